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

Its reducer is CheckedPartReducer (reducer.py: checks, weight cap, binding sketches, clipping), and the
averager admits only the peers of ``set_admitted`` (hivemind authorizes DHT RPCs only; its averaging
RPCs accept anyone): it refuses their join requests, parts and state downloads, asks no one else to
lead its group or to serve it state, and fails a round whose group includes anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import AsyncIterator, Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_tensor_stream, deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, ValueWithExpiration
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip

from node.swarm.binding import AllReduceReport, part_offsets
from node.swarm.errors import one_line
from node.swarm.reducer import CheckedPartReducer, ReduceRules, RefusedPart
from protocol import swarm_pb2

logger = logging.getLogger(__name__)

StateProvider = Callable[[], Tuple[dict, Sequence[torch.Tensor]]]
Admitted = Optional[FrozenSet[PeerID]]  # None: anyone (an open swarm)


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers send the averaged part itself, encoded once per part."""

    def __init__(self, *, rules: ReduceRules = ReduceRules(), **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # outputs are averages; a failed reducer leaves local values
        self._encoded_averages: Dict[int, asyncio.Future] = {}
        self.refusals: Dict[PeerID, str] = {}  # senders dropped for what they sent, and why
        # hivemind built a plain TensorPartReducer; replace it before anything uses it
        self.tensor_part_reducer = CheckedPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            rules=rules,
            part_offsets=part_offsets(self.tensor_part_container.local_tensors, self.parts_for_local_averaging),
        )

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

    def received_sketches(self) -> Dict[str, swarm_pb2.PartSketch]:
        return self.tensor_part_reducer.received_sketches(self.sender_peer_ids)

    def raise_if_partial(self) -> None:
        """hivemind finishes "successfully" around failed peers; a partial average must not be used."""
        if self.banned_senders:
            refused = "".join(f"; {peer}: {reason}" for peer, reason in self.refusals.items())
            raise AllreduceException(
                f"partial all-reduce: dropped senders {sorted(map(str, self.banned_senders))}{refused}"
            )
        failed_size = self.tensor_part_container.failed_size
        if failed_size:
            raise AllreduceException(f"partial all-reduce: {failed_size} values not averaged (a reducer failed)")


class AdmittingMatchmaking(Matchmaking):
    """Matchmaking that asks only admitted peers to lead its group: a group with anyone else would fail
    at the start of the all-reduce, losing the round."""

    is_admitted: Callable[[PeerID], bool]

    async def _request_join_group(self, leader: PeerID) -> Optional[GroupInfo]:
        if not self.is_admitted(leader):
            logger.info(f"not asking {leader} to lead our group: it is not admitted")
            return None
        return await super()._request_join_group(leader)


class ExactAverager(DecentralizedAverager):
    """DecentralizedAverager running ExactAllReduceRunner, serving ``state_provider()`` to joining peers,
    admitting only the peers of ``set_admitted``, keeping a report of each all-reduce for the host, and
    shutting down cleanly while a round is in flight.

    The host-side methods send a call through hivemind's control pipe; the averager process runs those
    calls in the order sent, so rules set before ``step`` apply to that step's all-reduce.
    """

    def __init__(self, *args, state_provider: StateProvider, admitted: Admitted = None, **kwargs):
        self._state_provider = state_provider
        self._admitted = admitted  # the averager process starts with this copy; set_admitted updates it
        self._rules = ReduceRules()
        self._report: Optional[AllReduceReport] = None
        super().__init__(*args, **kwargs)

    # ---- called in the host process ------------------------------------------------------------
    def get_current_state(self):
        """Runs in a thread of the host process when a peer downloads our state."""
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    def set_admitted(self, admitted: Admitted) -> MPFuture:
        """Admit only these peers (this peer itself always is); the future is done once the averager has them."""
        future = MPFuture()
        self._outer_pipe.send(("_set_admitted", [admitted], dict(future=future)))
        return future

    def set_rules(self, rules: ReduceRules) -> None:
        """How this peer reduces its parts in the all-reduces of the following steps."""
        self._outer_pipe.send(("_set_rules", [rules], {}))

    def take_report(self) -> MPFuture:
        """Future of the report of the current step's all-reduce (None if its group never formed); once."""
        future = MPFuture()
        self._outer_pipe.send(("_take_report", [], dict(future=future)))
        return future

    # ---- the averager process ------------------------------------------------------------------
    async def _set_admitted(self, admitted: Admitted, future: MPFuture) -> None:
        self._admitted = admitted
        future.set_result(None)

    async def _set_rules(self, rules: ReduceRules) -> None:
        self._rules = rules

    async def _take_report(self, future: MPFuture) -> None:
        future.set_result(self._report)
        self._report = None

    def _is_admitted(self, peer_id: PeerID) -> bool:
        return self._admitted is None or peer_id == self.peer_id or peer_id in self._admitted

    @property
    def _matchmaking(self) -> AdmittingMatchmaking:
        return self._admitting_matchmaking

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        # hivemind builds its Matchmaking inside the averager process, with no hook for a subclass: adopt it
        matchmaking.__class__ = AdmittingMatchmaking
        matchmaking.is_admitted = self._is_admitted
        self._admitting_matchmaking = matchmaking

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not self._is_admitted(context.remote_id):
            logger.warning(f"refused a join request from {context.remote_id}: not admitted")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not self._is_admitted(context.remote_id):  # admitted when its group formed, banned since
            logger.warning(f"refused parts from {context.remote_id}: not admitted")
            for runner in self._runners():
                await runner.ban(context.remote_id, "not admitted")
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self._is_admitted(context.remote_id):
            logger.warning(f"refused to serve our state to {context.remote_id}: not admitted")
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None) -> None:
        """hivemind's, downloading only from admitted peers (a banned one could serve a poisoned model)."""
        try:
            for peer in await self._state_donors():
                state = await self._download_state(peer)
                if state is not None:
                    future.set_result(state)
                    return
        except Exception as e:
            logger.warning(f"could not load state from peers: {one_line(e)}")
        finally:
            if not future.done():
                future.set_result(None)

    async def _state_donors(self) -> list:
        """Admitted peers that declared their state for download, highest priority first (ties at random)."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        declared = found.value if found is not None and isinstance(found.value, dict) else {}
        priorities = {}
        for subkey, entry in declared.items():
            if isinstance(subkey, bytes) and isinstance(entry, ValueWithExpiration) and isinstance(entry.value, (int, float)):
                peer = PeerID(subkey)
                if peer != self.peer_id and self._is_admitted(peer):
                    priorities[peer] = (float(entry.value), random.random())
        return sorted(priorities, key=priorities.get, reverse=True)

    async def _download_state(self, peer: PeerID) -> Optional[Tuple[dict, list]]:
        """(metadata, tensors) served by ``peer``; None if it refused (it then sends nothing) or failed."""
        try:
            stream = await self.get_stub(self._p2p, peer, namespace=self.prefix).rpc_download_state(
                averaging_pb2.DownloadRequest()
            )
            metadata, parts = None, []
            async for message in aiter_with_timeout(stream, timeout=self.next_chunk_timeout or self.request_timeout):
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                parts.append(message.tensor_part)
            if metadata is None:
                logger.info(f"{peer} did not send its state")
                return None
            return metadata, await deserialize_tensor_stream(as_aiter(parts))
        except Exception as e:
            logger.warning(f"could not download state from {peer}: {one_line(e)}")
            return None

    def _runners(self) -> list:
        """The all-reduce runners of the groups running now."""
        return [future.result() for future in self._running_groups.values() if future.done() and not future.cancelled()]

    async def _step(self, **kwargs) -> None:
        self._report = None  # a report belongs to the step whose all-reduce made it
        await super()._step(**kwargs)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes = None, **kwargs
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._report = AllReduceReport(group_id, [str(peer) for peer in group_info.peer_ids])
        outsiders = [str(peer) for peer in group_info.peer_ids if not self._is_admitted(peer)]
        if outsiders:
            self._running_groups[group_id].cancel()  # members' parts find no runner here: their rounds fail too
            raise AllreduceException(f"the group includes peers that are not admitted: {', '.join(outsiders)}")
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            rules=self._rules,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        try:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
            runner.raise_if_partial()
        finally:
            self._report.received.update(runner.received_sketches())

    async def _shutdown(self, timeout: float) -> None:
        """hivemind's version calls finalize() on the runners' futures and raises if a round is in flight."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for runner_future in self._running_groups.values():
            if runner_future.done() and not runner_future.cancelled():
                runner_future.result().finalize(cancel=True)
            else:
                runner_future.cancel()
