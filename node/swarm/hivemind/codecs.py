"""Compression for the gradient all-reduce, with hivemind's 8-bit quantizers made robust.

hivemind 1.1.12's 8-bit codecs lean on deprecated behaviour: ``Quantization.extract`` converts a
1-element array to int (a DeprecationWarning under numpy 2.2, an error in later numpy), and
``Uniform8BitQuantization`` uses ``torch.quantize_per_tensor`` (deprecated in torch 2.13). When
decoding fails inside an all-reduce, hivemind drops that part and keeps the peer's local values,
so a numpy upgrade would silently stop averaging. The classes below keep hivemind's wire format
(a peer running plain hivemind decodes them) and avoid both deprecated calls. Importing this
module registers them as hivemind's decoders, because the receiving side picks its decoder
from the wire type, never from the sender's object.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, quantization
from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
from hivemind.proto import runtime_pb2


class _RobustExtract(quantization.Quantization):
    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        codebook = torch.from_numpy(codebook.copy()).to(getattr(torch, serialized_tensor.dtype))
        indices = torch.from_numpy(indices.astype(np.int64)).reshape(tuple(serialized_tensor.size))
        return codebook[indices].requires_grad_(serialized_tensor.requires_grad)


class Uniform8BitQuantization(_RobustExtract, quantization.Uniform8BitQuantization):
    """Same buckets as hivemind's (±3 sigma around the mean in 256 steps), rounded without torch.quantization."""

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        tensor = tensor.detach().float()
        centered = tensor - tensor.mean()
        std = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
        scale = self.RANGE_IN_SIGMAS * std.item() / self.n_bins
        steps = centered / scale if scale > 0 else torch.zeros_like(centered)
        indices = (steps.round_() + self.n_bins // 2).clamp_(0, self.n_bins - 1).to(torch.uint8)
        codebook = quantization.average_buckets(tensor, indices, self.n_bins)
        return indices.numpy(), codebook.numpy().astype(self.codebook_dtype)


class Quantile8BitQuantization(_RobustExtract, quantization.Quantile8BitQuantization):
    """hivemind's quantile buckets; only decoding is replaced."""


COMPRESSIONS = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "uniform8bit": Uniform8BitQuantization,
    "quantile8bit": Quantile8BitQuantization,
}


def make_compression(name: str) -> CompressionBase:
    """A hivemind compression object for ``name`` (one of COMPRESSIONS)."""
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; expected one of {', '.join(COMPRESSIONS)}")
    return COMPRESSIONS[name]()


_BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8BitQuantization()
_BASE_COMPRESSION_TYPES["QUANTILE_8BIT"] = Quantile8BitQuantization()
