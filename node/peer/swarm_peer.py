"""A swarm peer: the solo round with an all-reduce between the gradient and the step.

Every peer of a round starts from the same θ_r, averages its gradient with the
group (weight = its share of the union batch, see node/train/loss.py ``loss_weight``), and steps on
the agreed average, so all of them hold the same θ_{r+1}. Three checks keep it so:

- the all-reduce outcome is used only when the whole group published the same
  digest of it (node/swarm/agreement.py); otherwise nobody in doubt steps;
- after the step each peer publishes its progress (round, model digest; node/swarm/progress.py);
  a peer that finds itself behind the swarm or outvoted on the digest loads the
  current state from peers (parameters, optimizer state and round) before it
  contributes again;
- peers serve their state with priority = their round, so a joiner or a peer that
  resyncs gets it from a peer that is furthest along.

And three make cheating visible (docs/DESIGN.md "Trust"): before averaging, a peer signs and publishes its
contribution (question ids, rollout digest, token count, gradient sketch, ...) and keeps the rollouts
behind it for verifiers (node/swarm/round_data.py); as a reducer it keeps signed reports of what each sender
sent it (binding); in an admitted run it averages only with peers holding a current token. What the peer
decides in a round (its batch, what it commits to and serves, what it sends) are the methods of
TrainerDecisions (trainer.py), which attackers override.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from hivemind.utils.timed_storage import get_dht_time

from node.peer.state_sync import load_vouched_state
from node.peer.suspensions import Suspensions
from node.peer.trainer import ServedContribution, TrainerDecisions
from node.swarm.averaging import AllReduceOutcome, FailureKind, RoundAverager, RoundFailure
from node.swarm.dht import dht_get
from node.swarm.progress import Progress, majority_position, publish_progress, published_progress
from node.swarm.round_data import RoundData, RoundDataService, RpcError
from node.train.checkpoint import load_checkpoint
from node.train.learner import Gradient, Learner, ScoredBatch, batch_metrics
from node.train.state import served_state
from node.train.warm_start import warm_started_policy
from protocol.digest import model_digest
from protocol.keys import CONTRIBUTION_LIFETIME, PROGRESS_LIFETIME, contributions_key
from protocol.records import sign_record
from protocol.sketch import sketch_seed
from protocol.tasks import load_task

logger = logging.getLogger(__name__)
FETCH_TIMEOUT = 10.0  # seconds for another peer's contribution (a copying attacker's fetch)
SIT_OUT_POLL = 1.0  # seconds between looks at whether the swarm finished a round this peer sits out
POSITION_POLL = 0.25  # seconds between looks at the swarm's progress while waiting for its next round


class SyncOutcome(enum.StrEnum):
    """What a peer found when it compared itself with the swarm after a round."""

    ALONE = "alone"  # no other live peer published progress
    IN_STEP = "in-step"  # not behind, and not outvoted on the model digest
    RESYNCED_BEHIND = "resynced-behind"  # others were further along: loaded their state
    BEHIND_NO_STATE = "behind-no-state"  # others were further along, but no state had a majority or was served
    RESYNCED_DIGEST = "resynced-digest"  # outvoted on the model digest of this round: loaded the majority's state
    OUTVOTED_NO_STATE = "outvoted-no-state"  # outvoted, but nobody served a state in time

    @property
    def resynced(self) -> bool:
        return self in (SyncOutcome.RESYNCED_BEHIND, SyncOutcome.RESYNCED_DIGEST)


@dataclass
class RoundReport:
    round: int  # the round that was attempted
    metrics: dict
    failure: Optional[RoundFailure] = None  # None: the peer stepped on the agreed average

    @property
    def stepped(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class Commitment:
    """What this peer committed to in a round, under the θ_r of ``model_digest``."""

    round: int
    model_digest: str
    batch: ScoredBatch
    gradient: Gradient


class SwarmPeer(TrainerDecisions):
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
        self.commitment: Optional[Commitment] = None  # the latest round this peer committed to
        # peers this peer caught breaking the protocol itself (a donor serving another state than it published, a
        # reducer returning a non-finite average) -> what it did; not asked, averaged with or counted again
        self.excluded: dict[str, str] = {}
        self.suspensions = Suspensions(self.peer_id)  # members that failed to deliver to it, kept out for a while
        self.state_lock = threading.RLock()  # parameters, optimizer, round and digest change together under it
        self.averager = RoundAverager.for_run(dht, config, self.learner.params,
                                              state_provider=self.state if serve_state else None, key=self.key,
                                              key_of=None if self.admission is None else self.key_of)
        self.service = RoundDataService(dht, config.run.id, config.trust.rollout_history, self.is_admitted).start()

    # ---- admission -----------------------------------------------------------------------------
    def is_admitted(self, peer_id: str) -> bool:
        return self.admission is None or peer_id == self.peer_id or self.admission.token_of(peer_id) is not None

    def exclude(self, culprits: dict[str, str]) -> None:
        """Stop asking and averaging with peers caught breaking the protocol (in an open swarm, where anyone may
        join a group, they are only no longer asked for state), and report them to the coordinator."""
        for peer, what in culprits.items():
            if peer not in self.excluded:
                logger.warning(f"{self.peer_id}: excluding {peer}: {what}")
                self.excluded[peer] = what
                if self.membership is not None:
                    self.membership.report_exclusion(peer, self.round, what)
        if culprits:
            self.refresh_admission()

    def refresh_admission(self) -> None:
        """Re-read the coordinator's tokens and bans; the averager takes only admitted peers into the next group,
        less those this peer excluded or suspended (suspensions.py). Exclusions stay out of ``admission``: an
        excluded peer keeps its token's key, so a verifier still audits it and reads its signed reports."""
        if self.admission is None:
            return
        self.admission.refresh(self.dht)
        if self.membership is not None:
            self.admission.banned |= self.membership.banned
        shunned = set(self.excluded) | self.suspensions.current()
        self.averager.set_admitted((self.admission.admitted() - shunned) | {self.peer_id})

    def report(self, round_: int, metrics: dict) -> None:
        """Heartbeat data for the coordinator (sent from the membership thread)."""
        if self.membership is not None:
            self.membership.report(round_, self.digest, metrics)

    # ---- state sharing -------------------------------------------------------------------------
    def state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads: parameters, optimizer state and the round they belong to (called from
        a thread of hivemind's; ``state_lock`` keeps the three consistent)."""
        with self.state_lock:
            return served_state(self.learner.params, self.learner.optimizer, self.round)

    def load_checkpoint(self, path) -> None:
        """Start from a coordinator checkpoint (model and optimizer) instead of θ_0."""
        checkpoint = load_checkpoint(path, self.policy.model, self.learner.optimizer)  # verified its digest
        self.round, self.digest = checkpoint.round, checkpoint.model_digest

    def sync_from_peers(self, position: Optional[Progress] = None) -> bool:
        """Load the state at ``position`` (default: the one most of the other live identities published) from a
        peer that published it (state_sync.py); False when there is none, or none served it in time. A peer
        that serves another state than it published is not asked again and, in an admitted run, no longer
        averaged with."""
        self.refresh_admission()  # a joiner or a verifier reads the tokens here first: progress counts only with them
        others = self.others_progress()
        position = position or majority_position(others)
        if position is None or position == Progress(self.round, self.digest):
            return False
        donors = [peer for peer, published in others.items() if published == position and peer not in self.excluded]
        random.shuffle(donors)
        with self.state_lock:
            load = load_vouched_state(self.averager, self.learner, position, donors, self.config.swarm.state_timeout)
            if load.donor is not None:
                self.round, self.digest = position.round, position.digest
        self.exclude(load.refused)
        if load.donor is None:
            return False
        logger.info(f"{self.peer_id}: loaded state of round {self.round} from {load.donor}")
        return True

    def catch_up(self, wait: float = 2.0) -> bool:
        """A joiner's first sync, retried while others claim to be ahead, for as long as a departed peer's progress
        record can live: until it expires it counts as a live identity, and with it there may be no majority
        yet. (Peers also admit a newcomer's state download only once they have read its token, each round.) Like
        any peer behind, it loads the round the others are only starting (``next_position``)."""
        deadline = time.monotonic() + PROGRESS_LIFETIME + wait
        while time.monotonic() < deadline:
            self.refresh_admission()  # the tokens first: progress counts only with them
            majority = majority_position(self.others_progress())
            if majority is not None and majority.round > self.round:
                majority = self.next_position(majority, self.averager.max_seconds)
            if majority is not None and self.sync_from_peers(majority):
                return True
            if self.furthest_other_round() <= self.round:
                return False  # nobody is ahead of θ_0: nothing to catch up with
            time.sleep(wait)
        return False

    # ---- rounds --------------------------------------------------------------------------------
    def run_round(self) -> RoundReport:
        """Try round ``self.round``; on success the peer holds θ_{r+1} and ``self.round`` advances."""
        config, r = self.config, self.round
        self.suspensions.next_attempt()
        self.refresh_admission()
        commitment = self.commitment_for(r)
        if commitment is None:
            return self.sit_out(r)
        batch = commitment.batch
        metrics = batch_metrics(batch, config.rollout.group_size)
        # From the first step until round and digest say so, the state is not served (it would be a mix).
        with contextlib.ExitStack() as stepping:
            for iteration in range(config.grpo.num_iterations):
                committed = iteration == 0  # the contribution commits to the on-policy gradient
                gradient = commitment.gradient if committed else self.learner.gradient(batch, iteration)
                tensors, weight = self.outgoing(gradient)
                seed = sketch_seed(config.run.seed, r) if committed else None
                outcome = self.averager.average(tensors, weight, r, sketch_seed=seed, max_weight=self.max_weight,
                                                clip_factor=config.trust.clip_factor)
                self.keep_bindings(r, outcome)
                self.exclude({peer: f"returned a non-finite average in round {r}" for peer in outcome.culprits})
                if outcome.report is not None:
                    self.suspensions.blame(outcome.dropped, outcome.report.members, r)
                metrics.update(gradient.metrics, group_size=outcome.group_size,
                               allreduce_seconds=outcome.allreduce_seconds, average_seconds=outcome.seconds)
                if not outcome.ok:
                    if iteration > 0:  # some of this round's steps were taken: the model is off the swarm's path
                        self.digest = model_digest(self.policy.model)  # what it is now, so that it is not kept
                        self.sync_from_peers()
                    stepping.close()
                    self.publish_progress()
                    return RoundReport(r, metrics, outcome.failure)
                if committed:
                    stepping.enter_context(self.state_lock)
                metrics["grad_norm"] = self.learner.apply(outcome.tensors)
            self.round = r + 1
            self.commitment = None
            self.digest = model_digest(self.policy.model)
        self.publish_progress()
        metrics["model_digest"] = self.digest
        return RoundReport(r, metrics)

    def commitment_for(self, r: int) -> Optional[Commitment]:
        """This peer's one commitment to round ``r``: made (sampled, signed, published) on the first attempt and
        sent again on every retry, so that what any reducer saw of any attempt matches the one contribution
        verifiers audit. None when the peer committed to ``r`` under a θ_r it no longer holds."""
        held = self.commitment
        if held is not None and held.round == r:
            return held if held.model_digest == self.digest else None
        batch = self.sample_batch(r)
        gradient = self.committed_gradient(r, batch)
        self.commit(r, batch, gradient)
        self.commitment = Commitment(r, self.digest, batch, gradient)
        return self.commitment

    def sit_out(self, r: int) -> RoundReport:
        """The peer was outvoted and loaded the majority's θ_r after committing to round ``r`` under its own: a
        second commitment would contradict what reducers reported of the first, so it waits (at most one
        all-reduce's time) for the swarm to finish the round, and resyncs after it."""
        deadline = time.monotonic() + self.averager.max_seconds
        while self.furthest_other_round() <= r and time.monotonic() < deadline:
            time.sleep(SIT_OUT_POLL)
        self.publish_progress()
        return RoundReport(r, {}, RoundFailure(FailureKind.SAT_OUT, f"committed to round {r} under another "
                                                                    f"model: sitting it out"))

    # ---- trust: what this peer commits to and keeps for verifiers --------------------------------
    def commit(self, r: int, batch: ScoredBatch, gradient: Gradient) -> None:
        """Sign the contribution, publish it in the DHT and keep it (with its rollouts) for verifiers."""
        body, bundle = self.contribution(r, batch, gradient)
        records, bundle = self.served_contribution(r, body, bundle)
        self.dht.store(contributions_key(self.config.run.id, r), records[0], get_dht_time() + CONTRIBUTION_LIFETIME,
                       subkey=self.peer_id, return_future=True)
        self.service.keep(r, RoundData.CONTRIBUTION, records, bundle)

    def others_contributions(self, r: int) -> Iterator[tuple[str, ServedContribution]]:
        found = dht_get(self.dht, contributions_key(self.config.run.id, r))
        others = [str(peer) for peer in (found.value if found is not None and isinstance(found.value, dict) else {})
                  if str(peer) != self.peer_id]
        for peer_id in others:
            try:
                yield peer_id, self.service.fetch(peer_id, r, RoundData.CONTRIBUTION, FETCH_TIMEOUT)
            except RpcError as e:
                logger.info(f"no contribution of {peer_id} for round {r}: {e}")

    def keep_bindings(self, r: int, outcome: AllReduceOutcome) -> None:
        """As a reducer: signed reports of what each sender sent this peer (sketched in the first iteration
        only, the one the contributions commit to)."""
        bindings = outcome.bindings()
        if not bindings:
            return
        records = [sign_record(self.key, "binding", self.config.run.id, r, binding).SerializeToString()
                   for binding in bindings]
        self.service.keep(r, RoundData.BINDINGS, records)

    # ---- where the swarm stands -----------------------------------------------------------------
    def publish_progress(self) -> None:
        """Tell the swarm our round and model digest, signed."""
        publish_progress(self.dht, self.key, self.config.run.id, self.peer_id, Progress(self.round, self.digest))

    def key_of(self, peer_id: str) -> Optional[bytes]:
        """The signing key ``peer_id``'s current token binds; None when it holds none (or is banned)."""
        token = self.admission.token_of(peer_id)
        return None if token is None else token.public_key

    def others_progress(self) -> dict[str, Progress]:
        """{peer: Progress} of the other live peers (in an admitted run, each signed by its token's key), less those
        this peer excluded: a peer caught lying has no say in where the swarm stands."""
        key_of = None if self.admission is None else self.key_of
        return {peer: progress for peer, progress in published_progress(self.dht, self.config.run.id, key_of).items()
                if peer != self.peer_id and peer not in self.excluded}

    def furthest_other_round(self) -> int:
        """The furthest round another live peer published (-1: none). A claim, not a position to trust."""
        return max((p.round for p in self.others_progress().values()), default=-1)

    def next_position(self, seen: Progress, timeout: float) -> Progress:
        """The first majority position past ``seen`` (polled), or ``seen`` after ``timeout``. A peer behind loads
        the state of a round the others are only starting: it then reaches that round's matchmaking (each round
        has its own key) while it is open. The round the others are already in it would miss, and chase them.
        After the run's last round nothing comes: that one is loaded at once."""
        if seen.round >= self.config.run.rounds:
            return seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            position = majority_position(self.others_progress())
            if position is not None and position.round > seen.round:
                return position
            time.sleep(POSITION_POLL)
        return seen

    def peers_behind(self) -> int:
        """Live peers at an earlier round than ours."""
        return sum(p.round < self.round for p in self.others_progress().values())

    def check_in_step(self) -> SyncOutcome:
        """Compare with the swarm; resync when behind the majority, or outvoted at our own round."""
        others = self.others_progress()
        if not others:
            return SyncOutcome.ALONE
        majority = majority_position(others)
        if majority is not None and majority.round > self.round:
            position = self.next_position(majority, self.averager.max_seconds)
            return SyncOutcome.RESYNCED_BEHIND if self.sync_from_peers(position) else SyncOutcome.BEHIND_NO_STATE
        if majority is None and max(p.round for p in others.values()) > self.round:
            return SyncOutcome.BEHIND_NO_STATE  # others claim to be ahead, but no state has a majority (yet)
        mine = Progress(self.round, self.digest)
        at_our_round = {peer: p for peer, p in others.items() if p.round == self.round}
        winner = majority_position({**at_our_round, self.peer_id: mine})
        if winner is not None and winner != mine:
            return SyncOutcome.RESYNCED_DIGEST if self.sync_from_peers(winner) else SyncOutcome.OUTVOTED_NO_STATE
        return SyncOutcome.IN_STEP

    def shutdown(self) -> None:
        self.service.stop()
        self.averager.shutdown()
