"""A member that failed to deliver is kept out of this peer's groups for a while, twice as long each time; a peer
that saw most of its group fail it blames nobody (node/peer/suspensions.py)."""

from node.peer.suspensions import Suspensions


def attempts_suspended(suspensions: Suspensions, peer: str, horizon: int = 100) -> int:
    """Run ``horizon`` attempts; how many of them kept ``peer`` out."""
    kept_out = 0
    for _ in range(horizon):
        suspensions.next_attempt()
        kept_out += peer in suspensions.current()
    return kept_out


def test_a_member_that_dropped_is_suspended_for_a_while_then_twice_as_long():
    suspensions = Suspensions("me", first=4)
    suspensions.next_attempt()
    suspensions.blame(["griefer"], ["me", "griefer", "a", "b"], round_=7)
    assert suspensions.current() == {"griefer"}
    assert attempts_suspended(suspensions, "griefer") == 4
    suspensions.blame(["griefer"], ["me", "griefer", "a", "b"], round_=30)
    assert attempts_suspended(suspensions, "griefer") == 8
    assert suspensions.current() == set()


def test_a_peer_that_most_of_its_group_failed_blames_nobody():
    suspensions = Suspensions("me")
    suspensions.next_attempt()
    suspensions.blame(["a", "b"], ["me", "a", "b", "c"], round_=3)  # 2 of 3 others: this peer's own trouble
    suspensions.blame(["a"], ["me", "a"], round_=3)  # a pair: no telling whose fault it was
    assert suspensions.current() == set()
    suspensions.blame(["a"], ["me", "a", "b"], round_=3)
    assert suspensions.current() == {"a"}
