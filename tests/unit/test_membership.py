"""A peer's heartbeats as the coordinator answers them (node/peer/membership.py), and the bound on the rounds
they may name (coordinator/swarm_round.py): a heartbeat of a round the coordinator has not seen the swarm reach
waits, one it refuses outright is dropped instead of holding back every later one, and exclusions go with the
first heartbeat delivered."""

from __future__ import annotations

import time

import grpc

from coordinator.swarm_round import median_round
from node.peer.coordinator_client import CoordinatorError
from node.peer.membership import Membership
from protocol import swarm_pb2


class Coordinator:
    """Stands in for CoordinatorClient: refuses the rounds in ``refusals`` with their code, records the rest."""

    def __init__(self, refusals: dict[int, grpc.StatusCode]):
        self.refusals, self.delivered, self.role = refusals, [], "trainer"
        self.token = swarm_pb2.AccessToken(issued_at=time.time(), expires_at=time.time() + 600)

    def expires_in(self) -> float:
        return self.token.expires_at - time.time()

    def heartbeat(self, round_, digest, metrics, exclusions=()):
        if round_ in self.refusals:
            raise CoordinatorError(f"refused round {round_}", self.refusals[round_])
        self.delivered.append((round_, [e.peer_id for e in exclusions]))
        return swarm_pb2.HeartbeatReply(round=round_)


def membership_with(refusals: dict[int, grpc.StatusCode]) -> tuple[Membership, Coordinator]:
    coordinator = Coordinator(refusals)
    membership = Membership(coordinator)
    for round_ in range(4):
        membership.report(round_, "digest", {"reward": 0.5})
    return membership, coordinator


def test_a_refused_heartbeat_is_dropped_and_the_later_ones_go_on():
    membership, coordinator = membership_with({1: grpc.StatusCode.INVALID_ARGUMENT})
    membership.report_exclusion("QmLiar", 2, "returned a non-finite average in round 2")
    membership._tick()
    assert coordinator.delivered == [(0, ["QmLiar"]), (2, []), (3, [])]
    assert not membership._pending and not membership._exclusions


def test_a_verifier_keeps_no_exclusions_to_report():
    membership, coordinator = membership_with({})
    coordinator.role = "verifier"
    membership.report_exclusion("QmLiar", 2, "served another state than it published")
    assert not membership._exclusions


def test_a_heartbeat_past_the_swarm_waits_and_goes_once_the_coordinator_takes_it():
    membership, coordinator = membership_with({2: grpc.StatusCode.FAILED_PRECONDITION})
    membership._tick()
    assert [round_ for round_, _ in coordinator.delivered] == [0, 1]
    assert sorted(membership._pending) == [2, 3]
    coordinator.refusals.clear()  # the coordinator has read the swarm's progress since
    membership._tick()
    assert [round_ for round_, _ in coordinator.delivered] == [0, 1, 2, 3]


def test_the_lower_median_of_progress_rounds_is_an_honest_round_while_fewer_than_half_lie():
    honest = [40, 41, 41]
    for liars in range(3):  # 0, 1 or 2 liars far ahead among 3 honest identities
        rounds = honest + [10**9] * liars
        assert median_round(rounds) in honest
    assert median_round([7]) == 7
    assert median_round([5, 10**9, 10**9]) == 10**9  # a majority of liars is outside the threat model
