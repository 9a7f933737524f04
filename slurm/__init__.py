"""Slurm launching: sbatch scripts rendered from the run config (render), submission with stage chains and data
job arrays (submit), job status (status), and a real single-node Slurm for tests (testing/start.sh, stop.sh).
The job side of preemption (checkpoint, requeue, exit) is train/signals.py. Entry point: `python -m slurm`."""
