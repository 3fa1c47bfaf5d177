"""The reducer's checks, binding reports and clipping, offline: hivemind's own part split fed to
CheckedPartReducer as the all-reduce feeds it (node/swarm/hivemind/offline.py)."""

import asyncio
import math

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

from node.bench.trust import ATTACKS, CLIP_FACTORS, binding_errors, bound_rows
from node.swarm.averaging import AllReduceOutcome, admitted_peer_ids
from node.swarm.binding import AllReduceReport, BindingKind, check_binding, check_groups
from node.swarm.clipping import clip_to_median, clipped_mean
from node.swarm.hivemind.codecs import make_compression
from node.swarm.hivemind.offline import simulate_allreduce
from node.swarm.hivemind.parts import part_offsets
from node.swarm.hivemind.reducer import CheckedPartReducer, ReduceRules, RefusedPart
from protocol import swarm_pb2
from protocol.sketch import sketch_flat, sketch_tensors

SHAPES = [(300, 100), (1000,), (7,)]
TOTAL = 31007
PART_BYTES = 2**14  # 4096 fp32 values a part: several parts per reducer
SEED = 77
TOLERANCE = {"none": 1e-5, "fp16": 1e-3}


def senders(count, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(count)]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def weighted_mean(vectors, weights):
    return sum(w * flat(v) for w, v in zip(weights, vectors, strict=True)) / sum(weights)


def reports_for(reports, sender):
    return [report[str(sender)] for report in reports if str(sender) in report]


async def reduce_in_order(reducer, parts_by_sender, weights):
    """Each sender's parts in order, all senders at once (as the all-reduce's streams arrive)."""
    async def send(sender):
        return [await reducer.accumulate_part(sender, index, part, weights[sender])
                for index, part in enumerate(parts_by_sender[sender])]
    return await asyncio.gather(*(send(sender) for sender in range(len(parts_by_sender))))


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_part_offsets_locate_every_part(compression):
    tensors = senders(1)[0]
    container = TensorPartContainer(tensors, (1.0, 0.0, 2.0, 1.0), compression=make_compression(compression),
                                    part_size_bytes=PART_BYTES)
    covered = []
    for peer in range(4):
        parts = container.get_raw_input_parts(peer)
        for offset, part in zip(part_offsets(tensors, parts), parts, strict=True):
            assert torch.equal(flat(tensors)[offset:offset + part.numel()], part.reshape(-1))
            covered.append((offset, part.numel()))
    assert [offset for offset, _ in covered] == [sum(n for _, n in covered[:i]) for i in range(len(covered))]
    assert sum(n for _, n in covered) == TOTAL
    with pytest.raises(ValueError, match="not a view"):
        part_offsets(tensors, [torch.zeros(3)])


def test_clip_off_is_hiveminds_arithmetic():
    inputs = senders(3)
    container = [TensorPartContainer(x, (1.0,), part_size_bytes=PART_BYTES).get_raw_input_parts(0) for x in inputs]
    shapes = tuple(part.shape for part in container[0])
    weights = [10.0, 25.0, 40.0]

    async def both():
        ours = CheckedPartReducer(shapes, 3, rules=ReduceRules(), part_offsets=part_offsets(inputs[0], container[0]))
        return (await reduce_in_order(TensorPartReducer(shapes, 3), container, weights),
                await reduce_in_order(ours, container, weights))

    theirs, ours = asyncio.run(both())
    assert all(torch.equal(a, b) for a, b in zip(theirs[0], ours[0], strict=True))


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_reports_cover_each_sender_and_add_up_to_its_sketch(compression):
    inputs, weights = senders(4), [10.0, 25.0, 40.0, 20.0]
    averaged, reports = simulate_allreduce(inputs, weights, ReduceRules(sketch_seed=SEED), compression, PART_BYTES)
    assert len(reports) == 4 and all(len(report) == 4 for report in reports)  # every reducer saw every sender
    for sender, tensors in enumerate(inputs):
        parts = reports_for(reports, sender)
        assert all(part.weight == weights[sender] for part in parts)
        assert check_binding(sketch_tensors(tensors, SEED).tolist(), weights[sender], parts, TOTAL,
                             TOLERANCE[compression]) is None
    scale = 1e-6 if compression == "none" else 2e-3
    assert float((averaged - weighted_mean(inputs, weights)).abs().max()) <= scale * 4


