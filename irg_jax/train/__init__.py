"""Training: loss, optimiser and freezing, train state, the jitted step, checkpoints, metrics, the loop."""
