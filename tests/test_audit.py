"""The audit at the function level: honest contributions pass, each attack fails on the check meant for it.

The attacks are the benchmark's (node/bench/verifier.py), built from an honest round on the tiny
model after a short warm start. The verifier recomputes every unit here (audit_sample = audit_units),
so an attack in any unit is caught deterministically.
"""

import dataclasses
import hashlib
import random

import pytest
import torch
from safetensors.torch import save

from node.audit import DTYPE_TOLERANCES, audit, audit_report, tolerances
from node.bench.verifier import ATTACKS, VerifierBench
from node.contribution import BUNDLE_TENSORS, make_contribution, read_bundle, rollout_digest
from node.warm_start import warm_started_policy
from protocol import swarm_pb2
from protocol.config import ConfigError, load_config
from protocol.identity import SigningKey
from protocol.records import sign_record
from protocol.tasks import load_task

SMALL = ["warm_start.steps=120", "task.options={digits=1}", "rollout.questions_per_peer=8",
         "rollout.group_size=4", "trust.audit_units=4", "trust.audit_sample=4"]
ROUND, PEER = 2, "peer-a"


def make_bench(overrides):
    config = load_config(overrides=overrides)
    task = load_task(config.task.name, config.task.options)
    return VerifierBench(config, task, warm_started_policy(config, task))


@pytest.fixture(scope="module")
def bench():
    return make_bench(SMALL)


@pytest.fixture(scope="module")
def honest(bench):
    h = bench.contribute(ROUND, PEER)
    assert all(float(s.norm()) > 0 for s in h.gradient.unit_sketches)  # every unit can show a tampered gradient
    return h


def signed(bench, body, round_=ROUND):
    return sign_record(SigningKey(), "contribution", bench.config.run.id, round_, body)


def verdict(bench, body, bundle, peer=PEER, round_=ROUND, record_round=ROUND):
    return audit(bench.config, bench.task, bench.verifier, signed(bench, body, record_round), body, bundle, round_,
                 peer, random.Random(0))


def report(bench, body, bundle, peer=PEER):
    return audit_report(bench.config, bench.task, bench.verifier, body, bundle, ROUND, peer, random.Random(0))


def with_body(body, **changes):
    copy = swarm_pb2.Contribution()
    copy.CopyFrom(body)
    for name, value in changes.items():
        if isinstance(value, list):
            getattr(copy, name)[:] = value
        else:
            setattr(copy, name, value)
    return copy


def test_honest_contributions_pass(bench, honest):
    for round_, peer in [(ROUND, PEER), (5, "peer-b"), (6, "peer-c")]:
        h = honest if round_ == ROUND else bench.contribute(round_, peer)
        record = signed(bench, h.body, round_)
        v = audit(bench.config, bench.task, bench.verifier, record, h.body, h.bundle, round_, peer, random.Random(1))
        assert v.passed and v.check == "", v.evidence
        assert (v.peer_id, v.round) == (peer, round_)
        assert v.contribution_digest == hashlib.sha256(record.SerializeToString(deterministic=True)).digest()
        assert "max |Δlogp|" in v.evidence and "cosine" in v.evidence


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_fails_on_its_check(bench, honest, name):
    attack, check = ATTACKS[name]
    body, bundle, signer = attack(bench, honest)
    v = verdict(bench, body, bundle, peer=signer)
    assert not v.passed and v.check == check, (v.check, v.evidence)
    assert v.evidence


def test_a_contribution_from_another_model_state_is_not_judged(bench, honest):
    body = with_body(honest.body, model_digest="0" * 64)
    assert verdict(bench, body, honest.bundle) is None


def test_round_and_shard_belong_to_the_signer(bench, honest):
    v = verdict(bench, honest.body, honest.bundle, record_round=ROUND + 1)
    assert v.check == "shard" and "record is for round 3, audited as round 2" in v.evidence
    v = verdict(bench, honest.body, honest.bundle, round_=ROUND + 1, record_round=ROUND + 1)
    assert v.check == "shard" and "not the shard of peer-a in round 3" in v.evidence
    body = with_body(honest.body, question_ids=list(honest.body.question_ids)[:-1])
    assert report(bench, body, honest.bundle).check == "shard"


def rebundled(bundle, **changes):
    """The bundle with some tensors changed."""
    parsed = read_bundle(bundle)
    tensors = {name: getattr(parsed, name) for name in BUNDLE_TENSORS} | changes
    return save(tensors, metadata={"format": "grpo-swarm/rollouts/v1", "round": str(parsed.round),
                                   "peer_id": parsed.peer_id})


