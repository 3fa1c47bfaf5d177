"""Built-in integer arithmetic, small enough for a character-level model to learn.

Every (a, op, b) with operands below 10**digits is a question, prompt "37+45=",
answer "82". The eval split holds the triples ``held_out`` picks, so evaluation
is on problems the model never trained on.
"""

from __future__ import annotations

import operator
import re
from array import array

from protocol.rewards import extract_answer
from protocol.tasks.base import Question, Task, TaskError, check_option_keys, held_out

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
DEFAULTS = {"digits": 2, "ops": "+"}
MAX_DIGITS = 3  # 3 digits and three ops is already 3M questions

_INTEGER = re.compile(r"-?[0-9]+")
_BARE_OR_TAGGED = re.compile(r"-?[0-9]+|<answer>\s*-?[0-9]+\s*</answer>")


class Arithmetic(Task):
    name = "arithmetic"

    def __init__(self, options: dict):
        check_option_keys(self.name, options, DEFAULTS)
        options = {**DEFAULTS, **options}
        digits, ops = options["digits"], options["ops"]
        if not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
            raise TaskError(f"arithmetic: option digits must be an integer in 1..{MAX_DIGITS}, got {digits!r}")
        if not isinstance(ops, str) or not ops or set(ops) - set(OPS):
            raise TaskError(f"arithmetic: option ops must be a non-empty subset of '{''.join(OPS)}', got {ops!r}")
        # A canonical op order, so "-+" and "+-" number the questions the same way.
        self._ops = [op for op in OPS if op in ops]
        self._n = 10**digits
        # Questions are stored as codes (8 bytes each, not a tuple each): 3 digits means millions.
        self._codes = {"train": array("q"), "eval": array("q")}
        for code in range(len(self._ops) * self._n**2):
            a, op, b = self._decode(code)
            self._codes["eval" if held_out(f"{a}{op}{b}") else "train"].append(code)

    def correctness(self, question: Question, completion: str) -> float:
        answer = extract_answer(completion)
        return float(_INTEGER.fullmatch(answer) is not None and int(answer) == int(question.answer))

    def format_ok(self, completion: str) -> bool:
        return _BARE_OR_TAGGED.fullmatch(completion.strip()) is not None

    def _size(self, split: str) -> int:
        return len(self._codes[split])

    def _question(self, index: int, split: str) -> Question:
        a, op, b = self._decode(self._codes[split][index])
        result = str(OPS[op](a, b))
        return Question(index=index, split=split, prompt=f"{a}{op}{b}=", answer=result, solution=result, meta={})

    def _decode(self, code: int) -> tuple[int, str, int]:
        op_index, rest = divmod(code, self._n**2)
        a, b = divmod(rest, self._n)
        return a, self._ops[op_index], b
