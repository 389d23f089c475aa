# The interpreter of the plain launcher/<stage>.sbatch scripts, in this order: $PYTHON; the
# checkout's .venv (what scripts/setup creates; the job's PATH may not have it activated); the
# interpreter behind `nemo-minitron` on PATH; python3.
launcher_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${PYTHON:-}" ]; then
  python=$PYTHON
elif [ -x "$launcher_dir/../.venv/bin/python" ]; then
  python=$launcher_dir/../.venv/bin/python
elif entry=$(command -v nemo-minitron) && head -c 2 "$entry" | grep -q '#!'; then
  python=$(head -n 1 "$entry" | cut -c 3- | cut -d' ' -f1)
else
  python=python3
fi
