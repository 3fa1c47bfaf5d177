"""The run config: one schema every role agrees on, loaded from TOML with overrides.

A run is described by sections (``[model]``, ``[task]``, ...). Every field is typed
and checked when the config is built, so a bad value fails at start-up with one
line naming the field, never deep inside a training round. ``digest()`` is the
canonical hash peers compare to be sure they train the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args, get_type_hints

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


Rule = tuple[Callable[[Any], bool], str]  # (predicate, what it requires)

POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
PROBABILITY: Rule = (lambda v: 0 < v <= 1, "must be in (0, 1]")
UNIT_INTERVAL: Rule = (lambda v: 0 <= v < 1, "must be in [0, 1)")
NON_EMPTY: Rule = (lambda v: bool(v.strip()), "must not be empty")
POSITIVE_OR_UNSET: Rule = (lambda v: v is None or v > 0, "must be > 0 (or unset)")


def one_of(options) -> Rule:
    return (lambda v: v in options, f"must be one of {', '.join(options)}")


def _spec(default, rule: Rule | None = None):
    """A field with a default and an optional rule checked when the config is built."""
    metadata = {"rule": rule} if rule else {}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunSection:
    id: str = _spec("local", (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) is not None,
                              "must be 1-64 letters, digits, '-' or '_' (it names DHT keys)"))
    seed: int = 0
    rounds: int = _spec(80, POSITIVE)


@dataclass
class ModelSection:
    # "tiny" is the built-in preset; anything else is a Hugging Face name or local path.
    name: str = _spec("tiny", NON_EMPTY)
    dtype: str = _spec("float32", one_of(DTYPES))
    device: str = "auto"
    lora_rank: int = _spec(0, NON_NEGATIVE)  # 0 = full fine-tuning
    lora_alpha: float = _spec(16.0, POSITIVE)
    lora_targets: list = _spec(["q_proj", "k_proj", "v_proj", "o_proj"])
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template


@dataclass
class TaskSection:
    # "arithmetic", "rg:<reasoning-gym dataset>" or "gsm8k"
    name: str = "arithmetic"
    format_reward: float = _spec(0.0, NON_NEGATIVE)  # weight of the format reward
    options: dict = _spec({})  # task-specific settings (e.g. arithmetic digits)


@dataclass
class RolloutSection:
    group_size: int = _spec(8, (lambda v: v >= 2, "must be >= 2 (a group needs two completions to compare)"))
    questions_per_peer: int = _spec(32, POSITIVE)
    max_new_tokens: int = _spec(8, POSITIVE)
    temperature: float = _spec(1.0, POSITIVE)
    top_p: float = _spec(1.0, PROBABILITY)


@dataclass
class GRPOSection:
    loss_type: str = _spec("dapo", one_of(LOSS_TYPES))
    beta: float = _spec(0.0, NON_NEGATIVE)  # k3 KL weight against the reference model
    epsilon_low: float = _spec(0.2, NON_NEGATIVE)
    epsilon_high: float = _spec(0.2, NON_NEGATIVE)
    delta: float | None = _spec(None, (lambda v: v is None or v > 1, "must be > 1 (or unset)"))
    scale_rewards: str = _spec("group", one_of(SCALE_REWARDS))
    mask_truncated_completions: bool = False
    num_iterations: int = _spec(1, POSITIVE)  # mu


@dataclass
class OptimSection:
    lr: float = _spec(3e-4, POSITIVE)  # the tiny preset; TRL uses 1e-6 for billion-parameter models
    weight_decay: float = _spec(0.0, NON_NEGATIVE)
    max_grad_norm: float = _spec(1.0, NON_NEGATIVE)  # 0 disables clipping
    adam_beta1: float = _spec(0.9, UNIT_INTERVAL)
    adam_beta2: float = _spec(0.99, UNIT_INTERVAL)
    adam_epsilon: float = _spec(1e-8, POSITIVE)
    micro_batch_size: int = _spec(0, NON_NEGATIVE)  # rows per forward/backward; 0 = the whole batch


@dataclass
class WarmStartSection:
    # Distillation from the task's reference solutions before GRPO (0 steps = off).
    steps: int = _spec(1500, NON_NEGATIVE)
    batch_size: int = _spec(64, POSITIVE)
    lr: float = _spec(2e-3, POSITIVE)


@dataclass
class EvalSection:
    every: int = _spec(10, POSITIVE)
    questions: int = _spec(400, POSITIVE)


@dataclass
class CheckpointSection:
    every: int = _spec(20, NON_NEGATIVE)  # 0 = only at the end


@dataclass
class SwarmSection:
    # Matchmaking window, group bounds and timeouts of each round's all-reduce.
    min_group_size: int = _spec(2, (lambda v: v >= 2, "must be >= 2 (averaging alone is not a swarm)"))
    target_group_size: int = _spec(64, (lambda v: v >= 2, "must be >= 2"))
    matchmaking_time: float = _spec(3.0, POSITIVE)
    allreduce_timeout: float = _spec(15.0, POSITIVE)
    next_chunk_timeout: float = _spec(5.0, POSITIVE)
    agreement_timeout: float = _spec(10.0, POSITIVE)
    compression: str = _spec("none", one_of(("none", "fp16", "uniform8bit", "quantile8bit")))
    state_timeout: float = _spec(60.0, POSITIVE)  # loading the current state from peers
    max_failed_rounds: int = _spec(40, POSITIVE)  # consecutive failures before a peer gives up
    linger: float = _spec(60.0, NON_NEGATIVE)  # seconds a finished peer serves state to peers still behind


@dataclass
class TrustSection:
    """Audits of contributions and the all-reduce's defences (DESIGN "Trust" 3-5).

    Every tolerance bounds honest noise with a margin; node/audit.py gives the honest distributions
    they were set from (``grpo-swarm bench verifier`` measures them again).
    """

    audit_units: int = _spec(8, POSITIVE)  # sketched units per contribution, each whole question groups
    audit_sample: int = _spec(2, POSITIVE)  # units a verifier recomputes per audit
    audit_rate: float = _spec(1.0, PROBABILITY)  # fraction of contributions a verifier audits
    # Tolerances of what a verifier recomputes. Unset: the measured default for model.dtype
    # (node.audit.DTYPE_TOLERANCES): bf16 rounding noise is ~10^4 times fp32's.
    logprob_max_abs: float | None = _spec(None, POSITIVE_OR_UNSET)  # max |sampling - prefill log-prob| of a token
    logprob_mean_abs: float | None = _spec(None, POSITIVE_OR_UNSET)  # mean of the same over the audited tokens
    sketch_min_cosine: float | None = _spec(None, (lambda v: v is None or -1 < v <= 1, "must be in (-1, 1] (or unset)"))
    sketch_norm_tolerance: float | None = _spec(None, POSITIVE_OR_UNSET)  # |committed / recomputed unit norm - 1|
    # a unit deviating by at most this x the committed units' RMS norm is rounding noise, whatever its angle
    sketch_noise_floor: float | None = _spec(None, POSITIVE_OR_UNSET)
    surprisal_max_z: float = _spec(6.0, POSITIVE)  # tokens less likely than sampling makes them, in std errors
    grad_norm_factor: float = _spec(2.0, (lambda v: v > 1, "must be > 1"))  # committed grad_norm vs sketch norm
    clip_factor: float = _spec(4.0, NON_NEGATIVE)  # robust clipping of each sender's part; 0 = off
    # relative error between a sender's part sketches (after compression) and its committed sketch;
    # measured on the tiny model's gradients: none ~1e-7, fp16 1.8e-4..2.3e-4, 8-bit 0.26..0.69
    binding_tolerance: float = _spec(2e-3, POSITIVE)
    token_lifetime: float = _spec(600.0, POSITIVE)  # seconds an access token is valid (coordinator --token-lifetime)
    rollout_history: int = _spec(4, POSITIVE)  # rounds a peer keeps its rollout bundles for verifiers


# 8-bit codecs move a part by up to ~0.7 of its norm (see binding_tolerance): a tighter tolerance bans honest peers.
MIN_BINDING_TOLERANCE = {"uniform8bit": 1.5, "quantile8bit": 1.5}


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    swarm: SwarmSection = field(default_factory=SwarmSection)
    trust: TrustSection = field(default_factory=TrustSection)

    def __post_init__(self):
        floor = MIN_BINDING_TOLERANCE.get(self.swarm.compression, 0.0)
        if self.trust.binding_tolerance < floor:
            raise ConfigError(f"trust.binding_tolerance: must be >= {floor:g} with swarm.compression "
                              f"{self.swarm.compression}, whose parts differ from the committed gradient by up to "
                              f"~0.7 of its norm (got {self.trust.binding_tolerance:g})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 of the canonical JSON encoding: equal configs give equal digests."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data, prefix="")


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "a table", list: "a list"}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a TOML value against the field's type; ints are accepted for floats."""
    types = [t for t in (get_args(annotation) or (annotation,)) if t is not type(None)]
    base = types[0]
    if value is None and len(types) < len(get_args(annotation) or (annotation,)):
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: must be {_KINDS.get(base, base)} (got {value!r})")
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a table (got {data!r})")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], data[name], prefix=f"{full}.")
            continue
        value = _coerce(full, data[name], hints[name])
        rule = f.metadata.get("rule")
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{full}: {rule[1]} (got {value!r})")
        values[name] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` with the value read as TOML (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then ``section.key=value`` overrides; checked once."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    config = RunConfig.from_dict(data)
    _check_task_name(config.task.name)
    return config


def _check_task_name(name: str) -> None:
    # Imported here: the task registry pulls in the task libraries, the schema does not need them.
    from protocol.tasks import known_task

    problem = known_task(name)
    if problem:
        raise ConfigError(f"task.name: {problem}")
