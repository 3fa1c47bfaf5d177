"""Auditing a contribution (docs/DESIGN.md "Trust" 3): recompute what the contributor claims, cheapest check first.

A verifier holds θ_r (a Learner at the round's model, same config) and checks, stopping at the
first failure:

- ``model``: the contribution was made from the verifier's θ_r. If not, the verifier cannot
  judge it: ``audit_report`` returns None (not a failure); the caller resyncs or leaves it to others.
- ``identity``: the contribution names the peer that signed it (a copied contribution names another).
- ``shard``: its question ids are that peer's shard of the round (protocol.shards): no chosen
  questions, no copied shards.
- ``digest``: the bundle hashes to the committed rollout digest, parses (protocol.bundle), and
  is consistent: its question ids, round and peer are the contribution's, it has G rows per
  question, at most max_new_tokens completion tokens, the prompts of those questions, masks and
  truncation flags that follow from the completion tokens, one sketch per audit unit.
- ``rewards``: the completions re-decoded and re-scored (protocol.rewards) give the bundle's
  rewards exactly, and their mean is the committed mean reward.
- ``token_count``: the loss weight of the batch (node/train/loss.py) is the committed all-reduce weight.
- ``sketch`` (commitment): the committed sketch is the sum of the unit sketches, and the committed
  gradient norm agrees with the sketch's norm (E‖Sg‖² = ‖g‖² for a CountSketch; this is the only
  check of grad_norm: the full norm needs the full gradient, which an audit does not recompute).
- then ``audit_sample`` units, drawn with the verifier's rng, are recomputed in one forward and
  backward pass each under θ_r (recompute.py), which gives:
  - ``logprobs``: the sampling log-probs of the completion tokens match the prefill log-probs
    (max and mean |Δ|): completions from another model, or tokens edited after sampling with
    their old log-probs, fail here;
  - ``surprisal``: the tokens are as likely under θ_r as sampling from θ_r makes them:
    z = Σ(−log p − H) / sqrt(Σ Var(−log p)) over the audited tokens (H, Var: the mean and variance
    of the surprisal of a token drawn from the tempered distribution). Tokens chosen rather than
    sampled, with log-probs recomputed to pass ``logprobs``, are improbable: z grows with them.
    Top-p sampling only lowers z.
  - ``sketch`` (units): each recomputed unit's sketch has cosine ≥ sketch_min_cosine with the
    committed one and the same norm within sketch_norm_tolerance, unless it deviates by less
    than sketch_noise_floor × the committed units' RMS norm (rounding noise): a scaled,
    sign-flipped or different gradient fails here.

A dishonest unit is caught with probability k/U per audit (k sampled of U units); a contribution
that cheats in every unit is always caught.

Cost: the contributor generates the batch and runs forward and backward over all of it; the
verifier hashes and re-scores the bundle and runs forward and backward over k/U of it (no
generation). Measured (``grpo-swarm bench verifier``, defaults, tiny model, 1 CPU thread, median of
50 contributions): contributor 0.327 s (rollouts 0.071, gradient with unit sketches 0.251, the
same gradient without them 0.215), the verifier's decision (record, this audit, binding) 0.065 s:
19.8% of the contributor's cost.

The tolerances and the honest distributions they come from: tolerances.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from node.train.learner import Learner, ScoredBatch
from node.train.loss import loss_weight
from node.train.models import Policy
from node.train.rollouts import Rollouts, completion_mask_for, encode_prompts
from node.verify.checks import Check
from node.verify.recompute import UnitGradient, unit_gradient
from node.verify.tolerances import tolerances
from protocol import swarm_pb2
from protocol.bundle import BundleError, RolloutBundle, read_bundle, rollout_digest
from protocol.config import RunConfig
from protocol.digest import model_digest as compute_model_digest
from protocol.shards import question_ids
from protocol.sketch import SKETCH_DIM, cosine, relative_error, sketch_seed
from protocol.tasks import Question, Task

# The committed sketch is float32; the unit sketches it must sum to are float64.
SKETCH_SUM_TOLERANCE = 1e-4
MEAN_REWARD_TOLERANCE = 1e-6


class AuditFailure(Exception):
    def __init__(self, check: Check, evidence: str):
        super().__init__(f"{check}: {evidence}")
        self.check, self.evidence = check, evidence


@dataclass
class AuditReport:
    """What an audit found: the first failed check (None when all passed) and the numbers measured."""

    check: Optional[Check]
    evidence: str
    units: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    contribution_digest: bytes = b""  # sha256 of what the peer served: the verdict's evidence

    @property
    def passed(self) -> bool:
        return self.check is None

    def verdict(self, peer_id: str, round_: int) -> swarm_pb2.Verdict:
        return swarm_pb2.Verdict(peer_id=peer_id, round=round_, passed=self.passed, check=self.check or "",
                                 evidence=self.evidence, contribution_digest=self.contribution_digest)


def audit_report(config: RunConfig, task: Task, learner: Learner, contribution: swarm_pb2.Contribution,
                 bundle_bytes: bytes, round_: int, peer_id: str, rng: random.Random,
                 model_digest: str | None = None) -> AuditReport | None:
    """The audit of ``contribution`` (its signed record already checked, signed by ``peer_id``) and the
    rollout bundle behind it; None when it was made from another model than ``learner``'s θ_r, which the
    verifier cannot judge. ``model_digest``: of ``learner``'s model, when the caller keeps it."""
    if contribution.model_digest != (model_digest or compute_model_digest(learner.policy.model)):
        return None
    checks = _Audit(config, task, learner, contribution, round_, peer_id)
    try:
        checks.identity()
        questions = checks.shard()
        bundle = checks.bundle(bundle_bytes, questions)
        batch = checks.rewards(bundle, questions)
        checks.token_count(batch)
        checks.commitment(bundle)
        count = bundle.unit_sketches.shape[0]
        units = checks.report.units = sorted(rng.sample(range(count), min(config.trust.audit_sample, count)))
        recomputed = [unit_gradient(learner, batch, checks.unit_rows[u], checks.seed) for u in units]
        checks.logprobs(bundle, units, recomputed)
        checks.unit_sketches(bundle, units, recomputed)
    except AuditFailure as failure:
        checks.report.check, checks.report.evidence = failure.check, failure.evidence
    else:
        checks.report.evidence = checks.summary()
    return checks.report


