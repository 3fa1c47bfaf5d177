"""One teacher-forced forward pass over prompt + completion, shared by training,
distillation and the verifier's prefill check (node/verify/recompute.py)."""

from __future__ import annotations

import torch

from node.train.rollouts import positions


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token: [B, C, V]."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # Only the positions that predict completion tokens: with a 150k vocabulary the prompt's
    # logits would be most of the memory.
    keep = completion_ids.shape[1] + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=keep).logits
    return logits[:, :-1, :]


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / T), without materializing a log-softmax copy."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, tokens[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logps = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -(logps.exp() * logps).sum(-1)
