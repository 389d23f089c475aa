"""Cluster launch: sbatch rendering, SLURM submission, multi-stage pipelines and the
validation of layouts and memory before anything is submitted."""
