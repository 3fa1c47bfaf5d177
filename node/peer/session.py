"""A node's session in a swarm: its DHT, the run it learned, its key, and in an admitted run its membership.

Two kinds of swarm. An open swarm has no coordinator: the first peer announces the run (node/peer/announce.py)
and anyone may join. An admitted run has a coordinator: a node registers with it first (``--coordinator
HOST:PORT``), gets an access token, and only then joins a DHT that refuses peers without one; the run's
announcement must be signed by that same coordinator. Either way a node that brings its own config must
match the announced one (config digest), so every peer trains the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import hivemind
from rich.console import Console

from node.peer.announce import check_same_run, discover_run, publish_run
from node.peer.membership import Membership
from node.peer.settings import PeerSettings
from node.swarm.admission import Admission
from node.swarm.dht import DHTSettings, start_dht
from node.swarm.run_records import dht_auth_kwargs
from protocol.config import ConfigError, RunConfig
from protocol.identity import P2PIdentity, SigningKey


@dataclass
class Session:
    """What a node holds while it is in a swarm: the DHT, the run, its signing key and, in an admitted
    run, its membership (token, heartbeats) and the view of who else is admitted."""

    dht: hivemind.DHT
    config: RunConfig
    key: SigningKey
    membership: Optional[Membership] = None
    admission: Optional[Admission] = None

    @property
    def open(self) -> bool:
        """No coordinator: anyone may join, and every live peer keeps the run announced."""
        return self.membership is None

    def close(self) -> None:
        if self.membership is not None:
            self.membership.stop()
        self.dht.shutdown()


def open_session(settings: PeerSettings, config: RunConfig | None, role: str, console: Console) -> Session:
    """Join the swarm as ``role``: register first when ``settings.coordinator`` is set, then learn the run
    (``config`` None: take the announced one; else it must match it)."""
    key = SigningKey.load_or_create(settings.key) if settings.key else SigningKey()
    if not settings.coordinator:
        dht = start_dht(settings.dht)
        try:
            if config is None:
                announcement = discover_run(dht, settings.run_id)
                if announcement.coordinator_public_key:
                    raise ConfigError(f"run {announcement.config.run.id!r} admits peers through its coordinator: "
                                      f"join with --coordinator {announcement.coordinator_address or 'HOST:PORT'}")
                config = announcement.config
            else:
                check_same_run(dht, config)
                publish_run(dht, config, key)
        except BaseException:
            dht.shutdown()
            raise
        return Session(dht, config, key)

    identity_path = settings.dht.identity_path or str(settings.out / "p2p.id")
    identity = P2PIdentity.load_or_create(identity_path)
    membership = Membership.register(settings.coordinator, key, identity, role)
    try:
        dht = start_dht(_dht_settings(settings, membership, identity_path),
                        **dht_auth_kwargs(identity, membership.coordinator_public_key, membership.run_id,
                                          membership.token))
    except BaseException:
        membership.stop()
        raise
    try:
        membership.start(dht)
        announcement = discover_run(dht, membership.run_id)
        if announcement.coordinator_public_key != membership.coordinator_public_key:
            raise ConfigError(f"run {membership.run_id!r} is announced by another coordinator than "
                              f"{settings.coordinator}")
        if config is not None and config.digest() != announcement.config.digest():
            raise ConfigError(f"run {config.run.id!r}: this config differs from the one the coordinator announces "
                              "(join without --config/--set to use the run's)")
    except BaseException:
        membership.stop()
        dht.shutdown()
        raise
    console.print(f"registered with the coordinator at {settings.coordinator} as a {role}")
    return Session(dht, announcement.config, key, membership,
                   Admission(membership.run_id, membership.coordinator_public_key))


def _dht_settings(settings: PeerSettings, membership: Membership, identity_path: str) -> DHTSettings:
    """This peer's DHT settings, dialling ``--initial-peers`` or else the addresses the coordinator lists."""
    if settings.dht.initial_peers:
        return settings.dht.replaced(identity_path=identity_path)
    if not membership.initial_peers:
        raise ConfigError(f"the coordinator at {settings.coordinator} lists no DHT addresses: pass --initial-peers")
    try:
        return settings.dht.replaced(initial_peers=list(membership.initial_peers), identity_path=identity_path)
    except ConfigError as e:
        raise ConfigError(f"the coordinator at {settings.coordinator} lists DHT addresses that are not multiaddrs "
                          f"({e}): pass --initial-peers") from None
