"""``grpo-swarm node`` in a swarm: join it, learn the run, train in rounds until done.

Each round is SwarmPeer.run_round (swarm_peer.py); between rounds the peer compares itself with the swarm
(resyncing when behind or outvoted), keeps an open swarm's run announced, reports to the coordinator and
evaluates held-out accuracy. A finished peer lingers while others are still behind, serving its state.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from rich.console import Console

from node.peer.announce import publish_run
from node.peer.session import Session, open_session
from node.peer.settings import PeerSettings
from node.peer.swarm_peer import SwarmPeer
from node.progress_bars import progress_bar
from node.runlog import RunLog, plot_run
from node.train.evaluate import evaluate_and_log
from protocol.config import RunConfig

CHECKPOINT_GRACE = 15.0  # seconds a finished peer of an admitted run serves its state for the final checkpoint


class SwarmStalled(RuntimeError):
    """The peer could not complete a round for too long (no group, or the swarm moved on without it)."""


def run_swarm_node(settings: PeerSettings, config: RunConfig | None, console: Console | None = None) -> None:
    """Train in the swarm until the run's last round; SIGTERM and Ctrl-C stop it cleanly. ``config`` None:
    train the run the swarm announces."""
    console = console or Console()
    stop = {"now": False}
    session = open_session(settings, config, "trainer", console)
    peer = None
    try:
        config, dht = session.config, session.dht
        addresses = " ".join(str(a) for a in dht.get_visible_maddrs())
        console.print(f"peer {dht.peer_id} in run {config.run.id!r} (config {config.digest()[:12]})")
        if not settings.dht.initial_peers and session.open:
            console.print(f"join with: grpo-swarm node --initial-peers {addresses}", soft_wrap=True)
        peer = SwarmPeer(session)
        # Only now: a handler installed before hivemind forks its DHT and averager would be theirs too,
        # and hivemind's terminate() could no longer stop them.
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        if settings.checkpoint:
            peer.load_checkpoint(settings.checkpoint)
        if settings.joins_existing:
            peer.catch_up()
        train_in_swarm(peer, session, settings.out, console, stop)
    finally:
        if peer is not None:
            peer.shutdown()
        session.close()


def train_in_swarm(peer: SwarmPeer, session: Session, out_dir: Path, console: Console, stop: dict) -> None:
    config = session.config
    log = RunLog(out_dir / "metrics.jsonl")

    evaluated_at = None

    def run_eval() -> None:
        nonlocal evaluated_at
        accuracy = evaluate_and_log(peer.policy, peer.task, config, log, peer.round)
        peer.report(max(peer.round - 1, 0), {"accuracy": accuracy})  # the model after that round's step
        evaluated_at = peer.round

    run_eval()  # where this peer starts: θ_0, or the state it loaded from the swarm
    failures = 0
    with progress_bar(console) as progress:
        bar = progress.add_task("swarm rounds", total=config.run.rounds, completed=peer.round, status="")
        while peer.round < config.run.rounds and not stop["now"]:
            report = peer.run_round()
            sync = peer.check_in_step()
            if session.open:
                publish_run(peer.dht, config, session.key)  # any live peer keeps an open swarm's run discoverable
            peer.report(report.round, {**report.metrics, "stepped": report.stepped})
            failure = report.failure
            log.write("train", report.round, stepped=failure is None, failure=failure.kind if failure else None,
                      reason=str(failure or ""), sync=sync, peer=peer.peer_id, **report.metrics)
            failures = 0 if report.stepped else failures + 1
            if failures >= config.swarm.max_failed_rounds:
                raise SwarmStalled(f"gave up after {failures} failed rounds in a row at round {peer.round} "
                                   f"(last: {report.failure})")
            # also when a resync brought the model there or past it (the last round included)
            if peer.round // config.eval.every > evaluated_at // config.eval.every or (
                    peer.round == config.run.rounds != evaluated_at):
                run_eval()
            if not report.stepped:
                status = f"waiting: {report.failure}"
            else:
                status = (f"reward {report.metrics['reward']:.2f} group {report.metrics['group_size']} "
                          f"all-reduce {report.metrics['allreduce_seconds']:.2f}s")
            progress.update(bar, completed=peer.round, status=status)
        linger_until = time.monotonic() + config.swarm.linger
        # In an admitted run also give the coordinator time to take the final checkpoint from us.
        serve_coordinator_until = time.monotonic() + (min(config.swarm.linger, CHECKPOINT_GRACE)
                                                      if not session.open else 0)
        while not stop["now"] and time.monotonic() < linger_until and (
                peer.peers_behind() or time.monotonic() < serve_coordinator_until):
            progress.update(bar, status="done; serving the final state to peers still behind")
            peer.publish_progress()  # a peer still behind finds its donors only while their records live
            time.sleep(1.0)
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: peer {peer.peer_id[-8:]}")
