"""Which questions a peer trains on in a round: a hash, so nobody chooses them.

Every peer and verifier recomputes a peer's shard from public values, so this
encoding is a protocol rule: changing it is a new domain tag.
"""

from __future__ import annotations

import hashlib

DOMAIN = b"grpo-swarm/shard/v1"


def question_ids(run_seed: int, round_: int, peer_id: str, count: int, dataset_size: int) -> list[int]:
    """The ``count`` question indices of ``peer_id`` in round ``round_``.

    Element i is ``int.from_bytes(sha256(m_i), "big") % dataset_size`` with

        m_i = len(DOMAIN) as u32 || DOMAIN
              || run_seed as i64 || round_ as u64
              || len(peer_id utf-8) as u32 || peer_id utf-8
              || i as u64

    all integers big-endian, fixed width (i64 two's complement); the length
    prefixes make the byte string unambiguous. Ids may repeat within a shard.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
    peer = peer_id.encode()
    prefix = hashlib.sha256(_u32(len(DOMAIN)) + DOMAIN + _int64(run_seed, "run_seed", signed=True)
                            + _int64(round_, "round_", signed=False) + _u32(len(peer)) + peer)
    ids = []
    for i in range(count):
        h = prefix.copy()  # the shared prefix is hashed once
        h.update(_int64(i, "i", signed=False))
        ids.append(int.from_bytes(h.digest(), "big") % dataset_size)
    return ids


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _int64(value: int, name: str, signed: bool) -> bytes:
    try:
        return value.to_bytes(8, "big", signed=signed)
    except OverflowError:
        kind = "a signed" if signed else "an unsigned"
        raise ValueError(f"{name}={value} does not fit in {kind} 64-bit integer") from None
