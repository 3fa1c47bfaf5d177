"""``grpo-swarm export CHECKPOINT --out DIR``: a checkpoint as a Hugging Face model folder.

The result is what ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
load, with no grpo-swarm code: LoRA adapters are merged into the base weights. The checkpoint is verified
whole (node.train.checkpoint) before anything is written, and the folder is written under a temporary name and
renamed, so a refused or interrupted export leaves nothing at ``DIR``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from node.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from node.train.models import load_policy
from protocol.config import RunConfig


def export_checkpoint(checkpoint: str | Path, out: str | Path, config: Optional[RunConfig] = None) -> Path:
    """Write ``checkpoint`` as a Hugging Face folder at ``out`` (which must not exist or be empty).
    ``config`` defaults to the run config saved in the checkpoint."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"export: {out} exists and is not an empty folder; not overwriting it")
    saved = read_checkpoint(checkpoint)
    config = config or RunConfig.from_dict(saved.config)
    # The checkpoint holds every tensor of the model (with LoRA: the base too), so the model's own
    # starting weights do not matter; only its architecture does.
    policy = load_policy(config.model, config.run.seed)
    load_checkpoint(saved.path, policy.model)
    model = policy.model.merge_and_unload() if policy.uses_lora else policy.model
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
