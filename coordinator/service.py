"""The coordinator's gRPC API (protocol/swarm.proto ``Coordinator``): admission, heartbeats, verdicts, bans.

Every request that changes something carries a record signed by the caller's Ed25519 key, and peers also
show the access token this coordinator issued them. A request is checked whole before anything is written,
and the write (with the record's nonce, see ledger.py) is one transaction, so a refused request changes
nothing. Refusals are gRPC status codes with a one-line reason:

- INVALID_ARGUMENT: a missing or malformed field, a record of the wrong kind or run, a stale record
- UNAUTHENTICATED: a bad signature, a bad proof of possession of the libp2p key, a replayed record,
  a token that is not ours, expired, or not the signer's
- PERMISSION_DENIED: a banned peer; a ban not signed by the admin key; a verdict from a non-verifier;
  exclusions reported by a non-trainer
- ALREADY_EXISTS: a peer id registered before with another Ed25519 key
- NOT_FOUND: a peer the ledger does not know
- FAILED_PRECONDITION: a heartbeat of a round past where the swarm's signed progress is (swarm_round.py); the
  peer sends it again later
- RESOURCE_EXHAUSTED: a message over the server's size limit (refused by gRPC itself)

The banned set lives in memory too (heartbeat replies list it) and every change goes to ``on_bans``,
which the server uses to publish the signed ban list to the DHT.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from typing import Callable, Iterable, Optional

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from coordinator.ledger import Ledger, ReplayedRecord
from protocol import swarm_pb2, swarm_pb2_grpc
from protocol.identity import (
    SigningKey,
    binding_bytes,
    fingerprint,
    hivemind_public_key,
    peer_id_from_public_der,
    verify_p2p,
)
from protocol.records import MAX_EXCLUSIONS, RecordError, check_signature, open_record
from protocol.tokens import TokenError, check_token, issue_token

logger = logging.getLogger(__name__)

PEER_ROLES = ("trainer", "verifier")
DEFAULT_TOKEN_LIFETIME = 600.0  # seconds; peers renew at half-life, so a ban takes effect within this
DEFAULT_RENEW_GRACE = 600.0  # an expired token may still be renewed this long (a coordinator outage)
MAX_FIELD = 256  # characters of a peer id, address, metric name, check name
MAX_EVIDENCE = 2048
MAX_METRICS = 64


class Refused(Exception):
    """A request the coordinator turns down: becomes the gRPC status ``code`` with ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _answers(handler):
    """Turn Refused (and a replayed record) into the gRPC status the client sees."""

    @functools.wraps(handler)
    def wrapper(self, request, context):
        try:
            return handler(self, request, context)
        except Refused as e:
            context.abort(e.code, e.message)
        except ReplayedRecord as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    return wrapper


