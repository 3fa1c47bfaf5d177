"""Group rollouts: G sampled completions per question, batched, with a KV cache.

We sample with our own loop rather than ``model.generate`` because GRPO needs the
log-prob of every sampled token under the tempered policy (π_old for μ > 1, and the
value a verifier recomputes in one prefill pass). The log-prob is taken from the
full tempered distribution, before top-p truncation, which is what the training
forward pass recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollouts:
    """One batch of completions; rows are grouped: question 0 × G, question 1 × G, ..."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C] 1 up to and including EOS
    sampling_logps: torch.Tensor  # [B, C] log π_old(token) at the sampling temperature
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, without special tokens

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def pad_rows(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows to an id matrix and a mask; prompts pad left, completions right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded, so every row's last prompt token sits in the same column."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return pad_rows(rows, tokenizer.pad_token_id, left=True, device=device)


def encode_completions(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids ending in EOS, as the policy should produce them."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return pad_rows(rows, tokenizer.pad_token_id, left=False, device=device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token; return it with its log-prob under the tempered distribution."""
    logps = F.log_softmax(logits.float() / temperature, dim=-1)
    if greedy:
        token = logps.argmax(-1)
    else:
        probs = logps.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the first token always
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logps.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator | None = None) -> Rollouts:
    """Sample ``group_size`` completions for each prompt in one batched, KV-cached loop."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    batch = prompt_ids.shape[0]
    eos = tokenizer.eos_token_id
    tokens, logps = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    mask, position = prompt_mask, positions(prompt_mask)
    step_ids, cache = prompt_ids, DynamicCache()
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        token, logp = sample_token(out.logits[:, -1, :], temperature, top_p, greedy, generator)
        token = token.masked_fill(finished, tokenizer.pad_token_id)
        tokens.append(token)
        logps.append(logp.masked_fill(finished, 0.0))
        finished |= token == eos
        if finished.all():
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position[:, -1:] + 1
    model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = completion_mask_for(completion_ids, eos)
    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, sampling_logps=torch.stack(logps, dim=1) * completion_mask,
        truncated=~(completion_ids == eos).any(dim=1),
        texts=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),  # pads after EOS
    )


def completion_mask_for(completion_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = completion_ids == eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()

