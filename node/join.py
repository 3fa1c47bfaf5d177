"""``grpo-swarm node`` in a swarm: join the DHT, learn the run, train in rounds until done.

Run discovery: whoever starts a swarm publishes the run config under ``RUNS_KEY``
(subkey = run id) and every live peer refreshes it; a node that knows only an
initial peer's address reads it from there. A node that brings its own config must
match the published one (by config digest), so every peer trains the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from pathlib import Path

import hivemind
from hivemind.utils.timed_storage import get_dht_time
from rich.console import Console

from node.progress import progress_bar
from node.runlog import RunLog, plot_run
from node.solo import evaluate_and_log
from node.swarm.dht import start_dht
from protocol.config import ConfigError, RunConfig

RUNS_KEY = "grpo-swarm.runs"
RUN_RECORD_LIFETIME = 3600.0


class SwarmStalled(RuntimeError):
    """The peer could not complete a round for too long (no group, or the swarm moved on without it)."""


def publish_run(dht: hivemind.DHT, config: RunConfig) -> None:
    dht.store(RUNS_KEY, config.to_dict(), get_dht_time() + RUN_RECORD_LIFETIME, subkey=config.run.id)


def published_runs(dht: hivemind.DHT) -> dict[str, dict]:
    found = dht.get(RUNS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {name: entry.value for name, entry in found.value.items()}


def check_same_run(dht: hivemind.DHT, config: RunConfig) -> None:
    """A peer that brings its own config must bring the swarm's: a different one would train another model."""
    published = published_runs(dht).get(config.run.id)
    if published is not None and RunConfig.from_dict(published).digest() != config.digest():
        raise ConfigError(f"run {config.run.id!r}: this config differs from the one the swarm trains "
                          "(join without --config/--set to use the swarm's)")


def discover_run(dht: hivemind.DHT, run_id: str | None, timeout: float = 30.0) -> RunConfig:
    """The run config published in the swarm: the one named ``run_id``, or the only one there is."""
    deadline = time.monotonic() + timeout
    runs: dict = {}
    while time.monotonic() < deadline and not runs:
        runs = published_runs(dht)
        if not runs:
            time.sleep(1.0)
    if not runs:
        raise ConfigError(f"no run is published in this swarm (waited {timeout:.0f}s); pass --config to start one")
    if run_id is None and len(runs) > 1:
        raise ConfigError(f"the swarm has several runs ({', '.join(sorted(runs))}): choose one with --run-id")
    name = run_id or next(iter(runs))
    if name not in runs:
        raise ConfigError(f"run {name!r} is not published in this swarm (found: {', '.join(sorted(runs))})")
    return RunConfig.from_dict(runs[name])


def check_multiaddrs(option: str, addresses) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for address in addresses or ():
        try:
            Multiaddr(address)
        except Exception as e:
            raise ConfigError(f"{option}: {address!r} is not a valid multiaddr ({e})") from None


def join_swarm(args) -> hivemind.DHT:
    for option in ("initial_peers", "host_maddrs", "announce_maddrs"):
        check_multiaddrs("--" + option.replace("_", "-"), getattr(args, option))
    mp.set_start_method("fork", force=True)  # hivemind passes pipes that only survive fork
    return start_dht(
        initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
        identity_path=args.identity, client_mode=args.client_mode, use_relay=not args.no_relay,
        use_auto_relay=args.use_auto_relay, startup_timeout=args.startup_timeout, retries=args.join_retries,
    )


def run_swarm_node(args, config: RunConfig | None, console: Console | None = None) -> None:
    """Train in the swarm until the run's last round; SIGTERM and Ctrl-C stop it cleanly."""
    from node.peer import SwarmPeer

    console = console or Console()
    dht = join_swarm(args)
    peer = None
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        if config is None:
            config = discover_run(dht, args.run_id)
        else:
            check_same_run(dht, config)
            publish_run(dht, config)
        addresses = " ".join(str(a) for a in dht.get_visible_maddrs())
        console.print(f"peer {dht.peer_id} in run {config.run.id!r} (config {config.digest()[:12]})")
        if not args.initial_peers:
            console.print(f"join with: grpo-swarm node --initial-peers {addresses}", soft_wrap=True)
        peer = SwarmPeer(config, dht)
        if args.initial_peers:
            peer.sync_from_peers()
        train_in_swarm(peer, config, Path(args.out), console, stop)
    finally:
        if peer is not None:
            peer.shutdown()
        dht.shutdown()


def train_in_swarm(peer, config: RunConfig, out_dir: Path, console: Console, stop: dict) -> None:
    log = RunLog(out_dir / "metrics.jsonl")

    def run_eval() -> None:
        evaluate_and_log(peer.policy, peer.task, config, log, peer.round)

    run_eval()  # where this peer starts: θ_0, or the state it loaded from the swarm
    failures = 0
    with progress_bar(console) as progress:
        bar = progress.add_task("swarm rounds", total=config.run.rounds, completed=peer.round, status="")
        while peer.round < config.run.rounds and not stop["now"]:
            report = peer.run_round()
            sync = peer.check_in_step()
            publish_run(peer.dht, config)  # any live peer keeps the run discoverable
            log.write("train", report.round, stepped=report.stepped, reason=report.reason, sync=sync,
                      peer=peer.peer_id, **report.metrics)
            failures = 0 if report.stepped else failures + 1
            if failures >= config.swarm.max_failed_rounds:
                raise SwarmStalled(f"gave up after {failures} failed rounds in a row at round {peer.round} "
                                   f"(last: {report.reason})")
            if report.stepped and (peer.round % config.eval.every == 0 or peer.round == config.run.rounds):
                run_eval()
            if not report.stepped:
                status = f"waiting: {report.reason}"
            else:
                status = (f"reward {report.metrics['reward']:.2f} group {report.metrics['group_size']} "
                          f"all-reduce {report.metrics['allreduce_seconds']:.2f}s")
            progress.update(bar, completed=peer.round, status=status)
        linger_until = time.monotonic() + config.swarm.linger
        while not stop["now"] and time.monotonic() < linger_until and peer.peers_behind():
            progress.update(bar, status="done; serving the final state to peers still behind")
            time.sleep(1.0)
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: peer {peer.peer_id[-8:]}")
