"""State, optimizer, the jitted train step, checkpoints, metrics and the generic loop."""
