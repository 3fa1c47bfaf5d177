"""The compute of one peer: the policy, rollouts, the GRPO loss and step, the warm start, evaluation, the
state and checkpoints. Nothing here talks to the network; a solo run (solo.py) is all of it in a loop."""
