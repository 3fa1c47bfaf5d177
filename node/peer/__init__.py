"""The trainer role in a swarm: its settings and session, what it decides each round (trainer.py), the round
with the all-reduce (swarm_peer.py), the node's loop (run.py), and its standing with the coordinator."""
