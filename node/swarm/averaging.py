"""Weighted gradient all-reduce for one round, with a result the whole group verifiably agrees on.

``RoundAverager.average`` never raises on a network or peer failure and never leaves the caller
waiting past ``max_seconds``: any failure is an outcome with a typed ``failure``, the caller's
tensors are untouched (they are copied into the averager's own buffers), and the caller skips the
step and tries again next round. ``ok`` means every member of the group published the same
digest of the result (see agreement.py).

Each call forms its own group among the peers that call within the matchmaking window. Two groups can
form in the same round (late peers, or more peers than ``target_group_size``); each is internally
consistent, so callers still compare model digests after the step (docs/DESIGN.md, "A round").

Trust (docs/DESIGN.md "Trust" 2, 4, 5): ``set_admitted`` limits who this peer averages with and serves;
with a ``sketch_seed`` the outcome's report carries what each sender sent this peer as a reducer
(binding.py), and ``clip_factor`` / ``max_weight`` bound what one sender can do to the parts this peer
reduces (clipping.py). The hivemind machinery behind it is in node/swarm/hivemind/.
"""

from __future__ import annotations

import enum
import logging
import math
import multiprocessing as mp
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

from node.errors import one_line
from node.swarm.agreement import AgreementSigner, agree, group_key, result_digest
from node.swarm.binding import AllReduceReport
from node.swarm.gather import RoundGather
from node.swarm.hivemind.averager import Admitted, ExactAverager, StateProvider
from node.swarm.hivemind.codecs import make_compression
from node.swarm.hivemind.reducer import ReduceRules
from node.swarm.progress import KeyOf
from protocol import swarm_pb2
from protocol.config import RunConfig, SwarmSection
from protocol.identity import SigningKey
from protocol.keys import averaging_prefix

logger = logging.getLogger(__name__)

HOST_GRACE = 5.0  # seconds on top of hivemind's own bounds before the host stops waiting for the averager
# Matchmaking runs DHT lookups that wait up to 3 s for each unresponsive node; a frozen peer measured here
# cost survivors ~6 s of matchmaking in the next round (until the DHT blacklists it).
MATCHMAKING_SLACK = 10.0
SHUTDOWN_TIMEOUT = 5.0
STAGE_POLL_INTERVAL = 0.01  # seconds; only to time the start of the all-reduce


class FailureKind(enum.StrEnum):
    """Why a round's average is not used."""

    CANCELLED = "cancelled"  # shutdown() during the round
    ALLREDUCE = "allreduce"  # hivemind failed: no group in time, a timeout, a dropped peer, a partial all-reduce
    ALONE = "alone"  # no other peer joined the group
    MALFORMED_GATHER = "malformed-gather"  # a member did not say which round it averages
    MIXED_ROUNDS = "mixed-rounds"  # the group mixed rounds
    DISAGREEMENT = "disagreement"  # the members did not all publish the same digest of the result
    NON_FINITE = "non-finite"  # a reducer returned a NaN or an infinity (outcome.culprits): never stepped on
    # Not the averager's: the peer did not average, having committed to the round under a model it no longer holds
    SAT_OUT = "sat-out"


@dataclass(frozen=True)
class RoundFailure:
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass
class AllReduceOutcome:
    failure: Optional[RoundFailure] = None  # None: every member agreed on ``tensors``
    tensors: list = field(default_factory=list)  # the averaged values (fp32); empty unless ok
    group_size: int = 0
    digest: str = ""
    seconds: float = 0.0  # the whole call: matchmaking, all-reduce, agreement
    allreduce_seconds: float = 0.0  # the all-reduce alone, once the group was formed
    # The averager process's account of the all-reduce whenever a group formed, also when the round then
    # failed (evidence matters most then): the group and what each sender sent this peer as a reducer.
    report: Optional[AllReduceReport] = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def reason(self) -> str:
        return "" if self.failure is None else str(self.failure)

    @property
    def culprits(self) -> list[str]:
        """Members this peer saw break the protocol on its own authenticated streams (a reducer that returned a
        non-finite average): evidence enough to stop averaging with them."""
        return list(self.report.non_finite_from) if self.report is not None else []

    @property
    def dropped(self) -> list[str]:
        """Members that failed to deliver to this peer in a failed all-reduce (stalled, dropped their parts, broke
        a stream), as this peer saw it on its own streams: nobody else can check that, so it is this peer's
        reason to keep them out of its next groups for a while, not evidence for a ban."""
        return [] if self.ok or self.report is None else list(self.report.dropped)

    def bindings(self) -> list[swarm_pb2.Binding]:
        """One Binding per sender (a small record each): what it sent this peer as a reducer."""
        if self.report is None:
            return []
        return [swarm_pb2.Binding(group_id=self.report.group_id, parts=[part])
                for _, part in sorted(self.report.received.items())]


