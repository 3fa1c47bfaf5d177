"""GSM8K grade-school math, scored with math-verify.

A reference answer is reasoning, then "#### 72". The solution shown during warm
start keeps the reasoning (without the "<<48/2=24>>" calculator notes) and puts
the final number in <answer> tags, the format the prompt asks for.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from protocol.rewards import extract_answer, has_one_answer_tag
from protocol.tasks.base import ANSWER_INSTRUCTION, Question, Task, TaskError, check_option_keys, held_out

HUB_NAME = "openai/gsm8k"
DEFAULTS = {"path": None}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


class GSM8K(Task):
    name = "gsm8k"

    def __init__(self, options: dict):
        check_option_keys(self.name, options, DEFAULTS)
        self._path = {**DEFAULTS, **options}["path"]
        self._rows = None  # split -> list of {"question", "answer"}, loaded on first use

    def correctness(self, question: Question, completion: str) -> float:
        from math_verify import parse, verify

        # math-verify's timeout is a SIGALRM, which only the main thread may set.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(question.answer, parsing_timeout=timeout)
        answer = parse(extract_answer(completion), parsing_timeout=timeout)
        return float(verify(gold, answer, timeout_seconds=timeout))

    def format_ok(self, completion: str) -> bool:
        return has_one_answer_tag(completion)

    def _size(self, split: str) -> int:
        return len(self._splits()[split])

    def _question(self, index: int, split: str) -> Question:
        row = self._splits()[split][index]
        reasoning, _, final = row["answer"].rpartition("####")
        answer = final.strip().replace(",", "")
        solution = f"{_CALCULATOR_NOTE.sub('', reasoning).strip()}\n<answer>{answer}</answer>"
        return Question(index=index, split=split, prompt=row["question"] + ANSWER_INSTRUCTION,
                        answer=answer, solution=solution, meta={})

    def _splits(self) -> dict[str, list[dict]]:
        if self._rows is None:
            source = self._path or HUB_NAME
            try:
                rows = _read(self._path)
            except Exception as e:
                hint = ("offline? Download it once with network access or set task.options.path to a local copy"
                        if self._path is None else
                        f"expected a folder with train and test files, or one {'/'.join(FILE_BUILDERS)} file")
                cause = str(e).strip().partition("\n")[0]
                raise TaskError(f"gsm8k: cannot load '{source}' ({hint}): {type(e).__name__}: {cause}") from None
            for split in ("train", "test"):
                if rows[split] and not {"question", "answer"} <= rows[split][0].keys():
                    raise TaskError(f"gsm8k: the {split} rows of '{source}' need 'question' and 'answer' columns")
            self._rows = {"train": rows["train"], "eval": rows["test"]}
        return self._rows


def _read(path: str | None) -> dict[str, list[dict]]:
    """The train and test rows of the hub copy, of a folder with train and test files,
    or of one file, split 9:1 by ``held_out`` since a single file has no test part."""
    import datasets

    if path is None:
        loaded = datasets.load_dataset(HUB_NAME, "main")
    elif Path(path).is_file():
        rows = datasets.load_dataset(FILE_BUILDERS[Path(path).suffix], data_files=path, split="train").to_list()
        return {"train": [r for r in rows if not held_out(r["question"])],
                "test": [r for r in rows if held_out(r["question"])]}
    else:
        loaded = datasets.load_dataset(path)
    return {split: loaded[split].to_list() for split in ("train", "test")}
