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

Generating a chunk's hashes costs more than sketching it, and a round sketches the same coordinates
many times under one seed (a trainer once per audit unit, a reducer once per sender), so the hashes
of recent seeds are kept up to HASH_CACHE_BYTES. They are stored as one signed bucket per coordinate
(h(i), or h(i) + dim where s(i) = -1): the sketch is then a single index_add without multiplications.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from collections import OrderedDict
from typing import Sequence

import torch

DOMAIN = b"grpo-swarm/sketch/v1"
SKETCH_DIM = 256
CHUNK = 1 << 20
HASH_CACHE_BYTES = 256 << 20  # 64 chunks (64M coordinates) of signed buckets


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


class _SignedBucketCache:
    """Signed buckets of recently used (seed, chunk, dim), at most ``capacity`` bytes.

    A seed's chunks are never evicted for other chunks of the same seed: a model larger than the
    cache then keeps hitting on its first chunks instead of thrashing a least-recently-used order.
    Older seeds are dropped whole when a newer seed needs the room.
    """

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self._seeds: OrderedDict[int, dict[tuple[int, int], torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, seed: int, chunk: int, dim: int) -> torch.Tensor:
        with self._lock:
            found = self._seeds.get(seed, {}).get((chunk, dim))
            if found is not None:
                self._seeds.move_to_end(seed)
                return found
        buckets, signs = _chunk_hashes(seed, chunk, dim)
        signed = (buckets + dim * (signs < 0)).to(torch.int32)
        with self._lock:
            self._insert(seed, (chunk, dim), signed)
        return signed

    def _insert(self, seed: int, key: tuple[int, int], signed: torch.Tensor) -> None:
        nbytes = signed.numel() * signed.element_size()
        while self.size + nbytes > self.capacity and any(s != seed for s in self._seeds):
            oldest = next(s for s in self._seeds if s != seed)
            self.size -= sum(t.numel() * t.element_size() for t in self._seeds.pop(oldest).values())
        if self.size + nbytes <= self.capacity and key not in self._seeds.get(seed, {}):
            self._seeds.setdefault(seed, {})[key] = signed
            self._seeds.move_to_end(seed)
            self.size += nbytes


_signed_buckets = _SignedBucketCache(HASH_CACHE_BYTES)


def sketch_flat(values: torch.Tensor, offset: int, seed: int, dim: int = SKETCH_DIM) -> torch.Tensor:
    """Sketch (float64, [dim]) of the flat slice ``values`` that starts at coordinate ``offset``."""
    values = values.detach().reshape(-1).to("cpu", torch.float64)
    signed = torch.zeros(2 * dim, dtype=torch.float64)
    position, end = offset, offset + values.numel()
    while position < end:
        chunk, start = divmod(position, CHUNK)
        stop = min(CHUNK, start + end - position)
        piece = values[position - offset: position - offset + stop - start]
        signed.index_add_(0, _signed_buckets.get(seed, chunk, dim)[start:stop], piece)
        position += stop - start
    return signed[:dim] - signed[dim:]


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
