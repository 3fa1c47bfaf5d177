"""Run config: defaults, TOML, overrides, and one clear error per bad value."""

import pytest

from protocol.config import (
    ConfigError,
    RolloutSection,
    RunConfig,
    SwarmSection,
    TrustSection,
    load_config,
    parse_override,
)


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
    ("rollout.group_size=1", "rollout.group_size: must be >= 2 (got 1)"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("optim.lr=-1e-4", "optim.lr: must be > 0"),
    ("grpo.loss_type=ppo", "grpo.loss_type: must be one of grpo, bnpo, dr_grpo, dapo"),
    ("grpo.scale_rewards=yes", "grpo.scale_rewards: must be one of"),
    ("rollout.top_p=1.5", "rollout.top_p: must be <= 1 (got 1.5)"),
    ("grpo.delta=0.5", "grpo.delta: must be > 1"),
    ("model.dtype=int8", "model.dtype: must be one of"),
    ("rollout.group_size=4.5", "rollout.group_size: must be an integer"),
    ("rollout.group_size=true", "rollout.group_size: must be an integer"),
    ("task.name=chess", "task.name: unknown task 'chess'"),
    ("task.name=rg:no_such_dataset", "task.name: unknown reasoning-gym dataset"),
    ("rollout.groupsize=8", "rollout.groupsize: unknown field"),
    ("nosection.x=1", "nosection: unknown field"),
    ("run.id=a.b", "run.id: must be 1-64 letters"),
    ("optim.lr=inf", "optim.lr: must be a finite number"),
    ("model.lora_targets=[1]", "model.lora_targets.0: must be a string"),
    ("swarm.compression=uniform8bit", "trust.binding_tolerance: must be >= 1.5 with swarm.compression uniform8bit"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_values_in_a_toml_file_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[rollout]\ngroup_size = 1\n'))
    assert str(err.value) == "rollout.group_size: must be >= 2 (got 1)"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[grpo]\nloss_type = "ppo"\n'))
    assert str(err.value).startswith("grpo.loss_type: must be one of grpo, bnpo, dr_grpo, dapo (got 'ppo')")


def test_unparsable_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[rollout\ngroup_size = 4"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="rollout: must be a table"):
        load_config(write(tmp_path, "rollout = 3\n"))


def test_round_trip_through_dict_and_toml(tmp_path):
    config = load_config(overrides=["grpo.beta=0.04", "grpo.delta=4", "task.options={digits=1, ops='+-'}"])
    assert RunConfig.from_dict(config.to_dict()) == config
    assert load_config(write(tmp_path, config.to_toml())) == config


@pytest.mark.parametrize("build, field", [
    (lambda: RolloutSection(group_size=1), "rollout.group_size: must be >= 2 (got 1)"),
    (lambda: RunConfig(rollout=RolloutSection(top_p=0)), "rollout.top_p: must be > 0 (got 0)"),
    (lambda: RunConfig(rollout={"group_size": "8"}), "rollout.group_size: must be an integer (got '8')"),
    (lambda: RunConfig(swarm=SwarmSection(compression="fp16"), trust=TrustSection(clip_factor=-1)),
     "trust.clip_factor: must be >= 0 (got -1)"),
    (lambda: RunConfig(rollout={"groupsize": 8}), "rollout.groupsize: unknown field"),
    (lambda: RunConfig(swarm={"min_group_size": 8, "target_group_size": 4}),
     "swarm.target_group_size: must be >= swarm.min_group_size 8 (got 4)"),
    (lambda: load_config().updated(grpo={"loss_type": "ppo"}), "grpo.loss_type: must be one of"),
])
def test_bad_values_built_in_python_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_a_config_is_frozen():
    config = load_config()
    with pytest.raises(Exception, match="frozen"):
        config.rollout.group_size = 4
    assert config.updated(rollout={"group_size": 4}).rollout.group_size == 4 and config.rollout.group_size == 8
