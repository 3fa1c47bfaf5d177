"""A seeded, linear random projection of a gradient (a CountSketch) that every role computes alike.

Linearity is what the protocol uses: the sketch of a sum is the sum of the sketches, so
- the sketch of a whole gradient equals the sum of the sketches of any split of it into flat slices
  (reducers sketch the part each sender sent them; the parts must add up to the committed sketch);
- the sketch of a batch's gradient is the sum of its micro-batches' sketches (a verifier recomputes
  a few micro-batches and checks them against the committed ones).

Coordinate i of the flattened gradient (the trainable parameters in order, each flattened) goes to
bucket h(i) with sign s(i). h and s come from a generator seeded per chunk of CHUNK coordinates by
sha256(DOMAIN, seed, chunk), so a slice anywhere is sketched without generating what precedes it,
and memory stays bounded for large models.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Sequence

import torch

DOMAIN = b"grpo-swarm/sketch/v1"
SKETCH_DIM = 256
CHUNK = 1 << 20


def sketch_seed(run_seed: int, round_: int) -> int:
    """The round's public sketch seed (63 bits)."""
    digest = hashlib.sha256(DOMAIN + struct.pack(">qQ", run_seed, round_)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _chunk_hashes(seed: int, chunk: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk_seed = int.from_bytes(hashlib.sha256(DOMAIN + struct.pack(">QQ", seed, chunk)).digest()[:8], "big") >> 1
    generator = torch.Generator().manual_seed(chunk_seed)
    buckets = torch.randint(0, dim, (CHUNK,), generator=generator)
    signs = torch.randint(0, 2, (CHUNK,), generator=generator, dtype=torch.int8) * 2 - 1
    return buckets, signs


def sketch_flat(values: torch.Tensor, offset: int, seed: int, dim: int = SKETCH_DIM) -> torch.Tensor:
    """Sketch (float64, [dim]) of the flat slice ``values`` that starts at coordinate ``offset``."""
    values = values.detach().reshape(-1).to("cpu", torch.float64)
    out = torch.zeros(dim, dtype=torch.float64)
    position, end = offset, offset + values.numel()
    while position < end:
        chunk, start = divmod(position, CHUNK)
        stop = min(CHUNK, start + end - position)
        buckets, signs = _chunk_hashes(seed, chunk, dim)
        piece = values[position - offset: position - offset + stop - start]
        out.index_add_(0, buckets[start:stop], piece * signs[start:stop])
        position += stop - start
    return out


def sketch_tensors(tensors: Sequence[torch.Tensor], seed: int, dim: int = SKETCH_DIM) -> torch.Tensor:
    """Sketch of the concatenation of ``tensors``, each flattened, in order."""
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]) if tensors else torch.zeros(0)
    return sketch_flat(flat, 0, seed, dim)


def cosine(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else (1.0 if float(a.norm()) == float(b.norm()) else 0.0)


def relative_error(measured: Sequence[float] | torch.Tensor, committed: Sequence[float] | torch.Tensor) -> float:
    """||measured − committed|| / ||committed|| (inf when the committed sketch is zero and they differ)."""
    measured = torch.as_tensor(measured, dtype=torch.float64)
    committed = torch.as_tensor(committed, dtype=torch.float64)
    difference, scale = float((measured - committed).norm()), float(committed.norm())
    if scale == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / scale