class RoundAverager:
    """Averages a fixed list of fp32 buffers (one per gradient tensor) with the peers of each round.
    One ``average`` call at a time; ``shutdown`` may come from another thread.

    :param dht: a running DHT (see start_dht); the averager uses it but does not shut it down
    :param shapes: the shape of each tensor passed to ``average``; every peer must use the same list
    :param swarm: group sizes, timeouts and compression
    :param prefix: the averaging namespace; peers with different prefixes never group together
    :param state_provider: called (from a background thread) when a joining peer downloads our state;
      returns (metadata dict, tensors). None: serve no state.
    :param client_mode: for peers that cannot accept connections (NAT); default: the DHT's mode.
      They send their gradient and get the average, but reduce no part and serve no state.
    :param admitted: the peer ids this peer averages with and serves from the start (see set_admitted);
      None: anyone
    :param signer: how this peer signs its agreement digests and whose it believes; default: a new key, any
      signer believed, the prefix as run id (a swarm without a run's DHT rules)
    """

    def __init__(self, dht: hivemind.DHT, shapes: Sequence[Sequence[int]], swarm: SwarmSection, *, prefix: str,
                 state_provider: Optional[StateProvider] = None, client_mode: Optional[bool] = None,
                 admitted: Optional[Iterable[str]] = None, signer: Optional[AgreementSigner] = None):
        if mp.get_start_method() != "fork":
            raise RuntimeError(
                "hivemind needs the 'fork' start method (its DHT and averager pass pipes that only survive fork): "
                "call multiprocessing.set_start_method('fork', force=True) before starting the swarm"
            )
        self.dht, self.prefix = dht, prefix
        self.signer = signer or AgreementSigner(SigningKey(), prefix)
        self.matchmaking_timeout = swarm.matchmaking_time + MATCHMAKING_SLACK
        self.allreduce_timeout = swarm.allreduce_timeout
        self.agreement_timeout = swarm.agreement_timeout
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
            compression=make_compression(swarm.compression),
            state_compression=NoCompression(),  # a joining peer must get the exact tensors
            min_group_size=swarm.min_group_size,
            target_group_size=swarm.target_group_size,
            min_matchmaking_time=swarm.matchmaking_time,
            request_timeout=min(3.0, swarm.matchmaking_time / 2),  # hivemind: must be below matchmaking_time
            allreduce_timeout=swarm.allreduce_timeout,
            next_chunk_timeout=swarm.next_chunk_timeout,
            client_mode=client_mode,
            allow_state_sharing=state_provider is not None and not client_mode,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            admitted=admitted_peer_ids(admitted),
        )
        self.peer_id = str(dht.peer_id)
        self.total_length = sum(buffer.numel() for buffer in self._buffers)  # of the flat order of binding.py
        self._in_flight: Optional[StepControl] = None
        self._closing = False

    @classmethod
    def for_run(cls, dht: hivemind.DHT, config: RunConfig, params: Sequence[torch.Tensor], *,
                state_provider: Optional[StateProvider] = None, client_mode: Optional[bool] = None,
                key: Optional[SigningKey] = None, key_of: Optional[KeyOf] = None) -> "RoundAverager":
        """The averager of a run's gradients (and state), for tensors shaped like ``params``: a trainer's, the
        verifier's, the coordinator's checkpointer's. ``key`` signs its agreement digests (default: a new one),
        ``key_of`` says whose to believe (None: anyone's)."""
        return cls(dht, [tuple(p.shape) for p in params], config.swarm, prefix=averaging_prefix(config.run.id),
                   state_provider=state_provider, client_mode=client_mode,
                   signer=AgreementSigner(key or SigningKey(), config.run.id, key_of))

    @property
    def max_seconds(self) -> float:
        """Upper bound on the duration of one ``average`` call."""
        return self.matchmaking_timeout + self.allreduce_timeout + self.agreement_timeout + 2 * HOST_GRACE

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
        :param sketch_seed: sketches what each sender sent it (the round's seed); see ``outcome.report``
        :param clip_factor: clips each sender's part to clip_factor x the part's median norm; 0: exact mean
        :param max_weight: counts a sender's weight as at most this; ``weight`` must not exceed it
        """
        started = time.monotonic()
        rules = ReduceRules(sketch_seed, clip_factor, math.inf if max_weight is None else max_weight)
        self._check(tensors, weight, rules)

        gathered: dict = {}

        def failed(kind: FailureKind, detail: str, report: Optional[AllReduceReport] = None) -> AllReduceOutcome:
            group_size = len(report.members) if report else len(gathered)
            return AllReduceOutcome(RoundFailure(kind, detail), group_size=group_size,
                                    seconds=time.monotonic() - started, report=report)

        try:
            self._load(tensors)
            gathered, allreduce_seconds = self._step(RoundGather.new(round_), weight, rules)
        except CancelledError:
            return failed(FailureKind.CANCELLED, "cancelled by shutdown()")
        except Exception as e:  # hivemind failures: no group, timeouts, dropped peers, partial all-reduce
            report = self._take_report()
            if report is not None and report.non_finite_from:
                return failed(FailureKind.NON_FINITE, f"{', '.join(report.non_finite_from)} returned a non-finite "
                                                      f"average", report)
            refused = report is not None and report.gathers and gather_failure(report.gathers, round_)
            if refused:  # the averager refused the group before any part was sent (hivemind/averager.py)
                return failed(refused.kind, refused.detail, report)
            return failed(FailureKind.ALLREDUCE, one_line(e), report=report)
        report = self._take_report()
        if len(gathered) < 2:
            return failed(FailureKind.ALONE, "no other peer joined", report=report)
        refused = gather_failure({str(peer): value for peer, value in gathered.items()}, round_)
        if refused:
            return failed(refused.kind, refused.detail, report)
        gathers = {str(peer): RoundGather.from_wire(value) for peer, value in gathered.items()}
        with self._averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        digest = result_digest(averaged)
        members = list(gathers)
        key = group_key(self.prefix, round_, [f"{peer}:{gather.nonce.hex()}" for peer, gather in gathers.items()])
        disagreement = agree(self.dht, key, round_, self.peer_id, members, digest, self.agreement_timeout,
                             self.signer)
        return AllReduceOutcome(
            failure=None if disagreement is None else RoundFailure(FailureKind.DISAGREEMENT, disagreement),
            tensors=averaged if disagreement is None else [],
            group_size=len(members),
            digest=digest,
            seconds=time.monotonic() - started,
            allreduce_seconds=allreduce_seconds,
            report=report,
        )

    def download_state(self, peer_id: str, timeout: float) -> Optional[Tuple[dict, list]]:
        """(metadata, tensors) ``peer_id``'s ``state_provider`` serves; None if it refused, is not admitted, or did
        not serve it within ``timeout``. The caller checks the state: it comes from a stranger."""
        try:
            with self._pipe_lock:
                future = self._averager.download_state(peer_id)
            return future.result(timeout=timeout)
        except Exception as e:
            logger.warning(f"could not load state from {peer_id}: {one_line(e)}")
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
            for buffer, tensor in zip(self._buffers, tensors, strict=True):
                buffer.copy_(tensor.detach())
        finally:
            self._averager.lock_averaged_tensors.release()

    def _step(self, gather: RoundGather, weight: float, rules: ReduceRules) -> Tuple[dict, float]:
        """One hivemind step without retries (a retry would re-average half-overwritten buffers).
        Returns ({peer: its gather, as sent} for the group, seconds from the all-reduce's start to its end)."""
        with self._pipe_lock:
            self._averager.set_rules(rules)
            control = self._averager.step(gather=gather.to_wire(), weight=float(weight),
                                          timeout=self.matchmaking_timeout, allow_retries=False, wait=False)
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


def gather_failure(gathered: dict[str, object], round_: int) -> Optional[RoundFailure]:
    """Why a group whose members sent these gathers (peer -> wire value) cannot average round ``round_``; None if
    every member said it averages that round."""
    rounds = set()
    for peer, value in gathered.items():
        try:
            rounds.add(RoundGather.from_wire(value).round)
        except ValueError as e:
            logger.warning(f"{peer} sent a malformed gather: {e}")
            return RoundFailure(FailureKind.MALFORMED_GATHER, f"{peer} did not say which round it averages")
    if rounds != {round_}:
        return RoundFailure(FailureKind.MIXED_ROUNDS, f"the group mixed rounds {sorted(rounds)}")
    return None


def _no_state():
    raise RuntimeError("this peer serves no state")
