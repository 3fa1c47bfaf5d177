"""hivemind's all-reduce runner, changed so that a finished all-reduce leaves every member with
bit-identical tensors, and so that a partial one fails instead of reporting success.

Stock hivemind returns each sender ``average - its_part`` (compressed) and the sender adds it to its
own values. ``x + (avg - x)`` is not ``avg`` in floating point, and with compression each sender gets
a different rounding of its own delta, so members end up with slightly different tensors even when
nothing fails. Since every member steps its optimizer on the result and then compares model digests,
that is a mismatch every round. Here the reducer of a part encodes the average once and sends the same
bytes to every sender, itself included; senders overwrite their values with the decoded average.

hivemind also treats a reducer that failed (its part keeps the local values) or a sender that was
dropped (the part was averaged without it) as success. ExactAllReduceRunner raises instead, and also when
a reducer returned a NaN or an infinity, naming that reducer (``non_finite_from``): the bytes came over its
own authenticated stream, so no other peer can be framed for them.

Its reducer is CheckedPartReducer (reducer.py: checks, weight cap, binding sketches, clipping), swapped in
for the TensorPartReducer hivemind's constructor builds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Dict, Set

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from node.swarm.hivemind.parts import part_offsets
from node.swarm.hivemind.reducer import CheckedPartReducer, ReduceRules, RefusedPart
from protocol import swarm_pb2

logger = logging.getLogger(__name__)


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers send the averaged part itself, encoded once per part."""

    def __init__(self, *, rules: ReduceRules, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # outputs are averages; a failed reducer leaves local values
        self._encoded_averages: Dict[int, asyncio.Future] = {}
        self.refusals: Dict[PeerID, str] = {}  # senders dropped for what they sent, and why
        self.non_finite_from: Set[PeerID] = set()  # reducers that returned a NaN or an infinity
        self.unanswered_by: Set[PeerID] = set()  # reducers that timed out on this peer or broke the stream
        register = self.tensor_part_container.register_processed_part

        def register_finite_only(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if not bool(torch.isfinite(part).all()):
                self.non_finite_from.add(self.ordered_peer_ids[peer_index])
            register(peer_index, part_index, part)

        self.tensor_part_container.register_processed_part = register_finite_only
        # hivemind built a plain TensorPartReducer; replace it before anything uses it
        self.tensor_part_reducer = CheckedPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            rules=rules,
            part_offsets=part_offsets(self.tensor_part_container.local_tensors, self.parts_for_local_averaging),
        )

    def _encode_average(self, part_index: int, averaged_part: torch.Tensor) -> asyncio.Future:
        """The one encoding of this part's average that every sender (and this peer) decodes. An average that is
        not finite (the parts were, so their sum overflowed) is never sent: this reducer fails the part instead,
        rather than be named for a NaN by every member."""
        if not bool(torch.isfinite(averaged_part).all()):
            raise AllreduceException(f"the average of part {part_index} overflowed")
        return self._encoded(part_index, averaged_part)

    def _encoded(self, part_index: int, averaged_part: torch.Tensor) -> asyncio.Future:
        if part_index not in self._encoded_averages:
            compression = self.tensor_part_container.compression
            self._encoded_averages[part_index] = asyncio.get_event_loop().run_in_executor(
                None, compression.compress, averaged_part, CompressionInfo.from_tensor(averaged_part)
            )
        return self._encoded_averages[part_index]

    async def _communicate_with_peer(self, peer_id) -> None:
        if peer_id != self.peer_id:
            try:
                return await super()._communicate_with_peer(peer_id)
            except AllreduceException:  # it answered, in the protocol: a refusal code or a short stream
                raise
            except Exception:  # no answer in time, or the stream broke
                self.unanswered_by.add(peer_id)
                raise
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged_part = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            encoded: runtime_pb2.Tensor = await self._encode_average(part_index, averaged_part)
            self.tensor_part_container.register_processed_part(
                peer_index, part_index, deserialize_torch_tensor(encoded)
            )

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                except BannedException:
                    break
                except RefusedPart as e:
                    sender = self.sender_peer_ids[sender_index]
                    logger.warning(f"dropped sender {sender} from the all-reduce: {e}")
                    self.refusals[sender] = str(e)
                    raise
                encoded = self._encode_average(part_index, averaged_part)
                part_index += 1  # counted once accumulated, as in hivemind: failing to receive is not a ban
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=await encoded)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def ban(self, peer_id: PeerID, reason: str) -> None:
        """Drop a sender from this all-reduce (which then fails)."""
        if peer_id in self.sender_peer_ids:
            self.refusals.setdefault(peer_id, reason)
            await self._ban_sender(peer_id)

    def dropped(self) -> Set[PeerID]:
        """Members that failed to deliver to this peer: as a sender, parts it did not send in time (not parts it
        sent and this peer refused), or, as a reducer, no answer in time. A member that answered with a refusal
        is not among them: it may say the truth (a leader that told members different groups)."""
        silent_senders = {peer for peer in self.banned_senders if peer not in self.refusals}
        return (silent_senders | self.unanswered_by) - {self.peer_id}

    def received_sketches(self) -> Dict[str, swarm_pb2.PartSketch]:
        return self.tensor_part_reducer.received_sketches(self.sender_peer_ids)

    def raise_if_partial(self) -> None:
        """hivemind finishes "successfully" around failed peers; a partial average must not be used."""
        if self.banned_senders:
            refused = "".join(f"; {peer}: {reason}" for peer, reason in self.refusals.items())
            raise AllreduceException(
                f"partial all-reduce: dropped senders {sorted(map(str, self.banned_senders))}{refused}"
            )
        if self.non_finite_from:
            raise AllreduceException(f"reducers returned non-finite averages: {sorted(map(str, self.non_finite_from))}")
        failed_size = self.tensor_part_container.failed_size
        if failed_size:
            raise AllreduceException(f"partial all-reduce: {failed_size} values not averaged (a reducer failed)")
