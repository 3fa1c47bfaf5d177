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

And three make cheating visible (DESIGN "Trust"): before averaging, a peer signs and publishes its
contribution (question ids, rollout digest, token count, gradient sketch, ...) and keeps the rollouts
behind it for verifiers (node/swarm/rpc.py); as a reducer it keeps signed reports of what each sender
sent it (binding); in an admitted run it averages only with peers holding a current token.
``sample_batch``, ``contribution``, ``commit`` and ``outgoing`` are the points where a peer's behaviour
is decided, which is where the adversarial tests' attackers differ from honest peers.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import torch
from hivemind.utils.timed_storage import get_dht_time

from node.checkpoint import StateError, load_checkpoint, load_peer_state, optimizer_tensors
from node.contribution import make_contribution
from node.digest import model_digest
from node.grpo import loss_weight
from node.learner import Gradient, Learner, ScoredBatch, batch_metrics
from node.solo import shard_batch
from node.swarm.allreduce import AllReduceOutcome, GradientAverager
from node.swarm.dht import dht_get
from node.swarm.rpc import PeerService
from node.warm_start import warm_started_policy
from protocol import swarm_pb2
from protocol.keys import averaging_prefix, contributions_key, progress_key
from protocol.records import sign_record
from protocol.sketch import sketch_seed
from protocol.tasks import load_task

logger = logging.getLogger(__name__)
# Seconds a (round, digest) record stays in the DHT. Live peers refresh theirs every attempt,
# so a record older than this belongs to a peer that is gone.
PROGRESS_LIFETIME = 60.0
CONTRIBUTION_LIFETIME = 300.0  # seconds a contribution record stays in the DHT (the ledger reads it later)


def published_progress(dht, run_id: str) -> dict[str, dict]:
    """{peer: {round, digest}} from the live peers' progress records."""
    found = dht_get(dht, progress_key(run_id))
    if found is None or not isinstance(found.value, dict):
        return {}
    return {peer: entry.value for peer, entry in found.value.items() if isinstance(entry.value, dict)}


@dataclass
class RoundReport:
    round: int  # the round that was attempted
    stepped: bool
    metrics: dict
    reason: str = ""


def max_weight(config) -> float:
    """The largest all-reduce weight an honest batch can carry: every completion at full length."""
    rows = config.rollout.questions_per_peer * config.rollout.group_size
    return loss_weight(config.grpo.loss_type, torch.ones(rows, config.rollout.max_new_tokens))


