"""One peer's GRPO work, split where the swarm needs to step in.

``collect`` samples and scores a batch, ``gradient`` turns it into a gradient and
the weight it carries, ``apply`` takes the (possibly swarm-averaged) gradient and
steps the optimizer. A solo run calls them in a row; a swarm peer all-reduces the
gradient between ``gradient`` and ``apply``, so every peer steps on the same values.
Clipping happens in ``apply``, on the averaged gradient, for the same reason.

Audit units (docs/DESIGN.md "Trust" 3): with a sketch seed, ``gradient`` also sketches each unit's
contribution to the batch gradient. A unit is a run of whole question groups, so a verifier can
recompute its advantages and its contribution from the unit's rows alone (node/verify/recompute.py)
and compare with the committed sketch, at a fraction of the contributor's cost.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import statistics
from dataclasses import dataclass, field

import torch

from node.train.logprobs import completion_logits, token_entropy, token_logps
from node.train.loss import group_advantages, grpo_loss, loss_weight
from node.train.models import Policy, trainable_parameters
from node.train.rollouts import Rollouts, generate
from protocol.config import RunConfig
from protocol.rewards import reward_functions, score
from protocol.sketch import sketch_tensors
from protocol.tasks import Question, Task


@dataclass
class ScoredBatch:
    """A round's rollouts with everything the loss needs, fixed for all μ iterations."""

    questions: list[Question]
    rollouts: Rollouts
    rewards: torch.Tensor  # [B]
    reward_parts: dict[str, list[float]]
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, C] completion mask (truncated rows zeroed if configured)
    ref_logps: torch.Tensor | None  # [B, C] when beta > 0


@dataclass
class Gradient:
    tensors: list[torch.Tensor]
    weight: float  # this batch's share in a union batch (see loss.loss_weight)
    metrics: dict = field(default_factory=dict)
    unit_sketches: torch.Tensor | None = None  # [units, SKETCH_DIM] float64: each audit unit's contribution
    sketch_seed: int | None = None  # the seed of unit_sketches


