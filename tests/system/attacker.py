"""``python tests/system/attacker.py ATTACK grpo-swarm-node-args...``: a real node that tells one lie.

It is the real ``grpo-swarm node`` with its SwarmPeer replaced by ``attacking(ATTACK, SwarmPeer)``: one
attack of the shared catalogue (node/bench/attacks.py) overriding one decision of the trainer. Everything
else (registration, admission, the all-reduce, serving round data) is the honest code.
"""

from __future__ import annotations

import sys

import node.peer.run
from node.bench.attacks import ATTACKS, attacking

if __name__ == "__main__":
    node.peer.run.SwarmPeer = attacking(ATTACKS[sys.argv[1]], node.peer.run.SwarmPeer)
    from cli.main import main

    sys.exit(main(["node", *sys.argv[2:]]))
