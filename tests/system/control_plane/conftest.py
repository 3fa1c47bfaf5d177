"""A real ``grpo-swarm coordinator`` process on 127.0.0.1 and real peers' credentials for the tests.

The coordinator runs in its own process group (its DHT and p2p daemon are children), so stopping it
means signalling the group whose id is its pid; every fixture stops what it started, passed or failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli.local_swarm.processes import start_group, stop_groups
from coordinator.server import READY_FILE
from protocol import swarm_pb2_grpc
from protocol.identity import P2PIdentity, SigningKey
from tests.command import ROOT

STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
RUN_ID = "coord-test"
CONFIG = f'[run]\nid = "{RUN_ID}"\nrounds = 10\n\n[warm_start]\nsteps = 0\n\n[checkpoint]\nevery = 5\n'


class Coordinator:
    """One ``grpo-swarm coordinator`` process; ``info`` is its coordinator.json."""

    def __init__(self, out: Path, *extra: str):
        self.out, self.extra = out, extra
        self.out.mkdir(parents=True, exist_ok=True)
        config = out.parent / "run.toml"
        config.write_text(CONFIG)
        (out / READY_FILE).unlink(missing_ok=True)  # a kill -9 leaves the last one behind
        self.log_path = out.parent / f"coordinator-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.process = start_group(
                [sys.executable, "-m", "cli", "coordinator", "--config", str(config), "--out", str(out),
                 "--bind", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *extra],
                log, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        self.pid = self.process.pid
        self.info = self._wait_ready()
        self.address = self.info["grpc"]

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        ready = self.out / READY_FILE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.process.returncode}:\n{self.log_tail()}")
            if ready.exists():
                info = json.loads(ready.read_text())
                if info["pid"] == self.pid:
                    return info
            time.sleep(0.2)
        raise AssertionError(f"coordinator not ready within {STARTUP_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stub(self) -> swarm_pb2_grpc.CoordinatorStub:
        """A stub on a channel that sends anything up to 8 MiB, so that the server's own limit is what is tested."""
        channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 8 << 20)])
        return swarm_pb2_grpc.CoordinatorStub(channel)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the coordinator alone (SIGTERM: a clean stop, it stops its children; SIGKILL: a crash), then
        make sure its whole process group is gone. Returns the coordinator's exit status."""
        left = stop_groups([self.process], sig, leader_only=True, grace=STOP_TIMEOUT)
        assert not left, f"processes of coordinator group {self.pid} still alive: {left}"
        return self.process.returncode


@pytest.fixture(scope="module")
def coordinator_factory(tmp_path_factory):
    """Start coordinators with it (``factory(out, *flags)``); all are stopped when the module is done."""
    started: list[Coordinator] = []

    def start(out: Path, *extra: str) -> Coordinator:
        started.append(Coordinator(out, *extra))
        return started[-1]

    try:
        yield start
    finally:
        for coordinator in started:
            if coordinator.process.returncode is None:
                coordinator.stop(signal.SIGKILL)


@dataclass
class PeerCredentials:
    """What a peer brings: its Ed25519 key and its libp2p identity."""
    key: SigningKey
    identity: P2PIdentity

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


@pytest.fixture(scope="session")
def new_peer(tmp_path_factory):
    """Make a peer's credentials: a new Ed25519 key and a new libp2p identity."""
    folder = tmp_path_factory.mktemp("identities")
    count = iter(range(1_000_000))

    def make() -> PeerCredentials:
        return PeerCredentials(SigningKey(), P2PIdentity.load_or_create(folder / f"peer{next(count)}.id"))

    return make
