"""hivemind's DecentralizedAverager, changed so that a finished all-reduce leaves every member with
bit-identical tensors, and so that a partial one fails instead of reporting success.

Stock hivemind returns each sender ``average - its_part`` (compressed) and the sender adds it to its
own values. ``x + (avg - x)`` is not ``avg`` in floating point, and with compression each sender gets
a different rounding of its own delta, so members end up with slightly different tensors even when
nothing fails. Since every member steps its optimizer on the result and then compares model digests,
that is a mismatch every round. Here the reducer of a part encodes the average once and sends the same
bytes to every sender, itself included; senders overwrite their values with the decoded average.

hivemind also treats a reducer that failed (its part keeps the local values) or a sender that was
dropped (the part was averaged without it) as success. ExactAllReduceRunner raises instead.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Dict, Sequence, Tuple

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

StateProvider = Callable[[], Tuple[dict, Sequence[torch.Tensor]]]


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers send the averaged part itself, encoded once per part."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # outputs are averages; a failed reducer leaves local values
        self._encoded_averages: Dict[int, asyncio.Future] = {}

    def _encode_average(self, part_index: int, averaged_part: torch.Tensor) -> asyncio.Future:
        """The one encoding of this part's average that every sender (and this peer) decodes."""
        if part_index not in self._encoded_averages:
            compression = self.tensor_part_container.compression
            self._encoded_averages[part_index] = asyncio.get_event_loop().run_in_executor(
                None, compression.compress, averaged_part, CompressionInfo.from_tensor(averaged_part)
            )
        return self._encoded_averages[part_index]

    async def _communicate_with_peer(self, peer_id) -> None:
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
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
                encoded = self._encode_average(part_index, averaged_part)
                part_index += 1  # counted once accumulated, as in hivemind: failing to receive is not a ban
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=await encoded)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def raise_if_partial(self) -> None:
        """hivemind finishes "successfully" around failed peers; a partial average must not be used."""
        if self.banned_senders:
            raise AllreduceException(f"partial all-reduce: dropped senders {sorted(map(str, self.banned_senders))}")
        failed_size = self.tensor_part_container.failed_size
        if failed_size:
            raise AllreduceException(f"partial all-reduce: {failed_size} values not averaged (a reducer failed)")


class ExactAverager(DecentralizedAverager):
    """DecentralizedAverager running ExactAllReduceRunner, serving ``state_provider()`` to joining peers,
    and shutting down cleanly while a round is in flight."""

    def __init__(self, *args, state_provider: StateProvider, **kwargs):
        self._state_provider = state_provider
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        """Runs in a thread of the host process when a peer downloads our state."""
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes = None, **kwargs
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        runner.raise_if_partial()

    async def _shutdown(self, timeout: float) -> None:
        """hivemind's version calls finalize() on the runners' futures and raises if a round is in flight."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for runner_future in self._running_groups.values():
            if runner_future.done() and not runner_future.cancelled():
                runner_future.result().finalize(cancel=True)
            else:
                runner_future.cancel()
