"""The verifier's decision at the function level: honest contributions pass, and every attack of the shared
catalogue fails on the check meant for it.

Trainers and the verifier are the benchmark's (node/bench/verifier.py) on the tiny model after a short warm
start; what a trainer sends is reduced by the real reducer offline, so binding is judged too. The verifier
recomputes every unit here (audit_sample = audit_units), so a lie in any unit is caught deterministically.
"""

import dataclasses
import hashlib
import random

import pytest
import torch
from safetensors.torch import save

from node.bench.attacks import ATTACKS
from node.bench.verifier import VerifierBench
from node.peer.contribution import make_contribution
from node.train.warm_start import warm_started_policy
from node.verify.audit import audit_report
from node.verify.checks import Check
from node.verify.tolerances import DTYPE_TOLERANCES, tolerances
from protocol import swarm_pb2
from protocol.bundle import BUNDLE_TENSORS, read_bundle, rollout_digest
from protocol.config import ConfigError, load_config
from protocol.records import ReplayGuard, sign_record
from protocol.tasks import load_task

SMALL = ["warm_start.steps=120", "task.options={digits=1}", "rollout.questions_per_peer=8",
         "rollout.group_size=4", "trust.audit_units=4", "trust.audit_sample=4"]
ROUND, PEER = 2, "peer-0"


def make_bench(overrides):
    config = load_config(overrides=overrides)
    task = load_task(config.task.name, config.task.options)
    return VerifierBench(config, task, warm_started_policy(config, task), peers=2)


@pytest.fixture(scope="module")
def bench():
    return make_bench(SMALL)


@pytest.fixture(scope="module")
def honest(bench):
    played = bench.play(bench.trainer(PEER), ROUND)
    assert all(float(s.norm()) > 0 for s in played.gradient.unit_sketches)  # every unit can show a lie
    return played


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
    replay = ReplayGuard()
    for round_, peer in [(ROUND, PEER), (5, "peer-1"), (6, "peer-0")]:
        played = honest if round_ == ROUND else bench.play(bench.trainer(peer), round_)
        found = bench.judge(peer, played, replay)
        assert found.passed and found.check is None, found.evidence
        verdict = found.verdict(peer, round_)
        assert verdict.passed and verdict.check == "" and (verdict.peer_id, verdict.round) == (peer, round_)
        [record] = played.served[0]
        assert verdict.contribution_digest == hashlib.sha256(
            swarm_pb2.SignedRecord.FromString(record).SerializeToString(deterministic=True)).digest()
        assert "max |Δlogp|" in found.evidence and "cosine" in found.evidence


@pytest.mark.parametrize("name", [name for name, attack in ATTACKS.items() if not attack.probe])
def test_each_attack_fails_on_its_check(bench, name):
    result = bench.attack(name, ROUND)
    assert result.report is not None and result.report.check == ATTACKS[name].caught_by, result
    assert result.report.evidence


def test_a_contribution_from_another_model_state_is_not_judged(bench, honest):
    assert report(bench, with_body(honest.body, model_digest="0" * 64), honest.served[1]) is None


def test_records_must_be_the_signers_of_this_round(bench, honest):
    records, bundle = honest.served
    moved = dataclasses.replace(honest, round=ROUND + 1)
    found = bench.judge(PEER, moved, ReplayGuard())
    assert found.check == Check.RECORD and "round 2 outside 3..3" in found.evidence
    found = bench.judge("peer-1", honest, ReplayGuard())  # the verifier knows peer-1's key, not PEER's
    assert found.check == Check.SIGNATURE
    twice = dataclasses.replace(honest, served=(records * 2, bundle))
    assert bench.judge(PEER, twice, ReplayGuard()).check == Check.RECORD
    replay = ReplayGuard()
    assert bench.judge(PEER, honest, replay).passed
    found = bench.judge(PEER, honest, replay)
    assert found.check == Check.RECORD and "replayed" in found.evidence
    body = with_body(honest.body, question_ids=list(honest.body.question_ids)[:-1])
    assert report(bench, body, bundle).check == Check.SHARD
    assert report(bench, honest.body, bundle, peer="peer-1").check == Check.IDENTITY


def test_unsigned_bytes_are_no_record(bench, honest):
    garbage = dataclasses.replace(honest, served=([b"not a record"], honest.served[1]))
    found = bench.judge(PEER, garbage, ReplayGuard())
    assert found.check == Check.RECORD and found.contribution_digest == hashlib.sha256(b"not a record").digest()
    other_run = sign_record(bench.key_of(PEER), "contribution", "another-run", ROUND, honest.body).SerializeToString()
    found = bench.judge(PEER, dataclasses.replace(honest, served=([other_run], honest.served[1])), ReplayGuard())
    assert found.check == Check.RECORD and "another-run" in found.evidence


