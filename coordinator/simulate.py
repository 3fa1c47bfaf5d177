"""``grpo-swarm simulate --peers N``: a whole admitted swarm on this machine, on 127.0.0.1.

It warm-starts θ_0 once (every node then loads the cached model), starts a
``grpo-swarm coordinator`` process (bootstrap DHT, admission, ledger, dashboard), N
``grpo-swarm node`` processes and a ``grpo-swarm verifier`` that register with it,
and shows a live table of their rounds. Each process runs in its own process group
with one torch thread (the peers share the machine's cores); on Ctrl-C or when every
node is done, each group is stopped by its pid, SIGTERM first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.server import READY_FILE
from node.progress import loss_progress
from node.runlog import RunLog, plot_run
from node.warm_start import warm_started_policy
from protocol.config import RunConfig
from protocol.tasks import load_task

STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL
COORDINATOR_STARTUP = 300.0  # it loads the model (warm start cached by then) on a loaded machine
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    out_dir: Path

    def records(self) -> list[dict]:
        return RunLog(self.out_dir / "metrics.jsonl").records()

    def train_records(self) -> list[dict]:
        """One per round attempted, failed attempts included."""
        return [r for r in self.records() if r["kind"] == "train"]

    def stepped_records(self) -> list[dict]:
        """The reports of the rounds whose average the node stepped on, in order."""
        return [r for r in self.train_records() if r.get("stepped")]

    def stepped_rounds(self) -> list[int]:
        return [r["round"] for r in self.stepped_records()]


def start_process(name: str, command: list[str], out_dir: Path, log_name: str = "node.log") -> NodeProcess:
    """``command`` (python arguments: the grpo-swarm CLI or a script) in its own process group, one torch
    thread, its output in ``out_dir/log_name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(out_dir / log_name, "w")
    process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    return NodeProcess(name, process, out_dir)


def stop_nodes(nodes: list[NodeProcess]) -> None:
    """SIGTERM each node's process group (the node, its DHT and its p2p daemons), then SIGKILL,
    and wait until no process of any group is left running."""
    for node in nodes:
        _signal_group(node.process.pid, signal.SIGTERM)
        _signal_group(node.process.pid, signal.SIGCONT)  # a frozen node must run to see SIGTERM
    deadline = time.monotonic() + STOP_GRACE
    for node in nodes:
        try:
            node.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(node.process.pid, signal.SIGKILL)  # also the daemons a clean exit leaves behind
        node.process.wait()
    deadline = time.monotonic() + STOP_GRACE
    while any(group_members(n.process.pid) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)


def group_members(pgid: int) -> list[psutil.Process]:
    """Processes of group ``pgid`` still running (zombies wait for PID 1 to reap them and do not count)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def status_table(nodes: list[NodeProcess], rounds: int) -> Table:
    table = Table(title=f"local swarm: {len(nodes)} peers, {rounds} rounds")
    for column in ("peer", "round", "reward", "held-out acc", "group", "all-reduce s", "state"):
        table.add_column(column, justify="right" if column != "state" else "left")
    for node in nodes:
        records = node.records()
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        last = train[-1] if train else {}
        state = "running" if node.process.poll() is None else f"exited {node.process.returncode}"
        if last and not last.get("stepped"):
            state += f" ({last.get('reason', '')[:40]})"
        table.add_row(node.name, str(last.get("round", -1) + 1 if last else 0), f"{last.get('reward', 0):.2f}",
                      f"{evals[-1]['accuracy']:.3f}" if evals else "-", str(last.get("group_size", "-")),
                      f"{last.get('allreduce_seconds', 0):.2f}", state)
    return table


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and numbers read the same in TOML


def write_toml(config: RunConfig, path: Path) -> Path:
    lines = []
    for section, values in config.to_dict().items():
        # TOML has no null: an unset value (None) is left out, which reads back as unset
        lines += [f"[{section}]", *(f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None),
                  ""]
    path.write_text("\n".join(lines))
    return path


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
        config_file = write_toml(self.config, self.out_dir / "run.toml")
        self.coordinator = start_process("coordinator", [
            "-m", "node.cli", "coordinator", "--config", str(config_file), "--out", str(folder), "--bind", "127.0.0.1",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--host-maddrs", self.dht_maddr, *self.coordinator_args], folder, "coordinator.log")
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
        entry = entry or ["-m", "node.cli", role]
        return [*entry, "--coordinator", self.address, "--host-maddrs", LOOPBACK, "--out", str(folder),
                "--key", str(folder / "key.pem")]

    def add_node(self, name: str | None = None, entry: list[str] | None = None) -> NodeProcess:
        """A trainer that registers with the coordinator; ``entry`` replaces ``-m node.cli node`` (a script
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
        stop_nodes(self.nodes + self.verifiers + ([self.coordinator] if self.coordinator else []))


def simulate(config: RunConfig, peers: int, out_dir: Path, console: Console | None = None,
             timeout: float | None = None) -> list[NodeProcess]:
    """Run the swarm to the end of the run (or ``timeout`` seconds); returns the finished nodes."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task.name, config.task.options)
    with loss_progress(console, "warm start (shared θ_0)", config.warm_start.steps) as on_step:
        warm_started_policy(config, task, on_step=on_step)

    with LocalSwarm(config, out_dir) as swarm:
        console.print(f"coordinator {swarm.address}, dashboard {swarm.ready['dashboard']}", soft_wrap=True)
        for _ in range(peers):
            swarm.add_node()
        swarm.add_verifier()
        deadline = time.monotonic() + timeout if timeout else float("inf")
        with Live(status_table(swarm.nodes, config.run.rounds), console=console, refresh_per_second=2) as live:
            try:
                while swarm.running() and time.monotonic() < deadline:
                    time.sleep(1.0)
                    live.update(status_table(swarm.nodes, config.run.rounds))
            except KeyboardInterrupt:  # Ctrl-C: stop the nodes, keep what they wrote
                console.print("stopping the swarm")
    write_summary(swarm.nodes, config, out_dir)
    console.print(f"metrics {out_dir / 'metrics.jsonl'}, plot {out_dir / 'plot.png'}, node logs {out_dir}/peer-*/",
                  soft_wrap=True)
    return swarm.nodes


def write_summary(nodes: list[NodeProcess], config: RunConfig, out_dir: Path) -> None:
    """One record per round for the whole swarm: mean reward over the peers that stepped, and accuracy."""
    by_round: dict[int, list[dict]] = {}
    for node in nodes:
        for record in node.stepped_records():
            by_round.setdefault(record["round"], []).append(record)
    log = RunLog(out_dir / "metrics.jsonl")
    log.path.unlink(missing_ok=True)
    for round_, records in sorted(by_round.items()):
        log.write("train", round_, peers=len(records), reward=sum(r["reward"] for r in records) / len(records),
                  allreduce_seconds=max(r["allreduce_seconds"] for r in records))
    for record in nodes[0].records() if nodes else []:
        if record["kind"] == "eval":
            log.write("eval", record["round"], accuracy=record["accuracy"])
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: {len(nodes)}-peer local swarm")
    (out_dir / "run.json").write_text(json.dumps(config.to_dict(), indent=1))
