"""Join (or start) the swarm's hivemind DHT with bounded retries, and read from it with a bound.

Volunteers' first contact with the swarm is ``start_dht``, so its failures must be bounded and readable:
a slow machine can take longer than hivemind's 15 s to start the p2p daemon, and a bootstrap peer
that is briefly down should not need a manual restart. Every other option goes to hivemind as is.

hivemind's blocking ``DHT.get`` waits on its DHT process without a limit; ``dht_get`` gives up after
``timeout`` seconds, so a stalled DHT process costs a peer one slow round instead of hanging it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Optional

import hivemind
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import ValueWithExpiration
from pydantic import Field, field_validator

from node.errors import one_line
from node.retry import retrying
from protocol.config import Checked

logger = logging.getLogger(__name__)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
STOP_GRACE = 10.0
BOOTSTRAP_GRACE = 15.0  # after the daemon is up: DHT pings to the initial peers (hivemind waits 3 s per stage)
GET_TIMEOUT = 30.0  # a latest-value search takes a few of hivemind's 3 s request timeouts at most
JOIN_BACKOFF = 2.0


class SwarmJoinError(RuntimeError):
    """The DHT could not be started or none of the initial peers answered, after every retry."""


class DHTSettings(Checked):
    """Where a DHT peer (node, verifier or coordinator) listens, how others dial it, and who it is."""

    field_prefix = "--"

    initial_peers: list[str] = []
    """Multiaddrs of peers already in the swarm; none: start a new swarm."""
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    """Multiaddrs to listen on."""
    announce_maddrs: list[str] = []
    """Multiaddrs other peers should dial (e.g. the public IP); none: the ones listened on."""
    identity_path: Optional[str] = None
    """libp2p identity file: the same peer id across restarts; none: a new id."""
    startup_timeout: float = Field(60.0, gt=0)
    """Seconds for the libp2p daemon to start (hivemind's 15 s is too short on loaded home machines)."""
    client_mode: bool = False
    """Accept no incoming connections (behind NAT)."""
    use_relay: bool = True
    """Use libp2p circuit relays."""
    use_auto_relay: bool = False
    """Look for relays automatically (NAT)."""
    join_retries: int = Field(3, ge=1)
    """Tries to start the DHT and reach the initial peers, with back-off in between."""

    @field_validator("initial_peers", "host_maddrs", "announce_maddrs")
    @classmethod
    def _multiaddrs(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            try:
                Multiaddr(address)
            except Exception as e:
                raise ValueError(f"{address!r} is not a valid multiaddr ({one_line(e)})") from None
        return addresses


def start_dht(settings: DHTSettings, backoff: float = JOIN_BACKOFF, **dht_kwargs) -> hivemind.DHT:
    """Start a DHT node connected to ``settings.initial_peers`` (or the first node of a new swarm if none).

    Tries ``join_retries`` times, sleeping ``backoff``, twice that, ... in between, then raises SwarmJoinError
    naming the addresses tried and the last error. ``dht_kwargs`` go to hivemind.DHT (and from there to
    DHTNode / P2P), e.g. an authorizer.
    """
    mp.set_start_method("fork", force=True)  # hivemind passes pipes that only survive fork

    def attempt() -> hivemind.DHT:
        dht = hivemind.DHT(
            initial_peers=settings.initial_peers, start=False, host_maddrs=settings.host_maddrs,
            announce_maddrs=settings.announce_maddrs or None, identity_path=settings.identity_path,
            client_mode=settings.client_mode, use_relay=settings.use_relay, use_auto_relay=settings.use_auto_relay,
            startup_timeout=settings.startup_timeout, **dht_kwargs,
        )
        try:
            dht.run_in_background(await_ready=True, timeout=settings.startup_timeout + BOOTSTRAP_GRACE)
        except BaseException:
            _stop(dht)
            raise
        return dht

    try:
        return retrying(attempt, attempts=settings.join_retries, backoff=backoff, retry_on=lambda e: True,
                        what="DHT start")
    except Exception as e:
        tried = ", ".join(settings.initial_peers) if settings.initial_peers else "(no initial peers)"
        raise SwarmJoinError(f"could not join the swarm after {settings.join_retries} attempts via {tried}: "
                             f"{one_line(e)}") from e


def _stop(dht: hivemind.DHT) -> None:
    """Reap a DHT that failed to start. It exits by itself after reporting the error; terminating it
    while it exits can leave hivemind's process-wide MPFuture state locked, hanging the next DHT."""
    dht.join(STOP_GRACE)
    if dht.is_alive():  # stuck: a timed-out start
        dht.kill()
        dht.join(STOP_GRACE)


def dht_get(dht: hivemind.DHT, key, timeout: float = GET_TIMEOUT) -> Optional[ValueWithExpiration]:
    """The latest value under ``key``, or None when there is none or the DHT did not answer in time."""
    try:
        return dht.get(key, latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:  # a timeout, or the DHT process gone
        logger.warning(f"DHT read of {key!r} failed: {one_line(e)}")
        return None
