"""The reducer of our all-reduce: hivemind's TensorPartReducer with the checks a swarm of strangers needs.

hivemind's reducer adds whatever a sender sends, with whatever weight it claims. This one, for each
part it receives and before anything is counted (so a refused part leaves the others' parts intact):

- refuses a part of the wrong shape or dtype or with non-finite values, and a weight that is not a
  positive number or that changes between the parts of one sender (the runner then drops the sender,
  which fails the round: see ExactAllReduceRunner.raise_if_partial);
- counts a claimed weight as at most ``max_weight``;
- sketches the part as received, for binding (binding.py);
- with clip_factor > 0, averages with the robust rule of node/swarm/clipping.py instead of the exact weighted
  mean, by replacing the reducer's accumulator tensor with ClippedSum. With clip_factor = 0 the arithmetic
  is hivemind's, operation for operation.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from hivemind.averaging.partition import AllreduceException, TensorPartReducer
from hivemind.p2p import PeerID

from node.swarm.binding import ReceivedParts
from node.swarm.clipping import clipped_mean
from protocol import swarm_pb2
from protocol.sketch import sketch_flat


@dataclass(frozen=True)
class ReduceRules:
    """How this peer reduces its parts in one all-reduce (each reducer applies its own to its parts).

    :param sketch_seed: sketch every received part with this seed (the round's); None: no binding reports
    :param clip_factor: clip each sender's part to this many times the part's median norm; 0: exact mean
    :param max_weight: a sender's claimed weight counts as at most this (the largest weight an honest batch has)
    """

    sketch_seed: Optional[int] = None
    clip_factor: float = 0.0
    max_weight: float = math.inf

    def __post_init__(self):
        seed = self.sketch_seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64):
            raise ValueError(f"sketch_seed must be None or an integer in [0, 2**64), got {self.sketch_seed!r}")
        clip = self.clip_factor
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
            raise ValueError(f"clip_factor must be a finite number >= 0, got {self.clip_factor!r}")
        if not (isinstance(self.max_weight, (int, float)) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a number > 0 (or inf), got {self.max_weight!r}")


class RefusedPart(AllreduceException):
    """A sender's part or weight broke the rules; the sender is dropped from the all-reduce."""


class CheckedPartReducer(TensorPartReducer):
    """TensorPartReducer that checks, caps, sketches and (optionally) clips what senders send.

    :param part_offsets: the flat offset (see binding.py) of each of this reducer's parts
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, rules: ReduceRules,
                 part_offsets: Sequence[int]):
        self.rules, self.part_offsets = rules, tuple(part_offsets)  # before super(): it resets the accumulators
        self.claimed_weights: dict[int, float] = {}
        self.received: dict[int, ReceivedParts] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if self.rules.clip_factor > 0 and not self.finished.is_set():
            self.accumulator = ClippedSum(self.rules.clip_factor)

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        self._check(sender_index, part_index, tensor_part, weight)
        if self.rules.sketch_seed is not None:
            await self._sketch(sender_index, part_index, tensor_part, weight)
        return await super().accumulate_part(
            sender_index, part_index, tensor_part, weight=min(weight, self.rules.max_weight)
        )

    def received_sketches(self, sender_peer_ids: Sequence[PeerID]) -> dict[str, swarm_pb2.PartSketch]:
        """{sender: what it sent us}, for every sender we received at least one part from."""
        return {str(sender_peer_ids[index]): received.to_proto(str(sender_peer_ids[index]))
                for index, received in sorted(self.received.items())}

    def _check(self, sender_index: int, part_index: int, part: torch.Tensor, weight: float) -> None:
        if not 0 <= part_index < self.num_parts:
            raise RefusedPart(f"sent part {part_index}, this reducer has {self.num_parts}")
        expected = self.part_shapes[part_index]
        if part.dtype != torch.float32 or part.shape != expected:
            raise RefusedPart(f"part {part_index} is {part.dtype} {tuple(part.shape)}, "
                              f"expected float32 {tuple(expected)}")
        if not (math.isfinite(weight) and weight > 0):
            raise RefusedPart(f"weight {weight} is not a positive number")
        claimed = self.claimed_weights.setdefault(sender_index, weight)
        if weight != claimed:
            raise RefusedPart(f"weight changed from {claimed} to {weight} at part {part_index}")
        if not bool(torch.isfinite(part).all()):
            raise RefusedPart(f"part {part_index} has non-finite values")

    async def _sketch(self, sender_index: int, part_index: int, part: torch.Tensor, weight: float) -> None:
        offset = self.part_offsets[part_index]
        sketch = await asyncio.get_running_loop().run_in_executor(
            None, sketch_flat, part, offset, self.rules.sketch_seed
        )
        self.received.setdefault(sender_index, ReceivedParts(weight, offset)).add(offset, part.numel(), sketch)


class ClippedSum:
    """Stands in for TensorPartReducer's accumulator tensor, of which the reducer only calls
    ``add_(part, alpha=weight)`` per sender and ``div_(sum of weights)`` once all have arrived: it keeps
    the parts until then, because the clipping threshold depends on all of them."""

    def __init__(self, clip_factor: float):
        self.clip_factor = clip_factor
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float) -> "ClippedSum":
        self.parts.append(part)
        self.weights.append(alpha)
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        assert denominator == sum(self.weights), "the reducer's denominator is the sum of the weights added"
        return clipped_mean(self.parts, self.weights, self.clip_factor)
