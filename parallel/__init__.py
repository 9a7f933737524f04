"""Parallelism: the validated `ParallelLayout`, process groups and engine set-up, and the CPU shims megatron-core needs."""