class SwarmPeer:
    def __init__(self, session, serve_state: bool = True):
        config, dht = session.config, session.dht
        self.session, self.config, self.dht = session, config, dht
        self.key, self.admission, self.membership = session.key, session.admission, session.membership
        self.peer_id = str(dht.peer_id)
        self.task = load_task(config.task.name, config.task.options)
        self.policy = warm_started_policy(config, self.task)
        self.learner = Learner(self.policy, config, self.task)
        self.round = 0
        self.digest = model_digest(self.policy.model)  # of the model we hold now; kept current
        swarm = config.swarm
        self.averager = GradientAverager(
            dht, [tuple(p.shape) for p in self.learner.params], prefix=averaging_prefix(config.run.id),
            state_provider=self.state if serve_state else None, compression=swarm.compression,
            min_group_size=swarm.min_group_size,
            target_group_size=swarm.target_group_size, matchmaking_time=swarm.matchmaking_time,
            allreduce_timeout=swarm.allreduce_timeout, next_chunk_timeout=swarm.next_chunk_timeout,
            agreement_timeout=swarm.agreement_timeout,
        )
        self.service = PeerService(dht, config.run.id, config.trust.rollout_history, self.is_admitted).start()
        self.max_weight = max_weight(config)

    # ---- admission -----------------------------------------------------------------------------
    def is_admitted(self, peer_id: str) -> bool:
        return self.admission is None or peer_id == self.peer_id or self.admission.token_of(peer_id) is not None

    def refresh_admission(self) -> None:
        """Re-read tokens and bans; the averager takes only admitted peers into the next group."""
        if self.admission is None:
            return
        self.admission.refresh(self.dht)
        if self.membership is not None:
            self.admission.banned |= self.membership.banned
        self.averager.set_admitted(self.admission.admitted() | {self.peer_id})

    def report(self, round_: int, metrics: dict) -> None:
        """Heartbeat data for the coordinator (sent from the membership thread)."""
        if self.membership is not None:
            self.membership.report(round_, self.digest, metrics)

    # ---- state sharing -------------------------------------------------------------------------
    def state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads: parameters, optimizer state and the round they belong to."""
        tensors, groups = optimizer_tensors(self.learner.optimizer)
        names = sorted(tensors)
        params = [p.detach().cpu().clone() for p in self.learner.params]
        metadata = {"round": self.round, "optimizer_keys": names, "param_groups": groups}
        return metadata, params + [tensors[name] for name in names]

    def load_state(self, metadata: dict, tensors: list[torch.Tensor]) -> None:
        """Take a state a peer served; all or nothing (a partial one raises StateError, changing nothing)."""
        self.round = load_peer_state(self.learner.params, self.learner.optimizer, metadata, tensors)
        self.digest = model_digest(self.policy.model)

    def load_checkpoint(self, path) -> None:
        """Start from a coordinator checkpoint (model and optimizer) instead of θ_0."""
        checkpoint = load_checkpoint(path, self.policy.model, self.learner.optimizer)  # verified its digest
        self.round, self.digest = checkpoint.round, checkpoint.model_digest
        self.averager.state_sharing_priority = self.round

    def sync_from_peers(self) -> bool:
        """Take the current state from the swarm; False when no peer served one in time."""
        loaded = self.averager.load_state_from_peers(timeout=self.config.swarm.state_timeout)
        if loaded is None:
            return False
        try:
            self.load_state(*loaded)
        except StateError as e:
            logger.warning(f"{self.peer_id}: state from peers refused: {e}")
            return False
        logger.info(f"{self.peer_id}: loaded state of round {self.round} from peers")
        return True

    def catch_up(self, attempts: int = 6, wait: float = 2.0) -> bool:
        """A joiner's first sync. Peers admit a newcomer's state download only once they have read its
        token (each round), so a refusal right after joining is retried a few times while peers are ahead."""
        for _ in range(attempts):
            if self.sync_from_peers():
                return True
            others = self.others_progress()
            if not others or max(p["round"] for p in others.values()) <= self.round:
                return False  # nobody is ahead of θ_0: nothing to catch up with
            time.sleep(wait)
        return False

    # ---- rounds --------------------------------------------------------------------------------
    def run_round(self) -> RoundReport:
        """Try round ``self.round``; on success the peer holds θ_{r+1} and ``self.round`` advances."""
        config, r = self.config, self.round
        self.refresh_admission()
        batch = self.sample_batch(r)
        metrics = batch_metrics(batch, config.rollout.group_size)
        seed = sketch_seed(config.run.seed, r)
        for iteration in range(config.grpo.num_iterations):
            committed = iteration == 0  # the contribution commits to the on-policy gradient
            gradient = self.learner.gradient(batch, iteration, sketch_seed=seed if committed else None)
            if committed:
                self.commit(r, batch, gradient)
            tensors, weight = self.outgoing(gradient)
            outcome = self.averager.average(tensors, weight, r, sketch_seed=seed if committed else None,
                                            max_weight=self.max_weight, clip_factor=config.trust.clip_factor)
            self.keep_bindings(r, outcome)
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

    # ---- trust: what this peer commits to and sends ----------------------------------------------
    def sample_batch(self, r: int) -> ScoredBatch:
        """The round's rollouts: this peer's own shard, sampled from θ_r and scored."""
        return shard_batch(self.learner, self.config, self.task, r, self.peer_id)

    def contribution(self, r: int, batch: ScoredBatch, gradient: Gradient) -> tuple[swarm_pb2.Contribution, bytes]:
        """The round's commitment and the rollout bundle behind it."""
        return make_contribution(self.config, r, self.peer_id, batch, gradient, self.digest)

    def outgoing(self, gradient: Gradient) -> tuple[list[torch.Tensor], float]:
        """What goes into the all-reduce: the committed gradient and its token count."""
        return gradient.tensors, gradient.weight

    def commit(self, r: int, batch: ScoredBatch, gradient: Gradient) -> None:
        """Sign the contribution, publish it in the DHT and keep it (with its rollouts) for verifiers."""
        body, bundle = self.contribution(r, batch, gradient)
        record = sign_record(self.key, "contribution", self.config.run.id, r, body).SerializeToString()
        self.dht.store(contributions_key(self.config.run.id, r), record, get_dht_time() + CONTRIBUTION_LIFETIME,
                       subkey=self.peer_id, return_future=True)
        self.service.keep(r, "contribution", [record], bundle)

    def keep_bindings(self, r: int, outcome: AllReduceOutcome) -> None:
        """As a reducer: signed reports of what each sender sent this peer (sketched in the first iteration
        only, the one the contributions commit to)."""
        if not outcome.received:
            return
        records = [sign_record(self.key, "binding", self.config.run.id, r, binding).SerializeToString()
                   for binding in outcome.bindings()]
        self.service.keep(r, "bindings", records)

    def publish_progress(self) -> None:
        """Tell the swarm our round and model digest."""
        self.dht.store(progress_key(self.config.run.id), {"round": self.round, "digest": self.digest},
                       get_dht_time() + PROGRESS_LIFETIME, subkey=self.peer_id, return_future=True)

    def others_progress(self) -> dict[str, dict]:
        """{peer: {round, digest}} of the other live peers (fresh progress records)."""
        return {peer: progress for peer, progress in published_progress(self.dht, self.config.run.id).items()
                if peer != self.peer_id}

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
        self.service.stop()
        self.averager.shutdown()

