"""Per-unit gradient sketches, the contribution body and the rollout bundle (build and strict parse)."""

import json
import struct

import pytest
import torch
from safetensors.torch import save

from node.peer.contribution import gradient_norm, make_contribution
from node.train.learner import Learner, audit_units
from node.train.shard import shard_batch
from node.train.warm_start import warm_started_policy
from node.verify.recompute import unit_gradient
from protocol import sketch
from protocol.bundle import BUNDLE_TENSORS, BundleError, read_bundle, rollout_digest
from protocol.config import load_config
from protocol.sketch import SKETCH_DIM, cosine, relative_error, sketch_seed, sketch_tensors
from protocol.tasks import load_task

# A short warm start on 1-digit sums: rewards vary within groups, so gradients are not zero.
SMALL = ["warm_start.steps=120", "task.options={digits=1}", "rollout.questions_per_peer=8",
         "rollout.group_size=4", "trust.audit_units=4"]


@pytest.fixture(scope="module")
def setup():
    config = load_config(overrides=SMALL)
    task = load_task(config.task.name, config.task.options)
    learner = Learner(warm_started_policy(config, task), config, task)
    batch = shard_batch(learner, config, task, 3, "peer-a")
    assert batch.advantages.abs().sum() > 0
    return config, task, learner, batch


def with_micro_batch(learner, size):
    config = learner.config
    learner.config = config.updated(optim={"micro_batch_size": size})
    return config


def test_audit_units_are_whole_groups():
    assert audit_units(32 * 8, 8, 8) == [slice(k * 32, (k + 1) * 32) for k in range(8)]
    assert audit_units(5 * 4, 4, 2) == [slice(0, 8), slice(8, 20)]
    assert audit_units(3 * 4, 4, 8) == [slice(0, 4), slice(4, 8), slice(8, 12)]  # fewer groups than units


