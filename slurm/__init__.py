"""Slurm launching: sbatch rendered from the run config, submission, requeue on signal, sweeps.

Not built yet (its own issue). Today a multi-node run is `srun torchrun ... -m train <overrides>`: the Hydra app
runs the rank it is given under torchrun, and the deterministic run dir lets a requeued job resume.
"""
