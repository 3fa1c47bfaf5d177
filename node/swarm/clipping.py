"""Bounding (docs/DESIGN.md "Trust" 5): a reducer's robust mean of one part, so that one bad sender moves the
round's average by a bounded amount before the audit catches it.

Each sender's part is clipped to ``clip_factor`` times the lower median of the part's norms across
senders, then the clipped parts are averaged with the senders' (capped) weights.

The bound, for one part. Senders H (honest) and a (bad) with weights w_i, W = sum(w_i), the bad
sender's share s = w_a / W (its weight is capped at ``max_weight``, so s <= max_weight / (max_weight + W_H)).
Let m be the lower median of the n part norms. With n >= 3 and one bad sender, m lies between the
smallest and the largest honest norm (at least one honest norm is at or below the lower median's
position and at least one at or above), so the bad sender cannot move the clipping threshold out of
the honest range. If no honest part is clipped (clip_factor >= max honest norm / m, true for
clip_factor >= 2 when honest norms are within a factor 2 of each other), the result r and the honest
mean h = sum_H(w_i x_i) / W_H satisfy

    r - h = s (clip(x_a) - h),   so   ||r - h|| <= s (clip_factor * m + ||h||)
                                                <= s (clip_factor * max_H ||x_i|| + ||h||),

whatever the bad sender sent. Over all parts (the parts partition the gradient, squared norms add):

    ||r - h|| <= s (clip_factor * sqrt(sum_H ||x_i||^2) + ||h||).

Without clipping, r - h = s (x_a - h) is unbounded. Measured numbers: node/bench/trust.py. The reducer
applies the rule through ClippedSum (node/swarm/hivemind/reducer.py).
"""

from __future__ import annotations

from typing import Sequence

import torch


def clip_to_median(parts: Sequence[torch.Tensor], clip_factor: float) -> list[torch.Tensor]:
    """Each part scaled down, if needed, to norm <= clip_factor x the lower median of the parts' norms."""
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    norms = [float(part.double().norm()) for part in parts]  # float64: a huge part must not overflow to inf
    limit = clip_factor * sorted(norms)[(len(norms) - 1) // 2]
    return [part * (limit / norm) if norm > limit else part for part, norm in zip(parts, norms, strict=True)]


def clipped_mean(parts: Sequence[torch.Tensor], weights: Sequence[float], clip_factor: float) -> torch.Tensor:
    """sum(w_i clip(x_i)) / sum(w_i): the robust weighted mean of one part over its senders."""
    if not parts or len(parts) != len(weights):
        raise ValueError(f"need one weight per part, got {len(parts)} parts and {len(weights)} weights")
    total = torch.zeros_like(parts[0])
    for part, weight in zip(clip_to_median(parts, clip_factor), weights, strict=True):
        total.add_(part, alpha=weight)
    return total.div_(sum(weights))
