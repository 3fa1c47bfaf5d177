"""Running ``grpo-swarm`` as a user does: its own process, output captured."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: processes that import the project start here


def grpo_swarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``grpo-swarm ARGS...`` (rich tables 200 columns wide, so that a test can read them)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def last_error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a command that failed as a user's mistake (exit 2, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]
