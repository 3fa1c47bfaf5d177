"""Weighted gradient all-reduce for one round, with a result the whole group verifiably agrees on.

``GradientAverager.average`` never raises on a network or peer failure and never leaves the caller
waiting past ``max_seconds``: any failure is an outcome with ``ok=False`` and a reason, the caller's
tensors are untouched (they are copied into the averager's own buffers), and the caller skips the
step and tries again next round. ``ok=True`` means every member of the group published the same
digest of the result (see agreement.py).

Each call forms its own group among the peers that call within the matchmaking window. Two groups can
form in the same round (late peers, or more peers than ``target_group_size``); each is internally
consistent, so callers still compare model digests after the step (DESIGN, "A round" step 7).

Trust (DESIGN "Trust" 2, 4, 5): ``set_admitted`` limits who this peer averages with and serves; with a
``sketch_seed`` the outcome carries what each sender sent this peer as a reducer (binding.py), and
``clip_factor`` / ``max_weight`` bound what one sender can do to the parts this peer reduces (robust.py).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import secrets
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple

import hivemind
import torch
from hivemind.averaging.control import StepControl
from hivemind.compression import NoCompression
from hivemind.p2p import PeerID

from node.swarm.agreement import agree, group_key, result_digest
from node.swarm.averager import Admitted, ExactAverager, StateProvider
from node.swarm.binding import AllReduceReport
from node.swarm.compression import make_compression
from node.swarm.errors import one_line
from node.swarm.reducer import ReduceRules
from protocol import swarm_pb2

logger = logging.getLogger(__name__)

HOST_GRACE = 5.0  # seconds on top of hivemind's own bounds before the host stops waiting for the averager
# Matchmaking runs DHT lookups that wait up to 3 s for each unresponsive node; a frozen peer measured here
# cost survivors ~6 s of matchmaking in the next round (until the DHT blacklists it).
MATCHMAKING_SLACK = 10.0
STAGE_POLL_INTERVAL = 0.01  # seconds; only to time the start of the all-reduce


@dataclass
class AllReduceOutcome:
    ok: bool
    tensors: list = field(default_factory=list)  # the averaged values (fp32); empty unless ok
    group_size: int = 0
    digest: str = ""
    seconds: float = 0.0  # the whole call: matchmaking, all-reduce, agreement
    allreduce_seconds: float = 0.0  # the all-reduce alone, once the group was formed
    reason: str = ""  # why not ok
    # Set whenever a group formed, also when the round then failed (evidence matters most then):
    group_id: bytes = b""
    members: list = field(default_factory=list)  # peer ids of the group, in hivemind's order
    received: dict = field(default_factory=dict)  # {sender: swarm_pb2.PartSketch} this peer reduced (sketch_seed)

    def bindings(self) -> list[swarm_pb2.Binding]:
        """One Binding per sender (a small record each): what it sent this peer as a reducer."""
        return [swarm_pb2.Binding(group_id=self.group_id, parts=[part]) for _, part in sorted(self.received.items())]

    def with_report(self, report: Optional[AllReduceReport]) -> "AllReduceOutcome":
        """This outcome with the group and the binding reports of the averager process's report."""
        if report is not None:
            self.group_id, self.members, self.received = report.group_id, report.members, report.received
            self.group_size = self.group_size or len(report.members)
        return self