@pytest.mark.parametrize("lie", ["scaled", "sign-flipped", "one value changed"])
def test_a_gradient_other_than_the_committed_one_is_caught(lie):
    inputs, weights = senders(4), [10.0, 25.0, 40.0, 20.0]
    committed = sketch_tensors(inputs[3], SEED)
    sent = {"scaled": [2 * t for t in inputs[3]], "sign-flipped": [-t for t in inputs[3]],
            "one value changed": [inputs[3][0].clone().index_put_((torch.tensor(5), torch.tensor(7)),
                                                                  torch.tensor(30.0)), *inputs[3][1:]]}[lie]
    _, reports = simulate_allreduce([*inputs[:3], sent], weights, ReduceRules(sketch_seed=SEED), "none", PART_BYTES)
    problem = check_binding(committed.tolist(), weights[3], reports_for(reports, 3), TOTAL, TOLERANCE["fp16"])
    assert problem is not None and problem.kind == BindingKind.MISMATCH, problem
    for honest in range(3):
        assert check_binding(sketch_tensors(inputs[honest], SEED).tolist(), weights[honest],
                             reports_for(reports, honest), TOTAL, TOLERANCE["none"]) is None


def part_sketch(vector, offset, length, weight=3.0, sender="s"):
    return swarm_pb2.PartSketch(sender=sender, weight=weight, offset=offset, length=length,
                                sketch=sketch_flat(vector[offset:offset + length], offset, SEED).tolist())


def test_check_binding_tells_its_reasons_apart():
    vector = flat(senders(1)[0])
    committed = sketch_flat(vector, 0, SEED).tolist()
    spans = [(0, 10000), (10000, 15000), (25000, TOTAL - 25000)]
    parts = [part_sketch(vector, *span) for span in spans]
    assert check_binding(committed, 3.0, parts, TOTAL, 1e-5) is None
    assert check_binding(committed, 3.0, parts[::-1], TOTAL, 1e-5) is None  # order of reports does not matter
    cases = {
        BindingKind.WEIGHT: [parts[0], part_sketch(vector, *spans[1], weight=300.0), parts[2]],
        BindingKind.INCOMPLETE: [parts[0], parts[2]],
        BindingKind.INCONSISTENT: [parts[0], part_sketch(vector, 9000, 16000), parts[2]],
        BindingKind.MISMATCH: [parts[0], part_sketch(1.01 * vector, *spans[1]), parts[2]],
    }
    for reason, reports in cases.items():
        problem = check_binding(committed, 3.0, reports, TOTAL, 1e-5)
        assert problem is not None and problem.kind == reason, (reason, problem)
    assert check_binding(committed, 3.0, [], TOTAL, 1e-5).kind == BindingKind.INCOMPLETE
    assert check_binding(committed, 3.0, [*parts[:2], part_sketch(vector, 25000, TOTAL)], TOTAL,
                         1e-5).kind == BindingKind.INCONSISTENT  # a report past the end
    with pytest.raises(ValueError, match="several senders"):
        check_binding(committed, 3.0, [parts[0], part_sketch(vector, *spans[1], sender="t")], TOTAL, 1e-5)
    with pytest.raises(ValueError, match="tolerance"):
        check_binding(committed, 3.0, parts, TOTAL, 0.0)



