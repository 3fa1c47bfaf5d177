"""The attack catalogue: each attack is one lie a trainer tells, and names the check that must catch it.

An attack overrides exactly one decision of node/peer/trainer.py ``TrainerDecisions``: what it samples
(``sample_batch``), the gradient it commits to (``committed_gradient``), its commitment
(``contribution``), what it serves verifiers (``served_contribution``) or what it sends into the
all-reduce (``outgoing``). Everything else is the honest code. ``attacking(attack, honest_type)`` mixes
it into a trainer: ``grpo-swarm bench verifier`` runs every attack offline against the verifier's
decision (node/verify/judge.py), and the adversarial system test runs them as real nodes of an admitted
swarm (tests/system/attacker.py). Either way an attack must be caught by ``caught_by`` within two rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, TypeVar

import torch

from node.peer.trainer import ServedContribution, TrainerDecisions
from node.train.learner import Gradient, Learner, ScoredBatch
from node.train.logprobs import completion_logits, token_logps
from node.train.loss import group_advantages
from node.train.models import load_policy
from node.train.rollouts import completion_mask_for, encode_completions
from node.train.shard import round_generator, shard_questions
from node.verify.audit import bundle_rollouts
from node.verify.checks import Check
from protocol import swarm_pb2
from protocol.bundle import read_bundle
from protocol.identity import SigningKey
from protocol.records import parse_record, sign_record

OTHER_MODEL_SEED = 12345  # a differently initialised model of the run's architecture
T = TypeVar("T", bound=TrainerDecisions)


class Attack(TrainerDecisions):
    """One lie; ``caught_by`` is the check that must catch it. A probe is informative only: it may pass."""

    caught_by: ClassVar[Check]
    probe: ClassVar[bool] = False


def attacking(attack: type[Attack], honest: type[T]) -> type[T]:
    """``honest`` with ``attack``'s lie: the attack's override comes first, ``super()`` reaches the honest code."""
    return type(f"{attack.__name__}{honest.__name__}", (attack, honest), {})


# ---- what it serves: the signed record -------------------------------------------------------------

class ForgedSignature(Attack):
    """Signs its contribution with a key that is not the one its token binds to its peer id."""

    caught_by = Check.SIGNATURE

    def served_contribution(self, r, body, bundle) -> ServedContribution:
        record = sign_record(SigningKey(), "contribution", self.config.run.id, r, body)
        return [record.SerializeToString()], bundle


class Replay(Attack):
    """Serves the contribution record of its first round again in every later round."""

    caught_by = Check.RECORD
    first: ServedContribution | None = None

    def served_contribution(self, r, body, bundle) -> ServedContribution:
        if self.first is None:
            self.first = super().served_contribution(r, body, bundle)
        return self.first


class CopiedContribution(Attack):
    """Re-signs another trainer's contribution of the round as its own, and serves that trainer's rollouts."""

    caught_by = Check.IDENTITY

    def served_contribution(self, r, body, bundle) -> ServedContribution:
        for _, (records, their_bundle) in self.others_contributions(r):
            theirs = swarm_pb2.Contribution.FromString(parse_record(records[0]).body)
            return super().served_contribution(r, theirs, their_bundle)
        return super().served_contribution(r, body, bundle)


# ---- what it samples ---------------------------------------------------------------------------------

class CherryPicked(Attack):
    """Trains on questions of its choosing (the first ones of the data set) instead of its shard."""

    caught_by = Check.SHARD

    def sample_batch(self, r) -> ScoredBatch:
        questions = [self.task.question(i) for i in range(self.config.rollout.questions_per_peer)]
        return self.learner.collect(questions, round_generator(self.config.run.seed, r, self.peer_id))


class RenamedRollouts(Attack):
    """Commits another trainer's rollouts of the previous round under its own peer id (no sampling work)."""

    caught_by = Check.SHARD

    def sample_batch(self, r) -> ScoredBatch:
        for _, (_, bundle) in self.others_contributions(r - 1):
            theirs = read_bundle(bundle)
            questions = [self.task.question(int(i)) for i in theirs.question_ids]
            return self.learner.score_rollouts(questions, bundle_rollouts(theirs, self.learner.policy))
        return super().sample_batch(r)


