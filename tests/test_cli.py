"""The console script as a user meets it: bad input gives one ``error:`` line and exit 2."""

import subprocess
import sys

import pytest


def grpo_swarm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["node", "--solo", "--set", "rollout.group_size=1"], "error: rollout.group_size: must be >= 2"),
    (["node", "--solo", "--set", "grpo.loss_type=ppo"], "error: grpo.loss_type: must be one of"),
    (["node", "--solo", "--set", "task.name=chess"], "error: task.name: unknown task 'chess'"),
    (["node", "--solo", "--config", "/nonexistent/run.toml"], "error: config file /nonexistent/run.toml: not found"),
    (["eval", "--set", "eval.questions=2", "no-such-org/no-such-model"], "error: model.name: cannot load"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = grpo_swarm(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_unparsable_toml(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_text("[grpo\nbeta = ")
    result = grpo_swarm("node", "--solo", "--config", str(bad))
    assert result.returncode == 2 and "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "round-000001"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"round": 1, "config": {}, "model_digest": "x", '
                                          '"sha256": {"model.safetensors": "00"}}')
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    result = grpo_swarm("eval", "--set", "eval.questions=2", str(folder))
    assert result.returncode == 2
    assert "model.safetensors is corrupt" in result.stderr and "Traceback" not in result.stderr