def test_bundle_must_hash_parse_and_fit_the_commitment(bench, honest):
    other = bench.contribute(ROUND, "peer-b")
    found = report(bench, honest.body, other.bundle)
    assert found.check == "digest" and "is not the committed" in found.evidence

    garbage = b"not a bundle"
    found = report(bench, with_body(honest.body, rollout_digest=rollout_digest(garbage)), garbage)
    assert found.check == "digest" and "malformed bundle: not a safetensors file" in found.evidence

    def check(bundle, message):
        found = report(bench, with_body(honest.body, rollout_digest=rollout_digest(bundle)), bundle)
        assert found.check == "digest" and message in found.evidence, found.evidence

    parsed = read_bundle(honest.bundle)
    ids = parsed.completion_ids.clone()
    ids[0, -1] = 999
    check(rebundled(honest.bundle, completion_ids=ids), "outside the model's vocabulary of 100")
    eos = bench.verifier.policy.tokenizer.eos_token_id
    ids = parsed.completion_ids.clone()
    ids[:, 0] = eos  # every completion now ends at its first token
    check(rebundled(honest.bundle, completion_ids=ids), "completion mask does not end at each row's first EOS")
    check(rebundled(honest.bundle, truncated=~parsed.truncated), "truncation flags")
    other_questions = parsed.prompt_ids.roll(bench.config.rollout.group_size, dims=0)
    check(rebundled(honest.bundle, prompt_ids=other_questions), "prompts are not those of the shard's questions")
    check(rebundled(honest.bundle, unit_sketches=parsed.unit_sketches[:2]), "2 unit sketches for 4 audit units")
    longer = bench.config.rollout.max_new_tokens + 1
    pad = lambda t, value: torch.cat([t, torch.full((t.shape[0], longer - t.shape[1]), value, dtype=t.dtype)], 1)
    check(rebundled(honest.bundle, completion_ids=pad(parsed.completion_ids, 0),
                    completion_mask=pad(parsed.completion_mask, 0), sampling_logps=pad(parsed.sampling_logps, 0)),
          f"completions of {longer} tokens > max_new_tokens")


def test_committed_sketch_and_norm_must_agree_with_the_units(bench, honest):
    found = report(bench, with_body(honest.body, sketch=[-v for v in honest.body.sketch]), honest.bundle)
    assert found.check == "sketch" and "not the sum of the unit sketches" in found.evidence
    found = report(bench, with_body(honest.body, grad_norm=honest.body.grad_norm * 10), honest.bundle)
    assert found.check == "sketch" and "grad_norm" in found.evidence
    found = report(bench, with_body(honest.body, mean_reward=honest.body.mean_reward + 0.25), honest.bundle)
    assert found.check == "rewards" and "committed mean reward" in found.evidence


def test_only_sampled_units_are_recomputed(bench, honest):
    """With 2 of 4 units sampled, a tampered unit is caught exactly when it is drawn."""
    config = dataclasses.replace(bench.config, trust=dataclasses.replace(bench.config.trust, audit_sample=2))
    sketches = honest.gradient.unit_sketches.clone()
    sketches[3] *= -1
    gradient = dataclasses.replace(honest.gradient, unit_sketches=sketches)
    body, bundle = make_contribution(config, ROUND, PEER, honest.batch, gradient, bench.digest)
    body.grad_norm = float(torch.tensor(list(body.sketch), dtype=torch.float64).norm())  # consistent with the sketch
    outcomes = set()
    for seed in range(8):
        found = audit_report(config, bench.task, bench.verifier, body, bundle, ROUND, PEER, random.Random(seed))
        assert found.passed == (3 not in found.units), found.evidence
        assert len(found.units) == 2
        outcomes.add(found.passed)
    assert outcomes == {True, False}


def test_a_unit_within_the_noise_floor_passes_whatever_its_angle(bench, honest):
    sketches = honest.gradient.unit_sketches
    scale = float(sketches.norm(dim=1).square().mean().sqrt())
    noise = torch.randn(sketches.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for size, passes in ((1e-4, True), (0.5, False)):  # the fp32 floor is 1e-3 of the units' RMS norm
        changed = sketches.clone()
        changed[0] += noise / noise.norm() * size * scale
        gradient = dataclasses.replace(honest.gradient, unit_sketches=changed)
        body, bundle = make_contribution(bench.config, ROUND, PEER, honest.batch, gradient, bench.digest)
        found = report(bench, body, bundle)
        assert found.passed == passes, found.evidence
        assert found.stats["sketch_deviation"] == pytest.approx(size, rel=0.1)  # of the committed units' RMS


def test_kl_reference_is_recomputed_for_the_audited_rows():
    bench = make_bench(SMALL + ["grpo.beta=0.04"])
    h = bench.contribute(ROUND, PEER)
    assert h.batch.ref_logps is not None
    found = report(bench, h.body, h.bundle)
    assert found.passed, found.evidence
    assert found.stats["sketch_min_cosine"] > 0.999999


def test_tolerances_follow_the_model_dtype_unless_set():
    assert tolerances(load_config()) == DTYPE_TOLERANCES["float32"]
    assert tolerances(load_config(overrides=["model.dtype=bfloat16"])) == DTYPE_TOLERANCES["bfloat16"]
    chosen = tolerances(load_config(overrides=["trust.logprob_max_abs=0.5", "trust.sketch_noise_floor=0.2"]))
    assert chosen == dataclasses.replace(DTYPE_TOLERANCES["float32"], logprob_max_abs=0.5, sketch_noise_floor=0.2)


@pytest.mark.parametrize("override, message", [
    ("trust.audit_units=0", "trust.audit_units: must be > 0"),
    ("trust.audit_rate=1.5", "trust.audit_rate: must be in (0, 1]"),
    ("trust.logprob_max_abs=0", "trust.logprob_max_abs: must be > 0 (or unset)"),
    ("trust.sketch_min_cosine=-1", "trust.sketch_min_cosine: must be in (-1, 1] (or unset)"),
    ("trust.grad_norm_factor=1", "trust.grad_norm_factor: must be > 1"),
    ("trust.clip_factor=-1", "trust.clip_factor: must be >= 0"),
    ("swarm.compression=uniform8bit", "trust.binding_tolerance: must be >= 1.5 with swarm.compression uniform8bit"),
])
def test_trust_settings_are_checked(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert load_config(overrides=["swarm.compression=quantile8bit", "trust.binding_tolerance=2.0"])
