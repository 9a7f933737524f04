"""The scaling-law planner: pure functions from a compute budget and a cluster to a run's size and layout.

- `laws`: compute-optimal parameters and tokens (Chinchilla, Epoch AI refit, Llama 3), over-training targets,
  predicted loss.
- `flops`: parameters (dense, MoE, MLA) and FLOPs per token, and MFU defined on them.
- `hardware`: the device table (dense peaks, memory, links) and budgets from GPU-hours.
- `shape`: a Llama shape (or a fine-grained MoE) for a parameter target.
- `hparams`: batch size, learning rate, warm-up and schedule.
- `memory`, `steptime`: memory per GPU and step time of a layout.
- `search`, `planner`: the layouts that fit, and the whole plan; `emit` writes it as a Hydra config.
- `sweep`, `fit`: IsoFLOP sweeps and fitting your own law to them.
`python -m parallel.plan` runs the planner; `python -m parallel.plan.fit <dir>` fits a sweep.
"""
