"""All-reduce among real peer processes on 127.0.0.1, including peers that die or freeze mid-round."""

import signal

import torch

from protocol.keys import ROUND_KEY_BITS
from tests.system.swarm.peer_worker import STATE_METADATA, state_tensors
from tests.system.swarm.rounds import (
    MARGIN,
    SHAPES,
    WEIGHTS,
    assert_all_agree_on_mean,
    run_agreed_round,
    run_round,
    saved,
    start_three,
)


def test_weighted_mean_of_three_peers_one_in_client_mode(swarm):
    peers, ready = start_three(swarm, "--client-mode", extra=("--target-group-size", "3"))
    for round_ in range(2):
        results = run_agreed_round(peers, round_, ready)
        assert_all_agree_on_mean(swarm, results, round_, WEIGHTS)


def check_failure_round_then_recovery(swarm, stop_signal):
    """Rank 2 freezes mid all-reduce in round 1 and gets ``stop_signal``; ranks 0 and 1 must finish round 1
    within their bounds without disagreeing, then average round 2 between themselves."""
    peers, ready = start_three(swarm, "--stall-at-round", "1")
    survivors, victim = peers[:2], peers[2]
    assert_all_agree_on_mean(swarm, run_agreed_round(peers, 0, ready), 0, WEIGHTS)

    for peer in peers:
        peer.send("average 1")
    victim.expect("stalled", ready["max_seconds"])
    victim.signal(stop_signal)
    results = [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in survivors]
    for result in results:
        assert result["seconds"] <= ready["max_seconds"] and result["inputs_unchanged"], result
    agreed = [rank for rank, result in enumerate(results) if result["ok"]]
    if agreed:  # whoever reports ok must hold the same tensors as every other peer reporting ok
        assert len({results[rank]["digest"] for rank in agreed}) == 1
        reference = saved(swarm, agreed[0], 1)
        for rank in agreed[1:]:
            assert all(torch.equal(a, b) for a, b in zip(saved(swarm, rank, 1), reference, strict=True))
    print(f"round with {stop_signal!r}: "
          f"{[(r['ok'], round(r['seconds'], 2), r['reason'], r['dropped']) for r in results]}")

    results = run_agreed_round(survivors, 2, ready)
    assert_all_agree_on_mean(swarm, results, 2, {rank: WEIGHTS[rank] for rank in (0, 1)})
    print(f"recovery round: {[round(r['seconds'], 2) for r in results]} s")


def test_peer_killed_mid_allreduce(swarm):
    check_failure_round_then_recovery(swarm, signal.SIGKILL)


def test_peer_frozen_mid_allreduce(swarm):
    check_failure_round_then_recovery(swarm, signal.SIGSTOP)


def test_shutdown_while_round_in_flight(swarm):
    first, ready = swarm.start("--rank", "0")
    (victim,) = swarm.start_joined(first, ready, ["--rank", "1", "--stall-at-round", "0"])
    first.send("average 0")
    victim.send("average 0")
    victim.expect("stalled", ready["max_seconds"])
    first.send("exit")
    result = first.expect("result", ready["max_seconds"] + MARGIN)
    assert not result["ok"] and result["inputs_unchanged"], result
    bye = first.expect("bye", MARGIN)
    assert bye["shutdown_seconds"] < MARGIN, bye
    print(f"shutdown in flight: {bye['shutdown_seconds']:.2f} s, round: {result['reason']}")


def test_late_joiner_loads_exact_state(swarm):
    first, ready = swarm.start("--rank", "0", "--serve-state")
    swarm.start_joined(first, ready, ["--rank", "1", "--serve-state"])
    (joiner,) = swarm.start_joined(first, ready, ["--rank", "2"])
    joiner.send(f"load_state 20 {first.ready['peer_id']}")
    state = joiner.expect("state", 20 + MARGIN)
    assert state["loaded"] and state["metadata"] == STATE_METADATA
    loaded = torch.load(swarm.directory / "rank2_state.pt")
    expected = state_tensors(SHAPES)
    assert len(loaded) == len(expected)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


def test_nobody_steps_on_a_non_finite_average_a_reducer_returns(swarm):
    """Rank 2 sends NaN back for the part it reduces: every member receives the same bytes (they would agree on
    them), and each refuses them before the step, names rank 2, and keeps its own tensors."""
    peers, ready = start_three(swarm, "--nan-reducer", extra=("--target-group-size", "3"))
    results = run_round(peers, 0, ready)
    grouped = [result for result in results if result["group_size"] == 3]
    assert grouped, [(result["failure"], result["reason"]) for result in results]
    liar = peers[2].ready["peer_id"]
    for result in grouped:
        assert not result["ok"] and result["failure"] == "non-finite", result["reason"]
        assert result["culprits"] == [liar], result  # named from the bytes on its own stream
    assert not any((swarm.directory / f"rank{rank}_round0.pt").exists() for rank in range(3))


def test_a_peer_at_another_round_never_joins_the_group(swarm):
    """Ranks 0 and 1 average round 5, rank 2 round 6: they look for groups under different keys, so ranks 0 and 1
    average between themselves and rank 2 costs them nothing."""
    peers, ready = start_three(swarm, extra=("--target-group-size", "3"))
    for _ in range(2):  # retried once, as in run_agreed_round
        results = run_round(peers, [5, 5, 6], ready)
        if results[0]["ok"] and results[1]["ok"]:
            break
    assert "mixed-rounds" not in {result["failure"] for result in results}, results
    assert results[2]["failure"] in ("alone", "allreduce") and results[2]["group_size"] <= 1, results[2]
    assert_all_agree_on_mean(swarm, results[:2], 5, {rank: WEIGHTS[rank] for rank in (0, 1)})


def test_a_group_that_mixes_rounds_exchanges_no_part(swarm):
    """Ranks 0 and 1 average round 5, rank 2 round 5 + 2**ROUND_KEY_BITS (the same matchmaking key: a peer far
    behind, or one that lies about its round): every member refuses the group before any part is sent, so no
    reducer reports, under its round, parts sent for another round (a verifier would read them as a lie about
    that round's commitment)."""
    peers, ready = start_three(swarm, extra=("--target-group-size", "3"))
    for rank, peer in enumerate(peers):
        peer.send(f"average {5 + (1 << ROUND_KEY_BITS) if rank == 2 else 5} seed=11")
    results = [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in peers]
    grouped = [result for result in results if result["group_size"] == 3]
    assert grouped, [(result["failure"], result["reason"]) for result in results]
    for result in grouped:
        assert result["failure"] == "mixed-rounds" and result["received"] == {}, result
        assert result["inputs_unchanged"], result
