"""A trainer's commitment for one round (DESIGN "A round" step 5) and the rollout bundle behind it.

``make_contribution`` turns the round's scored batch and gradient into two things:

- the rollout bundle: safetensors bytes holding everything a verifier needs to recompute the
  round's rewards, token count, log-probs and audit units (prompts, completions, sampling
  log-probs, rewards, the per-unit gradient sketches). The peer serves it over p2p; it never goes
  into the DHT. safetensors, not pickle: a bundle comes from an untrusted peer.
- the ``Contribution`` body the peer signs (record kind "contribution") and publishes: small
  (digests, counts and one sketch), because DHT values over ~16 KiB are unsafe (DESIGN).

``read_bundle`` is the strict parse side: a malformed bundle is one ``BundleError`` that says
what is wrong, never an exception from inside torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from node.learner import Gradient, ScoredBatch
from protocol import swarm_pb2
from protocol.config import RunConfig
from protocol.records import MAX_RECORD_BYTES
from protocol.sketch import SKETCH_DIM, sketch_seed

BUNDLE_FORMAT = "grpo-swarm/rollouts/v1"
MAX_BUNDLE_BYTES = 64 << 20
# A signed record adds its envelope (kind, run id, nonce, keys, signature: ~200 bytes) to the body.
MAX_BODY_BYTES = MAX_RECORD_BYTES - 1024

# name: (dtype, rank). Rows are grouped as in Rollouts: question 0 × G, question 1 × G, ...
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
    """A parsed, structurally valid bundle (CPU tensors). Its content is checked by node.audit."""

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


def gradient_norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of the whole gradient, accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def make_contribution(config: RunConfig, round_: int, peer_id: str, batch: ScoredBatch, gradient: Gradient,
                      model_digest: str) -> tuple[swarm_pb2.Contribution, bytes]:
    """The round's ``Contribution`` body and its rollout bundle.

    ``gradient`` must come from ``Learner.gradient(batch, 0, sketch_seed=sketch_seed(run seed, round_))``:
    the committed sketch is the sum of its unit sketches.
    """
    expected_seed = sketch_seed(config.run.seed, round_)
    if gradient.unit_sketches is None or gradient.sketch_seed != expected_seed:
        raise ValueError(f"the gradient of round {round_} must carry unit sketches with the round's seed "
                         f"{expected_seed} (got seed {gradient.sketch_seed})")
    r = batch.rollouts
    tensors = {
        "question_ids": torch.tensor([q.index for q in batch.questions], dtype=torch.int64),
        "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
        "completion_ids": r.completion_ids, "completion_mask": r.completion_mask,
        "sampling_logps": r.sampling_logps, "truncated": r.truncated, "rewards": batch.rewards,
        "unit_sketches": gradient.unit_sketches,
    }
    tensors = {name: tensors[name].detach().to("cpu", dtype).contiguous()
               for name, (dtype, _) in BUNDLE_TENSORS.items()}
    bundle = save(tensors, metadata={"format": BUNDLE_FORMAT, "round": str(round_), "peer_id": peer_id})
    body = swarm_pb2.Contribution(
        peer_id=peer_id, question_ids=tensors["question_ids"].tolist(), rollout_digest=rollout_digest(bundle),
        token_count=gradient.weight, mean_reward=float(batch.rewards.mean()),
        grad_norm=gradient_norm(gradient.tensors), sketch=tensors["unit_sketches"].sum(0).tolist(),
        model_digest=model_digest,
    )
    size = body.ByteSize()
    if size > MAX_BODY_BYTES:
        raise ValueError(f"contribution body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit "
                         f"(rollout.questions_per_peer {len(batch.questions)} is too many question ids for one record)")
    return body, bundle


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
