"""A peer's batch of a round: its deterministic questions, sampled with a deterministic generator.

The questions are the peer's shard (protocol.shards: anyone can recompute them, so no peer chooses easy
ones), and the sampling generator is seeded from (seed, round, peer), so a resumed solo run replays
exactly the rounds it would have run.
"""

from __future__ import annotations

import hashlib

import torch

from node.train.learner import Learner, ScoredBatch
from protocol.config import RunConfig
from protocol.shards import question_ids
from protocol.tasks import Question, Task

SOLO_PEER = "solo"


def round_generator(seed: int, round_: int, peer_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"grpo-swarm/sample|{seed}|{round_}|{peer_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def shard_questions(config: RunConfig, task: Task, round_: int, peer_id: str) -> list[Question]:
    """The peer's deterministic questions for ``round_``."""
    ids = question_ids(config.run.seed, round_, peer_id, config.rollout.questions_per_peer, task.size("train"))
    return [task.question(i) for i in ids]


def shard_batch(learner: Learner, config: RunConfig, task: Task, round_: int, peer_id: str) -> ScoredBatch:
    """The peer's deterministic questions for ``round_``, sampled and scored."""
    return learner.collect(shard_questions(config, task, round_, peer_id),
                           round_generator(config.run.seed, round_, peer_id))