def audit_units(rows: int, group_size: int, units: int) -> list[slice]:
    """The row ranges of a batch's audit units: ``units`` runs of whole groups (fewer if fewer groups)."""
    groups = rows // group_size
    count = max(1, min(units, groups))
    bounds = [k * groups // count * group_size for k in range(count)] + [rows]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def micro_batches(rows: slice, size: int) -> list[slice]:
    """``rows`` in pieces of ``size`` rows (0: one piece)."""
    step = size or (rows.stop - rows.start)
    return [slice(a, min(a + step, rows.stop)) for a in range(rows.start, rows.stop, step)]


class Learner:
    def __init__(self, policy: Policy, config: RunConfig, task: Task):
        self.policy, self.config, self.task = policy, config, task
        self.params = trainable_parameters(policy.model)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, weight_decay=optim.weight_decay,
                                           betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon)
        self.rewards = reward_functions(task, config.task.format_reward)
        # With LoRA the reference is the base model with adapters off; otherwise a frozen copy.
        self.reference = None
        if config.grpo.beta > 0 and not policy.uses_lora:
            self.reference = copy.deepcopy(policy.model).eval().requires_grad_(False)

    def collect(self, questions: list[Question], generator: torch.Generator | None = None) -> ScoredBatch:
        rollout = self.config.rollout
        rollouts = generate(self.policy.model, self.policy.tokenizer, self.policy.render([q.prompt for q in questions]),
                            rollout.group_size, rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                            generator=generator)
        return self.score_rollouts(questions, rollouts)

    def score_rollouts(self, questions: list[Question], rollouts: Rollouts,
                       reference_logps: bool = True) -> ScoredBatch:
        """Rewards, advantages and loss mask of ``rollouts`` (G rows per question, in order).

        Without ``reference_logps`` (a verifier recomputing a few units) ``gradient`` computes the
        reference log-probs of just the rows it needs.
        """
        rollout, grpo = self.config.rollout, self.config.grpo
        repeated = [q for q in questions for _ in range(rollout.group_size)]
        totals, parts = score(self.rewards, repeated, rollouts.texts)
        rewards = torch.tensor(totals, dtype=torch.float32)
        mask = rollouts.completion_mask
        if grpo.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).long()[:, None]
        ref_logps = self._reference_logps(rollouts, slice(None)) if reference_logps and grpo.beta > 0 else None
        return ScoredBatch(
            questions=questions, rollouts=rollouts, rewards=rewards, reward_parts=parts,
            advantages=group_advantages(rewards, rollout.group_size, grpo.scale_rewards).to(mask.device),
            mask=mask, ref_logps=ref_logps,
        )

    @torch.no_grad()
    def _reference_logps(self, r: Rollouts, rows: slice) -> torch.Tensor:
        if self.reference is not None:
            model, adapters_off = self.reference, contextlib.nullcontext()
        else:
            model, adapters_off = self.policy.model, self.policy.model.disable_adapter()
        with adapters_off:
            logits = completion_logits(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                                       r.completion_mask[rows])
            return token_logps(logits, r.completion_ids[rows], self.config.rollout.temperature)

    def gradient(self, batch: ScoredBatch, iteration: int = 0, sketch_seed: int | None = None) -> Gradient:
        """Gradient of the GRPO loss on ``batch``, accumulated over micro-batches, as float32 tensors.

        Iteration 0 uses the current policy as π_old (ratio 1, as TRL does for μ = 1);
        later iterations use the sampling log-probs, so clipping bounds the drift.
        With ``sketch_seed``, micro-batches also break at audit-unit boundaries and the result
        carries the sketch of each unit's contribution. Each unit is computed on zeroed
        gradients and summed into a float32 total, exactly as a verifier recomputes it:
        accumulating into a bf16 ``.grad`` instead would round each unit's share by up to 2^-9
        of the running total, which measured up to 23% of a small unit's sketch norm.
        """
        rows = batch.mask.shape[0]
        units = [slice(0, rows)] if sketch_seed is None else self.audit_units(rows)
        total_weight = loss_weight(self.config.grpo.loss_type, batch.mask)
        sums: dict[str, float] = {}
        sketches, total = [], [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        for unit in units:
            self.optimizer.zero_grad(set_to_none=True)
            for part in micro_batches(unit, self.config.optim.micro_batch_size):
                self.accumulate(batch, part, total_weight, iteration, sums)
            grads = self.grads()
            if sketch_seed is not None:
                sketches.append(sketch_tensors(grads, sketch_seed))
            for t, g in zip(total, grads, strict=True):
                t.add_(g)
        self.optimizer.zero_grad(set_to_none=True)
        return Gradient(tensors=total, weight=total_weight, metrics=sums,
                        unit_sketches=torch.stack(sketches) if sketches else None, sketch_seed=sketch_seed)

    def audit_units(self, rows: int) -> list[slice]:
        return audit_units(rows, self.config.rollout.group_size, self.config.trust.audit_units)

    def accumulate(self, batch: ScoredBatch, part: slice, total_weight: float, iteration: int,
                   sums: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of the rows ``part``'s loss times their share; returns their logits and log-probs, detached."""
        grpo, r = self.config.grpo, batch.rollouts
        mask = batch.mask[part]
        logits = completion_logits(self.policy.model, r.prompt_ids[part], r.prompt_mask[part],
                                   r.completion_ids[part], r.completion_mask[part])
        logps = token_logps(logits, r.completion_ids[part], self.config.rollout.temperature)
        old = logps.detach() if iteration == 0 else r.sampling_logps[part]
        ref = None
        if grpo.beta > 0:
            ref = batch.ref_logps[part] if batch.ref_logps is not None else self._reference_logps(r, part)
        loss, metrics = grpo_loss(
            logps, old, ref, batch.advantages[part], mask, loss_type=grpo.loss_type,
            epsilon_low=grpo.epsilon_low, epsilon_high=grpo.epsilon_high, delta=grpo.delta, beta=grpo.beta,
            max_completion_length=self.config.rollout.max_new_tokens)
        share = loss_weight(grpo.loss_type, mask) / max(total_weight, 1e-12)
        (loss * share).backward()
        metrics["loss"] = float(loss.detach())
        metrics["entropy"] = float((token_entropy(logits, self.config.rollout.temperature) * mask).sum()
                                   / mask.sum().clamp(min=1))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * share
        return logits.detach(), logps.detach()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def apply(self, tensors: list[torch.Tensor]) -> float:
        """Step on ``tensors`` (the averaged gradient); returns its norm before clipping."""
        for p, g in zip(self.params, tensors, strict=True):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        max_norm = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def batch_metrics(batch: ScoredBatch, group_size: int) -> dict:
    """The rollout half of TRL's GRPO metrics (the loss half comes from ``Gradient``)."""
    rewards = batch.rewards
    lengths = batch.rollouts.completion_mask.sum(dim=1).float()
    grouped_std = rewards.view(-1, group_size).std(dim=1)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": float((grouped_std < 1e-6).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(batch.rollouts.truncated.float().mean()),
        "num_tokens": batch.rollouts.num_tokens,
    }
    for name, values in batch.reward_parts.items():
        metrics[f"rewards/{name}/mean"] = statistics.fmean(values)
    return metrics
