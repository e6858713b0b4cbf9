"""Training every member at once: the multi-exit objective, schedules, loop, checkpoints."""
