"""The run config: one schema every role agrees on, loaded from TOML with ``section.key=value`` overrides.

``digest()`` is the sha256 of the one canonical dump (sorted JSON of every field); peers compare it to be
sure they train the same run, and the coordinator's ledger is tied to it.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from protocol.config.checked import Checked, ConfigError
from protocol.config.sections import (
    CheckpointSection,
    EvalSection,
    GRPOSection,
    ModelSection,
    OptimSection,
    RolloutSection,
    RunSection,
    SwarmSection,
    TaskSection,
    TrustSection,
    WarmStartSection,
)

# 8-bit codecs move a part by up to ~0.7 of its norm (see trust.binding_tolerance): a tighter tolerance bans
# honest peers.
MIN_BINDING_TOLERANCE = {"uniform8bit": 1.5, "quantile8bit": 1.5}


class RunConfig(Checked):
    """A whole run: every section, with the rules that span sections."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection = Field(default_factory=TaskSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    warm_start: WarmStartSection = Field(default_factory=WarmStartSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    swarm: SwarmSection = Field(default_factory=SwarmSection)
    trust: TrustSection = Field(default_factory=TrustSection)

    @model_validator(mode="after")
    def _binding_tolerance_fits_compression(self) -> Self:
        floor = MIN_BINDING_TOLERANCE.get(self.swarm.compression, 0.0)
        if self.trust.binding_tolerance < floor:
            raise ValueError(f"trust.binding_tolerance: must be >= {floor:g} with swarm.compression "
                              f"{self.swarm.compression}, whose parts differ from the committed gradient by up to "
                              f"~0.7 of its norm (got {self.trust.binding_tolerance:g})")
        return self

    @model_validator(mode="after")
    def _groups_can_form(self) -> Self:
        if self.swarm.target_group_size < self.swarm.min_group_size:
            raise ValueError(f"swarm.target_group_size: must be >= swarm.min_group_size "
                              f"{self.swarm.min_group_size} (got {self.swarm.target_group_size})")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The canonical dump: every field, unset values as None."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """sha256 of the canonical dump: equal configs give equal digests."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Any) -> RunConfig:
        return cls.checked(data)

    def updated(self, **sections: dict[str, Any]) -> RunConfig:
        """A checked copy with some fields changed, e.g. ``config.updated(grpo={"beta": 0.1})``."""
        data = self.to_dict()
        for section, values in sections.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: must be a table (got {values!r})")
            data.setdefault(section, {}).update(values)
        return RunConfig.from_dict(data)

    def to_toml(self) -> str:
        """The config as a TOML file that ``load_config`` reads back to an equal config (unset values are
        left out: TOML has no null, and a missing field is unset)."""
        lines = []
        for section, values in self.to_dict().items():
            lines += [f"[{section}]", *(f"{key} = {toml_value(value)}" for key, value in values.items()
                                        if value is not None), ""]
        return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and finite numbers read the same in TOML


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
    return RunConfig.from_dict(data)
