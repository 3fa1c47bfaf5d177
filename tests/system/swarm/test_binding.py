"""Binding and bounding among real peer processes on 127.0.0.1 (docs/DESIGN.md "Trust" 4 and 5).

Four peers shared by the tests of this module: ranks 0-2 are honest reducers; rank 3 is in client
mode (it reduces nothing, so what it lies about reaches only honest reducers) and lies in some rounds.
Every peer commits to the sketch of its true inputs; the reducers' reports come back in the results.
"""

import math

import pytest
import torch

from node.swarm.binding import BindingKind, check_binding
from protocol import swarm_pb2
from tests.system.swarm.peer_worker import input_seed, make_tensors
from tests.system.swarm.rounds import MARGIN, SHAPES, WEIGHTS, assert_all_agree_on_mean, saved, weighted_mean

SEED = 123456789
TOTAL = sum(math.prod(shape) for shape in SHAPES)
ALL_WEIGHTS = {**WEIGHTS, 3: 20}
TOLERANCE = 1e-5  # compression "none": only float32 rounding of the sketches
CLIP = 4.0
MAX_WEIGHT = 50.0


@pytest.fixture(scope="module")
def peers(module_swarm):
    first, ready = module_swarm.start("--rank", "0", "--weight", str(ALL_WEIGHTS[0]))
    others = module_swarm.start_joined(first, ready, *(["--rank", str(rank), "--weight", str(ALL_WEIGHTS[rank])]
                                                       for rank in (1, 2)),
                                       ["--rank", "3", "--weight", str(ALL_WEIGHTS[3]), "--client-mode"])
    peers = [first, *others]
    return peers, [peer.ready["peer_id"] for peer in peers], ready


def run(peers, ready, round_, honest_options, attacker_options=None):
    """Rank 3 takes ``attacker_options`` instead of ``honest_options`` when given."""
    for rank, peer in enumerate(peers):
        options = attacker_options if rank == 3 and attacker_options is not None else honest_options
        peer.send(f"average {round_} seed={SEED} {options}")
    return [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in peers]


def binding_problem(results, ids, sender):
    """check_binding for ``sender`` against the reports of every member, as a verifier would run it."""
    reports = [swarm_pb2.PartSketch(sender=ids[sender], **result["received"][ids[sender]])
               for result in results if ids[sender] in result["received"]]
    return check_binding(results[sender]["committed"], float(ALL_WEIGHTS[sender]), reports, TOTAL, TOLERANCE)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def honest_pull_bound(round_):
    """clipping.py's bound on ||avg - h||, h the honest ranks' mean, for one bad sender of weight share s."""
    honest = {rank: WEIGHTS[rank] for rank in (0, 1, 2)}
    h = flat(weighted_mean(round_, honest))
    norms = [float(flat(make_tensors(input_seed(rank, round_), SHAPES)).norm()) for rank in honest]
    share = ALL_WEIGHTS[3] / sum(ALL_WEIGHTS.values())
    return h, share * (CLIP * math.sqrt(sum(n * n for n in norms)) + float(h.norm()))


def test_reports_cover_each_sender_and_add_up_to_its_sketch(peers, module_swarm):
    peers, ids, ready = peers
    results = run(peers, ready, 0, f"max_weight={MAX_WEIGHT}")
    assert_all_agree_on_mean(module_swarm, results, 0, ALL_WEIGHTS)  # clip off: the exact weighted mean
    assert len({result["group_id"] for result in results}) == 1 and results[0]["group_id"]
    assert all(sorted(result["members"]) == sorted(ids) for result in results)
    assert results[3]["received"] == {}  # client mode: reduces nothing
    for rank in range(3):
        assert set(results[rank]["received"]) == set(ids), rank  # each reducer saw every sender
    for sender in range(4):
        assert binding_problem(results, ids, sender) is None, sender


def test_a_scaled_gradient_is_caught_and_clipping_bounds_its_pull(peers, module_swarm):
    peers, ids, ready = peers
    h, bound = {}, {}
    for round_, clip in ((1, CLIP), (2, 0.0)):
        options = f"clip={clip} max_weight={MAX_WEIGHT}"
        results = run(peers, ready, round_, options, f"{options} scale=100")
        assert all(result["ok"] for result in results), [result["reason"] for result in results]
        problem = binding_problem(results, ids, 3)
        assert problem is not None and problem.kind == BindingKind.MISMATCH, problem
        assert all(binding_problem(results, ids, sender) is None for sender in range(3))
        h[round_], bound[round_] = honest_pull_bound(round_)
        pulled = float((flat(saved(module_swarm, 0, round_)) - h[round_]).norm())
        print(f"clip {clip}: ||avg - h|| / ||h|| = {pulled / float(h[round_].norm()):.3g}, "
              f"bound {bound[round_] / float(h[round_].norm()):.3g}; {problem}")
        if clip:
            assert pulled <= bound[round_]
        else:
            assert pulled > 10 * bound[round_]  # what clipping prevented


def test_an_inflated_weight_is_capped_and_caught(peers, module_swarm):
    peers, ids, ready = peers
    results = run(peers, ready, 3, f"max_weight={MAX_WEIGHT}", "weight=1000")  # its own host would refuse 1000
    assert_all_agree_on_mean(module_swarm, results, 3, {**ALL_WEIGHTS, 3: MAX_WEIGHT})
    problem = binding_problem(results, ids, 3)
    assert problem is not None and problem.kind == BindingKind.WEIGHT, problem
