"""Test-wide settings: a private GRPO_SWARM_HOME (shared by the processes a test starts) and no hub traffic.

tests/unit: fast tests in one process. tests/system: real processes (DHTs, averagers, coordinators, nodes,
chromium) on 127.0.0.1, each stopped by the test that started it.
"""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def swarm_home(tmp_path_factory):
    """Presets and warm starts go to one folder per test session, shared by its subprocesses."""
    home = tmp_path_factory.mktemp("grpo-swarm-home")
    os.environ["GRPO_SWARM_HOME"] = str(home)
    return home
