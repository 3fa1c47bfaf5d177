"""Access tokens: the coordinator's signed, short-lived permission for one peer to take part in a run.

A token names the peer id, its Ed25519 key and its libp2p key (so a DHT request signed by that key
can be matched to it), the run, the peer's role and a validity window. Peers check a token offline
with the coordinator's public key, which the run announcement carries. A ban is a token that is not
renewed (and, until the old one expires, a signed ban list; see coordinator/).
"""

from __future__ import annotations

import struct
import time
from typing import Optional

from protocol import swarm_pb2
from protocol.identity import SigningKey, verify

DOMAIN = b"grpo-swarm/token/v1"
ROLES = ("trainer", "verifier", "coordinator")
CLOCK_SKEW = 5.0  # seconds a token may appear issued in the future (peers' clocks differ)


class TokenError(ValueError):
    """A token that does not admit its holder; the message says why."""


def token_signing_bytes(token: swarm_pb2.AccessToken) -> bytes:
    parts = [DOMAIN, token.peer_id.encode(), token.public_key, token.p2p_public_key, token.run_id.encode(),
             token.role.encode(), struct.pack(">d", token.issued_at), struct.pack(">d", token.expires_at)]
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def issue_token(coordinator_key: SigningKey, *, peer_id: str, public_key: bytes, p2p_public_key: bytes,
                run_id: str, role: str, lifetime: float, now: Optional[float] = None) -> swarm_pb2.AccessToken:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    now = time.time() if now is None else now
    token = swarm_pb2.AccessToken(peer_id=peer_id, public_key=public_key, p2p_public_key=p2p_public_key,
                                  run_id=run_id, role=role, issued_at=now, expires_at=now + lifetime)
    token.signature = coordinator_key.sign(token_signing_bytes(token))
    return token


def check_token(token: swarm_pb2.AccessToken, coordinator_public_key: bytes, *, run_id: str,
                peer_id: Optional[str] = None, public_key: Optional[bytes] = None,
                now: Optional[float] = None) -> None:
    """Raise TokenError unless ``token`` is the coordinator's, for this run, current, and (when given)
    for this peer id and Ed25519 key."""
    now = time.time() if now is None else now
    if not verify(coordinator_public_key, token.signature, token_signing_bytes(token)):
        raise TokenError("token not signed by this run's coordinator")
    if token.run_id != run_id:
        raise TokenError(f"token for run {token.run_id!r}, not {run_id!r}")
    if now > token.expires_at:
        raise TokenError(f"token expired {now - token.expires_at:.0f}s ago")
    if token.issued_at > now + CLOCK_SKEW:
        raise TokenError("token issued in the future (check this machine's clock)")
    if peer_id is not None and token.peer_id != peer_id:
        raise TokenError(f"token belongs to peer {token.peer_id}, not {peer_id}")
    if public_key is not None and token.public_key != public_key:
        raise TokenError("token belongs to another signing key")