class FabricatedRewards(Attack):
    """Reports reward 1 for every completion."""

    caught_by = Check.REWARDS

    def sample_batch(self, r) -> ScoredBatch:
        batch = super().sample_batch(r)
        rewards = torch.ones_like(batch.rewards)
        return dataclasses.replace(batch, rewards=rewards, advantages=group_advantages(
            rewards, self.config.rollout.group_size, self.config.grpo.scale_rewards).to(batch.advantages.device))


class _OtherModelAttack(Attack):
    @functools.cached_property
    def other_model(self) -> Learner:
        """A differently initialised model of the run's architecture."""
        return Learner(load_policy(self.config.model, OTHER_MODEL_SEED), self.config, self.task)

    def other_model_batch(self, r: int) -> ScoredBatch:
        """The peer's shard, sampled from the other model."""
        return self.other_model.collect(shard_questions(self.config, self.task, r, self.peer_id),
                                        round_generator(self.config.run.seed, r, self.peer_id))


class OtherModel(_OtherModelAttack):
    """Samples its completions from another model (an untrained one of the same architecture)."""

    caught_by = Check.LOGPROBS

    def sample_batch(self, r) -> ScoredBatch:
        return self.other_model_batch(r)


class OtherModelPrefilled(_OtherModelAttack):
    """Another model's completions, with their log-probs recomputed under θ_r to pass the log-prob check."""

    caught_by = Check.SURPRISAL

    def sample_batch(self, r) -> ScoredBatch:
        return _prefilled(self.learner, self.other_model_batch(r))


class EditedTokens(Attack):
    """Edits the first completion of every group into the right answer after sampling, keeping the sampled
    tokens' log-probs."""

    caught_by = Check.LOGPROBS

    def sample_batch(self, r) -> ScoredBatch:
        return _edited(self.learner, super().sample_batch(r))


class EditedPrefilled(Attack):
    """Edited answers with log-probs recomputed under θ_r: caught only when the edits are improbable."""

    caught_by = Check.SURPRISAL
    probe = True

    def sample_batch(self, r) -> ScoredBatch:
        return _prefilled(self.learner, _edited(self.learner, super().sample_batch(r)))


# ---- what it commits to --------------------------------------------------------------------------------

class InflatedTokenCount(Attack):
    """Commits to twice its batch's all-reduce weight."""

    caught_by = Check.TOKEN_COUNT

    def contribution(self, r, batch, gradient):
        body, bundle = super().contribution(r, batch, gradient)
        body.token_count *= 2
        return body, bundle


class ScaledCommitment(Attack):
    """Commits to (and sends) its gradient ×10, consistently: sketches and norm ×10."""

    caught_by = Check.SKETCH

    def committed_gradient(self, r, batch) -> Gradient:
        return _rescaled(super().committed_gradient(r, batch), 10.0)


class SignFlippedCommitment(Attack):
    """Commits to (and sends) its gradient negated, consistently."""

    caught_by = Check.SKETCH

    def committed_gradient(self, r, batch) -> Gradient:
        return _rescaled(super().committed_gradient(r, batch), -1.0)


class OtherGradient(Attack):
    """Commits to (and sends) the gradient of another batch (its next round's shard) with this batch's weight."""

    caught_by = Check.SKETCH

    def committed_gradient(self, r, batch) -> Gradient:
        honest = super().committed_gradient(r, batch)
        other = super().committed_gradient(r, super().sample_batch(r + 1))
        return dataclasses.replace(other, weight=honest.weight)


