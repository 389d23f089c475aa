#!/bin/bash
# Rendered by `nemo-minitron launch`; every value below was shell-quoted when rendered.
@@SBATCH@@
set -uo pipefail

cmd=(@@COMMAND@@)
srun_args=(@@SRUN_ARGS@@)
export NM_JOB_DIR=@@JOB_DIR@@

@@JOB@@
