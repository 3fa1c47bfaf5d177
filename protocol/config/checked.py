"""Checked models: pydantic models whose every validation error is one line naming the field.

The run config and the processes' settings are pydantic models built on ``Checked``. Whether a value
comes from a TOML file, a ``--set`` override, a command-line flag or Python code, a bad one raises
``ConfigError`` at construction with one line such as ``rollout.group_size: must be >= 2 (got 1)``,
never deep inside a training round.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails


class ConfigError(ValueError):
    """A config value or setting is wrong; the message (one line) names the field."""


class Checked(BaseModel):
    """A frozen, strict model: unknown fields, wrong types, non-finite numbers and broken rules are refused.

    ``field_prefix`` says how errors name a field of this model: ``"rollout."`` gives ``rollout.group_size``,
    ``"--"`` gives ``--host-maddrs`` (settings that come from command-line flags).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, validate_default=True)
    field_prefix: ClassVar[str] = ""

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None

    @classmethod
    def checked(cls, data: Any) -> Self:
        """``cls`` built from plain data (a dict read from TOML or JSON); raises ConfigError."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe(e, cls)) from None

    def replaced(self, **changes: Any) -> Self:
        """A checked copy with some fields changed."""
        return type(self).checked({**self.model_dump(), **changes})

    @classmethod
    def field_name(cls, loc: tuple) -> str:
        """How an error names the field at ``loc`` (pydantic's path of keys)."""
        if cls.field_prefix == "--":
            return "--" + str(loc[-1]).replace("_", "-") if loc else "settings"
        return cls.field_prefix + ".".join(map(str, loc)) if loc else cls.field_prefix.rstrip(".") or "config"


_KINDS = {"int": "an integer", "float": "a number", "string": "a string", "bool": "true or false",
          "dict": "a table", "model": "a table", "list": "a list"}


def requirement(error: ErrorDetails) -> str:
    """What the value must be, in the words of the README (``must be >= 2``)."""
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
              "less_than_equal": ("<=", "le")}
    if kind in bounds:
        operator, key = bounds[kind]
        bound = ctx[key]
        return f"must be {operator} {bound:g}" if isinstance(bound, float) else f"must be {operator} {bound}"
    if kind == "literal_error":
        return "must be one of " + ctx["expected"].replace("'", "").replace(" or ", ", ")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind.endswith(("_type", "_parsing", "_from_float")) and kind.split("_")[0] in _KINDS:
        return f"must be {_KINDS[kind.split('_')[0]]}"
    return error["msg"][0].lower() + error["msg"][1:]


def describe(error: ValidationError, model: type[Checked]) -> str:
    """The first problem of ``error`` as one line: ``field: requirement (got value)``."""
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):  # a nested model, which named its field itself
        return str(raised)
    if not loc and first["type"] == "value_error":  # a rule across fields names its fields itself
        return requirement(first)
    text = f"{model.field_name(loc)}: {requirement(first)}"
    if first["type"] == "extra_forbidden":
        known = _known_fields(model, loc[:-1])
        return text + (f" (known: {', '.join(known)})" if known else "")
    if first["type"] != "missing":
        text += f" (got {first['input']!r})"
    return " ".join(text.split())


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at ``loc``."""
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