def test_each_group_of_a_round_is_checked_on_its_own():
    """A failed attempt and its retry are two groups that split the gradient differently: together their
    reports overlap (no evidence), each alone must bind the sender, and evidence in either one counts."""
    vector = flat(senders(1)[0])
    committed = sketch_flat(vector, 0, SEED).tolist()
    first = [part_sketch(vector, 0, 20000), part_sketch(vector, 20000, TOTAL - 20000)]
    retry = [part_sketch(vector, 0, 12000), part_sketch(vector, 12000, TOTAL - 12000)]
    assert check_binding(committed, 3.0, first + retry, TOTAL, 1e-5).kind == BindingKind.INCONSISTENT
    assert check_groups(committed, 3.0, {b"first": first, b"retry": retry}, TOTAL, 1e-5) is None
    assert check_groups(committed, 3.0, {}, TOTAL, 1e-5) is None
    lied_once = {b"first": first[:1], b"retry": [retry[0], part_sketch(1.01 * vector, 12000, TOTAL - 12000)]}
    assert check_groups(committed, 3.0, lied_once, TOTAL, 1e-5).kind == BindingKind.MISMATCH
    other_weight = {b"a": first, b"b": [part_sketch(vector, 0, TOTAL, weight=4.0)]}
    assert check_groups(committed, 3.0, other_weight, TOTAL, 1e-5).kind == BindingKind.WEIGHT
    assert check_groups(committed, 3.0, {b"a": first[:1]}, TOTAL, 1e-5).kind == BindingKind.INCOMPLETE


def test_clipping_bounds_one_huge_sender():
    """clipping.py's bound: ||r - h|| <= s (c sqrt(sum_H ||x_i||^2) + ||h||) for any bad sender."""
    honest, weights = senders(3), [10.0, 25.0, 40.0, 20.0]
    h = weighted_mean(honest, weights[:3])
    share = weights[3] / sum(weights)
    bound = share * (4.0 * math.sqrt(sum(float(flat(x).norm()) ** 2 for x in honest)) + float(h.norm()))
    for bad in ([1000 * t for t in senders(1, seed=5)[0]], [-1e6 * t for t in honest[0]]):
        clipped, _ = simulate_allreduce([*honest, bad], weights, ReduceRules(clip_factor=4.0), "none", PART_BYTES)
        unclipped, _ = simulate_allreduce([*honest, bad], weights, ReduceRules(), "none", PART_BYTES)
        assert float((clipped - h).norm()) <= bound
        assert float((unclipped - h).norm()) > 100 * bound


def test_clipping_leaves_comparable_senders_alone():
    inputs, weights = senders(4), [10.0, 25.0, 40.0, 20.0]
    averaged, _ = simulate_allreduce(inputs, weights, ReduceRules(clip_factor=4.0), "none", PART_BYTES)
    assert float((averaged - weighted_mean(inputs, weights)).abs().max()) <= 1e-6


def test_clip_to_median_scales_only_the_outliers():
    parts = [torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((4,), 3.0), torch.full((4,), 300.0)]
    clipped = clip_to_median(parts, 2.0)  # lower median norm 4 (the part of 2s): limit 8
    assert all(torch.equal(a, b) for a, b in zip(clipped[:3], parts[:3], strict=True))
    assert math.isclose(float(clipped[3].norm()), 8.0, rel_tol=1e-6)
    assert torch.allclose(clipped_mean(parts, [1.0, 1.0, 1.0, 1.0], 2.0), (6.0 + 4.0) / 4 * torch.ones(4))
    with pytest.raises(ValueError):
        clip_to_median(parts, 0.0)
    with pytest.raises(ValueError):
        clipped_mean(parts, [1.0], 2.0)


def test_claimed_weight_is_capped_and_reported_as_claimed():
    inputs, claimed = senders(4), [10.0, 25.0, 40.0, 1e9]
    averaged, reports = simulate_allreduce(inputs, claimed, ReduceRules(sketch_seed=SEED, max_weight=50.0), "none",
                                           PART_BYTES)
    assert float((averaged - weighted_mean(inputs, [10.0, 25.0, 40.0, 50.0])).abs().max()) <= 1e-6
    problem = check_binding(sketch_tensors(inputs[3], SEED).tolist(), 20.0, reports_for(reports, 3), TOTAL, 1e-5)
    assert problem is not None and problem.kind == BindingKind.WEIGHT, problem


