"""Model digests: peers compare them every round to prove they hold the same θ."""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import torch

DIGEST_CHARS = 64  # a digest is sha256 in hex


def tensors_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the given order."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: torch.nn.Module, replaced: Optional[Mapping[int, torch.Tensor]] = None) -> str:
    """The digest of ``model``, or with ``replaced`` ({id(parameter): tensor}) the digest it would have with
    those parameters replaced: a served state is checked before it is loaded."""
    replaced = replaced or {}
    state = model.state_dict(keep_vars=True)
    return tensors_digest([(name, replaced.get(id(tensor), tensor)) for name, tensor in sorted(state.items())])