@pytest.mark.parametrize("micro_batch_size", [0, 3, 8, 100])
def test_unit_sketches_add_up_without_changing_the_gradient(setup, micro_batch_size):
    config, _, learner, batch = setup
    with_micro_batch(learner, micro_batch_size)
    try:
        seed = sketch_seed(config.run.seed, 3)
        sketched = learner.gradient(batch, 0, sketch_seed=seed)
        plain = learner.gradient(batch)
    finally:
        learner.config = config
    assert sketched.weight == plain.weight and sketched.sketch_seed == seed and plain.unit_sketches is None
    for a, b in zip(sketched.tensors, plain.tensors, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert sketched.unit_sketches.shape == (4, SKETCH_DIM)
    assert all(float(s.norm()) > 0 for s in sketched.unit_sketches)
    whole = sketch_tensors(sketched.tensors, seed)
    assert relative_error(sketched.unit_sketches.sum(0), whole) < 1e-5


def test_a_unit_recomputed_alone_gives_its_committed_sketch(setup):
    config, _, learner, batch = setup
    seed = sketch_seed(config.run.seed, 3)
    gradient = learner.gradient(batch, 0, sketch_seed=seed)
    for u, rows in enumerate(learner.audit_units(batch.mask.shape[0])):
        unit = unit_gradient(learner, batch, rows, seed)
        assert cosine(unit.sketch, gradient.unit_sketches[u]) > 1 - 1e-9
        assert relative_error(unit.sketch, gradient.unit_sketches[u]) < 1e-6
        mask = batch.rollouts.completion_mask[rows].bool()
        assert (unit.logps - batch.rollouts.sampling_logps[rows])[mask].abs().max() < 1e-4
        assert unit.entropy.shape == unit.logps.shape and (unit.surprisal_variance >= 0).all()
    assert all(p.grad is None for p in learner.params)  # the audit leaves no gradient behind


def test_contribution_commits_to_the_bundle(setup):
    config, _, learner, batch = setup
    gradient = learner.gradient(batch, 0, sketch_seed=sketch_seed(config.run.seed, 3))
    body, bundle = make_contribution(config, 3, "peer-a", batch, gradient, "d" * 64)
    assert body.rollout_digest == rollout_digest(bundle)
    assert list(body.question_ids) == [q.index for q in batch.questions]
    assert body.peer_id == "peer-a" and body.model_digest == "d" * 64
    assert body.token_count == gradient.weight == float(batch.mask.sum())
    assert body.mean_reward == pytest.approx(float(batch.rewards.mean()))
    assert body.grad_norm == pytest.approx(float(torch.cat([t.flatten() for t in gradient.tensors]).double().norm()))
    assert len(body.sketch) == SKETCH_DIM
    assert relative_error(torch.tensor(body.sketch), gradient.unit_sketches.sum(0)) < 1e-6
    assert body.ByteSize() < 4096
    parsed = read_bundle(bundle)
    assert (parsed.round, parsed.peer_id) == (3, "peer-a")
    r = batch.rollouts
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logps", "truncated"):
        assert torch.equal(getattr(parsed, name), getattr(r, name)), name
    assert torch.equal(parsed.rewards, batch.rewards)
    assert torch.equal(parsed.unit_sketches, gradient.unit_sketches)
    assert gradient_norm(gradient.tensors) == body.grad_norm


def test_contribution_needs_the_rounds_unit_sketches(setup):
    config, _, learner, batch = setup
    with pytest.raises(ValueError, match="unit sketches with the round's seed"):
        make_contribution(config, 3, "peer-a", batch, learner.gradient(batch), "d")
    wrong_round = learner.gradient(batch, 0, sketch_seed=sketch_seed(config.run.seed, 4))
    with pytest.raises(ValueError, match="round's seed"):
        make_contribution(config, 3, "peer-a", batch, wrong_round, "d")


@pytest.fixture(scope="module")
def bundle_tensors(setup):
    config, _, learner, batch = setup
    gradient = learner.gradient(batch, 0, sketch_seed=sketch_seed(config.run.seed, 3))
    _, bundle = make_contribution(config, 3, "peer-a", batch, gradient, "d")
    parsed = read_bundle(bundle)
    return {name: getattr(parsed, name) for name in BUNDLE_TENSORS}


def rebuilt(tensors, metadata=None, **changes):
    tensors = {**tensors, **changes}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    return save(tensors, metadata=metadata or {"format": "grpo-swarm/rollouts/v1", "round": "3", "peer_id": "p"})


def test_bundle_round_trips(bundle_tensors):
    assert read_bundle(rebuilt(bundle_tensors)).peer_id == "p"


@pytest.mark.parametrize("change, message", [
    (dict(rewards=None), r"missing \['rewards'\]"),
    (dict(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
    (dict(rewards=torch.zeros(32, dtype=torch.float64)), "rewards: torch.float64 of rank 1, expected torch.float32"),
    (dict(completion_ids=torch.zeros(32, 3, 1, dtype=torch.int64)), "completion_ids: .* rank 3, expected .* rank 2"),
    (dict(truncated=torch.zeros(31, dtype=torch.bool)), r"truncated: shape \(31,\), expected \(32,\)"),
    (dict(question_ids=torch.zeros(5, dtype=torch.int64)), "32 rows do not split into groups for 5 questions"),
    (dict(unit_sketches=torch.zeros(9, SKETCH_DIM, dtype=torch.float64)), r"unit_sketches: shape \(9, 256\)"),
    (dict(unit_sketches=torch.zeros(2, 7, dtype=torch.float64)), r"unit_sketches: shape \(2, 7\)"),
    (dict(completion_mask=torch.full((32, 1), 2, dtype=torch.int64),
          completion_ids=torch.zeros(32, 1, dtype=torch.int64), sampling_logps=torch.zeros(32, 1)),
     "completion_mask: values other than 0 and 1"),
    (dict(question_ids=torch.full((8,), -1, dtype=torch.int64)), "question_ids: negative ids"),
    (dict(rewards=torch.full((32,), float("nan"))), "rewards: values that are not finite"),
])
def test_malformed_bundles_are_one_clear_error(bundle_tensors, change, message):
    with pytest.raises(BundleError, match=message):
        read_bundle(rebuilt(bundle_tensors, **change))


def test_bytes_that_are_not_a_bundle(bundle_tensors):
    good = rebuilt(bundle_tensors)
    with pytest.raises(BundleError, match="not bytes"):
        read_bundle(bytearray(good))
    with pytest.raises(BundleError, match="over the 100-byte limit"):
        read_bundle(good, max_bytes=100)
    for data in (b"", b"garbage", good[:-5], struct.pack("<Q", 1 << 40) + b"{}"):
        with pytest.raises(BundleError, match="not a safetensors file"):
            read_bundle(data)
    with pytest.raises(BundleError, match="format None"):
        read_bundle(save(bundle_tensors))
    with pytest.raises(BundleError, match="needs a round and a peer id"):
        read_bundle(rebuilt(bundle_tensors, {"format": "grpo-swarm/rollouts/v1", "round": "-1", "peer_id": "p"}))
    header = json.dumps({"__metadata__": {"format": "grpo-swarm/rollouts/v1"}}).encode()
    with pytest.raises(BundleError, match="missing"):
        read_bundle(struct.pack("<Q", len(header)) + header)


def test_cached_sketch_hashes_give_the_same_sketch_within_a_memory_bound():
    values = torch.randn(sketch.CHUNK + 1000, generator=torch.Generator().manual_seed(0))
    cache = sketch._SignedBucketCache(capacity=sketch.CHUNK * 4)  # room for one chunk of int32 buckets
    uncached = sketch._SignedBucketCache(capacity=0)
    for seed in (1, 2, 1):
        expected = torch.zeros(2 * SKETCH_DIM, dtype=torch.float64)
        for chunk, piece in enumerate(values.split(sketch.CHUNK)):
            buckets, signs = sketch._chunk_hashes(seed, chunk, SKETCH_DIM)
            expected[:SKETCH_DIM].index_add_(0, buckets[:piece.numel()], piece.double() * signs[:piece.numel()])
            assert torch.equal(cache.get(seed, chunk, SKETCH_DIM), uncached.get(seed, chunk, SKETCH_DIM))
        assert cache.size <= cache.capacity and uncached.size == 0
        assert list(cache._seeds) == [seed]  # a new seed evicts the old one; a seed keeps its first chunks
        assert torch.allclose(sketch.sketch_flat(values, 0, seed), expected[:SKETCH_DIM], rtol=0, atol=1e-9)
