"""The rollout bundle: what a trainer keeps for verifiers and serves over p2p, and how it is read.

safetensors bytes holding everything a verifier needs to recompute a round's rewards, token count,
log-probs and audit units (prompts, completions, sampling log-probs, rewards, the per-unit gradient
sketches). safetensors, not pickle: a bundle comes from an untrusted peer. ``read_bundle`` is the strict
parse side: a malformed bundle is one ``BundleError`` that says what is wrong, never an exception from
inside torch. A bundle never goes into the DHT (DHT values must stay small).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from protocol.sketch import SKETCH_DIM

BUNDLE_FORMAT = "grpo-swarm/rollouts/v1"
MAX_BUNDLE_BYTES = 64 << 20  # the one cap: a trainer refuses to make a larger bundle, a verifier to read one

# name: (dtype, rank). Rows are grouped by question: question 0 × G, question 1 × G, ...
BUNDLE_TENSORS = {
    "question_ids": (torch.int64, 1),      # [Q]
    "prompt_ids": (torch.int64, 2),        # [B, P] left-padded
    "prompt_mask": (torch.int64, 2),       # [B, P]
    "completion_ids": (torch.int64, 2),    # [B, C] right-padded
    "completion_mask": (torch.int64, 2),   # [B, C]
    "sampling_logps": (torch.float32, 2),  # [B, C]
    "truncated": (torch.bool, 1),          # [B]
    "rewards": (torch.float32, 1),         # [B]
    "unit_sketches": (torch.float64, 2),   # [units, SKETCH_DIM]
}


class BundleError(ValueError):
    """A rollout bundle that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class RolloutBundle:
    """A parsed, structurally valid bundle (CPU tensors). Its content is checked by node.verify.audit."""

    round: int
    peer_id: str
    question_ids: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logps: torch.Tensor
    truncated: torch.Tensor
    rewards: torch.Tensor
    unit_sketches: torch.Tensor

    @property
    def rows(self) -> int:
        return self.prompt_ids.shape[0]


def rollout_digest(bundle: bytes) -> bytes:
    return hashlib.sha256(bundle).digest()


def write_bundle(tensors: dict[str, torch.Tensor], round_: int, peer_id: str) -> bytes:
    """The bundle of ``peer_id``'s round: ``tensors`` (every name of BUNDLE_TENSORS) in the format's dtypes."""
    tensors = {name: tensors[name].detach().to("cpu", dtype).contiguous()
               for name, (dtype, _) in BUNDLE_TENSORS.items()}
    data = save(tensors, metadata={"format": BUNDLE_FORMAT, "round": str(round_), "peer_id": peer_id})
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"rollout bundle of {len(data)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit "
                         "(fewer questions per peer or shorter completions)")
    return data


def read_bundle(data: bytes, max_bytes: int = MAX_BUNDLE_BYTES) -> RolloutBundle:
    """Parse and structurally check a bundle; raises BundleError on the first problem."""
    if not isinstance(data, bytes):
        raise BundleError(f"bundle is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise BundleError(f"bundle of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise BundleError(f"not a safetensors file ({e})") from None
    if set(tensors) != set(BUNDLE_TENSORS):
        missing, extra = sorted(set(BUNDLE_TENSORS) - set(tensors)), sorted(set(tensors) - set(BUNDLE_TENSORS))
        raise BundleError(f"bundle tensors differ from the format (missing {missing}, unexpected {extra})")
    for name, (dtype, rank) in BUNDLE_TENSORS.items():
        t = tensors[name]
        if t.dtype != dtype or t.dim() != rank:
            raise BundleError(f"{name}: {t.dtype} of rank {t.dim()}, expected {dtype} of rank {rank}")
    _check_shapes(tensors)
    round_, peer_id = _metadata(data)
    return RolloutBundle(round=round_, peer_id=peer_id, **tensors)


def _check_shapes(t: dict[str, torch.Tensor]) -> None:
    rows, prompt = t["prompt_ids"].shape
    columns = t["completion_ids"].shape[1]
    questions, units = t["question_ids"].numel(), t["unit_sketches"].shape[0]
    expected = {"prompt_mask": (rows, prompt), "completion_mask": (rows, columns),
                "sampling_logps": (rows, columns), "truncated": (rows,), "rewards": (rows,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise BundleError(f"{name}: shape {tuple(t[name].shape)}, expected {shape}")
    if questions == 0 or rows == 0 or rows % questions:
        raise BundleError(f"{rows} rows do not split into groups for {questions} questions")
    if columns == 0 or prompt == 0:
        raise BundleError(f"empty prompts or completions (prompt width {prompt}, completion width {columns})")
    if t["unit_sketches"].shape[1] != SKETCH_DIM or not 1 <= units <= questions:
        raise BundleError(f"unit_sketches: shape {tuple(t['unit_sketches'].shape)}, expected "
                          f"(1..{questions}, {SKETCH_DIM})")
    for name in ("prompt_mask", "completion_mask"):
        if ((t[name] != 0) & (t[name] != 1)).any():
            raise BundleError(f"{name}: values other than 0 and 1")
    for name in ("question_ids", "prompt_ids", "completion_ids"):
        if (t[name] < 0).any():
            raise BundleError(f"{name}: negative ids")
    for name in ("sampling_logps", "rewards", "unit_sketches"):
        if not torch.isfinite(t[name]).all():
            raise BundleError(f"{name}: values that are not finite")


def _metadata(data: bytes) -> tuple[int, str]:
    """The bundle's round and peer id, from the safetensors header (already validated by ``load``)."""
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"format {metadata.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    round_, peer_id = metadata.get("round", ""), metadata.get("peer_id", "")
    if not round_.isdigit() or not peer_id:
        raise BundleError(f"metadata needs a round and a peer id (got round {round_!r}, peer id {peer_id!r})")
    return int(round_), peer_id
