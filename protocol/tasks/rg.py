"""Any reasoning-gym dataset, scored by reasoning-gym's own verifier.

reasoning-gym generates item ``i`` from the seed and ``i`` alone (as a rule from
``Random(seed + i)``), so a split is just a seed and a size: nothing is stored and
every machine builds the same questions. The eval split's seed is
``EVAL_SEED_OFFSET`` higher, which keeps its items apart from the training items
as long as ``size`` stays below the offset.
"""

from __future__ import annotations

import dataclasses
import difflib

from protocol.rewards import has_one_answer_tag
from protocol.tasks.base import ANSWER_INSTRUCTION, Question, Task, TaskError, check_option_keys

PREFIX = "rg:"
DEFAULTS = {"seed": 0, "size": 10_000, "eval_size": 500}
EVAL_SEED_OFFSET = 1_000_003

# Datasets whose items differ between processes (through Python's string hash seed
# or global random state): the question, or the reference answer that warm start
# trains on, so peers could not agree on what a question id means. Found by
# generating the first 16 items under different PYTHONHASHSEEDs (reasoning-gym 0.1.25).
NOT_REPRODUCIBLE = {"isomorphic_strings", "knight_swap", "list_functions",
                    "polynomial_multiplication", "ransom_note", "word_ladder"}


def _registry() -> dict:
    import reasoning_gym.factory  # slow import (~1 s): only when a reasoning-gym task is named

    return reasoning_gym.factory.DATASETS


def unknown_dataset(dataset: str) -> str | None:
    """Why ``dataset`` cannot be used, or None. Looks at the registry only: creates nothing."""
    if dataset not in _registry():
        close = difflib.get_close_matches(dataset, _registry(), n=1)
        return f"unknown reasoning-gym dataset '{dataset}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    if dataset in NOT_REPRODUCIBLE:
        return f"reasoning-gym dataset '{dataset}' is not reproducible across machines, so peers cannot share it"
    return None


class ReasoningGymTask(Task):
    def __init__(self, dataset: str, options: dict):
        self.name = PREFIX + dataset
        self._dataset_cls, config_cls = _registry()[dataset]
        # Any field of the dataset's own config is an option too (e.g. max_terms).
        config_fields = {f.name for f in dataclasses.fields(config_cls)}
        check_option_keys(self.name, options, DEFAULTS.keys() | config_fields)
        options = {**DEFAULTS, **options}
        seed, size, eval_size = options.pop("seed"), options.pop("size"), options.pop("eval_size")
        valid = (all(isinstance(v, int) for v in (seed, size, eval_size))
                 and 0 < size <= EVAL_SEED_OFFSET and eval_size > 0)
        if not valid:
            raise TaskError(f"{self.name}: seed, size and eval_size must be integers, "
                            f"with 0 < size <= {EVAL_SEED_OFFSET} and eval_size > 0")
        # Configs are built (and checked) now so a bad option fails at start-up;
        # the datasets themselves on first use, since some take seconds to set up.
        try:
            self._configs = {"train": config_cls(seed=seed, size=size, **options),
                             "eval": config_cls(seed=seed + EVAL_SEED_OFFSET, size=eval_size, **options)}
            for config in self._configs.values():
                config.validate()
        except (AssertionError, TypeError, ValueError) as e:
            raise TaskError(f"{self.name}: bad options: {e}") from None
        self._datasets = {}

    def correctness(self, question: Question, completion: str) -> float:
        from reasoning_gym.utils import extract_answer

        answer = extract_answer(completion)
        if answer is None:
            answer = completion.strip()
        try:
            score = self._dataset(question.split).score_answer(answer, question.meta)
        except Exception:  # a verifier tripping over arbitrary model output is a wrong answer
            return 0.0
        return min(max(float(score), 0.0), 1.0)

    def format_ok(self, completion: str) -> bool:
        return has_one_answer_tag(completion)

    def _size(self, split: str) -> int:
        return self._configs[split].size

    def _question(self, index: int, split: str) -> Question:
        entry = self._dataset(split)[index]
        # Some datasets accept many answers and give no reference one (answer None):
        # their questions have an empty answer and solution, so warm start must skip them.
        answer = "" if entry["answer"] is None else str(entry["answer"])
        solution = f"<answer>{answer}</answer>" if answer else ""
        return Question(index=index, split=split, prompt=entry["question"] + ANSWER_INSTRUCTION,
                        answer=answer, solution=solution, meta=entry)

    def _dataset(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = self._dataset_cls(config=self._configs[split])
        return self._datasets[split]
