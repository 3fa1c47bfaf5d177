"""How a coordinator ``StatusReply`` reads to a person, shared by the web page, ``/metrics``
and ``grpo-swarm status``, so the three views never disagree on a peer's state or a label."""

from __future__ import annotations

import math

from protocol import swarm_pb2 as pb

# A peer silent this long is shown as idle: it may be gone, or restarting. Heartbeats come every
# few seconds; two minutes also covers a node reloading state from peers after a restart.
IDLE_AFTER_S = 120.0
PEER_STATES = ("live", "idle", "banned")

Point = tuple[int, float]  # (round, value)


def peer_state(peer: pb.PeerInfo, now: float) -> str:
    """"banned", "idle" (never seen, or silent for ``IDLE_AFTER_S``) or "live"."""
    if peer.banned:
        return "banned"
    if peer.last_seen <= 0 or now - peer.last_seen > IDLE_AFTER_S:
        return "idle"
    return "live"


def state_counts(reply: pb.StatusReply, now: float) -> dict[str, int]:
    counts = dict.fromkeys(PEER_STATES, 0)
    for peer in reply.peers:
        counts[peer_state(peer, now)] += 1
    return counts


def peers_title(reply: pb.StatusReply) -> str:
    """"peers", or which of them a page holds when the run has more (the counts above are of those too)."""
    shown = len(reply.peers)
    return "peers" if shown >= reply.peers_total else f"peers (the first {shown} of {reply.peers_total})"


def short_id(peer_id: str) -> str:
    """libp2p ids all start "Qm" or "12D3KooW": keep a little of the head and more of the tail."""
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:4]}…{peer_id[-8:]}"


def short_digest(digest: str) -> str:
    return digest[:12] if digest else "–"


def ago(timestamp: float, now: float) -> str:
    """"12s ago", "5m ago", "3h ago", "2d ago"; "never" for a zero timestamp."""
    if timestamp <= 0:
        return "never"
    seconds = max(now - timestamp, 0.0)
    for unit, size, up_to in (("s", 1, 120), ("m", 60, 120 * 60), ("h", 3600, 48 * 3600)):
        if seconds < up_to:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def number(value: float, spec: str = ".3f") -> str:
    """A value for display; "–" where there is none (NaN: no eval that round)."""
    return format(value, spec) if math.isfinite(value) else "–"


def series(reply: pb.StatusReply, field: str) -> list[Point]:
    """``(round, value)`` of one RoundInfo field, in round order, skipping rounds without a value."""
    points = [(r.round, getattr(r, field)) for r in reply.rounds]
    return sorted((p for p in points if math.isfinite(p[1])), key=lambda p: p[0])


def last_value(reply: pb.StatusReply, field: str) -> float:
    points = series(reply, field)
    return points[-1][1] if points else math.nan


def downsample(points: list[Point], limit: int) -> list[Point]:
    """At most ``limit`` points: consecutive buckets, each the mean value at its last round.
    A run of days has tens of thousands of rounds; a chart or a sparkline shows a few hundred."""
    if len(points) <= limit:
        return list(points)
    buckets = [points[len(points) * i // limit: len(points) * (i + 1) // limit] for i in range(limit)]
    return [(bucket[-1][0], sum(v for _, v in bucket) / len(bucket)) for bucket in buckets]
