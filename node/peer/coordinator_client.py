"""A peer's side of the coordinator's gRPC API: register, renew the access token, heartbeat, report verdicts.

The coordinator is not on the training path: peers keep training through the DHT while it is down. So
every call here is short and bounded: a few tries with back-off on UNAVAILABLE or DEADLINE_EXCEEDED,
then ``heartbeat`` gives up quietly (None) and the others raise one CoordinatorError line. Each try
signs a fresh record, since the coordinator consumes every record's nonce.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from node.retry import retrying
from protocol import swarm_pb2, swarm_pb2_grpc
from protocol.identity import P2PIdentity, SigningKey, binding_bytes
from protocol.records import sign_record
from protocol.tokens import TokenError, check_token

logger = logging.getLogger(__name__)

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_MESSAGE_BYTES = 1 << 20  # what the coordinator accepts; status replies may be larger
MAX_REPLY_BYTES = 64 << 20


class CoordinatorError(RuntimeError):
    """The coordinator refused a request, or could not be reached after every try; one line.
    ``code`` is the gRPC status (None when the reply itself was unusable)."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


def open_channel(address: str) -> grpc.Channel:
    # gRPC's reconnect back-off grows to 2 minutes by default: a restarted coordinator would stay
    # unreachable that long for peers that tried during the outage.
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                   ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                                                   ("grpc.initial_reconnect_backoff_ms", 500),
                                                   ("grpc.max_reconnect_backoff_ms", 5000)])


def call(address: str, method: Callable, make_request: Callable[[], Message], *, attempts: int, timeout: float,
         backoff: float) -> Message:
    """``method(make_request())`` with up to ``attempts`` (>= 1) tries while the coordinator is unreachable;
    raises CoordinatorError (its ``code`` set)."""
    try:
        return retrying(lambda: method(make_request(), timeout=timeout), attempts=attempts, backoff=backoff,
                        retry_on=lambda e: isinstance(e, grpc.RpcError) and e.code() in RETRIED,
                        what=f"coordinator {address}")
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        tries = f" (after {attempts} tries)" if code in RETRIED and attempts > 1 else ""
        raise CoordinatorError(f"coordinator {address}: {code.name}: {details}{tries}", code) from None


def registration_record(key: SigningKey, identity: P2PIdentity, run_id: str, role: str,
                        address: str) -> swarm_pb2.SignedRecord:
    """A "register" record: signed by the Ed25519 key (its proof of possession), with the libp2p key's
    signature of the binding between the two (protocol.identity.binding_bytes)."""
    timestamp = time.time()
    registration = swarm_pb2.Registration(
        peer_id=identity.peer_id, p2p_public_key=identity.public_der, role=role, address=address,
        p2p_signature=identity.sign(binding_bytes(key.public_key, run_id, timestamp)))
    return sign_record(key, "register", run_id, 0, registration, timestamp=timestamp)


