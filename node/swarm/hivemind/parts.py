"""Where hivemind cuts a tensor into all-reduce parts, read off the parts themselves.

Binding reports name the flat range of the gradient each part covers. hivemind's TensorPartContainer does
not expose it; its parts are views of each (contiguous) tensor's flat view, so a part starts where its
data lies in its tensor (``data_ptr``). internals.py checks that this still holds for the pinned hivemind.
"""

from __future__ import annotations

from typing import Sequence

import torch


def part_offsets(tensors: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]) -> list[int]:
    """Where each part starts in the flat order of ``tensors`` (each flattened, one after the other)."""
    offsets = []
    for part in parts:
        start = 0
        for tensor in tensors:
            begin = tensor.data_ptr()
            if tensor.numel() and begin <= part.data_ptr() < begin + tensor.numel() * tensor.element_size():
                offsets.append(start + (part.data_ptr() - begin) // tensor.element_size())
                break
            start += tensor.numel()
        else:
            raise ValueError("a part is not a view of any of the tensors")
    return offsets
