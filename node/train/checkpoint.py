"""Checkpoints: model and optimizer state in safetensors, with a manifest of hashes.

A checkpoint is a folder ``round-NNNNNN`` holding ``model.safetensors``,
``optimizer.safetensors`` and ``manifest.json`` (round, run config, sha256 of each
file, model digest). It is written to a temporary folder and renamed, and every
hash is checked before anything is loaded, so a torn or corrupt checkpoint is
refused whole, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from node.train.state import optimizer_state, optimizer_tensors
from protocol.digest import model_digest

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    round: int
    config: dict
    model_digest: str
    param_groups: list  # the optimizer's hyper-parameters (its tensors are in optimizer.safetensors)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: str | Path, round_: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    config: dict) -> Path:
    root = Path(root)
    final = root / f"round-{round_:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses shared storage (tied embeddings): store each tensor's own copy.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
              tmp / "model.safetensors")
    files = ["model.safetensors"]
    groups = []
    if optimizer is not None:
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        files.append("optimizer.safetensors")
    manifest = {"round": round_, "config": config, "model_digest": model_digest(model),
                "param_groups": groups, "sha256": {f: _sha256(tmp / f) for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    found = sorted(Path(root).glob("round-*/" + MANIFEST)) if Path(root).is_dir() else []
    return found[-1].parent if found else None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify the manifest and every file's hash; load nothing yet."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        hashes = manifest["sha256"]
        for name, expected in hashes.items():
            if _sha256(path / name) != expected:
                raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
        return Checkpoint(path=path, round=int(manifest["round"]), config=manifest["config"],
                          model_digest=manifest["model_digest"], param_groups=manifest.get("param_groups", []))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: missing {Path(e.filename).name}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({e})") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> Checkpoint:
    """Verify, then load model (and optimizer) state; on any mismatch nothing is changed."""
    checkpoint = read_checkpoint(path)
    try:
        weights = load_file(checkpoint.path / "model.safetensors")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {checkpoint.path}: model.safetensors unreadable ({e})") from None
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"checkpoint {checkpoint.path}: tensors do not match this model's architecture")
    loaded_optimizer = None
    if optimizer is not None and (checkpoint.path / "optimizer.safetensors").exists():
        loaded_optimizer = optimizer_state(load_file(checkpoint.path / "optimizer.safetensors"),
                                           checkpoint.param_groups)
    model.load_state_dict(weights)
    if loaded_optimizer is not None:
        optimizer.load_state_dict(loaded_optimizer)
    if model_digest(model) != checkpoint.model_digest:
        raise CheckpointError(f"checkpoint {checkpoint.path}: loaded model digest differs from the manifest")
    return checkpoint
