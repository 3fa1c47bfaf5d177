"""The clean local swarm run that the swarm-training and the adversarial tests share."""

import pytest
from rich.console import Console

from protocol.config import load_config

CLEAN_PEERS, CLEAN_ROUNDS = 3, 30
# The settings every swarm scenario runs with (the adversarial tests add attackers to the same swarm).
SWARM_TEST_SETTINGS = ["eval.every=15", "swarm.matchmaking_time=2", "swarm.linger=0"]


@pytest.fixture(scope="session")
def clean_swarm(tmp_path_factory):
    """``grpo-swarm simulate``: a coordinator, 3 nodes and a verifier, CLEAN_ROUNDS rounds, no attacker."""
    from cli.local_swarm.simulate import simulate

    out = tmp_path_factory.mktemp("clean-swarm")
    config = load_config(overrides=[f"run.rounds={CLEAN_ROUNDS}", *SWARM_TEST_SETTINGS])
    nodes = simulate(config, CLEAN_PEERS, out, console=Console(quiet=True), timeout=900)
    return nodes, out
