"""The training engine every task shares: run directory, loop, checkpoints and resume."""
