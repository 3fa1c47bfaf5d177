"""``grpo-swarm coordinator``: the run's bootstrap DHT peer, gRPC API, ledger, checkpoints and dashboard.

Everything it keeps lives in ``--out``: its Ed25519 key (``coordinator.pem``), its libp2p identity
(``p2p.id``, so the bootstrap address survives a restart), the ledger (``ledger.sqlite``) and the
checkpoints. Restarted on the same folder, after a crash or ``kill -9``, it is the same coordinator of
the same run: peers renew their tokens (or register again) and go on. ``coordinator.json`` in the folder
says where it serves (written once it is up, removed on a clean stop).

The parts it wires together: the DHT (node/swarm/dht.py), the checkpointer (checkpoints.py), the gRPC
service and its ledger (service.py, ledger.py), the reader of where the swarm is (swarm_round.py, which bounds
the rounds heartbeats name), the publisher of its DHT records (publisher.py) and the dashboard (dashboard/).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Optional, Sequence

import grpc
from rich.console import Console

from coordinator.checkpoints import Checkpointer
from coordinator.dashboard.server import DashboardServer
from coordinator.ledger import Ledger
from coordinator.publisher import Publisher, own_token
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.swarm_round import SwarmRound
from node.swarm.dht import start_dht
from node.swarm.run_records import dht_auth_kwargs
from protocol import swarm_pb2_grpc
from protocol.config import RunConfig
from protocol.identity import P2PIdentity, SigningKey
from protocol.keyfiles import public_key_text, read_public_key, read_public_keys

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20  # no honest request comes near this; bigger ones are RESOURCE_EXHAUSTED
GRPC_WORKERS = 8
STOP_GRACE = 3.0
READY_FILE = "coordinator.json"


class ServeError(OSError):
    """The gRPC API cannot listen where it was asked to."""


def start_grpc(service: CoordinatorService, host: str, port: int) -> tuple[grpc.Server, int]:
    """Serve ``service``; returns the server and the port it listens on (``port`` 0 picks one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  ("grpc.so_reuseport", 0)])
    swarm_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise ServeError(f"gRPC cannot listen on {host}:{port} ({e})") from None
    if bound == 0:
        raise ServeError(f"gRPC cannot listen on {host}:{port} (port taken?)")
    server.start()
    return server, bound


def host_of(maddr: str) -> Optional[str]:
    """The host of an /ip4, /ip6 or /dns multiaddr."""
    parts = str(maddr).split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") else None


def public_address(explicit: Optional[str], bind: str, grpc_port: int, announce_maddrs: Sequence[str],
                   visible_maddrs: Sequence[str]) -> str:
    """HOST:PORT nodes should dial: ``--public-address``, else the announced host, the bound host, or the
    DHT's first visible host."""
    if explicit:
        return explicit
    hosts = [host_of(m) for m in list(announce_maddrs or []) + [f"/ip4/{bind}"] + [str(m) for m in visible_maddrs]]
    host = next((h for h in hosts if h and h not in ("0.0.0.0", "::")), "127.0.0.1")
    return f"{host}:{grpc_port}"


def write_ready_file(out: Path, info: dict) -> Path:
    path = out / READY_FILE
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return path


def run_coordinator(settings: CoordinatorSettings, config: RunConfig, console: Optional[Console] = None) -> None:
    """Serve the run until SIGTERM or Ctrl-C, then stop every part cleanly."""
    console = console or Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = settings.out
    # What can be refused is checked before anything is created in ``out``.
    admin_key = read_public_key(settings.admin_key) if settings.admin_key else None
    verifier_keys = read_public_keys(settings.verifier_keys) if settings.verifier_keys else None
    key = SigningKey.load(settings.key) if settings.key else None
    ledger = Ledger(out / "ledger.sqlite", config.run.id, config.digest())
    token_lifetime = settings.token_lifetime or config.trust.token_lifetime
    parts: list = []  # stopped in reverse order
    try:
        key = key or SigningKey.load_or_create(out / "coordinator.pem")
        identity_path = settings.dht.identity_path or str(out / "p2p.id")
        identity = P2PIdentity.load_or_create(identity_path)
        admin_key = admin_key or key.public_key
        dht = start_dht(settings.dht.replaced(identity_path=identity_path),
                        **dht_auth_kwargs(identity, key.public_key, config.run.id,
                                          own_token(key, identity, config.run.id)))
        parts.append(dht.shutdown)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        # Before any gRPC thread runs: it forks hivemind's averager process, and must be made in this thread.
        console.print(f"loading the model of run {config.run.id!r} (checkpoints are taken into it)", soft_wrap=True)
        checkpointer = Checkpointer(dht, config, out / "checkpoints", ledger.furthest_round, ledger.signing_key_of)
        parts.append(checkpointer.stop)

        swarm_round = SwarmRound(dht, config.run.id, ledger.signing_key_of, ledger.furthest_round).start()
        parts.append(swarm_round.stop)
        service = CoordinatorService(ledger, key, admin_key=admin_key, token_lifetime=token_lifetime,
                                     renew_grace=settings.renew_grace, verifier_keys=verifier_keys,
                                     initial_peers=maddrs, round_bound=swarm_round.bound)
        server, grpc_port = start_grpc(service, settings.bind, settings.grpc_port)
        parts.append(lambda: server.stop(STOP_GRACE).wait())
        address = public_address(settings.public_address, settings.bind, grpc_port, settings.dht.announce_maddrs,
                                 maddrs)

        publisher = Publisher(dht, key, identity, config, address, service.banned_peers)
        service.on_bans = publisher.bans_changed
        publisher.start()
        parts.append(publisher.stop)

        checkpointer.start()

        dashboard = DashboardServer(service.status, settings.bind, settings.http_port).start()
        parts.append(dashboard.stop)

        verifiers = "open (any registered key)" if verifier_keys is None else f"{len(verifier_keys)} listed keys"
        console.print(f"coordinator of run {config.run.id!r} (config {config.digest()[:12]}), "
                      f"key {public_key_text(key.public_key)}", soft_wrap=True)
        console.print(f"DHT: {' '.join(maddrs)}", soft_wrap=True)
        console.print(f"gRPC: {address}; dashboard: {dashboard.url}; verifiers: {verifiers}", soft_wrap=True)
        console.print(f"join with: grpo-swarm node --coordinator {address}  (it learns the DHT addresses from "
                      "the coordinator)", soft_wrap=True)
        ready = write_ready_file(out, {"run_id": config.run.id, "pid": os.getpid(), "grpc": address,
                                       "grpc_port": grpc_port, "dashboard": dashboard.url,
                                       "initial_peers": maddrs, "peer_id": identity.peer_id,
                                       "public_key": public_key_text(key.public_key)})
        parts.append(lambda: ready.unlink(missing_ok=True))
        stop = threading.Event()
        # Only now: hivemind's averager start ignores SIGINT here, and a child forked after this would
        # inherit the handler and ignore the SIGTERM that hivemind's shutdown sends it as a last resort.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        console.print("stopping")
    finally:
        for stop_part in reversed(parts):
            try:
                stop_part()
            except Exception as e:
                logger.warning(f"while stopping: {type(e).__name__}: {e}")
        ledger.close()
