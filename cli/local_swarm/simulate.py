"""``grpo-swarm simulate --peers N``: a whole admitted swarm on this machine, on 127.0.0.1.

It warm-starts θ_0 once (every node then loads the cached model), starts a LocalSwarm (swarm.py): a
``grpo-swarm coordinator`` process (bootstrap DHT, admission, ledger, dashboard), N ``grpo-swarm node``
processes and a ``grpo-swarm verifier`` that register with it, and shows a live table of their rounds.
On Ctrl-C or when every node is done, each process group is stopped by its pid, SIGTERM first; then
it writes the swarm's metrics and plot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.local_swarm.swarm import LocalSwarm, NodeProcess
from node.progress_bars import loss_progress
from node.runlog import RunLog, plot_run
from node.train.warm_start import warm_started_policy
from protocol.config import RunConfig
from protocol.tasks import load_task


def status_table(nodes: list[NodeProcess], rounds: int) -> Table:
    table = Table(title=f"local swarm: {len(nodes)} peers, {rounds} rounds")
    for column in ("peer", "round", "reward", "held-out acc", "group", "all-reduce s", "state"):
        table.add_column(column, justify="right" if column != "state" else "left")
    for node in nodes:
        train, evals = node.train_records(), node.records("eval")
        last = train[-1] if train else {}
        state = "running" if node.process.poll() is None else f"exited {node.process.returncode}"
        if last and not last.get("stepped"):
            state += f" ({last.get('reason', '')[:40]})"
        table.add_row(node.name, str(last.get("round", -1) + 1 if last else 0), f"{last.get('reward', 0):.2f}",
                      f"{evals[-1]['accuracy']:.3f}" if evals else "-", str(last.get("group_size", "-")),
                      f"{last.get('allreduce_seconds', 0):.2f}", state)
    return table


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
    for record in nodes[0].records("eval") if nodes else []:
        log.write("eval", record["round"], accuracy=record["accuracy"])
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: {len(nodes)}-peer local swarm")
    (out_dir / "run.json").write_text(json.dumps(config.to_dict(), indent=1))
