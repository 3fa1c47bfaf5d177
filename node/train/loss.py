"""The GRPO objective as pure functions over tensors (no model, no I/O).

Conventions follow TRL's GRPOTrainer so numbers are comparable: k3 KL estimator,
two-sided clipping (ε_low, ε_high), optional δ cap on the unclipped ratio
(INTELLECT-2), std with Bessel's correction and eps 1e-4 in the advantages, and
the four loss normalizations.

Swarm exactness: ``loss_weight`` is the share a batch has in a union batch under
each loss type (tokens for token-mean losses, sequences for sequence-mean ones).
Weighting micro-batches and swarm peers by it makes the weighted mean of their
gradients equal to the gradient of one centralized step on all of their rows.
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A = r - mean(group), divided by the group's (or batch's) std unless ``none``."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(group_size) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + ADVANTAGE_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none (got {scale_rewards!r})")
    return advantages


def loss_weight(loss_type: str, mask: torch.Tensor) -> float:
    """How much this batch counts in a union of batches under ``loss_type``."""
    if loss_type in ("dapo", "bnpo"):
        return float(mask.sum())
    if loss_type in ("grpo", "dr_grpo"):
        return float(mask.shape[0])
    raise ValueError(f"unknown loss type {loss_type!r}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo",
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float | None = None,
              beta: float = 0.0, max_completion_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token clipped surrogate + β·KL_k3, normalized by ``loss_type``.

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are [B, T]; ``advantages`` is [B].
    Returns the scalar loss and detached metrics (means over completion tokens).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token = -torch.min(unclipped * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl

    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * length)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")

    def token_mean(x: torch.Tensor) -> float:
        return float((x.detach() * mask).sum() / tokens)

    low_clipped = (ratio < 1 - epsilon_low) & (adv < 0)
    high_clipped = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics = {
        "ratio": token_mean(ratio),
        "clip_ratio/low_mean": token_mean(low_clipped.to(mask.dtype)),
        "clip_ratio/high_mean": token_mean(high_clipped.to(mask.dtype)),
        "clip_ratio/region_mean": token_mean((low_clipped | high_clipped).to(mask.dtype)),
        "kl": token_mean(kl) if kl is not None else 0.0,
    }
    return loss, metrics
