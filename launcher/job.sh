# The body of every nemo_minitron SLURM job: sourced by launcher/<stage>.sbatch, inlined by
# `nemo-minitron launch`. Expects the bash arrays `cmd` (the per-task command) and
# `srun_args`; runs `srun "${srun_args[@]}" "${cmd[@]}"` with preemption-safe requeue.

# Rendezvous from the SLURM environment: rank = SLURM_PROCID, world = SLURM_NTASKS (read by
# nemo_minitron.parallel.runtime); the first node of the allocation hosts the store.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
# Threads per process: --cpus-per-task when the job names it, else the node's cores divided
# among its processes (a whole GPU node would otherwise run every process on 1 thread).
if [ -z "${SLURM_CPUS_PER_TASK:-}" ]; then
  tasks=${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}
  tasks=${tasks%%[!0-9]*}  # "2(x2)" forms
  per_task=$(( ${SLURM_CPUS_ON_NODE:-1} / ${tasks:-1} ))
  [ "$per_task" -ge 1 ] || per_task=1
  srun_args+=(--cpus-per-task="$per_task")
  export OMP_NUM_THREADS=$per_task
else
  export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun >= 22.05 no longer inherits it
fi
echo "[launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \
  "master $MASTER_ADDR:$MASTER_PORT threads/process $OMP_NUM_THREADS at $(date -Is)"

# A run that stops before its last step (a signal to any of its processes: the trainer saves
# a checkpoint and exits 75) must not count as a success, or the next stage (afterok) would
# start on a checkpoint that is not there. With --kill-on-bad-exit the first task to exit
# takes the others down, so srun's status is not theirs: each task leaves a flag on the
# shared file system when its command exits 75, before srun sees the exit. The wrapper traps
# USR1/TERM (SLURM signals the task's whole process group) so that it outlives the command.
stop_flag=${NM_JOB_DIR:-$PWD}/.stopped-$SLURM_JOB_ID
export NM_STOP_FLAG=$stop_flag
rm -f "$stop_flag"
wrap='trap : USR1 TERM; "$@"; rc=$?; [ "$rc" = 75 ] && : > "$NM_STOP_FLAG"; exit "$rc"'

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

srun "${srun_args[@]}" bash -c "$wrap" nemo-minitron-task "${cmd[@]}" &
srun_pid=$!
# `wait` returns early when the trap runs; keep waiting until the step has really ended.
while :; do
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ -e "$stop_flag" ]; then
  rm -f "$stop_flag"
  requeue=1
  echo "[launch] the run stopped before its last step (status 75)"
elif [ "$requeue" = 1 ] && [ "$rc" = 0 ]; then
  requeue=0  # the step finished before USR1 could stop it: nothing left to run
  echo "[launch] USR1 came, but the step finished its work"
fi

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
