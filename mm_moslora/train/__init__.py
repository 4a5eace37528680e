"""Training: flags, DeepSpeed config filling, checkpoints with exact resume, and the two-stage recipe."""
