"""Progress records: where each live peer stands, so that peers behind or off the swarm's model resync.

After every attempt a peer publishes a signed record (round, model digest) under ``progress_key(run)`` with
its peer id as subkey. Live peers refresh theirs every attempt, so a record older than PROGRESS_LIFETIME
belongs to a peer that is gone. Readers check every entry: one that is not a fresh progress record of the
run, signed by the key the subkey's token binds (in an admitted run), is dropped with a log line naming
the subkey it came under. So each admitted identity has one voice, and no peer speaks for another.

``majority_position`` is what a peer may load a state for (docs/DESIGN.md "Trust" 6): the (round, digest)
that more than half of the live identities published. Priority, or a round someone claims alone, is
never a reason to trust a state.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import hivemind

from node.swarm.dht import dht_get
from protocol.digest import DIGEST_CHARS
from protocol.identity import SigningKey
from protocol.keys import PROGRESS_LIFETIME, progress_key
from protocol.records import RecordError, check_signature, parse_record, sign_record

logger = logging.getLogger(__name__)
CLOCK_SLACK = 30.0  # seconds a record may look younger or older than its lifetime allows (clock skew)
KeyOf = Callable[[str], Optional[bytes]]  # peer id -> the signing key its token binds; None: not admitted


@dataclass(frozen=True)
class Progress:
    """A peer holds the model with this digest after ``round`` rounds."""

    round: int
    digest: str


def progress_record(key: SigningKey, run_id: str, progress: Progress) -> bytes:
    return sign_record(key, "progress", run_id, progress.round, progress.digest.encode()).SerializeToString()


def read_progress(data, run_id: str, now: Optional[float] = None) -> tuple[bytes, Progress]:
    """(signer's key, progress) of a progress record of ``run_id`` signed within its lifetime; ValueError
    (RecordError) if it is not one."""
    record = parse_record(data)
    check_signature(record)
    now = time.time() if now is None else now
    if record.run_id != run_id or record.kind != "progress":
        raise RecordError(f"a {record.kind!r} record of run {record.run_id!r}, not a progress record")
    if not now - PROGRESS_LIFETIME - CLOCK_SLACK <= record.timestamp <= now + CLOCK_SLACK:
        raise RecordError(f"a progress record signed {now - record.timestamp:.0f}s ago")
    digest = record.body.decode("ascii", errors="replace")
    if record.round < 0 or len(digest) != DIGEST_CHARS or not all(c in "0123456789abcdef" for c in digest):
        raise RecordError(f"a progress record of round {record.round} with digest {digest!r:.80}")
    return record.public_key, Progress(record.round, digest)


def publish_progress(dht: hivemind.DHT, key: SigningKey, run_id: str, peer_id: str, progress: Progress) -> None:
    record = progress_record(key, run_id, progress)
    dht.store(progress_key(run_id), record, time.time() + PROGRESS_LIFETIME, subkey=peer_id, return_future=True)


def published_progress(dht: hivemind.DHT, run_id: str, key_of: Optional[KeyOf] = None) -> dict[str, Progress]:
    """{peer: Progress} of the live peers; with ``key_of`` (an admitted run), only records each peer signed
    with the key its token binds."""
    found = dht_get(dht, progress_key(run_id))
    if found is None or not isinstance(found.value, dict):
        return {}
    progress = {}
    for peer, entry in found.value.items():
        try:
            signer, position = read_progress(entry.value, run_id)
            if key_of is not None and signer != key_of(str(peer)):
                raise RecordError("not signed by the key of its token (or it holds no current token)")
        except ValueError as e:
            logger.warning(f"progress record under {str(peer)[:60]!r} dropped: {e}")
            continue
        progress[str(peer)] = position
    return progress


def majority_position(progress: Mapping[str, Progress]) -> Optional[Progress]:
    """The (round, digest) more than half of these identities published; None when none has a majority."""
    if not progress:
        return None
    position, votes = collections.Counter(progress.values()).most_common(1)[0]
    return position if 2 * votes > len(progress) else None
