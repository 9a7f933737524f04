"""The scaling-law planner: pure functions from a compute budget and a cluster to a run's size and layout.

- `laws`: compute-optimal parameters and tokens (Chinchilla, Epoch AI refit, Llama 3), over-training targets,
  predicted loss, budgets from GPU-hours.
- `flops`: parameters and FLOPs per token of an architecture, and MFU defined on them.
"""
