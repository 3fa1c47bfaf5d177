"""``grpo-swarm coordinator``: the run's bootstrap DHT peer, gRPC API, ledger, checkpoints and dashboard.

Everything it keeps lives in ``--out``: its Ed25519 key (``coordinator.pem``), its libp2p identity
(``p2p.id``, so the bootstrap address survives a restart), the ledger (``ledger.sqlite``) and the
checkpoints. Restarted on the same folder, after a crash or ``kill -9``, it is the same coordinator of
the same run: peers renew their tokens (or register again) and go on. ``coordinator.json`` in the folder
says where it serves (written once it is up, removed on a clean stop).

It publishes to the DHT, every PUBLISH_INTERVAL seconds and at once on a ban: the signed run
announcement (config, coordinator key and address) under RUNS_KEY, its own access token (so peers'
averagers admit it when it downloads state for a checkpoint), and the signed ban list.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Optional, Sequence

import grpc
from rich.console import Console

from coordinator.checkpoints import Checkpointer
from coordinator.dashboard import DashboardServer
from coordinator.ledger import Ledger
from coordinator.service import CoordinatorService
from node.announce import publish_run
from node.join import check_multiaddrs
from node.keygen import public_key_text, read_public_key, read_public_keys
from node.swarm.admission import dht_auth_kwargs, publish_bans, push_bans, push_token
from node.swarm.dht import start_dht
from protocol import swarm_pb2, swarm_pb2_grpc
from protocol.config import RunConfig
from protocol.identity import P2PIdentity, SigningKey
from protocol.tokens import issue_token

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20  # no honest request comes near this; bigger ones are RESOURCE_EXHAUSTED
GRPC_WORKERS = 8
PUBLISH_INTERVAL = 60.0
OWN_TOKEN_LIFETIME = 3600.0  # the coordinator's own token, re-issued every PUBLISH_INTERVAL
STOP_GRACE = 3.0
READY_FILE = "coordinator.json"


class ServeError(OSError):
    """The gRPC API cannot listen where it was asked to."""


def own_token(key: SigningKey, identity: P2PIdentity, run_id: str) -> swarm_pb2.AccessToken:
    """The coordinator's own access token: its DHT authorizer shows it, and peers' averagers admit it."""
    return issue_token(key, peer_id=identity.peer_id, public_key=key.public_key,
                       p2p_public_key=identity.hivemind_public_key(), run_id=run_id, role="coordinator",
                       lifetime=OWN_TOKEN_LIFETIME)


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


def write_ready_file(out: Path, info: dict) -> Path:
    path = out / READY_FILE
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return path


def run_coordinator(args, config: RunConfig, console: Optional[Console] = None) -> None:
    """Serve the run until SIGTERM or Ctrl-C, then stop every part cleanly."""
    console = console or Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    # What can be refused is checked before anything is created in ``out``.
    for option in ("host_maddrs", "announce_maddrs"):
        check_multiaddrs("--" + option.replace("_", "-"), getattr(args, option))
    admin_key = read_public_key(args.admin_key) if args.admin_key else None
    verifier_keys = read_public_keys(args.verifier_keys) if args.verifier_keys else None
    key = SigningKey.load(args.key) if args.key else None
    ledger = Ledger(out / "ledger.sqlite", config.run.id, config.digest())
    token_lifetime = config.trust.token_lifetime if args.token_lifetime is None else args.token_lifetime
    parts: list = []  # stopped in reverse order
    try:
        key = key or SigningKey.load_or_create(out / "coordinator.pem")
        identity_path = Path(args.identity or out / "p2p.id")
        identity = P2PIdentity.load_or_create(identity_path)
        admin_key = admin_key or key.public_key
        mp.set_start_method("fork", force=True)  # hivemind passes pipes that only survive fork
        dht = start_dht(host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
                        identity_path=str(identity_path), startup_timeout=args.startup_timeout,
                        **dht_auth_kwargs(identity, key.public_key, config.run.id,
                                          own_token(key, identity, config.run.id)))
        parts.append(dht.shutdown)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        # Before any gRPC thread runs: it forks hivemind's averager process, and must be made in this thread.
        console.print(f"loading the model of run {config.run.id!r} (checkpoints are taken into it)", soft_wrap=True)
        checkpointer = Checkpointer(dht, config, out / "checkpoints", ledger.furthest_round, ledger.admitted_peers)
        parts.append(checkpointer.stop)

        service = CoordinatorService(ledger, key, admin_key=admin_key, token_lifetime=token_lifetime,
                                     renew_grace=args.renew_grace, verifier_keys=verifier_keys, initial_peers=maddrs)
        server, grpc_port = start_grpc(service, args.bind, args.grpc_port)
        parts.append(lambda: server.stop(STOP_GRACE).wait())
        address = public_address(args.public_address, args.bind, grpc_port, args.announce_maddrs, maddrs)

        publisher = Publisher(dht, key, identity, config, address, service.banned_peers)
        service.on_bans = publisher.bans_changed
        publisher.start()
        parts.append(publisher.stop)

        checkpointer.start()

        dashboard = DashboardServer(service.status, args.bind, args.http_port).start()
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
