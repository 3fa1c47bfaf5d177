"""A trainer's commitment for one round (docs/DESIGN.md "A round", step 5) and the rollout bundle behind it.

``make_contribution`` turns the round's scored batch and gradient into the rollout bundle
(protocol.bundle: the peer serves it over p2p) and the ``Contribution`` body the peer signs (record kind
"contribution") and publishes: small (digests, counts and one sketch), because DHT values over ~16 KiB
are unsafe.
"""

from __future__ import annotations

import math

import torch

from node.train.learner import Gradient, ScoredBatch
from protocol import swarm_pb2
from protocol.bundle import rollout_digest, write_bundle
from protocol.config import RunConfig
from protocol.records import MAX_RECORD_BYTES
from protocol.sketch import sketch_seed

# A signed record adds its envelope (kind, run id, nonce, keys, signature: ~200 bytes) to the body.
MAX_BODY_BYTES = MAX_RECORD_BYTES - 1024


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
    question_ids = [q.index for q in batch.questions]
    bundle = write_bundle({
        "question_ids": torch.tensor(question_ids, dtype=torch.int64),
        "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
        "completion_ids": r.completion_ids, "completion_mask": r.completion_mask,
        "sampling_logps": r.sampling_logps, "truncated": r.truncated, "rewards": batch.rewards,
        "unit_sketches": gradient.unit_sketches,
    }, round_, peer_id)
    committed_sketch = gradient.unit_sketches.detach().to("cpu", torch.float64).sum(0)
    body = swarm_pb2.Contribution(
        peer_id=peer_id, question_ids=question_ids, rollout_digest=rollout_digest(bundle),
        token_count=gradient.weight, mean_reward=float(batch.rewards.mean()),
        grad_norm=gradient_norm(gradient.tensors), sketch=committed_sketch.tolist(), model_digest=model_digest,
    )
    size = body.ByteSize()
    if size > MAX_BODY_BYTES:
        raise ValueError(f"contribution body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit "
                         f"(rollout.questions_per_peer {len(batch.questions)} is too many question ids for one record)")
    return body, bundle
