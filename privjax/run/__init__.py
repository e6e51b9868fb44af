"""The run: workload, training loop, evaluation, reports, checkpoints."""
