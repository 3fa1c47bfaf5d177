"""An admitted swarm for the attack tests: a coordinator, HONEST honest nodes and a verifier, as separate processes
on 127.0.0.1 (test_adversarial.py adds one lying node at a time, test_hardening.py one misbehaving node at a
time), and what a timed-out wait reports about it."""

from __future__ import annotations

from pathlib import Path

from cli.local_swarm.swarm import LocalSwarm
from node.train.warm_start import warm_started_policy
from protocol.config import load_config
from protocol.identity import P2PIdentity
from protocol.tasks import load_task
from tests.system.conftest import SWARM_TEST_SETTINGS
from tests.waiting import wait_for

HONEST = 3
JOIN_TIMEOUT = 150.0  # a node must take part in a round by then (start-up under load included)
CONFIG = load_config(overrides=[*SWARM_TEST_SETTINGS, "run.rounds=1000", "swarm.max_failed_rounds=1000"])


def peer_id_of(node) -> str:
    """A node's libp2p peer id, from the identity it keeps in its folder."""
    return P2PIdentity.load_or_create(node.out_dir / "p2p.id").peer_id


def describe(swarm: LocalSwarm) -> str:
    """What a timed-out wait reports: the honest nodes', the verifier's and a running attacker's process
    state, last rounds and log tail."""
    running_attackers = [n for n in swarm.nodes[HONEST:] if n.process.poll() is None]
    lines = []
    for node in [*swarm.nodes[:HONEST], *swarm.verifiers, *running_attackers]:
        state = "running" if node.process.poll() is None else f"exited {node.process.returncode}"
        records = node.train_records()
        last = [(r["round"], r["stepped"], r.get("group_size"), r.get("reason", "")[:60], r.get("sync"))
                for r in records[-3:]]
        log = (node.out_dir / "node.log").read_text(errors="replace").splitlines()
        lines += [f"\n{node.name} {peer_id_of(node)} ({state}), {len(records)} rounds, last {last}",
                  *(f"    {line[:200]}" for line in log[-8:])]
    return "".join(f"{line}\n" for line in lines)


def start_honest_swarm(out: Path) -> LocalSwarm:
    warm_started_policy(CONFIG, load_task(CONFIG.task.name, CONFIG.task.options))
    swarm = LocalSwarm(CONFIG, out).__enter__()
    try:
        honest = [swarm.add_node() for _ in range(HONEST)]
        swarm.add_verifier()
        wait_for(lambda: all(len(n.train_records()) >= 2 for n in honest), JOIN_TIMEOUT, "honest rounds",
                 explain=lambda: describe(swarm))
    except BaseException:
        swarm.__exit__()
        raise
    return swarm