class CoordinatorClient:
    """One peer's session with the coordinator; holds its current token and the coordinator's public key.

    :param coordinator_public_key: when known (the run announcement carries it), a reply signed by any
      other key is refused
    """

    def __init__(self, address: str, key: SigningKey, identity: P2PIdentity, run_id: str, role: str, *,
                 coordinator_public_key: Optional[bytes] = None, timeout: float = 5.0, attempts: int = 3,
                 backoff: float = 0.5):
        self.address, self.key, self.identity, self.run_id, self.role = address, key, identity, run_id, role
        self.coordinator_public_key = coordinator_public_key
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.token: Optional[swarm_pb2.AccessToken] = None
        self.peer_address = ""
        self._channel = open_channel(address)
        self._stub = swarm_pb2_grpc.CoordinatorStub(self._channel)

    def _call(self, method: Callable, make_request: Callable[[], Message], attempts: Optional[int] = None) -> Message:
        return call(self.address, method, make_request, attempts=attempts or self.attempts, timeout=self.timeout,
                    backoff=self.backoff)

    def _peer_request(self, kind: str, round_: int, body: Message) -> Callable[[], swarm_pb2.PeerRequest]:
        if self.token is None:
            raise CoordinatorError(f"coordinator {self.address}: not registered")
        return lambda: swarm_pb2.PeerRequest(token=self.token, record=sign_record(self.key, kind, self.run_id,
                                                                                  round_, body))

    def _accept(self, reply: swarm_pb2.TokenReply) -> swarm_pb2.AccessToken:
        """Check and keep a token the coordinator sent: ours, for this run, signed by the coordinator."""
        expected = self.coordinator_public_key or reply.coordinator_public_key
        try:
            check_token(reply.token, expected, run_id=self.run_id, peer_id=self.identity.peer_id,
                        public_key=self.key.public_key)
        except TokenError as e:
            raise CoordinatorError(f"coordinator {self.address} sent an unusable token: {e}") from None
        self.coordinator_public_key, self.token = expected, reply.token
        return reply.token

    def register(self, address_text: str = "") -> swarm_pb2.AccessToken:
        """Register this peer (``address_text``: its visible multiaddrs, for the dashboard) and get a token."""
        self.peer_address = address_text
        reply = self._call(self._stub.Register, lambda: swarm_pb2.RegisterRequest(
            record=registration_record(self.key, self.identity, self.run_id, self.role, address_text)))
        return self._accept(reply)

    def renew(self) -> swarm_pb2.AccessToken:
        """A fresh token. A coordinator that no longer accepts the old one (expired past its grace, or
        a ledger that forgot us) gets a new registration; a banned peer gets a CoordinatorError."""
        try:
            reply = self._call(self._stub.RenewToken, self._peer_request("renew", 0, empty_pb2.Empty()))
        except CoordinatorError as e:
            if e.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                raise
            logger.info(f"token not renewed ({e}); registering again")
            return self.register(self.peer_address)
        return self._accept(reply)

    def expires_in(self, now: Optional[float] = None) -> float:
        """Seconds until the current token expires (negative: expired; -inf: none)."""
        if self.token is None:
            return float("-inf")
        return self.token.expires_at - (time.time() if now is None else now)

    def heartbeat(self, round_: int, model_digest: str, metrics: dict[str, float],
                  exclusions: Sequence[swarm_pb2.Exclusion] = ()) -> Optional[swarm_pb2.HeartbeatReply]:
        """Report the round this peer just finished, and the peers it excluded since (one try: the next heartbeat
        is the retry); None when the coordinator cannot be reached, and training goes on. An expired token is
        renewed once; a refusal (e.g. banned) is a CoordinatorError."""
        body = swarm_pb2.Heartbeat(peer_id=self.identity.peer_id, round=round_, model_digest=model_digest,
                                   metrics=metrics, exclusions=exclusions)

        def send() -> swarm_pb2.HeartbeatReply:
            return self._call(self._stub.Heartbeat, self._peer_request("heartbeat", round_, body), attempts=1)

        try:
            try:
                return send()
            except CoordinatorError as e:
                if e.code != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                self.renew()
                return send()
        except CoordinatorError as e:
            if e.code not in RETRIED:
                raise
            logger.warning(f"heartbeat not delivered: {e}")
            return None

    def report_verdict(self, verdict: swarm_pb2.Verdict) -> bool:
        """Send a verifier's verdict; False (logged) when the coordinator could not be reached or refused it."""
        try:
            reply = self._call(self._stub.ReportVerdict, self._peer_request("verdict", verdict.round, verdict))
        except CoordinatorError as e:
            logger.warning(f"verdict on {verdict.peer_id} round {verdict.round} not recorded: {e}")
            return False
        logger.info(f"verdict on {verdict.peer_id} round {verdict.round}: {reply.message}")
        return True

    def status(self) -> swarm_pb2.StatusReply:
        return self._call(self._stub.Status, swarm_pb2.StatusRequest)

    def close(self) -> None:
        self._channel.close()


def coordinator_status(address: str, timeout: float = 5.0, attempts: int = 3,
                       page: Optional[swarm_pb2.StatusRequest] = None) -> swarm_pb2.StatusReply:
    """One page of the status of the run a coordinator serves (no registration needed); by default its first
    peers and latest rounds."""
    with open_channel(address) as channel:
        return call(address, swarm_pb2_grpc.CoordinatorStub(channel).Status,
                    lambda: page or swarm_pb2.StatusRequest(), attempts=attempts, timeout=timeout, backoff=0.5)


def all_peers(address: str, timeout: float = 5.0, attempts: int = 3, page_size: int = 0) -> list[swarm_pb2.PeerInfo]:
    """Every registered peer, page by page (``page_size`` 0: the coordinator's), until the first reply's total or
    a page that does not move the cursor on (so a broken or hostile coordinator cannot keep this reading)."""
    first = coordinator_status(address, timeout, attempts, swarm_pb2.StatusRequest(peers_limit=page_size))
    peers = list(first.peers)
    while peers and len(peers) < first.peers_total:
        next_page = swarm_pb2.StatusRequest(peers_after=peers[-1].index, peers_limit=page_size)
        page = coordinator_status(address, timeout, attempts, next_page)
        if not page.peers or page.peers[0].index <= peers[-1].index:
            break
        peers += page.peers
    return peers


def admin_action(address: str, admin_key: SigningKey, kind: str, peer_id: str, reason: str = "",
                 timeout: float = 5.0, attempts: int = 3) -> str:
    """Ban or unban (``kind``) a peer with the admin key; returns the coordinator's answer."""
    if kind not in ("ban", "unban"):
        raise ValueError(f"unknown admin action {kind!r}")
    with open_channel(address) as channel:
        stub = swarm_pb2_grpc.CoordinatorStub(channel)
        run_id = call(address, stub.Status, swarm_pb2.StatusRequest, attempts=attempts, timeout=timeout,
                      backoff=0.5).run_id
        method = stub.Ban if kind == "ban" else stub.Unban
        reply = call(address, method, lambda: sign_record(admin_key, kind, run_id, 0,
                                                          swarm_pb2.AdminAction(peer_id=peer_id, reason=reason)),
                     attempts=attempts, timeout=timeout, backoff=0.5)
    return reply.message
