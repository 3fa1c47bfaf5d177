"""The local swarm: ``grpo-swarm simulate`` and the harness of the system tests (processes, swarm, simulate)."""
