"""What a verifier recomputes of an audit unit: its gradient's sketch, and what its forward pass saw.

One forward and backward pass over the unit's rows under θ_r gives the unit's contribution to the
gradient (its sketch is compared with the committed one), the log-probs of the completion tokens
(compared with the sampling log-probs) and the mean and variance of each token's surprisal under the
tempered distribution (the surprisal test of improbable tokens). Only verifiers need this: the
contributor's side is ``Learner.gradient`` with a sketch seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.train.learner import Learner, ScoredBatch, micro_batches
from node.train.loss import loss_weight
from protocol.sketch import sketch_tensors


@dataclass
class UnitGradient:
    """One audit unit's contribution recomputed, with what its forward pass saw of each completion token."""

    sketch: torch.Tensor  # [SKETCH_DIM] float64
    logps: torch.Tensor  # [rows, C] log-probs of the completion tokens under the current policy
    entropy: torch.Tensor  # [rows, C] entropy of the tempered next-token distribution
    surprisal_variance: torch.Tensor  # [rows, C] variance of -log p(token) when sampling from it


def surprisal_moments(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of -log p(token) for a token sampled from softmax(logits / T)."""
    with torch.no_grad():
        logps = torch.log_softmax(logits.float() / temperature, dim=-1)
        probs = logps.exp()
        entropy = -(probs * logps).sum(-1)
        return entropy, ((probs * logps.square()).sum(-1) - entropy.square()).clamp(min=0)


def unit_gradient(learner: Learner, batch: ScoredBatch, unit: slice, sketch_seed: int) -> UnitGradient:
    """What the unit ``unit`` added to ``learner.gradient(batch, 0, sketch_seed)``, recomputed alone.

    Each micro-batch keeps its share of the whole batch (its loss weight over the batch's),
    and micro-batches split as in ``gradient``, so the sketches compare without rescaling.
    """
    total_weight = loss_weight(learner.config.grpo.loss_type, batch.mask)
    temperature = learner.config.rollout.temperature
    learner.optimizer.zero_grad(set_to_none=True)
    logps, entropy, variance = [], [], []
    for part in micro_batches(unit, learner.config.optim.micro_batch_size):
        logits, part_logps = learner.accumulate(batch, part, total_weight, 0, {})
        moments = surprisal_moments(logits, temperature)
        logps.append(part_logps)
        entropy.append(moments[0])
        variance.append(moments[1])
    sketch = sketch_tensors(learner.grads(), sketch_seed)
    learner.optimizer.zero_grad(set_to_none=True)
    return UnitGradient(sketch=sketch, logps=torch.cat(logps), entropy=torch.cat(entropy),
                        surprisal_variance=torch.cat(variance))