def _require(condition: bool, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    if not condition:
        raise Refused(code, message)


def _short(text: str, what: str, limit: int = MAX_FIELD) -> str:
    _require(len(text) <= limit, f"{what} longer than {limit} characters")
    return text


class CoordinatorService(swarm_pb2_grpc.CoordinatorServicer):
    """
    :param ledger: the run's ledger (also the source of Status)
    :param key: the coordinator's signing key (issues tokens)
    :param admin_key: raw Ed25519 public key whose records may ban and unban
    :param verifier_keys: public keys allowed to register as verifiers; None: any registered key (open)
    :param on_bans: called with the sorted banned peer ids after every change
    :param initial_peers: the coordinator's DHT multiaddrs, which Status tells nodes
    :param round_bound: the furthest round a heartbeat may name now (swarm_round.py)
    """

    def __init__(self, ledger: Ledger, key: SigningKey, *, admin_key: bytes,
                 token_lifetime: float = DEFAULT_TOKEN_LIFETIME, renew_grace: float = DEFAULT_RENEW_GRACE,
                 verifier_keys: Optional[Iterable[bytes]] = None,
                 on_bans: Callable[[list[str]], None] = lambda banned: None, initial_peers: Iterable[str] = (),
                 round_bound: Callable[[], float] = lambda: math.inf):
        self.ledger, self.key, self.run_id = ledger, key, ledger.run_id
        self.round_bound = round_bound
        self.admin_key, self.token_lifetime, self.renew_grace = admin_key, token_lifetime, renew_grace
        self.verifier_keys = None if verifier_keys is None else frozenset(verifier_keys)
        self.on_bans, self.initial_peers = on_bans, list(initial_peers)
        self.banned: set[str] = set(ledger.banned_peers())
        # Check-then-write must not interleave (e.g. two registrations of one peer id with different keys).
        self._lock = threading.Lock()

    # ---- checks shared by the RPCs ---------------------------------------------------------------
    def _open(self, record: swarm_pb2.SignedRecord, kind: str, body_type: type[Message], now: float) -> Message:
        try:
            check_signature(record)
        except RecordError as e:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        try:
            return open_record(record, run_id=self.run_id, kind=kind, body_type=body_type, now=now)
        except RecordError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def _admitted(self, request: swarm_pb2.PeerRequest, kind: str, body_type: type[Message], now: float,
                  expired_ok: bool = False) -> tuple[swarm_pb2.AccessToken, Message]:
        """The token and the opened body of a request from an admitted peer (token valid, record its own)."""
        _require(request.HasField("token") and request.HasField("record"), "request needs a token and a record")
        token, record = request.token, request.record
        try:
            # An expired token passes here; its age is judged below (renewal has a grace period).
            check_token(token, self.key.public_key, run_id=self.run_id, now=min(now, token.expires_at))
        except TokenError as e:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        expired_for = now - token.expires_at
        if expired_for > (self.renew_grace if expired_ok else 0.0):
            advice = "register again" if expired_ok else "renew it"
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"token expired {expired_for:.0f}s ago; {advice}")
        _require(record.public_key == token.public_key, "record not signed by the token's key",
                 grpc.StatusCode.UNAUTHENTICATED)
        body = self._open(record, kind, body_type, now)
        peer = self.ledger.peer(token.peer_id)
        _require(peer is not None and peer.public_key == token.public_key,
                 f"unknown peer {token.peer_id} (register again)", grpc.StatusCode.NOT_FOUND)
        _require(not peer.banned, f"peer {token.peer_id} is banned: {peer.ban_reason}",
                 grpc.StatusCode.PERMISSION_DENIED)
        return token, body

    def _issue(self, peer_id: str, public_key: bytes, p2p_der: bytes, role: str, now: float) -> swarm_pb2.TokenReply:
        token = issue_token(self.key, peer_id=peer_id, public_key=public_key,
                            p2p_public_key=hivemind_public_key(p2p_der), run_id=self.run_id, role=role,
                            lifetime=self.token_lifetime, now=now)
        return swarm_pb2.TokenReply(token=token, coordinator_public_key=self.key.public_key)

    def banned_peers(self) -> list[str]:
        with self._lock:
            return sorted(self.banned)

    def _set_banned(self, peer_id: str, banned: bool) -> None:
        (self.banned.add if banned else self.banned.discard)(peer_id)
        self.on_bans(sorted(self.banned))

    # ---- admission -------------------------------------------------------------------------------
    @_answers
    def Register(self, request: swarm_pb2.RegisterRequest, context) -> swarm_pb2.TokenReply:
        now = time.time()
        _require(request.HasField("record"), "request needs a signed register record")
        record = request.record
        registration: swarm_pb2.Registration = self._open(record, "register", swarm_pb2.Registration, now)
        peer_id = _short(registration.peer_id, "peer id")
        address = _short(registration.address, "address")
        _require(bool(peer_id and registration.p2p_public_key and registration.p2p_signature),
                 "registration needs peer_id, p2p_public_key and p2p_signature")
        _require(registration.role in PEER_ROLES,
                 f"role {registration.role!r} is not one of {', '.join(PEER_ROLES)}")
        _require(peer_id_from_public_der(registration.p2p_public_key) == peer_id,
                 f"p2p_public_key does not hash to peer id {peer_id}", grpc.StatusCode.UNAUTHENTICATED)
        _require(verify_p2p(registration.p2p_public_key, registration.p2p_signature,
                            binding_bytes(record.public_key, self.run_id, record.timestamp)),
                 "p2p_signature is not the peer id's signature of this key and run", grpc.StatusCode.UNAUTHENTICATED)
        if registration.role == "verifier" and self.verifier_keys is not None:
            _require(record.public_key in self.verifier_keys,
                     f"key {fingerprint(record.public_key)} is not on this run's verifier list",
                     grpc.StatusCode.PERMISSION_DENIED)
        with self._lock:
            known = self.ledger.peer(peer_id)
            if known is not None:
                _require(known.public_key == record.public_key,
                         f"peer id {peer_id} is registered with another signing key", grpc.StatusCode.ALREADY_EXISTS)
                _require(not known.banned, f"peer {peer_id} is banned: {known.ban_reason}",
                         grpc.StatusCode.PERMISSION_DENIED)
            self.ledger.register(peer_id, record.public_key, registration.p2p_public_key, registration.role, address,
                                 record.nonce, record.timestamp, now)
        logger.info(f"registered {registration.role} {peer_id} (key {fingerprint(record.public_key)})")
        return self._issue(peer_id, record.public_key, registration.p2p_public_key, registration.role, now)

    @_answers
    def RenewToken(self, request: swarm_pb2.PeerRequest, context) -> swarm_pb2.TokenReply:
        now = time.time()
        with self._lock:
            token, _ = self._admitted(request, "renew", empty_pb2.Empty, now, expired_ok=True)
            self.ledger.touch(token.peer_id, request.record.nonce, request.record.timestamp, now)
        peer = self.ledger.peer(token.peer_id)
        return self._issue(peer.peer_id, peer.public_key, peer.p2p_public_key, peer.role, now)

    # ---- run progress ----------------------------------------------------------------------------
    @_answers
    def Heartbeat(self, request: swarm_pb2.PeerRequest, context) -> swarm_pb2.HeartbeatReply:
        now = time.time()
        with self._lock:
            token, heartbeat = self._admitted(request, "heartbeat", swarm_pb2.Heartbeat, now)
            _require(heartbeat.peer_id in ("", token.peer_id),
                     f"heartbeat of {heartbeat.peer_id} sent by {token.peer_id}")
            _require(heartbeat.round >= 0, f"round {heartbeat.round} is negative")
            bound = self.round_bound()
            _require(heartbeat.round <= bound, f"round {heartbeat.round} is past the swarm's (at most {bound} now)",
                     grpc.StatusCode.FAILED_PRECONDITION)
            _short(heartbeat.model_digest, "model digest")
            _require(len(heartbeat.metrics) <= MAX_METRICS, f"more than {MAX_METRICS} metrics")
            for name, value in heartbeat.metrics.items():
                _short(name, "metric name")
                _require(math.isfinite(value), f"metric {name!r} is {value}")
            _require(len(heartbeat.exclusions) <= MAX_EXCLUSIONS, f"more than {MAX_EXCLUSIONS} exclusions")
            _require(token.role == "trainer" or not heartbeat.exclusions, "only trainers report exclusions",
                     grpc.StatusCode.PERMISSION_DENIED)
            for exclusion in heartbeat.exclusions:
                _require(bool(exclusion.peer_id) and exclusion.peer_id != token.peer_id,
                         f"an exclusion of {exclusion.peer_id!r:.60}: name another peer")
                _short(exclusion.peer_id, "excluded peer id")
                _short(exclusion.what, "exclusion", MAX_EVIDENCE)
                _require(exclusion.round >= 0, f"exclusion round {exclusion.round} is negative")
            reported = self.ledger.heartbeat(token.peer_id, heartbeat.round, heartbeat.model_digest,
                                             dict(heartbeat.metrics), request.record.nonce, request.record.timestamp,
                                             now, exclusions=heartbeat.exclusions)
            for peer_id in reported:
                self._set_banned(peer_id, True)
            banned = sorted(self.banned)
        for peer_id, reason in reported.items():
            logger.warning(f"banned {peer_id}: {reason}")
        return swarm_pb2.HeartbeatReply(round=self.ledger.furthest_round(), banned=banned)

    @_answers
    def ReportVerdict(self, request: swarm_pb2.PeerRequest, context) -> swarm_pb2.Ack:
        now = time.time()
        with self._lock:
            token, verdict = self._admitted(request, "verdict", swarm_pb2.Verdict, now)
            _require(token.role == "verifier", f"peer {token.peer_id} is a {token.role}, not a verifier",
                     grpc.StatusCode.PERMISSION_DENIED)
            _require(bool(verdict.peer_id), "verdict needs the audited peer_id")
            _require(verdict.peer_id != token.peer_id, "a verifier cannot judge itself")
            _short(verdict.check, "check name")
            _short(verdict.evidence, "evidence", MAX_EVIDENCE)
            _require(self.ledger.peer(verdict.peer_id) is not None, f"unknown peer {verdict.peer_id}",
                     grpc.StatusCode.NOT_FOUND)
            _require(not self.ledger.has_verdict(token.peer_id, verdict.peer_id, verdict.round),
                     f"a verdict on {verdict.peer_id}'s round {verdict.round} by this verifier is already recorded",
                     grpc.StatusCode.ALREADY_EXISTS)
            banned = self.ledger.verdict(token.peer_id, verdict, request.record.nonce, request.record.timestamp, now)
            if banned:
                self._set_banned(verdict.peer_id, True)
        if banned:
            logger.warning(f"banned {verdict.peer_id}: verifier {token.peer_id} failed it on {verdict.check}")
        return swarm_pb2.Ack(message=f"banned {verdict.peer_id}" if banned else "recorded")

    # ---- administration --------------------------------------------------------------------------
    def _admin_action(self, record: swarm_pb2.SignedRecord, kind: str, now: float) -> swarm_pb2.AdminAction:
        action: swarm_pb2.AdminAction = self._open(record, kind, swarm_pb2.AdminAction, now)
        _require(record.public_key == self.admin_key, f"{kind} not signed by the admin key",
                 grpc.StatusCode.PERMISSION_DENIED)
        _require(bool(action.peer_id), f"{kind} needs a peer_id")
        _short(action.reason, "reason", MAX_EVIDENCE)
        _require(self.ledger.peer(action.peer_id) is not None, f"unknown peer {action.peer_id}",
                 grpc.StatusCode.NOT_FOUND)
        return action

    @_answers
    def Ban(self, record: swarm_pb2.SignedRecord, context) -> swarm_pb2.Ack:
        now = time.time()
        with self._lock:
            action = self._admin_action(record, "ban", now)
            changed = self.ledger.ban(action.peer_id, action.reason or "banned by the admin", "admin",
                                      record.nonce, record.timestamp, now)
            if changed:
                self._set_banned(action.peer_id, True)
        return swarm_pb2.Ack(message=f"banned {action.peer_id}" if changed else f"{action.peer_id} was already banned")

    @_answers
    def Unban(self, record: swarm_pb2.SignedRecord, context) -> swarm_pb2.Ack:
        now = time.time()
        with self._lock:
            action = self._admin_action(record, "unban", now)
            changed = self.ledger.unban(action.peer_id, "admin", record.nonce, record.timestamp, now)
            if changed:
                self._set_banned(action.peer_id, False)
        return swarm_pb2.Ack(message=f"unbanned {action.peer_id}" if changed else f"{action.peer_id} was not banned")

    # ---- reading ---------------------------------------------------------------------------------
    def status(self, page: Optional[swarm_pb2.StatusRequest] = None) -> swarm_pb2.StatusReply:
        """One page of the ledger's view of the run (the first peers and the latest rounds by default), and
        where its DHT is (also the dashboard's snapshot)."""
        reply = self.ledger.status(page)
        reply.initial_peers.extend(self.initial_peers)
        return reply

    def Status(self, request: swarm_pb2.StatusRequest, context) -> swarm_pb2.StatusReply:
        return self.status(request)

    def ListPeers(self, request: swarm_pb2.StatusRequest, context) -> swarm_pb2.PeerList:
        return swarm_pb2.PeerList(peers=self.ledger.status(request).peers)
