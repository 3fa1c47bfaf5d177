"""The console script as a user meets it: bad input gives one ``error:`` line and exit 2."""

import json

import pytest

from tests.command import grpo_swarm


@pytest.mark.parametrize("args, message", [
    (["node", "--solo", "--set", "rollout.group_size=1"], "error: rollout.group_size: must be >= 2"),
    (["node", "--solo", "--set", "grpo.loss_type=ppo"], "error: grpo.loss_type: must be one of"),
    (["node", "--solo", "--set", "task.name=chess"], "error: task.name: unknown task 'chess'"),
    (["node", "--solo", "--config", "/nonexistent/run.toml"], "error: config file /nonexistent/run.toml: not found"),
    (["eval", "--set", "eval.questions=2", "no-such-org/no-such-model"], "error: model.name: cannot load"),
    (["node", "--initial-peers", "/ip4/1.2.3.4/tcp/x"], "error: --initial-peers: '/ip4/1.2.3.4/tcp/x' is not a valid"),
    (["coordinator", "--grpc-port", "70000"], "error: --grpc-port: must be <= 65535 (got 70000)"),
    (["node", "--coordinator", "localhost"], "error: --coordinator: 'localhost' is not HOST:PORT"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = grpo_swarm(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_a_config_that_loads_back(tmp_path):
    shown = grpo_swarm("config", "show", "--set", "rollout.group_size=4", "--set", "grpo.delta=4")
    assert shown.returncode == 0, shown.stderr
    saved = tmp_path / "run.toml"
    saved.write_text(shown.stdout)
    again = grpo_swarm("config", "show", "--config", str(saved))
    assert again.stdout == shown.stdout and "group_size = 4" in shown.stdout and "delta = 4.0" in shown.stdout


def test_config_schema_describes_every_field():
    result = grpo_swarm("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    rollout = schema["$defs"]["RolloutSection"]["properties"]
    assert rollout["group_size"]["minimum"] == 2 and "G" in rollout["group_size"]["description"]
    described = [name for section in schema["$defs"].values() for name, field in section["properties"].items()
                 if not field.get("description")]
    assert described == [], f"fields without a docstring: {described}"


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
