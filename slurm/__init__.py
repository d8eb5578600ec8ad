"""cirlab.slurm: the sbatch templates `cirlab slurm submit` renders (package data; see slurm/README.md)."""
