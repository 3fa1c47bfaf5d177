"""A local admitted swarm: a ``grpo-swarm coordinator`` process and node and verifier processes that register
with it, all on 127.0.0.1. ``grpo-swarm simulate`` runs one; the system tests use it as their harness.

Each process leads its own process group (processes.py) with one torch thread (the peers share the
machine's cores) and its output in its folder; leaving the ``with`` block stops every group by its pid.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cli.local_swarm.processes import start_group, stop_groups
from coordinator.server import READY_FILE
from node.runlog import RunLog
from node.swarm.dht import LOOPBACK
from protocol.config import RunConfig

logger = logging.getLogger(__name__)
COORDINATOR_STARTUP = 300.0  # it loads the model (warm start cached by then) on a loaded machine


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    out_dir: Path

    def records(self, kind: str | None = None) -> list[dict]:
        return RunLog(self.out_dir / "metrics.jsonl").records(kind)

    def train_records(self) -> list[dict]:
        """One per round attempted, failed attempts included."""
        return self.records("train")

    def stepped_records(self) -> list[dict]:
        """The reports of the rounds whose average the node stepped on, in order."""
        return [r for r in self.train_records() if r.get("stepped")]

    def stepped_rounds(self) -> list[int]:
        return [r["round"] for r in self.stepped_records()]


def start_process(name: str, command: list[str], out_dir: Path, log_name: str = "node.log") -> NodeProcess:
    """``command`` (python arguments: the grpo-swarm CLI or a script) as a process group, one torch
    thread, its output in ``out_dir/log_name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(out_dir / log_name, "w") as log:
        process = start_group([sys.executable, *command], log, env=env)
    return NodeProcess(name, process, out_dir)


class LocalSwarm:
    """A coordinator process and node/verifier processes that register with it; all stopped on exit."""

    def __init__(self, config: RunConfig, out_dir: Path, coordinator_args: tuple[str, ...] = ()):
        self.config, self.out_dir, self.coordinator_args = config, out_dir, coordinator_args
        self.nodes: list[NodeProcess] = []
        self.verifiers: list[NodeProcess] = []
        self.coordinator: NodeProcess | None = None
        self.grpc_port, self.http_port, self.dht_maddr = 0, 0, LOOPBACK  # any free ones at first start

    def __enter__(self) -> "LocalSwarm":
        try:
            self.start_coordinator()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_coordinator(self) -> dict:
        """Start (or restart, on the same folder) the coordinator; returns what it wrote once ready."""
        folder = self.out_dir / "coordinator"
        ready_file = folder / READY_FILE
        ready_file.unlink(missing_ok=True)
        config_file = self.out_dir / "run.toml"
        config_file.write_text(self.config.to_toml())
        self.coordinator = start_process("coordinator", [
            "-m", "cli", "coordinator", "--config", str(config_file), "--out", str(folder), "--bind", "127.0.0.1",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--host-maddrs", self.dht_maddr,
            *self.coordinator_args], folder, "coordinator.log")
        deadline = time.monotonic() + COORDINATOR_STARTUP
        while not ready_file.exists():
            if self.coordinator.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start; see {folder / 'coordinator.log'}")
            time.sleep(0.2)
        self.ready = json.loads(ready_file.read_text())
        # a restart reuses the ports and DHT address, so peers find it where it was
        self.grpc_port, self.http_port = self.ready["grpc_port"], urllib.parse.urlparse(self.ready["dashboard"]).port
        self.dht_maddr = self.ready["initial_peers"][0].split("/p2p/")[0]
        return self.ready

    @property
    def address(self) -> str:
        return self.ready["grpc"]

    def _peer_command(self, role: str, folder: Path, entry: list[str] | None) -> list[str]:
        entry = entry or ["-m", "cli", role]
        return [*entry, "--coordinator", self.address, "--host-maddrs", LOOPBACK, "--out", str(folder),
                "--key", str(folder / "key.pem")]

    def add_node(self, name: str | None = None, entry: list[str] | None = None) -> NodeProcess:
        """A trainer that registers with the coordinator; ``entry`` replaces ``-m cli node`` (a script
        that takes the node's arguments)."""
        name = name or f"peer-{len(self.nodes)}"
        folder = self.out_dir / name
        self.nodes.append(start_process(name, self._peer_command("node", folder, entry), folder))
        return self.nodes[-1]

    def add_verifier(self) -> NodeProcess:
        folder = self.out_dir / f"verifier-{len(self.verifiers)}"
        self.verifiers.append(start_process(folder.name, self._peer_command("verifier", folder, None), folder))
        return self.verifiers[-1]

    def running(self) -> bool:
        return any(n.process.poll() is None for n in self.nodes)

    def __exit__(self, *exc) -> None:
        processes = [n.process for n in self.nodes + self.verifiers + ([self.coordinator] if self.coordinator else [])]
        left = stop_groups(processes)
        if left:
            logger.warning(f"processes of the local swarm still running after SIGKILL: {left}")


