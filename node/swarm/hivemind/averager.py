"""hivemind's DecentralizedAverager as this project runs it: exact all-reduce, admission, reports, state.

- Every all-reduce runs ExactAllReduceRunner (allreduce.py): members end with bit-identical tensors,
  and a partial all-reduce fails.
- Admission: hivemind authorizes DHT RPCs only; its averaging RPCs accept anyone. This averager admits
  only the peers of ``set_admitted``: it refuses their join requests, parts and state downloads, asks no
  one else to lead its group or to serve it state (AdmittingMatchmaking, adopted by swapping the class
  of the Matchmaking hivemind builds inside the averager process), and fails a round whose group
  includes anyone else.
- Matchmaking runs under the key of the step's round (protocol/keys.py ``round_group_bits``): peers at other
  rounds never join the group; one that does anyway (a liar) gets the group refused before any part is sent.
- The host takes a report of each step's all-reduce (group, members, what each sender sent this peer as
  a reducer), also of a failed one.
- State is served by the host's ``state_provider`` and downloaded only from admitted peers.
- Shutting down while a round is in flight does not raise (hivemind's does).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable, FrozenSet, Optional, Sequence, Tuple

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import deserialize_tensor_stream
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip

from node.errors import one_line
from node.swarm.binding import AllReduceReport
from node.swarm.gather import RoundGather
from node.swarm.hivemind.allreduce import ExactAllReduceRunner
from node.swarm.hivemind.reducer import ReduceRules
from protocol.keys import round_group_bits

logger = logging.getLogger(__name__)

StateProvider = Callable[[], Tuple[dict, Sequence[torch.Tensor]]]
Admitted = Optional[FrozenSet[PeerID]]  # None: anyone (an open swarm)


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

    def download_state(self, peer_id: str) -> MPFuture:
        """Future of the (metadata, tensors) ``peer_id`` serves; None if it refused, failed or is not admitted."""
        future = MPFuture()
        self._outer_pipe.send(("_download_state_of", [peer_id], dict(future=future)))
        return future

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

    async def _download_state_of(self, peer_id: str, future: MPFuture) -> None:
        """Download ``peer_id``'s state if it is admitted (the host chose it: it vouched for the state)."""
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception as e:
            logger.warning(f"no state download from {peer_id!r:.60}: not a peer id ({one_line(e)})")
            future.set_result(None)
            return
        future.set_result(await self._download_state(peer) if self._is_admitted(peer) else None)

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

    async def _step(self, *, step: StepControl, **kwargs) -> None:
        self._report = None  # a report belongs to the step whose all-reduce made it
        # look for a group under the key of this step's round (hivemind also changes the bits once a group forms)
        try:
            own_round = RoundGather.from_wire(self._user_gather(step.data_for_gather)).round
        except Exception as e:  # the host always sends a RoundGather (RoundAverager._step); never leave it waiting
            logger.warning(f"a step without a round gather ({one_line(e)}): matchmaking under round 0's key")
            own_round = 0
        self._matchmaking.group_key_manager.group_bits = round_group_bits(own_round)
        await super()._step(step=step, **kwargs)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes = None, **kwargs
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._report = AllReduceReport(group_id, [str(peer) for peer in group_info.peer_ids],
                                       gathers=self._user_gathers(group_info))
        outsiders = [str(peer) for peer in group_info.peer_ids if not self._is_admitted(peer)]
        if outsiders:
            self._running_groups[group_id].cancel()  # members' parts find no runner here: their rounds fail too
            raise AllreduceException(f"the group includes peers that are not admitted: {', '.join(outsiders)}")
        off_round = self._off_round(self._report.gathers)
        if off_round:  # no part is sent or reduced: a reducer would report another round's parts under ours
            self._running_groups[group_id].cancel()
            raise AllreduceException(f"members at another round or with a malformed gather: {', '.join(off_round)}")
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
            self._report.non_finite_from = sorted(map(str, runner.non_finite_from))
            self._report.dropped = sorted(map(str, runner.dropped()))

    def _user_gathers(self, group_info: GroupInfo) -> dict[str, object]:
        """{member: what it sent as ``gather``}, from hivemind's (bandwidth, mode, user bytes) per member; a
        member whose gather does not decode maps to None."""
        gathers = {}
        for peer, data in zip(group_info.peer_ids, group_info.gathered, strict=True):
            try:
                gathers[str(peer)] = self._user_gather(data)
            except Exception:  # another peer's bytes
                gathers[str(peer)] = None
        return gathers

    def _user_gather(self, data: bytes) -> object:
        """What a member sent as ``gather``, from hivemind's (bandwidth, mode, user bytes) of it."""
        return self.serializer.loads(self.serializer.loads(data)[2])

    def _off_round(self, gathers: dict[str, object]) -> list[str]:
        """Members whose gather does not name the round this peer's own gather names."""
        try:
            own = RoundGather.from_wire(gathers[str(self.peer_id)]).round
        except (KeyError, ValueError):
            return sorted(gathers)
        off = []
        for peer, value in gathers.items():
            try:
                if RoundGather.from_wire(value).round != own:
                    off.append(peer)
            except ValueError:
                off.append(peer)
        return off

    async def _shutdown(self, timeout: float) -> None:
        """hivemind's version calls finalize() on the runners' futures and raises if a round is in flight."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for runner_future in self._running_groups.values():
            if runner_future.done() and not runner_future.cancelled():
                runner_future.result().finalize(cancel=True)
            else:
                runner_future.cancel()
