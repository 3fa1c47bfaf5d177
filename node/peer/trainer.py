"""What a trainer decides each round, apart from how it talks to the swarm.

A trainer samples its batch, computes the gradient it commits to, builds and signs its contribution,
serves it to verifiers, and sends a gradient and a weight into the all-reduce. ``TrainerDecisions`` makes
each of these one overridable method: the swarm peer (swarm_peer.py) runs them between the network steps
of a round, ``grpo-swarm bench verifier`` runs them offline, and each attack of the shared catalogue
(node/bench/attacks.py) overrides exactly one of them, so every attack is one lie told the same way in
both places.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

from node.peer.contribution import make_contribution
from node.train.learner import Gradient, Learner, ScoredBatch
from node.train.loss import loss_weight
from node.train.shard import shard_batch
from protocol import swarm_pb2
from protocol.config import RunConfig
from protocol.identity import SigningKey
from protocol.records import sign_record
from protocol.sketch import sketch_seed
from protocol.tasks import Task

ServedContribution = tuple[list[bytes], bytes]  # (serialized signed records, rollout bundle)


def largest_honest_weight(config: RunConfig) -> float:
    """The largest all-reduce weight an honest batch can carry: every completion at full length. Reducers
    count any larger claim as this."""
    rows = config.rollout.questions_per_peer * config.rollout.group_size
    return loss_weight(config.grpo.loss_type, torch.ones(rows, config.rollout.max_new_tokens))


class TrainerDecisions:
    """An honest trainer's decisions. Subclasses set ``config``, ``task``, ``learner``, ``key``, ``peer_id``
    and ``digest`` (of the θ_r it holds)."""

    config: RunConfig
    task: Task
    learner: Learner
    key: SigningKey
    peer_id: str
    digest: str

    @functools.cached_property
    def max_weight(self) -> float:
        return largest_honest_weight(self.config)

    def sample_batch(self, r: int) -> ScoredBatch:
        """The round's rollouts: this peer's own shard, sampled from θ_r and scored."""
        return shard_batch(self.learner, self.config, self.task, r, self.peer_id)

    def committed_gradient(self, r: int, batch: ScoredBatch) -> Gradient:
        """The on-policy gradient of the batch with the sketch of each audit unit (the round's seed)."""
        return self.learner.gradient(batch, 0, sketch_seed=sketch_seed(self.config.run.seed, r))

    def contribution(self, r: int, batch: ScoredBatch, gradient: Gradient) -> tuple[swarm_pb2.Contribution, bytes]:
        """The round's commitment and the rollout bundle behind it."""
        return make_contribution(self.config, r, self.peer_id, batch, gradient, self.digest)

    def served_contribution(self, r: int, body: swarm_pb2.Contribution, bundle: bytes) -> ServedContribution:
        """What this peer serves verifiers as its contribution of round ``r``: the signed record and bundle."""
        record = sign_record(self.key, "contribution", self.config.run.id, r, body)
        return [record.SerializeToString()], bundle

    def outgoing(self, gradient: Gradient) -> tuple[list[torch.Tensor], float]:
        """What goes into the all-reduce: the committed gradient and its token count."""
        return gradient.tensors, gradient.weight

    def others_contributions(self, r: int) -> Iterator[tuple[str, ServedContribution]]:
        """(peer id, served contribution) of other trainers in round ``r``, as far as this peer can get them.
        An honest trainer never needs them; a copying attacker does."""
        return iter(())
