"""The warm start: distill once, keep the result, load it like any model.

Every peer of a run must begin from the same θ_0. The distilled model is written
with ``save_pretrained`` under a folder named by the hash of everything that
determines it (model, task, warm-start settings, seed), so a second peer, a
restarted peer or a test reuses it instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

from node.train.distill import DistillSettings, distill
from node.train.models import Policy, home_dir, load_policy
from protocol.config import RunConfig
from protocol.tasks import Task


def warm_start_key(config: RunConfig) -> str:
    model = config.model.replaced(lora_rank=0, device="auto")
    blob = json.dumps({"model": model.model_dump(), "task": config.task.model_dump(),
                       "warm_start": config.warm_start.model_dump(), "seed": config.run.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_started_policy(config: RunConfig, task: Task,
                        on_step: Callable[[int, float], None] | None = None) -> Policy:
    """The policy θ_0 of a run: the configured model after the (cached) warm start."""
    if config.warm_start.steps == 0:
        return load_policy(config.model, config.run.seed)
    path = home_dir() / "warm-start" / warm_start_key(config)
    if not (path / "config.json").exists():
        base = config.model.replaced(lora_rank=0)
        student = load_policy(base, config.run.seed)
        ws = config.warm_start
        distill(student, task, DistillSettings(ws.steps, ws.batch_size, ws.lr, seed=config.run.seed), on_step=on_step)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        student.model.save_pretrained(tmp)
        student.tokenizer.save_pretrained(tmp)
        try:
            tmp.replace(path)
        except OSError:  # a concurrent peer finished first; same inputs, same model
            shutil.rmtree(tmp, ignore_errors=True)
    return load_policy(config.model, config.run.seed, path=str(path))
