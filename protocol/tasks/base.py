"""What a task is: numbered questions in two splits, and how to score a completion.

Peers never exchange questions, only their indices (see ``protocol.shards``), so a
task must build the same question for the same index on every machine.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

SPLITS = ("train", "eval")
ANSWER_INSTRUCTION = "\nPut your final answer within <answer></answer> tags."


class TaskError(ValueError):
    """A task cannot be built or loaded; the message is one line that says why."""


@dataclass(frozen=True)
class Question:
    index: int  # position in its split
    split: str  # "train" or "eval"
    prompt: str
    answer: str  # canonical answer text
    solution: str  # reference completion after the prompt, without EOS (SFT warm start)
    meta: dict = field(default_factory=dict, hash=False)  # task-specific, e.g. a reasoning-gym entry


class Task(ABC):
    """A question set with a verifiable answer checker.

    Subclasses implement ``_size`` and ``_question``; the public methods check the
    split and the index first, so every task fails the same clear way.
    """

    name: str

    def size(self, split: str) -> int:
        return self._size(check_split(split))

    def question(self, index: int, split: str = "train") -> Question:
        size = self.size(split)
        if not 0 <= index < size:
            raise IndexError(f"{self.name}: question {index} is out of range for split '{split}' (size {size})")
        return self._question(index, split)

    @abstractmethod
    def correctness(self, question: Question, completion: str) -> float:
        """How right the completion's answer is, in [0, 1]."""

    @abstractmethod
    def format_ok(self, completion: str) -> bool:
        """Whether the completion has the answer format the prompt asks for."""

    @abstractmethod
    def _size(self, split: str) -> int: ...

    @abstractmethod
    def _question(self, index: int, split: str) -> Question: ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise TaskError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    return split


def check_option_keys(task: str, options: dict, known: Iterable[str]) -> None:
    """Reject option keys a task does not read: a typo must not silently change nothing."""
    known = sorted(known)
    for key in options:
        if key not in known:
            raise TaskError(f"{task}: unknown option '{key}' (known: {', '.join(known) or 'none'})")


def held_out(key: str) -> bool:
    """Whether an item belongs to the eval split: about 1 in 10, by a hash of its content.

    Hashing the content (not its position) keeps an item on the same side of the
    split however the item set is enumerated or extended.
    """
    return int.from_bytes(hashlib.sha256(key.encode()).digest(), "big") % 10 == 0
