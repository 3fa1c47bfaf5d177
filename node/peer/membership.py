"""A peer's standing in an admitted run, kept current from a background thread.

Training never waits on the coordinator: this thread renews the access token before it expires,
hands it to the DHT process and publishes it for other peers' averagers (node/swarm/admission.py),
and sends the latest heartbeat (with the peers this one excluded: service.py bans one that most live trainers
report), taking the coordinator's ban list from each reply. While the
coordinator is down, heartbeats are skipped and the current token carries the peer on.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import grpc
import hivemind

from node.peer.coordinator_client import RETRIED, CoordinatorClient, CoordinatorError, coordinator_status
from node.swarm.admission import push_bans, push_token
from protocol import swarm_pb2
from protocol.identity import P2PIdentity, SigningKey
from protocol.records import MAX_EXCLUSIONS

logger = logging.getLogger(__name__)
RENEW_FRACTION = 0.5  # renew once half of the token's lifetime is gone
MAX_PENDING = 100  # heartbeats kept while the coordinator is unreachable


class Membership:
    def __init__(self, client: CoordinatorClient, interval: float = 2.0):
        self.client, self.interval = client, interval
        self.banned: frozenset[str] = frozenset()
        self._refusal: Optional[str] = None  # the coordinator's last refusal (e.g. banned), logged once
        self._pending: dict[int, tuple[str, dict]] = {}  # round -> (model digest, metrics) not yet delivered
        self._exclusions: dict[str, swarm_pb2.Exclusion] = {}  # peer -> why this peer excluded it, not yet delivered
        self._lock = threading.Lock()
        self.initial_peers: list[str] = []  # the coordinator's DHT addresses
        self._dht: Optional[hivemind.DHT] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="membership", daemon=True)

    @classmethod
    def register(cls, address: str, key: SigningKey, identity: P2PIdentity, role: str) -> "Membership":
        """Ask the coordinator at ``address`` which run it serves, and register for it."""
        status = coordinator_status(address)
        client = CoordinatorClient(address, key, identity, status.run_id, role)
        client.register()
        membership = cls(client)
        membership.initial_peers = list(status.initial_peers)
        return membership

    @property
    def run_id(self) -> str:
        return self.client.run_id

    @property
    def token(self) -> swarm_pb2.AccessToken:
        return self.client.token

    @property
    def coordinator_public_key(self) -> bytes:
        return self.client.coordinator_public_key

    def start(self, dht: hivemind.DHT) -> "Membership":
        """Hand the token to the now running DHT and start the thread. The peer registered before its DHT
        existed (the DHT needs the token), so it registers again with the address the DHT listens on,
        which the dashboard lists; without a coordinator answer the first token carries on."""
        self._dht = dht
        token = self.token
        visible = dht.get_visible_maddrs()
        try:
            token = self.client.register(str(visible[0]) if visible else "")
        except CoordinatorError as e:
            logger.warning(f"could not tell the coordinator this peer's address: {e}")
        push_token(dht, token)
        self._thread.start()
        return self

    def report(self, round_: int, model_digest: str, metrics: dict) -> None:
        """Queue a heartbeat for ``round_`` (numbers only; booleans as 0/1); metrics of one round are merged.
        While the coordinator is down the last MAX_PENDING rounds wait."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with self._lock:
            _, known = self._pending.get(round_, ("", {}))
            self._pending[round_] = (model_digest, {**known, **numbers})
            for old in sorted(self._pending)[:-MAX_PENDING]:
                del self._pending[old]

    def report_exclusion(self, peer_id: str, round_: int, what: str) -> None:
        """Tell the coordinator, with the next heartbeat, that this peer caught ``peer_id`` breaking the protocol
        in ``round_`` (it bans a peer reported by more than half of the live trainers). Only trainers report:
        a verifier sends no heartbeats and has no voice."""
        if self.client.role != "trainer":
            return
        with self._lock:
            self._exclusions[peer_id] = swarm_pb2.Exclusion(peer_id=peer_id, round=round_, what=what[:1024])
            for old in list(self._exclusions)[:-MAX_PENDING]:
                del self._exclusions[old]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except CoordinatorError as e:
                if self._refusal != str(e):
                    logger.warning(f"coordinator refused this peer: {e}")
                self._refusal = str(e)
            except Exception as e:  # never let the thread die: training must go on
                logger.warning(f"membership: {type(e).__name__}: {e}")

    def _tick(self) -> None:
        token = self.client.token
        if self.client.expires_in() < (1 - RENEW_FRACTION) * (token.expires_at - token.issued_at):
            try:
                push_token(self._dht, self.client.renew())
            except CoordinatorError as e:
                if getattr(e, "code", None) in RETRIED:
                    logger.info(f"token not renewed yet: {e}")  # coordinator down: the current token carries on
                else:
                    raise
        with self._lock:
            pending = sorted(self._pending.items())
        for round_, (digest, metrics) in pending:
            with self._lock:
                exclusions = list(self._exclusions.values())[:MAX_EXCLUSIONS]
            try:
                reply = self.client.heartbeat(round_, digest, metrics, exclusions)
            except CoordinatorError as e:
                if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # the coordinator has not seen the swarm this far
                    logger.info(f"heartbeat of round {round_} waits: {e}")
                    return
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                logger.warning(f"heartbeat of round {round_} dropped: {e}")  # else it would hold back the rest
                with self._lock:
                    self._pending.pop(round_, None)
                continue
            if reply is None:  # coordinator down: try again next tick
                return
            with self._lock:
                if self._pending.get(round_, (None, None))[1] == metrics:
                    del self._pending[round_]
                for exclusion in exclusions:
                    if self._exclusions.get(exclusion.peer_id) == exclusion:
                        del self._exclusions[exclusion.peer_id]
            self._refusal = None
            if set(reply.banned) != self.banned:
                self.banned = frozenset(reply.banned)
                push_bans(self._dht, self.banned)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.client.timeout * self.client.attempts + 5)
        self.client.close()
