"""Tasks by name: the built-in arithmetic, any reasoning-gym dataset, GSM8K.

``known_task`` checks a name cheaply (the config validates with it); ``load_task``
builds the task, whose heavy parts (datasets) load on first use.
"""

from __future__ import annotations

from protocol.tasks import rg
from protocol.tasks.arithmetic import Arithmetic
from protocol.tasks.base import Question, Task, TaskError
from protocol.tasks.gsm8k import GSM8K

__all__ = ["Question", "Task", "TaskError", "known_task", "load_task"]

BUILTIN = {"arithmetic": Arithmetic, "gsm8k": GSM8K}


def known_task(name: str) -> str | None:
    """None if ``name`` names a usable task, else a one-line message saying why not."""
    if name in BUILTIN:
        return None
    if name.startswith(rg.PREFIX):
        return rg.unknown_dataset(name[len(rg.PREFIX):])
    known = ", ".join(sorted(BUILTIN))
    return f"unknown task '{name}' (known: {known}, {rg.PREFIX}<name> for any reasoning-gym dataset)"


def load_task(name: str, options: dict | None = None) -> Task:
    problem = known_task(name)
    if problem:
        raise TaskError(problem)
    options = dict(options or {})
    if name in BUILTIN:
        return BUILTIN[name](options)
    return rg.ReasoningGymTask(name[len(rg.PREFIX):], options)
