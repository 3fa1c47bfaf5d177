"""Run config: defaults, TOML, overrides, and one clear error per bad value."""

import pytest

from protocol.config import ConfigError, RunConfig, load_config, parse_override


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_digest_is_stable():
    a, b = load_config(), load_config()
    assert a == b and a.digest() == b.digest()
    assert a.rollout.group_size >= 2 and a.grpo.loss_type == "dapo"


def test_toml_then_overrides(tmp_path):
    path = write(tmp_path, '[rollout]\ngroup_size = 4\n[grpo]\nloss_type = "grpo"\ndelta = 4\n')
    config = load_config(path, ["rollout.group_size=16", "optim.lr=1e-5", "task.name=rg:basic_arithmetic"])
    assert config.rollout.group_size == 16
    assert config.grpo.loss_type == "grpo" and config.grpo.delta == 4.0
    assert config.optim.lr == 1e-5 and config.task.name == "rg:basic_arithmetic"
    assert config.digest() != load_config().digest()


def test_override_values_are_read_as_toml():
    assert parse_override("task.options={digits=1, ops='+-'}") == (["task", "options"], {"digits": 1, "ops": "+-"})
    assert parse_override("model.name=Qwen/Qwen2.5-0.5B") == (["model", "name"], "Qwen/Qwen2.5-0.5B")
    assert parse_override("grpo.mask_truncated_completions=true")[1] is True


@pytest.mark.parametrize("override, field", [
    ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("optim.lr=-1e-4", "optim.lr: must be > 0"),
    ("grpo.loss_type=ppo", "grpo.loss_type: must be one of grpo, bnpo, dr_grpo, dapo"),
    ("grpo.scale_rewards=yes", "grpo.scale_rewards: must be one of"),
    ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1]"),
    ("grpo.delta=0.5", "grpo.delta: must be > 1"),
    ("model.dtype=int8", "model.dtype: must be one of"),
    ("rollout.group_size=4.5", "rollout.group_size: must be an integer"),
    ("rollout.group_size=true", "rollout.group_size: must be an integer"),
    ("task.name=chess", "task.name: unknown task 'chess'"),
    ("task.name=rg:no_such_dataset", "task.name: unknown reasoning-gym dataset"),
    ("rollout.groupsize=8", "rollout.groupsize: unknown field"),
    ("nosection.x=1", "nosection: unknown field"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_unparsable_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[rollout\ngroup_size = 4"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="rollout: must be a table"):
        load_config(write(tmp_path, "rollout = 3\n"))


def test_round_trip_through_dict():
    config = load_config(overrides=["grpo.beta=0.04", "task.options={digits=1}"])
    assert RunConfig.from_dict(config.to_dict()) == config
