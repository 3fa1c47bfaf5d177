"""A swarm peer: the solo round with an all-reduce between the gradient and the step.

Every peer of a round starts from the same θ_r, averages its gradient with the
group (weight = its share of the union batch, see grpo.loss_weight), and steps on
the agreed average, so all of them hold the same θ_{r+1}. Three checks keep it so:

- the all-reduce outcome is used only when the whole group published the same
  digest of it (node/swarm/agreement.py); otherwise nobody in doubt steps;
- after the step each peer publishes (round, model digest) under ``{run}.progress``;
  a peer that finds itself behind the swarm or outvoted on the digest loads the
  current state from peers (parameters, optimizer state and round) before it
  contributes again;
- peers serve their state with priority = their round, so a joiner or a peer that
  resyncs gets it from a peer that is furthest along.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from node.checkpoint import optimizer_state, optimizer_tensors
from node.digest import model_digest
from node.learner import Learner, batch_metrics
from node.solo import shard_batch
from node.swarm.allreduce import GradientAverager
from node.warm_start import warm_started_policy
from protocol.config import RunConfig
from protocol.tasks import load_task

logger = logging.getLogger(__name__)
# Seconds a (round, digest) record stays in the DHT. Live peers refresh theirs every attempt,
# so a record older than this belongs to a peer that is gone.
PROGRESS_LIFETIME = 60.0


@dataclass
class RoundReport:
    round: int  # the round that was attempted
    stepped: bool
    metrics: dict
    reason: str = ""


class SwarmPeer:
    def __init__(self, config: RunConfig, dht: hivemind.DHT):
        self.config, self.dht = config, dht
        self.peer_id = str(dht.peer_id)
        self.task = load_task(config.task.name, config.task.options)
        self.policy = warm_started_policy(config, self.task)
        self.learner = Learner(self.policy, config, self.task)
        self.round = 0
        self.digest = model_digest(self.policy.model)  # of the model we hold now; kept current
        swarm = config.swarm
        self.averager = GradientAverager(
            dht, [tuple(p.shape) for p in self.learner.params], prefix=f"{config.run.id}-grads",
            state_provider=self.state, compression=swarm.compression, min_group_size=swarm.min_group_size,
            target_group_size=swarm.target_group_size, matchmaking_time=swarm.matchmaking_time,
            allreduce_timeout=swarm.allreduce_timeout, next_chunk_timeout=swarm.next_chunk_timeout,
            agreement_timeout=swarm.agreement_timeout,
        )

    # ---- state sharing -------------------------------------------------------------------------
    def state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads: parameters, optimizer state and the round they belong to."""
        tensors, groups = optimizer_tensors(self.learner.optimizer)
        names = sorted(tensors)
        params = [p.detach().cpu().clone() for p in self.learner.params]
        metadata = {"round": self.round, "optimizer_keys": names, "param_groups": groups}
        return metadata, params + [tensors[name] for name in names]

    def load_state(self, metadata: dict, tensors: list[torch.Tensor]) -> None:
        count = len(self.learner.params)
        with torch.no_grad():
            for param, value in zip(self.learner.params, tensors[:count]):
                param.copy_(value)
        named = dict(zip(metadata["optimizer_keys"], tensors[count:]))
        self.learner.optimizer.load_state_dict(optimizer_state(named, metadata["param_groups"]))
        self.round = int(metadata["round"])
        self.digest = model_digest(self.policy.model)

    def sync_from_peers(self) -> bool:
        """Take the current state from the swarm; False when no peer served one in time."""
        loaded = self.averager.load_state_from_peers(timeout=self.config.swarm.state_timeout)
        if loaded is None:
            return False
        self.load_state(*loaded)
        logger.info(f"{self.peer_id}: loaded state of round {self.round} from peers")
        return True

    # ---- rounds --------------------------------------------------------------------------------
    def run_round(self) -> RoundReport:
        """Try round ``self.round``; on success the peer holds θ_{r+1} and ``self.round`` advances."""
        config, r = self.config, self.round
        batch = shard_batch(self.learner, config, self.task, r, self.peer_id)
        metrics = batch_metrics(batch, config.rollout.group_size)
        for iteration in range(config.grpo.num_iterations):
            gradient = self.learner.gradient(batch, iteration)
            outcome = self.averager.average(gradient.tensors, gradient.weight, r)
            metrics.update(gradient.metrics, group_size=outcome.group_size, allreduce_seconds=outcome.allreduce_seconds,
                           average_seconds=outcome.seconds)
            if not outcome.ok:
                if iteration > 0:  # some of this round's steps were taken: the model is off the swarm's path
                    self.sync_from_peers()
                self.publish_progress()
                return RoundReport(r, False, metrics, outcome.reason)
            metrics["grad_norm"] = self.learner.apply(outcome.tensors)
        self.round = r + 1
        self.digest = model_digest(self.policy.model)
        self.averager.state_sharing_priority = self.round
        self.publish_progress()
        metrics["model_digest"] = self.digest
        return RoundReport(r, True, metrics)

    def publish_progress(self) -> None:
        """Tell the swarm our round and model digest."""
        self.dht.store(f"{self.config.run.id}.progress", {"round": self.round, "digest": self.digest},
                       get_dht_time() + PROGRESS_LIFETIME, subkey=self.peer_id, return_future=True)

    def others_progress(self) -> dict[str, dict]:
        """{peer: {round, digest}} of the other live peers (fresh progress records)."""
        found = self.dht.get(f"{self.config.run.id}.progress", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {peer: entry.value for peer, entry in found.value.items()
                if peer != self.peer_id and isinstance(entry.value, dict)}

    def peers_behind(self) -> int:
        """Live peers at an earlier round than ours."""
        return sum(p["round"] < self.round for p in self.others_progress().values())

    def check_in_step(self) -> str:
        """Compare with the swarm; resync when behind or outvoted. Returns what was found."""
        others = self.others_progress()
        if not others:
            return "alone"
        furthest = max(p["round"] for p in others.values())
        if furthest > self.round:
            return "resynced (behind)" if self.sync_from_peers() else "behind, no state served"
        same_round = [p["digest"] for p in others.values() if p["round"] == self.round]
        if same_round:
            votes = collections.Counter(same_round + [self.digest])
            winner, count = votes.most_common(1)[0]
            if winner != self.digest and count > 1:
                return "resynced (digest)" if self.sync_from_peers() else "outvoted, no state served"
        return "in step"

    def shutdown(self) -> None:
        self.averager.shutdown()

