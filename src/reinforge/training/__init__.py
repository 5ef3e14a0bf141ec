"""Training loops (offline preference, online RL), optimiser/scheduler, metrics, checkpoints."""
