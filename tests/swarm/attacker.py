"""``python tests/swarm/attacker.py ATTACK grpo-swarm-node-args...``: a node that cheats one way.

It is the real ``grpo-swarm node`` with node.peer.SwarmPeer replaced by a subclass that overrides one
of the peer's decision points (what it samples, what it commits to, what it sends into the
all-reduce). Everything else (registration, admission, the all-reduce, serving round data) is the
honest code, so each attack is exactly one lie.
"""

from __future__ import annotations

import sys

import torch

import node.peer
from node.grpo import group_advantages
from node.learner import Gradient, ScoredBatch
from node.models import load_policy
from node.rollouts import generate
from node.swarm.rpc import RpcError
from protocol import swarm_pb2
from protocol.identity import SigningKey
from protocol.keys import contributions_key
from protocol.records import parse_record, sign_record
from protocol.rewards import score

Honest = node.peer.SwarmPeer  # each attacker names the verifier check that must catch it (``caught_by``)


class ForgedSignature(Honest):
    """Signs its contribution with a key that is not the one its token binds to its peer id."""

    caught_by = "signature"

    def commit(self, r, batch, gradient):
        real_key, self.key = self.key, SigningKey()
        try:
            super().commit(r, batch, gradient)
        finally:
            self.key = real_key


class Replay(Honest):
    """Serves the contribution record of an earlier round again (fresh data is not sampled honestly)."""

    caught_by = "record"

    first = None

    def commit(self, r, batch, gradient):
        super().commit(r, batch, gradient)
        if self.first is None:
            self.first = self.service.held(r, "contribution")
        else:
            self.service.keep(r, "contribution", *self.first)


class CherryPick(Honest):
    """Trains on questions of its choosing (the first ones of the data set) instead of its shard."""

    caught_by = "shard"

    def sample_batch(self, r):
        questions = [self.task.question(i) for i in range(self.config.rollout.questions_per_peer)]
        return self.learner.collect(questions)


class FabricatedRewards(Honest):
    """Reports reward 1 for every completion."""

    caught_by = "rewards"

    def sample_batch(self, r):
        batch = super().sample_batch(r)
        batch.rewards = torch.ones_like(batch.rewards)
        batch.advantages = group_advantages(batch.rewards, self.config.rollout.group_size,
                                            self.config.grpo.scale_rewards)
        return batch


class OtherModel(Honest):
    """Samples its completions from another model (an untrained one of the same architecture)."""

    caught_by = "logprobs"

    def sample_batch(self, r):
        batch = super().sample_batch(r)
        if not hasattr(self, "other"):
            self.other = load_policy(self.config.model, seed=12345)
        config = self.config.rollout
        rollouts = generate(self.other.model, self.other.tokenizer,
                            self.other.render([q.prompt for q in batch.questions]), config.group_size,
                            config.max_new_tokens, config.temperature, config.top_p)
        repeated = [q for q in batch.questions for _ in range(config.group_size)]
        totals, parts = score(self.learner.rewards, repeated, rollouts.texts)
        rewards = torch.tensor(totals, dtype=torch.float32)
        return ScoredBatch(questions=batch.questions, rollouts=rollouts, rewards=rewards, reward_parts=parts,
                           advantages=group_advantages(rewards, config.group_size, self.config.grpo.scale_rewards),
                           mask=rollouts.completion_mask, ref_logps=None)


class Scaled(Honest):
    """Commits to its gradient, sends it ×10."""

    caught_by = "binding"

    def outgoing(self, gradient: Gradient):
        return [t * 10 for t in gradient.tensors], gradient.weight


class SignFlipped(Honest):
    """Commits to its gradient, sends its negation."""

    caught_by = "binding"

    def outgoing(self, gradient: Gradient):
        return [-t for t in gradient.tensors], gradient.weight


class DifferentGradient(Honest):
    """Commits to its gradient, sends a random one of the same norm."""

    caught_by = "binding"

    def outgoing(self, gradient: Gradient):
        noise = [torch.randn_like(t) for t in gradient.tensors]
        scale = torch.sqrt(sum((t ** 2).sum() for t in gradient.tensors) / sum((n ** 2).sum() for n in noise))
        return [n * scale for n in noise], gradient.weight


class InflatedWeight(Honest):
    """Claims the largest all-reduce weight reducers accept (an honest batch of full-length completions)
    instead of its committed token count (reducers cap anything larger)."""

    caught_by = "binding"

    def outgoing(self, gradient: Gradient):
        return gradient.tensors, self.max_weight


class CopiedContribution(Honest):
    """Re-signs another peer's contribution of the round as its own (and sends its own gradient)."""

    caught_by = "identity"

    def commit(self, r, batch, gradient):
        super().commit(r, batch, gradient)
        found = self.dht.get(contributions_key(self.config.run.id, r), latest=True)
        others = {} if found is None else {k: v.value for k, v in found.value.items() if k != self.peer_id}
        for peer_id, data in others.items():
            try:
                records, bundle = self.service.fetch(peer_id, r, "contribution", timeout=10)
            except RpcError:
                continue
            body = swarm_pb2.Contribution.FromString(parse_record(records[0]).body)
            record = sign_record(self.key, "contribution", self.config.run.id, r, body).SerializeToString()
            self.service.keep(r, "contribution", [record], bundle)
            return


ATTACKS = {cls.__name__: cls for cls in (ForgedSignature, Replay, CherryPick, FabricatedRewards, OtherModel, Scaled,
                                         SignFlipped, DifferentGradient, InflatedWeight, CopiedContribution)}

if __name__ == "__main__":
    node.peer.SwarmPeer = ATTACKS[sys.argv[1]]
    from node.cli import main

    sys.exit(main(["node", *sys.argv[2:]]))