def bundle_rollouts(b: RolloutBundle, policy: Policy) -> Rollouts:
    """The bundle's rollouts on the policy's device, their texts decoded as ``generate`` decodes them."""
    device = policy.device
    return Rollouts(
        prompt_ids=b.prompt_ids.to(device), prompt_mask=b.prompt_mask.to(device),
        completion_ids=b.completion_ids.to(device), completion_mask=b.completion_mask.to(device),
        sampling_logps=b.sampling_logps.to(device), truncated=b.truncated.to(device),
        texts=policy.tokenizer.batch_decode(b.completion_ids, skip_special_tokens=True),
    )


class _Audit:
    """The checks of one audit, in order; each raises AuditFailure or records its numbers in ``report``."""

    def __init__(self, config: RunConfig, task: Task, learner: Learner, contribution: swarm_pb2.Contribution,
                 round_: int, peer_id: str):
        self.config, self.task, self.learner = config, task, learner
        self.contribution, self.round, self.peer_id = contribution, round_, peer_id
        self.seed = sketch_seed(config.run.seed, round_)
        self.report = AuditReport(None, "")
        self.stats = self.report.stats
        self.unit_rows: list[slice] = []

    def identity(self) -> None:
        if self.contribution.peer_id != self.peer_id:
            raise AuditFailure(Check.IDENTITY, f"contribution names peer {self.contribution.peer_id}, "
                                               f"but {self.peer_id} signed it")

    def shard(self) -> list[Question]:
        c, rollout = self.contribution, self.config.rollout
        expected = question_ids(self.config.run.seed, self.round, self.peer_id, rollout.questions_per_peer,
                                self.task.size("train"))
        claimed = list(c.question_ids)
        if claimed != expected:
            wrong = sum(a != b for a, b in zip(claimed, expected, strict=False)) + abs(len(claimed) - len(expected))
            raise AuditFailure(Check.SHARD, f"{wrong} of {len(claimed)} question ids are not the shard of "
                                        f"{self.peer_id} in round {self.round} ({len(expected)} ids)")
        return [self.task.question(i) for i in expected]

    def bundle(self, data: bytes, questions: list[Question]) -> RolloutBundle:
        if rollout_digest(data) != self.contribution.rollout_digest:
            raise AuditFailure(Check.DIGEST, f"bundle sha256 {rollout_digest(data).hex()[:16]}… is not the committed "
                                         f"{self.contribution.rollout_digest.hex()[:16]}…")
        try:
            bundle = read_bundle(data)
        except BundleError as e:
            raise AuditFailure(Check.DIGEST, f"malformed bundle: {e}") from None
        self._consistent(bundle, questions)
        return bundle

    def _consistent(self, b: RolloutBundle, questions: list[Question]) -> None:
        rollout, policy = self.config.rollout, self.learner.policy
        tokenizer = policy.tokenizer

        def fail(what: str):
            raise AuditFailure(Check.DIGEST, what)

        if (b.round, b.peer_id) != (self.round, self.peer_id):
            fail(f"bundle is for round {b.round} of {b.peer_id}, not round {self.round} of {self.peer_id}")
        if b.question_ids.tolist() != list(self.contribution.question_ids):
            fail("bundle question ids differ from the contribution's")
        if b.rows != len(questions) * rollout.group_size:
            fail(f"{b.rows} rows for {len(questions)} questions × G {rollout.group_size}")
        if b.completion_ids.shape[1] > rollout.max_new_tokens:
            fail(f"completions of {b.completion_ids.shape[1]} tokens > max_new_tokens {rollout.max_new_tokens}")
        self.unit_rows = self.learner.audit_units(b.rows)
        if b.unit_sketches.shape[0] != len(self.unit_rows):
            fail(f"{b.unit_sketches.shape[0]} unit sketches for {len(self.unit_rows)} audit units")
        if len(self.contribution.sketch) != SKETCH_DIM:
            fail(f"committed sketch of {len(self.contribution.sketch)} values, expected {SKETCH_DIM}")
        ids, eos, pad = b.completion_ids, tokenizer.eos_token_id, tokenizer.pad_token_id
        vocabulary = policy.model.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocabulary:
            fail(f"completion token id {int(ids.max())} outside the model's vocabulary of {vocabulary}")
        mask = completion_mask_for(ids, eos)
        if not torch.equal(mask, b.completion_mask):
            fail("completion mask does not end at each row's first EOS")
        if not torch.equal(ids.masked_select(mask == 0), torch.full_like(ids.masked_select(mask == 0), pad)):
            fail("tokens after EOS that are not padding")
        if not torch.equal(b.truncated, ~(ids == eos).any(dim=1)):
            fail("truncation flags do not match the rows without EOS")
        prompt_ids, prompt_mask = encode_prompts(tokenizer, policy.render([q.prompt for q in questions]), "cpu")
        prompt_ids = prompt_ids.repeat_interleave(rollout.group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(rollout.group_size, dim=0)
        if not (torch.equal(prompt_ids, b.prompt_ids) and torch.equal(prompt_mask, b.prompt_mask)):
            fail("prompts are not those of the shard's questions")

    def rewards(self, b: RolloutBundle, questions: list[Question]) -> ScoredBatch:
        rollouts = bundle_rollouts(b, self.learner.policy)
        batch = self.learner.score_rollouts(questions, rollouts, reference_logps=False)
        wrong = (batch.rewards != b.rewards).nonzero().flatten().tolist()
        if wrong:
            row = wrong[0]
            question = questions[row // self.config.rollout.group_size]
            raise AuditFailure(Check.REWARDS, f"{len(wrong)} of {b.rows} rewards differ from re-scoring; row {row} "
                                          f"({question.prompt!r} -> {rollouts.texts[row]!r}) claims "
                                          f"{float(b.rewards[row]):g}, scores {float(batch.rewards[row]):g}")
        mean = float(batch.rewards.mean())
        if not abs(mean - self.contribution.mean_reward) <= MEAN_REWARD_TOLERANCE:
            raise AuditFailure(Check.REWARDS, f"committed mean reward {self.contribution.mean_reward:g}, "
                                          f"rewards average {mean:g}")
        return batch

    def token_count(self, batch: ScoredBatch) -> None:
        weight = loss_weight(self.config.grpo.loss_type, batch.mask)
        if self.contribution.token_count != weight:
            raise AuditFailure(Check.TOKEN_COUNT, f"committed all-reduce weight {self.contribution.token_count:g}, "
                                              f"the batch's {self.config.grpo.loss_type} weight is {weight:g}")

    def commitment(self, b: RolloutBundle) -> None:
        committed = torch.tensor(list(self.contribution.sketch), dtype=torch.float64)
        error = relative_error(b.unit_sketches.sum(0), committed)
        self.stats["sketch_sum_error"] = error
        if not error <= SKETCH_SUM_TOLERANCE:
            raise AuditFailure(Check.SKETCH, f"committed sketch is not the sum of the unit sketches "
                                         f"(relative error {error:.3g} > {SKETCH_SUM_TOLERANCE:g})")
        norm, sketch_norm = self.contribution.grad_norm, float(committed.norm())
        factor = self.config.trust.grad_norm_factor
        ratio = sketch_norm / norm if norm > 0 else (1.0 if sketch_norm == 0 else math.inf)
        self.stats["grad_norm_ratio"] = ratio
        if not 1 / factor <= ratio <= factor:
            raise AuditFailure(Check.SKETCH, f"committed grad_norm {norm:.4g} disagrees with the sketch's norm "
                                         f"{sketch_norm:.4g} (ratio {ratio:.3g} outside 1/{factor:g}..{factor:g})")

    def logprobs(self, b: RolloutBundle, units: list[int], recomputed: list[UnitGradient]) -> None:
        limits = tolerances(self.config)
        deltas, surprise, variance, worst = [], 0.0, 0.0, (0.0, -1, -1, -1)
        for u, unit in zip(units, recomputed, strict=True):
            rows = self.unit_rows[u]
            mask = b.completion_mask[rows].bool()
            prefill = unit.logps.cpu()
            delta = (prefill - b.sampling_logps[rows]).abs().masked_fill(~mask, 0.0)
            deltas.append(delta[mask])
            top = int(delta.argmax())
            row, column = divmod(top, delta.shape[1])
            if float(delta.max()) >= worst[0]:
                worst = (float(delta.max()), u, rows.start + row, column)
            surprise += float(((-prefill - unit.entropy.cpu()) * mask).sum())
            variance += float((unit.surprisal_variance.cpu() * mask).sum())
        tokens = torch.cat(deltas)
        max_abs, mean_abs = worst[0], float(tokens.mean()) if tokens.numel() else 0.0
        z = surprise / math.sqrt(variance) if variance > 0 else 0.0
        self.stats.update(logprob_max_abs=max_abs, logprob_mean_abs=mean_abs, surprisal_z=z,
                          audited_tokens=float(tokens.numel()))
        if not max_abs <= limits.logprob_max_abs:
            raise AuditFailure(Check.LOGPROBS, f"unit {worst[1]} row {worst[2]} token {worst[3]}: |Δlogp| "
                                               f"{max_abs:.3g} > {limits.logprob_max_abs:g} between sampling and "
                                               "prefill under θ_r")
        if not mean_abs <= limits.logprob_mean_abs:
            raise AuditFailure(Check.LOGPROBS, f"units {units}: mean |Δlogp| {mean_abs:.3g} > "
                                           f"{limits.logprob_mean_abs:g} over {tokens.numel()} tokens")
        z_max = self.config.trust.surprisal_max_z
        if not z <= z_max:
            raise AuditFailure(Check.SURPRISAL, f"units {units}: tokens improbable under θ_r, surprisal z {z:.3g} > "
                                            f"{z_max:g} over {tokens.numel()} tokens")

    def unit_sketches(self, b: RolloutBundle, units: list[int], recomputed: list[UnitGradient]) -> None:
        """Each audited unit's committed sketch against the recomputed one.

        Rounding (bf16 above all) moves a recomputed unit by an amount that scales with the whole
        gradient, not with the unit: a unit whose groups nearly cancel can come out at any angle.
        So a unit that deviates by at most ``sketch_noise_floor`` × the RMS norm of the committed
        units passes whatever its angle; any other must have the cosine and norm ratio of a
        faithful copy. (A contributor can raise that RMS only by committing, and sending, larger
        units, which fail the norm ratio whenever they are drawn.)
        """
        limits = tolerances(self.config)
        scale = float(b.unit_sketches.norm(dim=1).square().mean().sqrt())
        worst_cosine, worst_ratio, worst_deviation = 1.0, 1.0, 0.0
        for u, unit in zip(units, recomputed, strict=True):
            committed, mine = b.unit_sketches[u], unit.sketch
            committed_norm, my_norm = float(committed.norm()), float(mine.norm())
            similarity = cosine(mine, committed)
            ratio = committed_norm / my_norm if my_norm > 0 else (1.0 if committed_norm == 0 else math.inf)
            difference = float((committed - mine).norm())
            deviation = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
            worst_cosine = min(worst_cosine, similarity)
            worst_ratio = ratio if abs(ratio - 1) > abs(worst_ratio - 1) else worst_ratio
            worst_deviation = max(worst_deviation, deviation)
            self.stats.update(sketch_min_cosine=worst_cosine, sketch_norm_ratio=worst_ratio,
                              sketch_deviation=worst_deviation)
            if deviation <= limits.sketch_noise_floor:
                continue
            if not similarity >= limits.sketch_min_cosine:
                raise AuditFailure(Check.SKETCH, f"unit {u}: cosine {similarity:.4f} < {limits.sketch_min_cosine:g} "
                                             f"between the recomputed and the committed unit sketch "
                                             f"(deviation {deviation:.3g}× the committed units' RMS norm)")
            if not abs(ratio - 1) <= limits.sketch_norm_tolerance:
                raise AuditFailure(Check.SKETCH, f"unit {u}: committed sketch norm {committed_norm:.4g} is "
                                             f"{ratio:.4g}× the recomputed {my_norm:.4g} "
                                             f"(tolerance {limits.sketch_norm_tolerance:g})")

    def summary(self) -> str:
        s = self.stats
        return (f"units {self.report.units}: max |Δlogp| {s['logprob_max_abs']:.2g}, "
                f"mean {s['logprob_mean_abs']:.2g}, surprisal z {s['surprisal_z']:.2f}, "
                f"cosine ≥ {s['sketch_min_cosine']:.6f}, norm ratio {s['sketch_norm_ratio']:.6f}, "
                f"deviation {s['sketch_deviation']:.2g}, grad_norm ratio {s['grad_norm_ratio']:.3f}")
