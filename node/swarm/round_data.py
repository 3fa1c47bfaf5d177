"""The peer's own p2p RPC: serving what it did in recent rounds to verifiers.

Per round a peer keeps its signed contribution record with the rollout bundle behind it, and, as a
reducer, its signed binding records. Verifiers ask the peer itself over libp2p, which authenticates
both ends: the answer is attributable to the peer (a DHT value is not: any admitted peer may
overwrite it), and only admitted peers are served. Rollouts are bulk data (docs/DESIGN.md: keep DHT values
small), so bundles stream in chunks. Handlers run on an asyncio loop in a background thread of the
host process, talking to the DHT's p2p daemon through a replica.

hivemind ends a reply stream quietly when the connection closes, so a cut stream reads like a short
answer. What a peer serves is evidence against it, so the final chunk is marked: a stream without the
mark is a transport failure, tried again with back-off, and never read as the peer's answer.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
from typing import AsyncIterator, Callable, Optional

import hivemind
from hivemind.p2p import P2PContext, PeerID

from node.retry import retrying
from protocol import swarm_pb2
from protocol.bundle import MAX_BUNDLE_BYTES
from protocol.keys import ROUND_DATA_RPC
from protocol.records import MAX_RECORD_BYTES

logger = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # below hivemind's 4 MiB stream message limit
MAX_RECORDS = 256  # a contribution is one record; a reducer's bindings are one per sender of its group
MAX_REPLY_BYTES = MAX_BUNDLE_BYTES + MAX_RECORDS * MAX_RECORD_BYTES  # an asker stops reading a peer that sends more
START_TIMEOUT = 30.0
FETCH_ATTEMPTS = 3
FETCH_BACKOFF = 1.0  # seconds before the second attempt, doubled before each next one


class RoundData(enum.StrEnum):
    """What a peer keeps of a round for others to ask."""

    CONTRIBUTION = "contribution"  # its signed contribution record, with the rollout bundle behind it
    BINDINGS = "bindings"  # as a reducer: one signed binding record per sender of its group


class RpcError(RuntimeError):
    """A round-data request that could not be answered; the message says why."""


class Refused(RpcError):
    """The peer's answer itself is the failure (a refusal, or too much data): asking again would not help."""


class NotHeld(Refused):
    """The peer answered, and holds no such data for ``round``; ``held_rounds`` are those it holds."""

    def __init__(self, message: str, round_: int, held_rounds: list[int]):
        super().__init__(message)
        self.round, self.held_rounds = round_, held_rounds

    def evicted(self, history: int) -> bool:
        """Whether the round has left a full window of newer rounds (the asker came late): no evidence
        that the peer never kept it."""
        return len(self.held_rounds) >= history and self.round < min(self.held_rounds)


