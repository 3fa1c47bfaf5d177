"""Real swarm peers for the tests: each one a peer_worker.py process in its own process group.

A peer is several processes (the worker, its DHT and averager processes, two p2pd daemons), so
"kill the peer" means signalling its process group, whose id is the worker's pid. The ``peers``
fixture kills every group it started when the test ends, passed or failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path

import pytest

from cli.local_swarm.processes import start_group, stop_groups
from tests.command import ROOT

WORKER = Path(__file__).with_name("peer_worker.py")
STARTUP_TIMEOUT = 60.0


class Peer:
    """A running peer_worker.py: send it commands, read its JSON events."""

    def __init__(self, args: list[str], log_path: Path, script: Path = WORKER):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = start_group([sys.executable, str(script), *args], log, piped=True, cwd=str(ROOT),
                                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pid = self.process.pid
        self.ready: dict = {}  # its ready event (peer_id, maddrs, ...), once started
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_events, daemon=True).start()

    def _read_events(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):
                self._events.put(json.loads(line))

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict:
        """The next event, which must be ``event``, within ``timeout`` seconds."""
        try:
            received = self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.pid}: no {event!r} within {timeout}s; log tail:\n{self.log_tail()}") \
                from None
        assert received["event"] == event, f"peer {self.pid}: expected {event!r}, got {received}"
        return received

    def signal(self, signum: int) -> None:
        os.killpg(self.pid, signum)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole group (a stopped process dies too), reap the worker, and check nothing is left."""
        left = stop_groups([self.process], signal.SIGKILL, grace=10.0)
        assert not left, f"processes of group {self.pid} still alive: {left}"


class Swarm:
    """The peers of one test; ``directory`` holds their logs and saved tensors."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[Peer] = []

    def launch(self, *args: str, script: Path = WORKER) -> Peer:
        peer = Peer([*args, "--out-dir", str(self.directory)], self.directory / f"peer{len(self.started)}.log",
                    script)
        self.started.append(peer)
        return peer

    def start(self, *args: str, script: Path = WORKER) -> tuple[Peer, dict]:
        """Launch a peer and wait until it is ready; returns it with its ``ready`` event."""
        peer = self.launch(*args, script=script)
        peer.ready = peer.expect("ready", STARTUP_TIMEOUT)
        return peer, peer.ready

    def start_joined(self, first: Peer, ready: dict, *peer_args: list[str]) -> list[Peer]:
        """Launch peers that bootstrap from ``first`` (in parallel) and wait until all are ready."""
        joined = [self.launch(*args, "--initial-peers", *ready["maddrs"]) for args in peer_args]
        for peer in joined:
            peer.ready = peer.expect("ready", STARTUP_TIMEOUT)
        return joined


@contextlib.contextmanager
def killed_at_exit(swarm: Swarm):
    try:
        yield swarm
    finally:
        for peer in swarm.started:
            peer.kill()


@pytest.fixture
def swarm(tmp_path):
    """Start peers with it; every peer's process group is killed when the test ends, passed or failed."""
    with killed_at_exit(Swarm(tmp_path)) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def module_swarm(tmp_path_factory):
    """Like ``swarm``, for peers that the tests of one module share; killed when the module ends."""
    with killed_at_exit(Swarm(tmp_path_factory.mktemp("swarm"))) as swarm:
        yield swarm
