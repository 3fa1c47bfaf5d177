"""The peer: model loading, rollouts, the GRPO step, swarm averaging, and the CLI."""
