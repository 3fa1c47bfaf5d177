"""``grpo-swarm``: the one console script, and the local-swarm launcher (``grpo-swarm simulate``).

It sits above the roles: a node (node/), a coordinator (coordinator/) and the tools around them all run
from here, so neither role imports the other's command line.
"""
