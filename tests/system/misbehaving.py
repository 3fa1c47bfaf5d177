"""``python tests/system/misbehaving.py NAME grpo-swarm-node-args...``: a real node that attacks the protocol.

The real ``grpo-swarm node`` with its SwarmPeer replaced by one of misbehaviours.py; everything else
(registration, admission, the all-reduce, serving round data) is the honest code.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, whose tests package this imports

import node.peer.run  # noqa: E402
from tests.system.misbehaviours import MISBEHAVIOURS  # noqa: E402

if __name__ == "__main__":
    node.peer.run.SwarmPeer = MISBEHAVIOURS[sys.argv[1]]
    from cli.main import main

    sys.exit(main(["node", *sys.argv[2:]]))
