"""A real local swarm: a bootstrap DHT and 3 ``grpo-swarm node`` processes on 127.0.0.1.

The nodes learn the run from the DHT, load the shared warm start, and average every
round's gradient; after each round all peers must hold the same model (equal digests)
and score the same held-out accuracy. Every process group is gone afterwards.
"""

import json

import pytest
from rich.console import Console

from coordinator.simulate import group_members, simulate
from protocol.config import load_config

PEERS, ROUNDS = 3, 8


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("swarm")
    config = load_config(overrides=[f"run.rounds={ROUNDS}", "eval.every=4", "swarm.matchmaking_time=2"])
    nodes = simulate(config, PEERS, out, console=Console(quiet=True), timeout=420)
    return nodes, out


@pytest.mark.slow
def test_every_peer_finishes_with_the_same_model_each_round(swarm_run):
    nodes, out = swarm_run
    assert [n.process.returncode for n in nodes] == [0] * PEERS, [n.out_dir / "node.log" for n in nodes]
    digests: dict[int, set] = {}
    for node in nodes:
        stepped = [r for r in node.records() if r["kind"] == "train" and r["stepped"]]
        assert [r["round"] for r in stepped] == list(range(ROUNDS))
        for record in stepped:
            digests.setdefault(record["round"], set()).add(record["model_digest"])
            assert record["group_size"] >= 2
    assert all(len(found) == 1 for found in digests.values()), digests
    accuracies = {tuple(r["accuracy"] for r in node.records() if r["kind"] == "eval") for node in nodes}
    assert len(accuracies) == 1 and len(next(iter(accuracies))) == 3  # rounds 0, 4, 8
    assert (out / "plot.png").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_swarm_learns(swarm_run):
    _, out = swarm_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if r["kind"] == "train"]  # mean over the peers, per round
    accuracy = [r["accuracy"] for r in rows if r["kind"] == "eval"]
    print(f"swarm reward per round {[round(r, 3) for r in rewards]}, held-out accuracy {accuracy}")
    # The sampled reward of 8 rounds is too noisy to assert on (shards follow the random peer ids;
    # measured half-to-half gains were +0.02 to +0.06); the fixed held-out set is not.
    assert len(rewards) == ROUNDS
    assert accuracy[-1] > accuracy[0] + 0.05


@pytest.mark.slow
def test_no_process_is_left_behind(swarm_run):
    nodes, _ = swarm_run
    for node in nodes:
        assert group_members(node.process.pid) == []
