"""A coordinator's status of a sample run, and a real dashboard serving it on 127.0.0.1 (in this process)."""

import contextlib
import math
import time

from coordinator.dashboard.server import DashboardServer
from protocol import swarm_pb2 as pb

ROUNDS = 12
PEER_IDS = ["QmTrainerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1", "QmTrainerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2",
            "QmCheaterCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC3"]
BOOTSTRAP = "/ip4/127.0.0.1/tcp/31337/p2p/QmCoordinatorDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD"


def reward_at(r: int) -> float:
    return 0.2 + 0.05 * r


def make_reply(rounds: int = ROUNDS, now: float | None = None) -> pb.StatusReply:
    """A run of ``rounds`` rounds with an eval every 4th, two trainers and a banned cheater."""
    now = time.time() if now is None else now
    peers = [
        pb.PeerInfo(peer_id=PEER_IDS[0], address="/ip4/127.0.0.1/tcp/4001", role="trainer", rounds_contributed=12,
                    verdicts_passed=5, last_seen=now - 3, round=rounds - 1),
        pb.PeerInfo(peer_id=PEER_IDS[1], address="/ip4/127.0.0.1/tcp/4002", role="verifier", rounds_contributed=11,
                    verdicts_passed=4, last_seen=now - 7, round=rounds - 1),
        pb.PeerInfo(peer_id=PEER_IDS[2], address="/ip4/127.0.0.1/tcp/4003", role="trainer", rounds_contributed=3,
                    verdicts_passed=1, verdicts_failed=2, banned=True, last_seen=now - 400, round=3),
    ]
    infos = [pb.RoundInfo(round=r, reward=reward_at(r), accuracy=0.5 + 0.02 * r if r % 4 == 3 else math.nan,
                          allreduce_seconds=0.1 + 0.01 * r, peers=3 if r < 4 else 2) for r in range(rounds)]
    return pb.StatusReply(run_id="test-run", round=rounds, config_digest="ab" * 32, peers=peers, rounds=infos,
                          initial_peers=[BOOTSTRAP])


@contextlib.contextmanager
def serving_dashboard():
    """A dashboard serving whatever ``state["reply"]`` holds (an exception is raised); stopped on exit."""
    state = {"reply": make_reply()}

    def snapshot() -> pb.StatusReply:
        if isinstance(state["reply"], Exception):
            raise state["reply"]
        return state["reply"]

    server = DashboardServer(snapshot).start()
    try:
        yield server, state
    finally:
        server.stop()
