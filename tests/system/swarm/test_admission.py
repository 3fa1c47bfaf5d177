"""Admission on the averaging RPCs, among real peer processes on 127.0.0.1.

Four peers, shared by the tests of this module: ranks 0-2 admit each other; rank 3 is an outsider that
admits anyone, serves a state that says round 99 and declares the highest state priority (a joiner
asking it first would take that state).
"""

import time

import pytest

from tests.system.swarm.peer_worker import STATE_METADATA
from tests.system.swarm.rounds import MARGIN, WEIGHTS, assert_all_agree_on_mean, run_agreed_round, run_round

OUTSIDER_STATE_ROUND = 99
LEADER_HEAD_START = 1.0  # seconds; the peer that starts matchmaking first leads the group


@pytest.fixture(scope="module")
def peers(module_swarm):
    first, ready = module_swarm.start("--rank", "0", "--weight", str(WEIGHTS[0]), "--serve-state")
    others = module_swarm.start_joined(
        first, ready,
        ["--rank", "1", "--weight", str(WEIGHTS[1]), "--serve-state"],
        ["--rank", "2", "--weight", str(WEIGHTS[2])],
        ["--rank", "3", "--weight", "20", "--serve-state", "--state-round", str(OUTSIDER_STATE_ROUND)],
    )
    peers = [first, *others]
    return peers, [peer.ready["peer_id"] for peer in peers], ready


def admit(peer, peer_ids):
    peer.send(f"admit {','.join(peer_ids) if peer_ids is not None else 'all'}")
    peer.expect("admitted", MARGIN)


def test_an_outsider_cannot_join_a_group_or_download_state(peers, module_swarm):
    peers, ids, ready = peers
    for peer in peers[:3]:
        admit(peer, ids[:3])
    admit(peers[3], None)

    results = run_round(peers, 0, ready)
    assert_all_agree_on_mean(module_swarm, results[:3], 0, WEIGHTS)
    assert not results[3]["ok"], results[3]
    assert all(ids[3] not in result["members"] for result in results[:3])

    peers[3].send(f"load_state 10 {ids[0]}")  # rank 0 serves no outsider
    assert not peers[3].expect("state", 10 + MARGIN)["loaded"]
    peers[2].send(f"load_state 10 {ids[3]}")  # nor does rank 2 download from one
    assert not peers[2].expect("state", 10 + MARGIN)["loaded"]
    peers[2].send(f"load_state 20 {ids[0]}")
    state = peers[2].expect("state", 20 + MARGIN)
    assert state["loaded"] and state["metadata"] == STATE_METADATA, state


def test_a_group_with_a_peer_one_member_does_not_admit_fails(peers):
    """Rank 1 no longer admits rank 2, rank 0 (the leader) still does: rank 1 refuses the round."""
    peers, ids, ready = peers
    admit(peers[0], ids[:3])
    admit(peers[1], ids[:2])
    admit(peers[2], ids[:3])
    peers[0].send("average 1 seed=5")
    time.sleep(LEADER_HEAD_START)
    for peer in peers[1:3]:
        peer.send("average 1 seed=5")
    results = [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in peers[:3]]
    assert sorted(results[1]["members"]) == sorted(ids[:3]), results[1]
    assert not results[1]["ok"] and ids[2] in results[1]["reason"] and "not admitted" in results[1]["reason"]
    assert not results[0]["ok"] and not results[2]["ok"], results  # a member refused: no one holds a result
    for rank in (0, 2):  # a failed round still reports what each reducer received (evidence)
        assert results[rank]["members"] == results[1]["members"] and {ids[0], ids[2]} <= set(results[rank]["received"])
    print(f"reasons: {[result['reason'] for result in results]}")


def test_a_banned_peer_is_out_of_the_next_round(peers, module_swarm):
    """Rank 2, banned by ranks 0 and 1 but unaware of it, starts matchmaking first: it would lead their
    group if they asked it to."""
    peers, ids, ready = peers
    for peer in peers[:2]:
        admit(peer, ids[:2])
    admit(peers[2], ids[:3])
    peers[2].send("average 2")
    time.sleep(LEADER_HEAD_START)
    for peer in peers[:2]:
        peer.send("average 2")
    results = [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in peers[:3]]
    assert_all_agree_on_mean(module_swarm, results[:2], 2, {rank: WEIGHTS[rank] for rank in (0, 1)})
    assert not results[2]["ok"], results[2]

    for peer in peers[:2]:
        admit(peer, ids[:3])  # unbanned: back in the next round
    results = run_agreed_round(peers[:3], 3, ready)
    assert_all_agree_on_mean(module_swarm, results, 3, WEIGHTS)
