"""Peers that attack the protocol itself, in a real admitted swarm: a coordinator, 3 honest nodes and a
verifier (separate processes on 127.0.0.1), joined by one misbehaving node at a time (misbehaviours.py, run
by misbehaving.py): poisoned progress records and double votes, a state donor that lies with the highest
priority and progress far ahead, a reducer that returns NaN, forged agreement digests, a member that stalls in
the all-reduce.

For each: no honest process exits, the honest peers keep stepping (the rounds each one lost while the
misbehaving node ran are printed and bounded), nothing it did reached an honest peer's model, a reducer
that returned NaN is excluded by every honest peer at once, and a member that stalls is suspended by each.
During the lying donor's run a new honest node joins and loads the majority's state, not the liar's.
Held-out accuracy after CLEAN_ROUNDS rounds is no worse than a clean run's by more than ACCURACY_MARGIN.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest

from cli.local_swarm.processes import stop_groups
from cli.local_swarm.swarm import LocalSwarm, NodeProcess
from node.peer.coordinator_client import coordinator_status
from tests.system.admitted_swarm import HONEST, JOIN_TIMEOUT, describe, peer_id_of, start_honest_swarm
from tests.system.conftest import CLEAN_ROUNDS
from tests.system.misbehaviours import MISBEHAVIOURS
from tests.waiting import wait_for

MISBEHAVING = str(Path(__file__).with_name("misbehaving.py"))
WINDOW = 5  # honest rounds stepped while each misbehaving node runs, after it took part in a round
MAX_LOST = 3  # failed rounds an honest peer may lose to one misbehaving node
ACCURACY_MARGIN = 0.05
EXCLUDED = re.compile(r"excluding (\S+): (.*)")
SUSPENDED = re.compile(r"suspending (\S+) for")


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """Run every misbehaviour in turn on one swarm; returns {misbehaviour: outcome} with the swarm stopped."""
    swarm = start_honest_swarm(tmp_path_factory.mktemp("hardened"))
    outcomes = {}
    try:
        for name in MISBEHAVIOURS:
            outcomes[name] = run_misbehaviour(swarm, name)
        honest = swarm.nodes[:HONEST]
        outcomes["accuracy"] = wait_for(lambda: accuracies_at(honest, CLEAN_ROUNDS), JOIN_TIMEOUT,
                                        f"the honest peers' evaluation at round {CLEAN_ROUNDS}",
                                        explain=lambda: describe(swarm))
    finally:
        swarm.__exit__()
    return outcomes


def accuracies_at(nodes: list[NodeProcess], round_: int) -> list[float]:
    """Each node's held-out accuracy at ``round_``, or at the first round after it that it evaluated (a peer that
    resynced past ``round_`` evaluates where it landed); empty until every one of them has evaluated there."""
    found = [[r["accuracy"] for r in n.records("eval") if r["round"] >= round_] for n in nodes]
    return [values[0] for values in found] if all(found) else []


def node_log(node: NodeProcess) -> str:
    return (node.out_dir / "node.log").read_text(errors="replace")


def exclusions(node: NodeProcess) -> dict[str, str]:
    """{peer: why} the node excluded, from its log."""
    return {match[1]: match[2] for match in EXCLUDED.finditer(node_log(node))}


def suspensions(node: NodeProcess) -> set[str]:
    """The peers the node suspended, from its log."""
    return {match[1] for match in SUSPENDED.finditer(node_log(node))}


def failure_kind(record: dict) -> str:
    """A failed round's kind, with a disagreement only because a member published no digest told apart: that
    member failed its own all-reduce (under CI load a reducer's reply to one honest member can be late while the
    others finish), which is not members stepping on different results."""
    failure = record.get("failure") or ""
    if failure == "disagreement" and record.get("reason", "").startswith("no digest"):
        return "missing-digest"
    return failure


def run_misbehaviour(swarm: LocalSwarm, name: str) -> dict:
    """Run one misbehaving node until the honest peers stepped WINDOW rounds alongside it, and count what they
    lost meanwhile; the joiner of LiesAboutState joins after that count, while the liar still runs."""
    honest = swarm.nodes[:HONEST]
    attempts_before = [len(n.train_records()) for n in honest]
    misbehaving = swarm.add_node(f"misbehaving-{name}", entry=[MISBEHAVING, name])
    peer_id = peer_id_of(misbehaving)
    outcome: dict = {"peer_id": peer_id}
    try:
        wait_for(lambda: any(r.get("group_size", 0) > 1 for r in misbehaving.train_records())
                 or all(peer_id in exclusions(n) for n in honest), JOIN_TIMEOUT, f"a round {name} took part in",
                 explain=lambda: describe(swarm))
        stepped_at = [len(n.stepped_rounds()) for n in honest]
        wait_for(lambda: all(len(n.stepped_rounds()) >= at + WINDOW for n, at in zip(honest, stepped_at, strict=True)),
                 JOIN_TIMEOUT, f"{WINDOW} honest rounds alongside {name}", explain=lambda: describe(swarm))
        window = [n.train_records()[before:] for n, before in zip(honest, attempts_before, strict=True)]
        outcome["ban"] = next((p.ban_reason for p in coordinator_status(swarm.address).peers
                               if p.peer_id == peer_id and p.banned), None)
        if name == "LiesAboutState":
            outcome["joiner"] = join_while_a_donor_lies(swarm)
    finally:
        stop_groups([misbehaving.process])
    # the round its stop broke (it may have been in a group) ends before the next one's count begins
    stepped_at = [len(n.stepped_rounds()) for n in honest]
    wait_for(lambda: all(len(n.stepped_rounds()) > at for n, at in zip(honest, stepped_at, strict=True)),
             JOIN_TIMEOUT, f"an honest round after {name} stopped", explain=lambda: describe(swarm))
    outcome["lost"] = [sum(not r["stepped"] for r in records) for records in window]
    outcome["failures"] = sorted({failure_kind(r) for records in window for r in records if not r["stepped"]})
    outcome["alive"] = [n.process.poll() is None for n in honest]
    outcome["finite"] = all(math.isfinite(r["reward"]) and math.isfinite(r.get("grad_norm", 0.0))
                            for records in window for r in records if r["stepped"])
    outcome["excluded_by"] = [exclusions(n).get(peer_id) for n in honest]
    outcome["suspended_by"] = [peer_id in suspensions(n) for n in honest]
    outcome["honest_suspended"] = sorted(set().union(*map(suspensions, honest)) & set(map(peer_id_of, honest)))
    print(f"{name}: rounds lost per honest peer {outcome['lost']} ({', '.join(outcome['failures']) or 'none'}); "
          f"excluded by {sum(e is not None for e in outcome['excluded_by'])} of {HONEST}, "
          f"suspended by {sum(outcome['suspended_by'])}; honest peers suspended: {outcome['honest_suspended']}")
    return outcome


def join_while_a_donor_lies(swarm: LocalSwarm) -> dict:
    """A new honest node joins while the liar claims a round far ahead with a NaN state at the top priority."""
    joiner = swarm.add_node("joiner")
    try:
        wait_for(lambda: len(joiner.stepped_rounds()) >= 2, JOIN_TIMEOUT, "the joiner's rounds",
                 explain=lambda: describe(swarm))
        first = joiner.stepped_records()[0]
        honest_rounds = [n.stepped_rounds()[-1] for n in swarm.nodes[:HONEST]]
        return {"first_round": first["round"], "honest_round": max(honest_rounds),
                "finite": all(math.isfinite(r["reward"]) for r in joiner.stepped_records())}
    finally:
        stop_groups([joiner.process])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MISBEHAVIOURS))
def test_a_misbehaving_peer_neither_stops_nor_poisons_the_honest_swarm(hardened, name):
    outcome = hardened[name]
    assert all(outcome["alive"]), outcome
    assert outcome["finite"], outcome
    assert max(outcome["lost"]) <= MAX_LOST, outcome


@pytest.mark.slow
def test_a_reducer_that_returns_nan_is_excluded_by_every_honest_peer(hardened):
    outcome = hardened["ReturnsNaN"]
    assert all(why is not None and "non-finite" in why for why in outcome["excluded_by"]), outcome
    assert outcome["ban"] is not None and "non-finite" in outcome["ban"], outcome  # the honest peers reported it
    assert set(outcome["failures"]) <= {"non-finite", "allreduce", "missing-digest", "alone"}, outcome


@pytest.mark.slow
def test_a_member_that_stalls_in_the_all_reduce_is_suspended_by_every_honest_peer(hardened):
    outcome = hardened["StallsInAllReduce"]
    assert all(outcome["suspended_by"]), outcome
    assert set(outcome["failures"]) <= {"allreduce", "missing-digest", "alone"}, outcome


@pytest.mark.slow
def test_accuracy_stays_that_of_a_clean_run(hardened, clean_swarm):
    clean_nodes, _ = clean_swarm
    clean = statistics.fmean(accuracies_at(clean_nodes, CLEAN_ROUNDS))
    attacked = statistics.fmean(hardened["accuracy"])
    print(f"held-out accuracy at round {CLEAN_ROUNDS}: {attacked:.3f} with misbehaving peers, {clean:.3f} clean")
    assert attacked >= clean - ACCURACY_MARGIN


@pytest.mark.slow
def test_a_joiner_loads_the_majority_s_state_not_the_liar_s(hardened):
    outcome = hardened["LiesAboutState"]
    joiner = outcome["joiner"]
    # it started at the swarm's round (not 0, not the liar's far-ahead one) and stepped on finite values
    assert 0 < joiner["first_round"] <= joiner["honest_round"], joiner
    assert joiner["finite"], joiner
    assert all(why is None for why in outcome["excluded_by"]), outcome  # nobody even asked the liar
