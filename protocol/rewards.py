"""Verifiable rewards: the scorers every trainer and verifier runs on a completion.

A verifier recomputes a peer's rewards from its completions, so scoring is a pure
function of (question, completion) and totals are summed in a fixed order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from protocol.tasks import Question, Task

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The content of the last <answer>...</answer>, else the first line of the completion.

    The fallback lets a model that answers bare (the tiny arithmetic model) be scored.
    """
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    return completion.strip().partition("\n")[0].strip()


def has_one_answer_tag(completion: str) -> bool:
    """Exactly one <answer>...</answer> pair: the format tag-instructed prompts ask for."""
    return (completion.count("<answer>") == 1 and completion.count("</answer>") == 1
            and _ANSWER_TAG.search(completion) is not None)


@dataclass(frozen=True)
class RewardFunction:
    name: str
    weight: float
    fn: Callable[[Question, str], float]


def reward_functions(task: Task, format_weight: float) -> list[RewardFunction]:
    """Correctness always; a format reward too when it has a weight (TRL-style shaping)."""
    functions = [RewardFunction("correct", 1.0, task.correctness)]
    if format_weight > 0:
        def format_reward(question: Question, completion: str) -> float:
            return float(task.format_ok(completion))

        functions.append(RewardFunction("format", format_weight, format_reward))
    return functions


def score(functions: list[RewardFunction], questions: list[Question],
          completions: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Total weighted reward per completion, and each function's raw values (for metrics).

    ``questions[k]`` is the question ``completions[k]`` answers (a group repeats it).
    """
    if len(questions) != len(completions):
        raise ValueError(f"{len(questions)} questions for {len(completions)} completions")
    values = {f.name: [float(f.fn(q, c)) for q, c in zip(questions, completions, strict=True)] for f in functions}
    totals = [sum(f.weight * values[f.name][k] for f in functions) for k in range(len(completions))]
    return totals, values
