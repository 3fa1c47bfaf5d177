"""Where the swarm stands, as the coordinator reads it from the DHT: the bound on the rounds heartbeats may name.

A heartbeat names the round its peer finished; without a bound, one identity could name round 10^9 and so
move the run's round the dashboard shows and fill the ledger with metrics of rounds to come. The ledger's own
furthest round cannot be the bound: it stands still while the coordinator is down and the swarm moves on. The
trainers' signed progress records (node/swarm/progress.py) go on through an outage, so the bound is the lower
median of the rounds the live, registered trainers signed, plus a slack: while fewer than half of the
identities lie, that median is an honest peer's round (the liars, however far ahead, sit above it).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from node.swarm.dht import dht_get
from node.swarm.progress import KeyOf, published_progress
from protocol.keys import tokens_key

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0
ROUND_SLACK = 10  # rounds a heartbeat may name past the median (a peer reports before others publish progress)


def median_round(rounds: list[int]) -> int:
    """The lower median: the round of an honest identity whenever fewer than half of them lie."""
    return sorted(rounds)[(len(rounds) - 1) // 2]


class SwarmRound:
    """A thread that keeps the furthest lower-median round of the trainers' signed progress seen so far.

    :param start: the round to assume until progress is read (the ledger's furthest: bounded the same way before)
    :param key_of: the signing key of a registered, unbanned peer (None for anyone else): only their records count
    """

    def __init__(self, dht, run_id: str, key_of: KeyOf, start: Callable[[], int], poll: float = POLL_SECONDS):
        self.dht, self.run_id, self.key_of, self.poll = dht, run_id, key_of, poll
        self._round = start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarm-round", daemon=True)

    def bound(self) -> int:
        """The furthest round a heartbeat may name now."""
        return self._round + ROUND_SLACK

    def read(self) -> None:
        """Read the progress records once; the round only moves forward."""
        dht_get(self.dht, tokens_key(self.run_id))  # teaches our DHT node the tokens (run_records.TokenBook)
        progress = published_progress(self.dht, self.run_id, self.key_of)
        if progress:
            self._round = max(self._round, median_round([p.round for p in progress.values()]))

    def start(self) -> "SwarmRound":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.read()
            except Exception as e:  # a DHT hiccup: the bound stays where it was
                logger.warning(f"swarm round not read: {type(e).__name__}: {e}")
