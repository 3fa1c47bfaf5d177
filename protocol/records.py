"""Signed records: the one envelope for everything a peer publishes (docs/DESIGN.md "Trust" 1).

A record is signed over a fixed, length-prefixed encoding of its fields (``signing_bytes``), not
over protobuf bytes, whose encoding is not guaranteed canonical. Receivers check, in order: the
signature, the run, the kind, the round window, the age, and the nonce (a replay); the first
failure is a ``RecordError`` naming it, and the record is dropped.
"""

from __future__ import annotations

import secrets
import struct
import time
from collections import OrderedDict
from typing import Optional

from google.protobuf.message import DecodeError, Message

from protocol import swarm_pb2
from protocol.identity import SigningKey, verify

DOMAIN = b"grpo-swarm/record/v1"
NONCE_BYTES = 16
MAX_RECORD_BYTES = 15 * 1024  # DHT values above ~16 KiB can hang hivemind's DHT (docs/DESIGN.md)
DEFAULT_MAX_AGE = 600.0  # seconds; also the horizon of the replay guard
MAX_EXCLUSIONS = 16  # a heartbeat record's exclusions (peers send no more, the coordinator takes no more)


class RecordError(ValueError):
    """A record that must be dropped; the message says why."""


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def signing_bytes(kind: str, run_id: str, round_: int, nonce: bytes, timestamp: float, public_key: bytes,
                  body: bytes) -> bytes:
    """DOMAIN, then each field as u64 length + bytes (strings utf-8, round i64, timestamp f64, big-endian)."""
    return b"".join([
        _field(DOMAIN), _field(kind.encode()), _field(run_id.encode()), _field(struct.pack(">q", round_)),
        _field(nonce), _field(struct.pack(">d", timestamp)), _field(public_key), _field(body),
    ])


def sign_record(key: SigningKey, kind: str, run_id: str, round_: int, body: Message | bytes,
                timestamp: Optional[float] = None) -> swarm_pb2.SignedRecord:
    body_bytes = body if isinstance(body, bytes) else body.SerializeToString(deterministic=True)
    record = swarm_pb2.SignedRecord(kind=kind, run_id=run_id, round=round_, nonce=secrets.token_bytes(NONCE_BYTES),
                                    timestamp=time.time() if timestamp is None else timestamp,
                                    public_key=key.public_key, body=body_bytes)
    record.signature = key.sign(_signed_part(record))
    return record


def _signed_part(record: swarm_pb2.SignedRecord) -> bytes:
    return signing_bytes(record.kind, record.run_id, record.round, record.nonce, record.timestamp,
                         record.public_key, record.body)


def parse_record(data: bytes) -> swarm_pb2.SignedRecord:
    if not isinstance(data, bytes):
        raise RecordError(f"record is {type(data).__name__}, not bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(data)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    try:
        return swarm_pb2.SignedRecord.FromString(data)
    except DecodeError as e:
        raise RecordError(f"malformed record: {e}") from None


def check_signature(record: swarm_pb2.SignedRecord) -> None:
    if not verify(record.public_key, record.signature, _signed_part(record)):
        raise RecordError(f"bad signature on {record.kind or 'unnamed'} record")


def parse_body(record: swarm_pb2.SignedRecord, body_type: type[Message]) -> Message:
    try:
        return body_type.FromString(record.body)
    except DecodeError as e:
        raise RecordError(f"malformed {record.kind} body: {e}") from None


class ReplayGuard:
    """Remembers the nonces of accepted records until they are too old to be accepted anyway."""

    def __init__(self, max_age: float = DEFAULT_MAX_AGE, capacity: int = 100_000):
        self.max_age, self.capacity = max_age, capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check_and_remember(self, nonce: bytes, timestamp: float, now: float) -> None:
        while self._seen and (len(self._seen) >= self.capacity or next(iter(self._seen.values())) < now - self.max_age):
            self._seen.popitem(last=False)
        if len(nonce) != NONCE_BYTES:
            raise RecordError(f"nonce of {len(nonce)} bytes (want {NONCE_BYTES})")
        if nonce in self._seen:
            raise RecordError("replayed record (nonce already seen)")
        self._seen[nonce] = timestamp


def open_record(record: swarm_pb2.SignedRecord, *, run_id: str, kind: str, body_type: type[Message],
                rounds: Optional[tuple[int, int]] = None, max_age: float = DEFAULT_MAX_AGE,
                replay: Optional[ReplayGuard] = None, now: Optional[float] = None) -> Message:
    """Check ``record`` and return its parsed body; raises RecordError on the first failed check.

    :param rounds: (lowest, highest) round accepted, inclusive; None accepts any round
    :param replay: drop a nonce seen before (and remember this one); None skips the replay check
    """
    now = time.time() if now is None else now
    check_signature(record)
    if record.run_id != run_id:
        raise RecordError(f"record for run {record.run_id!r}, not {run_id!r}")
    if record.kind != kind:
        raise RecordError(f"expected a {kind} record, got {record.kind!r}")
    if rounds is not None and not rounds[0] <= record.round <= rounds[1]:
        raise RecordError(f"stale {kind} record: round {record.round} outside {rounds[0]}..{rounds[1]}")
    if not now - max_age <= record.timestamp <= now + max_age:
        raise RecordError(f"stale {kind} record: signed {now - record.timestamp:.0f}s ago (limit {max_age:.0f}s)")
    if replay is not None:
        replay.check_and_remember(record.nonce, record.timestamp, now)
    return parse_body(record, body_type)