# ---- what it sends into the all-reduce ------------------------------------------------------------

class Scaled(Attack):
    """Commits to its gradient, sends it ×10."""

    caught_by = Check.BINDING

    def outgoing(self, gradient):
        return [t * 10 for t in gradient.tensors], gradient.weight


class SignFlipped(Attack):
    """Commits to its gradient, sends its negation."""

    caught_by = Check.BINDING

    def outgoing(self, gradient):
        return [-t for t in gradient.tensors], gradient.weight


class DifferentGradient(Attack):
    """Commits to its gradient, sends a random one of the same norm."""

    caught_by = Check.BINDING

    def outgoing(self, gradient):
        noise = [torch.randn_like(t) for t in gradient.tensors]
        scale = torch.sqrt(sum((t ** 2).sum() for t in gradient.tensors) / sum((n ** 2).sum() for n in noise))
        return [n * scale for n in noise], gradient.weight


class InflatedWeight(Attack):
    """Claims the largest all-reduce weight reducers accept (an honest batch of full-length completions)
    instead of its committed token count (reducers cap anything larger)."""

    caught_by = Check.BINDING

    def outgoing(self, gradient):
        return gradient.tensors, self.max_weight


ATTACKS: dict[str, type[Attack]] = {attack.__name__: attack for attack in (
    ForgedSignature, Replay, CopiedContribution, CherryPicked, RenamedRollouts, FabricatedRewards, OtherModel,
    OtherModelPrefilled, EditedTokens, EditedPrefilled, InflatedTokenCount, ScaledCommitment, SignFlippedCommitment,
    OtherGradient, Scaled, SignFlipped, DifferentGradient, InflatedWeight)}


# ---- helpers of the lies --------------------------------------------------------------------------------

def _prefilled(learner: Learner, batch: ScoredBatch) -> ScoredBatch:
    """``batch`` with each completion token's log-prob recomputed under ``learner``'s θ_r."""
    r = batch.rollouts
    with torch.no_grad():
        logits = completion_logits(learner.policy.model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                   r.completion_mask)
        logps = token_logps(logits, r.completion_ids, learner.config.rollout.temperature) * r.completion_mask
    return dataclasses.replace(batch, rollouts=dataclasses.replace(r, sampling_logps=logps))


def _edited(learner: Learner, batch: ScoredBatch) -> ScoredBatch:
    """The first completion of every group replaced by the right answer after sampling, and re-scored."""
    r, group = batch.rollouts, learner.config.rollout.group_size
    tokenizer, device = learner.policy.tokenizer, learner.policy.device
    edited = list(range(0, r.completion_ids.shape[0], group))
    answers, _ = encode_completions(tokenizer, [batch.questions[row // group].answer for row in edited], device)
    width = max(r.completion_ids.shape[1], answers.shape[1])
    ids = torch.full((r.completion_ids.shape[0], width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    ids[:, :r.completion_ids.shape[1]] = r.completion_ids
    ids[edited] = tokenizer.pad_token_id
    ids[edited, :answers.shape[1]] = answers
    mask = completion_mask_for(ids, tokenizer.eos_token_id)
    logps = torch.zeros(ids.shape, dtype=r.sampling_logps.dtype, device=device)
    logps[:, :r.completion_ids.shape[1]] = r.sampling_logps  # the sampled tokens' log-probs, kept
    rollouts = dataclasses.replace(r, completion_ids=ids, completion_mask=mask, sampling_logps=logps * mask,
                                   truncated=~(ids == tokenizer.eos_token_id).any(dim=1),
                                   texts=tokenizer.batch_decode(ids, skip_special_tokens=True))
    return learner.score_rollouts(batch.questions, rollouts)


def _rescaled(gradient: Gradient, factor: float) -> Gradient:
    return dataclasses.replace(gradient, tensors=[t * factor for t in gradient.tensors],
                               unit_sketches=gradient.unit_sketches * factor)