class GradientAverager:
    """Averages a fixed list of fp32 buffers (one per gradient tensor) with the peers of each round.
    One ``average`` call at a time; ``shutdown`` may come from another thread.

    :param dht: a running DHT (see start_dht); the averager uses it but does not shut it down
    :param shapes: the shape of each tensor passed to ``average``; every peer must use the same list
    :param prefix: the averaging namespace; peers with different prefixes never group together
    :param state_provider: called (from a background thread) when a joining peer downloads our state;
      returns (metadata dict, tensors). None: serve no state.
    :param compression: "none", "fp16", "uniform8bit" or "quantile8bit" (see compression.py)
    :param matchmaking_time: how long a peer waits for others to join its group
    :param matchmaking_timeout: give up finding a group after this long (default: matchmaking_time + 10 s)
    :param allreduce_timeout: bound on one all-reduce once the group is formed (a frozen peer is waited on
      no longer than this; next_chunk_timeout alone does not bound it)
    :param next_chunk_timeout: a peer silent for this long during the all-reduce is dropped
    :param agreement_timeout: how long to wait for the other members' digests
    :param client_mode: for peers that cannot accept connections (NAT); default: the DHT's mode.
      They send their gradient and get the average, but reduce no part and serve no state.
    :param admitted: the peer ids this peer averages with and serves from the start (see set_admitted);
      None: anyone
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        shapes: Sequence[Sequence[int]],
        *,
        prefix: str = "grads",
        state_provider: Optional[StateProvider] = None,
        compression: str = "none",
        min_group_size: int = 2,
        target_group_size: Optional[int] = None,
        matchmaking_time: float = 5.0,
        matchmaking_timeout: Optional[float] = None,
        request_timeout: Optional[float] = None,
        allreduce_timeout: float = 30.0,
        next_chunk_timeout: float = 5.0,
        agreement_timeout: float = 10.0,
        client_mode: Optional[bool] = None,
        shutdown_timeout: float = 5.0,
        admitted: Optional[Iterable[str]] = None,
    ):
        if mp.get_start_method() != "fork":
            raise RuntimeError(
                "hivemind needs the 'fork' start method (its DHT and averager pass pipes that only survive fork): "
                "call multiprocessing.set_start_method('fork', force=True) before starting the swarm"
            )
        if matchmaking_timeout is None:
            matchmaking_timeout = matchmaking_time + MATCHMAKING_SLACK
        if request_timeout is None:
            request_timeout = min(3.0, matchmaking_time / 2)  # hivemind: must be below matchmaking_time
        if not 0 < matchmaking_time < matchmaking_timeout:
            raise ValueError("need 0 < matchmaking_time < matchmaking_timeout")
        self.dht, self.prefix = dht, prefix
        self.matchmaking_timeout = matchmaking_timeout
        self.allreduce_timeout = allreduce_timeout
        self.agreement_timeout = agreement_timeout
        if client_mode is None:
            client_mode = dht.client_mode
        self._buffers = [torch.zeros(tuple(shape), dtype=torch.float32) for shape in shapes]
        self._pipe_lock = threading.Lock()  # hivemind's control pipe takes one message at a time
        self._averager = ExactAverager(
            self._buffers,
            dht,
            start=True,
            prefix=prefix,
            state_provider=state_provider or _no_state,
            compression=make_compression(compression),
            state_compression=NoCompression(),  # a joining peer must get the exact tensors
            min_group_size=min_group_size,
            target_group_size=target_group_size,
            min_matchmaking_time=matchmaking_time,
            request_timeout=request_timeout,
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout,
            client_mode=client_mode,
            allow_state_sharing=state_provider is not None and not client_mode,
            shutdown_timeout=shutdown_timeout,
            admitted=admitted_peer_ids(admitted),
        )
        self.peer_id = str(dht.peer_id)
        self.total_length = sum(buffer.numel() for buffer in self._buffers)  # of the flat order of binding.py
        self._in_flight: Optional[StepControl] = None
        self._closing = False

    @property
    def max_seconds(self) -> float:
        """Upper bound on the duration of one ``average`` call."""
        return self.matchmaking_timeout + self.allreduce_timeout + self.agreement_timeout + 2 * HOST_GRACE

    @property
    def share_state(self) -> bool:
        """Whether joining peers may download our state (turn off until our own state is current)."""
        return self._averager.allow_state_sharing

    @share_state.setter
    def share_state(self, value: bool) -> None:
        with self._pipe_lock:
            self._averager.allow_state_sharing = value

    @property
    def state_sharing_priority(self) -> float:
        """Joining peers download state from the peer with the highest priority (we use the round)."""
        return self._averager.state_sharing_priority

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        if self.share_state:
            with self._pipe_lock:
                self._averager.state_sharing_priority = value

    def set_admitted(self, peer_ids: Optional[Iterable[str]]) -> None:
        """From now on, average with, serve and load state from only these peers (libp2p peer ids, which the
        p2p layer authenticates); this peer itself is always admitted. None: anyone (an open swarm).

        Takes effect for the next group: join requests, parts and state downloads from others are refused,
        other peers are not asked to lead our group or to serve us state, and a round whose group includes
        one of them fails (its outcome names them). May be called from any thread, also during a round.
        An averager too busy to confirm within HOST_GRACE takes the set when it reads its pipe (logged).
        """
        admitted = admitted_peer_ids(peer_ids)
        if not self._averager.is_alive():
            raise RuntimeError("the averager process is not running")
        with self._pipe_lock:
            future = self._averager.set_admitted(admitted)
        try:
            future.result(timeout=HOST_GRACE)
        except TimeoutError:
            logger.warning(f"the averager has not confirmed the admitted peers within {HOST_GRACE:.0f}s")

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        weight: float,
        round_: int,
        *,
        sketch_seed: Optional[int] = None,
        clip_factor: float = 0.0,
        max_weight: Optional[float] = None,
    ) -> AllReduceOutcome:
        """The weighted mean sum(w_i x_i) / sum(w_i) of ``tensors`` over this round's group; ``weight``
        is this peer's token count. Does not modify ``tensors``.

        As a reducer of the group, this peer
        :param sketch_seed: sketches what each sender sent it (the round's seed); see ``outcome.received``
        :param clip_factor: clips each sender's part to clip_factor x the part's median norm; 0: exact mean
        :param max_weight: counts a sender's weight as at most this; ``weight`` must not exceed it
        """
        started = time.monotonic()
        rules = ReduceRules(sketch_seed, clip_factor, math.inf if max_weight is None else max_weight)
        self._check(tensors, weight, rules)
        # The round rides along so that a group which mixed rounds is refused by all of its members;
        # the random part makes the agreement key unique per call.
        token = f"{self.peer_id}:{round_}:{secrets.token_hex(8)}"
        try:
            self._load(tensors)
            gathered, allreduce_seconds = self._step(token, weight, rules)
        except CancelledError:
            return _failed(started, "cancelled by shutdown()")
        except Exception as e:  # hivemind failures: no group, timeouts, dropped peers, partial all-reduce
            return _failed(started, one_line(e)).with_report(self._take_report())
        report = self._take_report()
        if len(gathered) < 2:
            return _failed(started, "no other peer joined", group_size=1).with_report(report)
        rounds = sorted({int(str(token).split(":")[1]) for token in gathered.values()})
        if rounds != [round_]:
            return _failed(started, f"the group mixed rounds {rounds}", group_size=len(gathered)).with_report(report)
        with self._averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        digest = result_digest(averaged)
        members = [str(peer) for peer in gathered]
        key = group_key(self.prefix, round_, gathered.values())
        disagreement = agree(self.dht, key, self.peer_id, members, digest, self.agreement_timeout)
        return AllReduceOutcome(
            ok=disagreement is None,
            tensors=averaged if disagreement is None else [],
            group_size=len(members),
            digest=digest,
            seconds=time.monotonic() - started,
            allreduce_seconds=allreduce_seconds,
            reason=disagreement or "",
            members=members,
        ).with_report(report)

    def load_state_from_peers(self, timeout: float) -> Optional[Tuple[dict, list]]:
        """(metadata, tensors) served by some peer's ``state_provider``, or None if none answered in time."""
        try:
            with self._pipe_lock:
                future = self._averager.load_state_from_peers(wait=False)
            return future.result(timeout=timeout)
        except Exception as e:
            logger.warning(f"could not load state from peers: {one_line(e)}")
            return None

    def shutdown(self) -> None:
        """Stop the averager process; safe while a round is in flight (that round then fails)."""
        self._closing = True
        if self._in_flight is not None:
            self._in_flight.cancel()
        try:
            if self._averager.is_alive():
                self._averager.shutdown()
        except Exception as e:
            logger.warning(f"averager shutdown raised {one_line(e)}; killing it")
        if self._averager.is_alive():
            self._averager.kill()
            self._averager.join(HOST_GRACE)

    def _check(self, tensors: Sequence[torch.Tensor], weight: float, rules: ReduceRules) -> None:
        shapes = [tuple(t.shape) for t in tensors]
        expected = [tuple(b.shape) for b in self._buffers]
        if shapes != expected:
            raise ValueError(f"tensor shapes {shapes} differ from the averager's {expected}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive token count, got {weight}")
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError("tensors hold non-finite values (reducers would refuse them)")
        if weight > rules.max_weight:
            raise ValueError(f"weight {weight} is above max_weight {rules.max_weight}")

    def _load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the inputs into the shared buffers; the averager holds this lock while it all-reduces."""
        if not self._averager.is_alive():
            raise RuntimeError("the averager process is not running")
        if not self._averager.lock_averaged_tensors.acquire(timeout=HOST_GRACE):
            raise RuntimeError("the previous all-reduce is still running")
        try:
            for buffer, tensor in zip(self._buffers, tensors):
                buffer.copy_(tensor.detach())
        finally:
            self._averager.lock_averaged_tensors.release()

    def _step(self, token: str, weight: float, rules: ReduceRules) -> Tuple[dict, float]:
        """One hivemind step without retries (a retry would re-average half-overwritten buffers).
        Returns ({peer: token} for the group, seconds from the all-reduce's start to its end)."""
        with self._pipe_lock:
            self._averager.set_rules(rules)
            control = self._averager.step(
                gather=token, weight=float(weight), timeout=self.matchmaking_timeout, allow_retries=False, wait=False
            )
        self._in_flight = control
        deadline = time.monotonic() + self.matchmaking_timeout + self.allreduce_timeout + HOST_GRACE
        try:
            while not (control.done() or control.began_allreduce) and time.monotonic() < deadline:
                time.sleep(STAGE_POLL_INTERVAL)
            began = time.monotonic()
            gathered = control.result(timeout=max(deadline - began, 0.0))
            return gathered, time.monotonic() - began
        except BaseException:
            if not control.done():  # cancelling twice raises InvalidStateError
                control.cancel()
            raise
        finally:
            self._in_flight = None

    def _take_report(self) -> Optional[AllReduceReport]:
        """The averager process's report of this step's all-reduce (None if no group formed)."""
        if self._closing or not self._averager.is_alive():
            return None
        try:
            with self._pipe_lock:
                future = self._averager.take_report()
            return future.result(timeout=HOST_GRACE)
        except Exception as e:
            logger.warning(f"no report of the all-reduce: {one_line(e)}")
            return None


def _failed(started: float, reason: str, group_size: int = 0) -> AllReduceOutcome:
    return AllReduceOutcome(False, group_size=group_size, seconds=time.monotonic() - started, reason=reason)


def admitted_peer_ids(peer_ids: Optional[Iterable[str]]) -> Admitted:
    """Checked libp2p peer ids (base58 strings); None stays None (anyone)."""
    if peer_ids is None:
        return None
    if isinstance(peer_ids, (str, bytes)):
        raise TypeError("expected a collection of peer ids, got a single string")
    admitted = set()
    for peer_id in peer_ids:
        if not isinstance(peer_id, str) or not peer_id:
            raise ValueError(f"a peer id must be a non-empty base58 string, got {peer_id!r}")
        admitted.add(PeerID.from_base58(peer_id))  # raises ValueError on a character outside base58
    return frozenset(admitted)


def _no_state():
    raise RuntimeError("this peer serves no state")
