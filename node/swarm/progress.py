"""Progress records: where each live peer stands, so that peers behind or off the swarm's model resync.

After every attempt a peer publishes (round, model digest) under ``progress_key(run)`` with its peer id as
subkey. Live peers refresh theirs every attempt, so a record older than PROGRESS_LIFETIME belongs to a
peer that is gone. Readers parse every entry: one that is not a progress record is dropped with a log
line naming the subkey it came under.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from node.swarm.dht import dht_get
from protocol.keys import PROGRESS_LIFETIME, progress_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A peer holds the model with this digest after ``round`` rounds."""

    round: int
    digest: str

    @classmethod
    def parse(cls, value) -> "Progress":
        """The record in a DHT value; ValueError if it is not one."""
        if not isinstance(value, dict) or set(value) != {"round", "digest"}:
            raise ValueError(f"not a progress record: {value!r:.80}")
        round_, digest = value["round"], value["digest"]
        if not (isinstance(round_, int) and not isinstance(round_, bool) and round_ >= 0 and isinstance(digest, str)):
            raise ValueError(f"not a progress record: {value!r:.80}")
        return cls(round_, digest)


def publish_progress(dht: hivemind.DHT, run_id: str, peer_id: str, progress: Progress) -> None:
    dht.store(progress_key(run_id), {"round": progress.round, "digest": progress.digest},
              get_dht_time() + PROGRESS_LIFETIME, subkey=peer_id, return_future=True)


def published_progress(dht: hivemind.DHT, run_id: str) -> dict[str, Progress]:
    """{peer: Progress} of the live peers."""
    found = dht_get(dht, progress_key(run_id))
    if found is None or not isinstance(found.value, dict):
        return {}
    progress = {}
    for peer, entry in found.value.items():
        try:
            progress[str(peer)] = Progress.parse(entry.value)
        except ValueError as e:
            logger.warning(f"progress record under {str(peer)[:60]!r} dropped: {e}")
    return progress
