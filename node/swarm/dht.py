"""Join (or start) the swarm's hivemind DHT with bounded retries, and read from it with a bound.

Volunteers' first contact with the swarm is ``start_dht``, so its failures must be bounded and readable:
a slow machine can take longer than hivemind's 15 s to start the p2p daemon, and a bootstrap peer
that is briefly down should not need a manual restart. Every other option goes to hivemind as is.

hivemind's blocking ``DHT.get`` waits on its DHT process without a limit; ``dht_get`` gives up after
``timeout`` seconds, so a stalled DHT process costs a peer one slow round instead of hanging it.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import hivemind
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import ValueWithExpiration

from node.swarm.errors import one_line

logger = logging.getLogger(__name__)

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)
DEFAULT_STARTUP_TIMEOUT = 60.0  # hivemind's default (15 s) is too short on loaded home machines
MAX_BACKOFF = 30.0
STOP_GRACE = 10.0
BOOTSTRAP_GRACE = 15.0  # after the daemon is up: DHT pings to the initial peers (hivemind waits 3 s per stage)
GET_TIMEOUT = 30.0  # a latest-value search takes a few of hivemind's 3 s request timeouts at most


class SwarmJoinError(RuntimeError):
    """The DHT could not be started or none of the initial peers answered, after every retry."""


def start_dht(
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
    announce_maddrs: Optional[Sequence[str]] = None,
    identity_path: Optional[str] = None,
    client_mode: bool = False,
    use_relay: bool = True,
    use_auto_relay: bool = False,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    retries: int = 3,
    backoff: float = 2.0,
    **dht_kwargs,
) -> hivemind.DHT:
    """Start a DHT node connected to ``initial_peers`` (or the first node of a new swarm if empty).

    Tries ``retries`` times, sleeping ``backoff``, then twice that, ... (at most MAX_BACKOFF) in between;
    then raises SwarmJoinError naming the addresses tried and the last error.
    ``dht_kwargs`` go to hivemind.DHT (and from there to DHTNode / P2P), e.g. record_validators.
    """
    if retries < 1:
        raise ValueError("retries must be >= 1")
    for maddr in initial_peers:
        Multiaddr(maddr)  # a typo is not worth retrying: raise its ValueError now
    last_error: Optional[BaseException] = None
    delay = backoff
    for attempt in range(1, retries + 1):
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=False,
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path,
            client_mode=client_mode,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            startup_timeout=startup_timeout,
            **dht_kwargs,
        )
        try:
            dht.run_in_background(await_ready=True, timeout=startup_timeout + BOOTSTRAP_GRACE)
            return dht
        except Exception as e:
            last_error = e
            _stop(dht)
            logger.warning(f"DHT start attempt {attempt}/{retries} failed: {one_line(e)}")
        if attempt < retries:
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF)
    tried = ", ".join(initial_peers) if initial_peers else "(no initial peers)"
    raise SwarmJoinError(
        f"could not join the swarm after {retries} attempts via {tried}: {one_line(last_error)}"
    ) from last_error


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
