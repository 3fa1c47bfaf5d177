"""``grpo-swarm node`` in a swarm: join the DHT, learn the run, train in rounds until done.

Two kinds of swarm. An open swarm has no coordinator: the first peer announces the run (node/announce.py)
and anyone may join. An admitted run has a coordinator: a node registers with it first (``--coordinator
HOST:PORT``), gets an access token, and only then joins a DHT that refuses peers without one; the run's
announcement must be signed by that same coordinator. Either way a node that brings its own config must
match the announced one (config digest), so every peer trains the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hivemind
from rich.console import Console

from node.announce import check_same_run, discover_run, publish_run
from node.membership import Membership
from node.progress import progress_bar
from node.runlog import RunLog, plot_run
from node.solo import evaluate_and_log
from node.swarm.admission import Admission, dht_auth_kwargs
from node.swarm.dht import start_dht
from protocol.config import ConfigError, RunConfig
from protocol.identity import P2PIdentity, SigningKey


CHECKPOINT_GRACE = 15.0  # seconds a finished peer of an admitted run serves its state for the final checkpoint


class SwarmStalled(RuntimeError):
    """The peer could not complete a round for too long (no group, or the swarm moved on without it)."""


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


def open_session(args, config: RunConfig | None, role: str, console: Console) -> Session:
    """Join the swarm as ``role``: register first when ``args.coordinator`` is set, then learn the run."""
    key = SigningKey.load_or_create(args.key) if args.key else SigningKey()
    if not args.coordinator:
        dht = join_swarm(args, args.initial_peers, args.identity)
        try:
            if config is None:
                announcement = discover_run(dht, args.run_id)
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

    identity_path = args.identity or str(Path(args.out) / "p2p.id")
    identity = P2PIdentity.load_or_create(identity_path)
    membership = Membership.register(args.coordinator, key, identity, role)
    initial_peers = args.initial_peers or membership.initial_peers
    if not initial_peers:
        membership.stop()
        raise ConfigError(f"the coordinator at {args.coordinator} lists no DHT addresses: pass --initial-peers")
    dht = join_swarm(args, initial_peers, identity_path, **dht_auth_kwargs(
        identity, membership.coordinator_public_key, membership.run_id, membership.token))
    try:
        membership.start(dht)
        announcement = discover_run(dht, membership.run_id)
        if announcement.coordinator_public_key != membership.coordinator_public_key:
            raise ConfigError(f"run {membership.run_id!r} is announced by another coordinator than {args.coordinator}")
        if config is not None and config.digest() != announcement.config.digest():
            raise ConfigError(f"run {config.run.id!r}: this config differs from the one the coordinator announces "
                              "(join without --config/--set to use the run's)")
    except BaseException:
        membership.stop()
        dht.shutdown()
        raise
    console.print(f"registered with the coordinator at {args.coordinator} as a {role}")
    return Session(dht, announcement.config, key, membership,
                   Admission(membership.run_id, membership.coordinator_public_key))


def check_multiaddrs(option: str, addresses) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for address in addresses or ():
        try:
            Multiaddr(address)
        except Exception as e:
            raise ConfigError(f"{option}: {address!r} is not a valid multiaddr ({e})") from None


def join_swarm(args, initial_peers, identity_path, **dht_kwargs) -> hivemind.DHT:
    for option, addresses in (("--initial-peers", initial_peers), ("--host-maddrs", args.host_maddrs),
                              ("--announce-maddrs", args.announce_maddrs)):
        check_multiaddrs(option, addresses)
    mp.set_start_method("fork", force=True)  # hivemind passes pipes that only survive fork
    return start_dht(
        initial_peers=initial_peers, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
        identity_path=identity_path, client_mode=args.client_mode, use_relay=not args.no_relay,
        use_auto_relay=args.use_auto_relay, startup_timeout=args.startup_timeout, retries=args.join_retries,
        **dht_kwargs,
    )


def run_swarm_node(args, config: RunConfig | None, console: Console | None = None) -> None:
    """Train in the swarm until the run's last round; SIGTERM and Ctrl-C stop it cleanly."""
    from node.peer import SwarmPeer

    console = console or Console()
    stop = {"now": False}
    session = open_session(args, config, "trainer", console)
    peer = None
    try:
        config, dht = session.config, session.dht
        addresses = " ".join(str(a) for a in dht.get_visible_maddrs())
        console.print(f"peer {dht.peer_id} in run {config.run.id!r} (config {config.digest()[:12]})")
        if not args.initial_peers and session.open:
            console.print(f"join with: grpo-swarm node --initial-peers {addresses}", soft_wrap=True)
        peer = SwarmPeer(session)
        # Only now: a handler installed before hivemind forks its DHT and averager would be theirs too,
        # and hivemind's terminate() could no longer stop them.
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        if args.checkpoint:
            peer.load_checkpoint(args.checkpoint)
        if args.initial_peers or not session.open:
            peer.catch_up()
        train_in_swarm(peer, session, Path(args.out), console, stop)
    finally:
        if peer is not None:
            peer.shutdown()
        session.close()


def run_verifier_node(args, console: Console | None = None) -> None:
    """Audit the run's contributions until its last round; SIGTERM and Ctrl-C stop it cleanly."""
    from node.verifier import Verifier

    console = console or Console()
    stop = {"now": False}
    session = open_session(args, None, "verifier", console)
    verifier = None
    try:
        console.print(f"verifier {session.dht.peer_id} auditing run {session.config.run.id!r}")
        verifier = Verifier(session, Path(args.out), seed=args.seed)
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))  # after hivemind's forks (see above)
        verifier.run(stop, round_timeout=verifier.peer.averager.max_seconds + 30)
    finally:
        if verifier is not None:
            verifier.shutdown()
        session.close()


def train_in_swarm(peer, session: Session, out_dir: Path, console: Console, stop: dict) -> None:
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
            log.write("train", report.round, stepped=report.stepped, reason=report.reason, sync=sync,
                      peer=peer.peer_id, **report.metrics)
            failures = 0 if report.stepped else failures + 1
            if failures >= config.swarm.max_failed_rounds:
                raise SwarmStalled(f"gave up after {failures} failed rounds in a row at round {peer.round} "
                                   f"(last: {report.reason})")
            # also when a resync brought the model there (the last round included)
            if peer.round != evaluated_at and (peer.round % config.eval.every == 0 or peer.round == config.run.rounds):
                run_eval()
            if not report.stepped:
                status = f"waiting: {report.reason}"
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
            time.sleep(1.0)
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: peer {peer.peer_id[-8:]}")