def bad_inputs():
    good = torch.ones(8)
    return {
        "wrong shape": ([torch.ones(9)], [1.0]),
        "float64": ([good.double()], [1.0]),
        "nan value": ([torch.tensor([1.0] * 7 + [math.nan])], [1.0]),
        "inf value": ([torch.tensor([1.0] * 7 + [math.inf])], [1.0]),
        "zero weight": ([good], [0.0]),
        "negative weight": ([good], [-1.0]),
        "nan weight": ([good], [math.nan]),
        "weight changed": ([good, good], [1.0, 2.0]),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_a_refused_part_leaves_the_other_senders_averaging(case):
    """The bad sender's part is refused before anything is counted; once the runner bans it, the honest
    senders' parts are averaged without it."""
    parts, weights = bad_inputs()[case]

    async def run():
        reducer = CheckedPartReducer((torch.Size([8]),) * 2, 3, rules=ReduceRules(sketch_seed=SEED),
                                     part_offsets=(0, 8))
        honest = [asyncio.create_task(reducer.accumulate_part(sender, index, torch.full((8,), float(sender + 1)),
                                                              weight=1.0))
                  for sender in (0, 1) for index in (0,)]
        with pytest.raises(RefusedPart):
            for index, (part, weight) in enumerate(zip(parts, weights, strict=True)):
                await reducer.accumulate_part(2, index, part, weight=weight)
        reducer.on_sender_failed(2)  # what the runner's ban does
        results = await asyncio.gather(*honest)
        return results, reducer.received

    results, received = asyncio.run(run())
    expected = torch.full((8,), 1.5) if case != "weight changed" else torch.full((8,), 4.0 / 3)
    assert all(torch.allclose(result, expected) for result in results), (case, results)
    assert received.get(2) is None or received[2].length == 8  # only the accepted first part was sketched


@pytest.mark.parametrize("rules", [dict(sketch_seed=-1), dict(sketch_seed=2**64), dict(sketch_seed=1.5),
                                   dict(clip_factor=-1.0), dict(clip_factor=math.inf), dict(clip_factor=math.nan),
                                   dict(max_weight=0.0), dict(max_weight=math.nan)])
def test_bad_reduce_rules_are_refused(rules):
    with pytest.raises(ValueError):
        ReduceRules(**rules)


def test_admitted_peer_ids_are_checked():
    assert admitted_peer_ids(None) is None
    assert {str(p) for p in admitted_peer_ids(["QmXyz", "QmAbc"])} == {"QmXyz", "QmAbc"}
    with pytest.raises(TypeError):
        admitted_peer_ids("QmXyz")
    for bad in ([""], ["Qm0OIl"], [42]):
        with pytest.raises(ValueError):
            admitted_peer_ids(bad)


def test_outcome_bindings_are_one_record_per_sender():
    parts = {sender: swarm_pb2.PartSketch(sender=sender, weight=1.0, offset=0, length=4, sketch=[0.5] * 4)
             for sender in ("b", "a")}
    bindings = AllReduceOutcome(report=AllReduceReport(b"g", ["a", "b"], parts)).bindings()
    assert [(b.group_id, [p.sender for p in b.parts]) for b in bindings] == [(b"g", ["a"]), (b"g", ["b"])]


def test_trust_bench_measures_small_vectors():
    inputs = senders(4)
    assert max(binding_errors(inputs, "none")) <= 1e-6
    rows = bound_rows(inputs[:3], [10.0, 25.0, 40.0], inputs[3], 20.0)
    assert {row["clip"] for row in rows} == set(CLIP_FACTORS) and len(rows) == len(CLIP_FACTORS) * len(ATTACKS)
    for row in rows:
        assert row["from_honest"] <= row["bound"], row
