# The body of every nemo_minitron SLURM job: sourced by launcher/<stage>.sbatch, inlined by
# `nemo-minitron launch`. Expects the bash arrays `cmd` (the per-task command) and
# `srun_args`; runs `srun "${srun_args[@]}" "${cmd[@]}"` with preemption-safe requeue.

# Rendezvous from the SLURM environment: rank = SLURM_PROCID, world = SLURM_NTASKS (read by
# nemo_minitron.parallel.runtime); the first node of the allocation hosts the store.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "[launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \
  "master $MASTER_ADDR:$MASTER_PORT at $(date -Is)"

# Preemption / time limit: SLURM sends USR1 to this shell (--signal=B:USR1@...). Forward it
# to the srun step; the trainer saves a checkpoint at the end of its current step and exits;
# then the job requeues itself and the same command resumes from that checkpoint.
requeue=0
srun_pid=
forward_usr1() {
  requeue=1
  echo "[launch] USR1: asking the trainer to checkpoint and stop at $(date -Is)"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap forward_usr1 USR1

srun "${srun_args[@]}" "${cmd[@]}" &
srun_pid=$!
# `wait` returns early when the trap runs; keep waiting until the step has really ended.
while :; do
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

# Requeue after USR1 even when the step failed: a signal that came before the trainer was
# listening kills it, and the next run resumes from the latest complete checkpoint anyway.
if [ "$requeue" = 1 ]; then
  echo "[launch] step exited with status $rc; requeueing job $SLURM_JOB_ID at $(date -Is)"
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60  # scontrol requeue ends this script; never report success before it does
  exit 1
fi
echo "[launch] step exited with status $rc at $(date -Is)"
exit "$rc"
