"""Training: the Hydra entry point (`python -m train`), config schema, stage loop, checkpoints, logging, report."""