def rebundled(bundle, **changes):
    """The bundle with some tensors changed."""
    parsed = read_bundle(bundle)
    tensors = {name: getattr(parsed, name) for name in BUNDLE_TENSORS} | changes
    return save(tensors, metadata={"format": "grpo-swarm/rollouts/v1", "round": str(parsed.round),
                                   "peer_id": parsed.peer_id})


def test_bundle_must_hash_parse_and_fit_the_commitment(bench, honest):
    bundle = honest.served[1]
    other = bench.play(bench.trainer("peer-1"), ROUND)
    found = report(bench, honest.body, other.served[1])
    assert found.check == Check.DIGEST and "is not the committed" in found.evidence

    garbage = b"not a bundle"
    found = report(bench, with_body(honest.body, rollout_digest=rollout_digest(garbage)), garbage)
    assert found.check == Check.DIGEST and "malformed bundle: not a safetensors file" in found.evidence

    def check(changed, message):
        found = report(bench, with_body(honest.body, rollout_digest=rollout_digest(changed)), changed)
        assert found.check == Check.DIGEST and message in found.evidence, found.evidence

    parsed = read_bundle(bundle)
    ids = parsed.completion_ids.clone()
    ids[0, -1] = 999
    check(rebundled(bundle, completion_ids=ids), "outside the model's vocabulary of 100")
    eos = bench.verifier.policy.tokenizer.eos_token_id
    ids = parsed.completion_ids.clone()
    ids[:, 0] = eos  # every completion now ends at its first token
    check(rebundled(bundle, completion_ids=ids), "completion mask does not end at each row's first EOS")
    check(rebundled(bundle, truncated=~parsed.truncated), "truncation flags")
    other_questions = parsed.prompt_ids.roll(bench.config.rollout.group_size, dims=0)
    check(rebundled(bundle, prompt_ids=other_questions), "prompts are not those of the shard's questions")
    check(rebundled(bundle, unit_sketches=parsed.unit_sketches[:2]), "2 unit sketches for 4 audit units")
    longer = bench.config.rollout.max_new_tokens + 1

    def pad(t, value):
        return torch.cat([t, torch.full((t.shape[0], longer - t.shape[1]), value, dtype=t.dtype)], 1)

    padded = rebundled(bundle, completion_ids=pad(parsed.completion_ids, 0),
                       completion_mask=pad(parsed.completion_mask, 0), sampling_logps=pad(parsed.sampling_logps, 0))
    check(padded, f"completions of {longer} tokens > max_new_tokens")


def test_committed_sketch_and_norm_must_agree_with_the_units(bench, honest):
    bundle = honest.served[1]
    found = report(bench, with_body(honest.body, sketch=[-v for v in honest.body.sketch]), bundle)
    assert found.check == Check.SKETCH and "not the sum of the unit sketches" in found.evidence
    found = report(bench, with_body(honest.body, grad_norm=honest.body.grad_norm * 10), bundle)
    assert found.check == Check.SKETCH and "grad_norm" in found.evidence
    found = report(bench, with_body(honest.body, mean_reward=honest.body.mean_reward + 0.25), bundle)
    assert found.check == Check.REWARDS and "committed mean reward" in found.evidence


def test_only_sampled_units_are_recomputed(bench, honest):
    """With 2 of 4 units sampled, a tampered unit is caught exactly when it is drawn."""
    config = bench.config.updated(trust={"audit_sample": 2})
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
    played = bench.play(bench.trainer(PEER), ROUND)
    assert played.batch.ref_logps is not None
    found = report(bench, played.body, played.served[1])
    assert found.passed, found.evidence
    assert found.stats["sketch_min_cosine"] > 0.999999


def test_tolerances_follow_the_model_dtype_unless_set():
    assert tolerances(load_config()) == DTYPE_TOLERANCES["float32"]
    assert tolerances(load_config(overrides=["model.dtype=bfloat16"])) == DTYPE_TOLERANCES["bfloat16"]
    chosen = tolerances(load_config(overrides=["trust.logprob_max_abs=0.5", "trust.sketch_noise_floor=0.2"]))
    assert chosen == dataclasses.replace(DTYPE_TOLERANCES["float32"], logprob_max_abs=0.5, sketch_noise_floor=0.2)


@pytest.mark.parametrize("override, message", [
    ("trust.audit_units=0", "trust.audit_units: must be > 0"),
    ("trust.audit_rate=1.5", "trust.audit_rate: must be <= 1"),
    ("trust.logprob_max_abs=0", "trust.logprob_max_abs: must be > 0"),
    ("trust.sketch_min_cosine=-1", "trust.sketch_min_cosine: must be > -1"),
    ("trust.grad_norm_factor=1", "trust.grad_norm_factor: must be > 1"),
    ("trust.clip_factor=-1", "trust.clip_factor: must be >= 0"),
    ("swarm.compression=uniform8bit", "trust.binding_tolerance: must be >= 1.5 with swarm.compression uniform8bit"),
])
def test_trust_settings_are_checked(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert load_config(overrides=["swarm.compression=quantile8bit", "trust.binding_tolerance=2.0"])