class RoundDataService:
    """Serves what was ``keep``-ed for the last ``history`` rounds; ``fetch`` asks another peer."""

    def __init__(self, dht: hivemind.DHT, run_id: str, history: int,
                 is_admitted: Optional[Callable[[str], bool]] = None):
        self.dht, self.run_id = dht, run_id
        self.is_admitted = is_admitted or (lambda peer_id: True)
        self.peer_id = str(dht.peer_id)
        self._held: collections.OrderedDict[tuple[int, str], tuple[list[bytes], bytes]] = collections.OrderedDict()
        self._history = history
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="peer-rpc", daemon=True)
        self._p2p = None

    def start(self) -> "RoundDataService":
        self._thread.start()
        self._call(self._setup(), START_TIMEOUT)
        return self

    async def _setup(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        await self._p2p.add_protobuf_handler(ROUND_DATA_RPC, self._serve, swarm_pb2.RoundDataRequest,
                                             stream_output=True)

    def keep(self, round_: int, what: RoundData, records: list[bytes], tensors: bytes = b"") -> None:
        """Hold ``records`` (serialized SignedRecords) and ``tensors`` as this peer's ``what`` of ``round_``."""
        what = RoundData(what)
        with self._lock:
            self._held[(round_, what)] = (list(records), tensors)
            while len({r for r, _ in self._held}) > self._history:
                self._held.popitem(last=False)

    def held(self, round_: int, what: RoundData) -> tuple[list[bytes], bytes]:
        """What this peer serves as its ``what`` of ``round_`` (KeyError if nothing)."""
        with self._lock:
            return self._held[(round_, what)]

    async def _serve(self, request: swarm_pb2.RoundDataRequest, context: P2PContext
                     ) -> AsyncIterator[swarm_pb2.RoundData]:
        reply = swarm_pb2.RoundData(run_id=self.run_id, round=request.round, peer_id=self.peer_id)
        with self._lock:
            records, tensors = self._held.get((request.round, request.what), (None, b""))
            held = sorted({r for r, _ in self._held})
        if not self.is_admitted(str(context.remote_id)):
            reply.error = "not admitted to this run"
        elif request.run_id != self.run_id:
            reply.error = f"this peer trains run {self.run_id!r}, not {request.run_id!r}"
        elif records is None:
            reply.error = f"no {request.what!r} held for round {request.round} (holding rounds {held})"
            reply.not_held = True
            reply.held_rounds.extend(held)
        if reply.error:
            yield reply
            return
        reply.records.extend(records)
        starts = range(0, max(len(tensors), 1), CHUNK_BYTES)
        for start in starts:
            reply.tensors = tensors[start:start + CHUNK_BYTES]
            reply.last = start == starts[-1]
            yield reply
            del reply.records[:]

    def fetch(self, peer_id: str, round_: int, what: RoundData, timeout: float,
              attempts: int = FETCH_ATTEMPTS) -> tuple[list[bytes], bytes]:
        """(records, tensors) ``peer_id`` holds as its ``what`` of ``round_``; raises RpcError otherwise.

        Each attempt gets ``timeout`` seconds; failures other than a refusal are tried ``attempts`` times."""
        try:
            return retrying(lambda: self._call(self._fetch(peer_id, round_, RoundData(what)), timeout),
                            attempts=attempts, backoff=FETCH_BACKOFF, what=f"round data from {peer_id}",
                            retry_on=lambda e: isinstance(e, RpcError) and not isinstance(e, Refused))
        except Refused:
            raise
        except RpcError as e:
            raise RpcError(f"{e} (after {attempts} attempts)") from None

    async def _fetch(self, peer_id: str, round_: int, what: RoundData) -> tuple[list[bytes], bytes]:
        request = swarm_pb2.RoundDataRequest(run_id=self.run_id, round=round_, what=what)
        records, chunks, size, complete = [], [], 0, False
        try:
            stream = await self._p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), ROUND_DATA_RPC, request,
                                                               swarm_pb2.RoundData)
            async for reply in stream:
                if reply.error:
                    message = f"{peer_id} has no {what} of round {round_}: {reply.error}"
                    raise NotHeld(message, round_, list(reply.held_rounds)) if reply.not_held else Refused(message)
                size += len(reply.tensors) + sum(map(len, reply.records))
                if size > MAX_REPLY_BYTES:
                    raise Refused(f"{peer_id} sent more than {MAX_REPLY_BYTES} bytes for round {round_}")
                records.extend(reply.records)
                chunks.append(reply.tensors)
                complete = reply.last
        except RpcError:
            raise
        except Exception as e:
            raise RpcError(f"could not fetch the {what} of round {round_} from {peer_id}: "
                           f"{type(e).__name__}: {e}") from None
        if not complete:
            raise RpcError(f"the {what} of round {round_} from {peer_id} was cut off after {len(chunks)} chunks "
                           f"({size} bytes)")
        return records, b"".join(chunks)

    def _call(self, coroutine, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise RpcError(f"no answer within {timeout:.0f}s") from None

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._teardown(), 5.0)
            except Exception as e:  # the daemon may be gone already
                logger.debug(f"stopping the round-data service: {e}")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)

    async def _teardown(self) -> None:
        if self._p2p is not None:
            await self._p2p.remove_protobuf_handler(ROUND_DATA_RPC, stream_output=True)
            await self._p2p.shutdown()  # a replica: closes its connections, the daemon belongs to the DHT
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
