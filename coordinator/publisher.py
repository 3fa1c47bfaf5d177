"""Keeps the run's records fresh in the DHT: the signed announcement, the coordinator's own token, the bans.

Every PUBLISH_INTERVAL seconds, and at once on a ban: the run announcement (config, coordinator key and
address) under RUNS_KEY, the coordinator's own access token (so peers' averagers admit it when it
downloads state for a checkpoint), and the signed ban list.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from node.peer.announce import publish_run
from node.swarm.admission import push_bans, push_token
from node.swarm.ban_list import publish_bans
from protocol import swarm_pb2
from protocol.config import RunConfig
from protocol.identity import P2PIdentity, SigningKey
from protocol.tokens import issue_token

logger = logging.getLogger(__name__)
PUBLISH_INTERVAL = 60.0
OWN_TOKEN_LIFETIME = 3600.0  # the coordinator's own token, re-issued every PUBLISH_INTERVAL


def own_token(key: SigningKey, identity: P2PIdentity, run_id: str) -> swarm_pb2.AccessToken:
    """The coordinator's own access token: its DHT authorizer shows it, and peers' averagers admit it."""
    return issue_token(key, peer_id=identity.peer_id, public_key=key.public_key,
                       p2p_public_key=identity.hivemind_public_key(), run_id=run_id, role="coordinator",
                       lifetime=OWN_TOKEN_LIFETIME)


class Publisher:
    """Keeps the announcement, the coordinator's token and the ban list fresh in the DHT (one thread: the
    only one of this process that writes to the DHT).

    :param banned: the current banned peer ids (read at each publication)
    """

    def __init__(self, dht, key: SigningKey, identity: P2PIdentity, config: RunConfig, address: str,
                 banned: Callable[[], list[str]], interval: float = PUBLISH_INTERVAL):
        self.dht, self.key, self.identity, self.config, self.address = dht, key, identity, config, address
        self.banned, self.interval = banned, interval
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def bans_changed(self, _banned: list[str]) -> None:
        """The service's ``on_bans`` (called from gRPC threads): publish the ban list now."""
        self._wake.set()

    def publish(self) -> None:
        publish_run(self.dht, self.config, self.key, self.address)
        push_token(self.dht, own_token(self.key, self.identity, self.config.run.id))
        self.publish_bans()

    def publish_bans(self) -> None:
        banned = self.banned()
        push_bans(self.dht, banned)
        publish_bans(self.dht, self.key, self.config.run.id, banned)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def _run(self) -> None:
        last_full = time.monotonic()
        while not self._stop.is_set():
            woken = self._wake.wait(max(last_full + self.interval - time.monotonic(), 0.0))
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                if woken:
                    self.publish_bans()
                else:
                    self.publish()
                    last_full = time.monotonic()
            except Exception as e:  # the DHT is busy or restarting: the next pass publishes again
                logger.warning(f"publishing to the DHT failed: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
