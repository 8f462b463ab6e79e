"""Training: the run folder, the loop, checkpoints and resume, the lock, optimizers and EMA."""
