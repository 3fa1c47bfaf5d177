"""One peer's GRPO work, split where the swarm needs to step in.

``collect`` samples and scores a batch, ``gradient`` turns it into a gradient and
the weight it carries, ``apply`` takes the (possibly swarm-averaged) gradient and
steps the optimizer. A solo run calls them in a row; a swarm peer all-reduces the
gradient between ``gradient`` and ``apply``, so every peer steps on the same values.
Clipping happens in ``apply``, on the averaged gradient, for the same reason.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from dataclasses import dataclass, field

import torch

from node.grpo import group_advantages, grpo_loss, loss_weight
from node.logprobs import completion_logits, token_entropy, token_logps
from node.models import Policy, trainable_parameters
from node.rollouts import Rollouts, generate
from protocol.config import RunConfig
from protocol.rewards import reward_functions, score
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
    weight: float  # this batch's share in a union batch (see grpo.loss_weight)
    metrics: dict = field(default_factory=dict)


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
        rollout, grpo = self.config.rollout, self.config.grpo
        rollouts = generate(self.policy.model, self.policy.tokenizer, self.policy.render([q.prompt for q in questions]),
                            rollout.group_size, rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                            generator=generator)
        repeated = [q for q in questions for _ in range(rollout.group_size)]
        totals, parts = score(self.rewards, repeated, rollouts.texts)
        rewards = torch.tensor(totals, dtype=torch.float32)
        mask = rollouts.completion_mask
        if grpo.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).long()[:, None]
        return ScoredBatch(
            questions=questions, rollouts=rollouts, rewards=rewards, reward_parts=parts,
            advantages=group_advantages(rewards, rollout.group_size, grpo.scale_rewards).to(mask.device),
            mask=mask, ref_logps=self._reference_logps(rollouts) if grpo.beta > 0 else None,
        )

    @torch.no_grad()
    def _reference_logps(self, r: Rollouts) -> torch.Tensor:
        if self.reference is not None:
            model, adapters_off = self.reference, contextlib.nullcontext()
        else:
            model, adapters_off = self.policy.model, self.policy.model.disable_adapter()
        with adapters_off:
            logits = completion_logits(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
            return token_logps(logits, r.completion_ids, self.config.rollout.temperature)

    def gradient(self, batch: ScoredBatch, iteration: int = 0) -> Gradient:
        """Gradient of the GRPO loss on ``batch``, accumulated over micro-batches.

        Iteration 0 uses the current policy as π_old (ratio 1, as TRL does for μ = 1);
        later iterations use the sampling log-probs, so clipping bounds the drift.
        """
        grpo, r = self.config.grpo, batch.rollouts
        rows = batch.mask.shape[0]
        step = self.config.optim.micro_batch_size or rows
        total_weight = loss_weight(grpo.loss_type, batch.mask)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for start in range(0, rows, step):
            part = slice(start, start + step)
            mask = batch.mask[part]
            logits = completion_logits(self.policy.model, r.prompt_ids[part], r.prompt_mask[part],
                                       r.completion_ids[part], r.completion_mask[part])
            logps = token_logps(logits, r.completion_ids[part], self.config.rollout.temperature)
            old = logps.detach() if iteration == 0 else r.sampling_logps[part]
            ref = batch.ref_logps[part] if batch.ref_logps is not None else None
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
        tensors = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.optimizer.zero_grad(set_to_none=True)
        return Gradient(tensors=tensors, weight=total_weight, metrics=sums)

    def apply(self, tensors: list[torch.Tensor]) -> float:
        """Step on ``tensors`` (the averaged gradient); returns its norm before clipping."""
        for p, g in zip(self.params, tensors):
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
