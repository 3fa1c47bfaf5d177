"""Swarm primitives on top of hivemind: joining the DHT, compression, and a gradient all-reduce whose
result every member of the group verifiably agrees on."""
