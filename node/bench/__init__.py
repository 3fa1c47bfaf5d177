"""Benchmarks (``grpo-swarm bench ...``): tables with ratios against a baseline measured in the same run.

- grpo.py: rollout tokens/s and GRPO step time next to TRL's GRPOTrainer;
- allreduce.py: the all-reduce among local peer processes next to the loopback bound;
- trust.py: binding error per compression, and how far one bad sender moves the average;
- verifier.py: an audit's cost next to the contribution's, false positives, and the attack catalogue
  (attacks.py, shared with the adversarial system test) caught offline.
"""
