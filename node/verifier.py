"""``grpo-swarm verifier``: a peer that follows the model and audits the trainers' contributions.

Each cycle the verifier loads the current state θ_R from peers (it averages nothing), waits until
round R is over, and audits it. For every trainer that took part it asks the trainer itself, over
libp2p, for its signed contribution and rollouts, and every reducer for its signed binding reports
(node/swarm/rpc.py): answers that come over an authenticated connection are attributable, DHT values
are not. Checks, cheapest first:

1. the record: signed by the key bound to the sender's token, this run, this round, a fresh nonce,
   and naming the sender (a copied contribution names someone else);
2. the contribution against θ_R and the rollouts (node/audit.py: shard, rollout digest, rewards,
   token count, log-probs in one prefill pass, gradient sketches of sampled units);
3. binding: the reducers' sketches of what the sender sent add up to its committed sketch, with the
   committed token count as weight (node/swarm/binding.py). Reports that leave part of the gradient
   unreported (a reducer failed) are no evidence either way.

A sender that put a gradient into the all-reduce without a contribution it can show fails. No
verdict at all, because verdicts must never flag an honest peer, for: a peer that cannot be reached
or whose answer was cut off (after retries), a round that has left the peer's window of kept rounds
(the verifier came late), a peer whose token the verifier has not seen, and a round the verifier
holds the wrong model for. Verdicts are signed, stored in the DHT, sent to the coordinator (which
bans on a failure) and logged to ``verdicts.jsonl``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Optional

from hivemind.utils.timed_storage import get_dht_time

from node.audit import AuditFailure, audit
from node.peer import SwarmPeer
from node.runlog import RunLog
from node.swarm.binding import MISMATCH, WEIGHT, check_binding
from node.swarm.dht import dht_get
from node.swarm.rpc import NotHeld, RpcError
from protocol import swarm_pb2
from protocol.keys import contributions_key, verdicts_key
from protocol.records import RecordError, ReplayGuard, check_signature, open_record, parse_record, sign_record

logger = logging.getLogger(__name__)
VERDICT_LIFETIME = 3600.0
FETCH_TIMEOUT = 20.0
POLL_INTERVAL = 0.5


class NoVerdict(Exception):
    """The verifier cannot judge: its own view (of tokens) may lag the swarm's. No evidence either way."""


def failed(peer_id: str, round_: int, check: str, evidence: str, contribution_digest: bytes = b"") -> swarm_pb2.Verdict:
    return swarm_pb2.Verdict(peer_id=peer_id, round=round_, passed=False, check=check, evidence=evidence,
                             contribution_digest=contribution_digest)


class Verifier:
    def __init__(self, session, out_dir: Path, seed: int = 0):
        self.session, self.config = session, session.config
        self.peer = SwarmPeer(session, serve_state=False)
        self.peer_id = self.peer.peer_id
        self.log = RunLog(Path(out_dir) / "verdicts.jsonl")
        self.rng = random.Random(seed)
        self.replay = ReplayGuard()
        self.flagged: set[str] = set()
        self.total_length = sum(p.numel() for p in self.peer.learner.params)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, stop: dict, round_timeout: float) -> None:
        """Audit rounds until the run's last one (or ``stop``); each round waits at most ``round_timeout``."""
        last = -1
        while not stop["now"] and last < self.config.run.rounds - 1:
            if not self.peer.sync_from_peers() or self.peer.round <= last:
                time.sleep(POLL_INTERVAL)
                continue
            round_ = self.peer.round
            self.wait_round_over(round_, round_timeout)
            self.audit_round(round_)
            last = round_

    def wait_round_over(self, round_: int, timeout: float) -> bool:
        """Wait until some trainer has moved past ``round_`` (its all-reduce, and so its bindings, are done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p["round"] > round_ for p in self.peer.others_progress().values()):
                return True
            time.sleep(POLL_INTERVAL)
        return False

    # ---- one round -----------------------------------------------------------------------------
    def trainers(self, round_: int) -> set[str]:
        """Peers to ask: admitted trainers, plus anyone who published a contribution for the round."""
        peers = set(self.peer.others_progress())
        found = dht_get(self.peer.dht, contributions_key(self.config.run.id, round_))
        if found is not None and isinstance(found.value, dict):
            peers |= {str(peer) for peer in found.value}
        if self.peer.admission is not None:
            self.peer.refresh_admission()
            peers |= {p for p, token in self.peer.admission.tokens.items() if token.role == "trainer"}
            peers = {p for p in peers if self.peer.is_admitted(p)}
        return peers - {self.peer_id}

    def audit_round(self, round_: int) -> list[swarm_pb2.Verdict]:
        trainers = self.trainers(round_)
        reports = self.binding_reports(round_, trainers)
        verdicts = []
        for peer_id in sorted((trainers | set(reports)) - self.flagged):
            if self.rng.random() >= self.config.trust.audit_rate:
                continue
            verdict = self.audit_peer(round_, peer_id, reports.get(peer_id, []))
            if verdict is not None:
                self.publish(verdict)
                verdicts.append(verdict)
        return verdicts

    def binding_reports(self, round_: int, reducers: set[str]) -> dict[str, list[swarm_pb2.PartSketch]]:
        """{sender: the parts reducers say it sent them}, from reducers' own signed records."""
        reports: dict[str, list] = {}
        for reducer in sorted(reducers):
            try:
                records, _ = self.peer.service.fetch(reducer, round_, "bindings", FETCH_TIMEOUT)
            except RpcError as e:
                logger.info(f"no binding reports from {reducer} for round {round_}: {e}")
                continue
            for data in records:
                try:
                    _, binding = self.open_signed(data, reducer, round_, "binding", swarm_pb2.Binding)
                except (AuditFailure, NoVerdict) as e:
                    logger.warning(f"binding report of {reducer} dropped: {e}")
                    continue
                for part in binding.parts:
                    reports.setdefault(part.sender, []).append(part)
        return reports

    def audit_peer(self, round_: int, peer_id: str, parts: list) -> Optional[swarm_pb2.Verdict]:
        try:
            records, bundle = self.peer.service.fetch(peer_id, round_, "contribution", FETCH_TIMEOUT)
        except RpcError as e:
            if isinstance(e, NotHeld) and parts and not e.evicted(self.config.trust.rollout_history):
                return failed(peer_id, round_, "commitment",
                              f"sent {len(parts)} parts to the all-reduce but shows no contribution ({e})")
            logger.info(f"cannot audit {peer_id} in round {round_}: {e}")
            return None
        try:
            if len(records) != 1:
                raise AuditFailure("record", f"{len(records)} contribution records for one round")
            record, contribution = self.open_signed(records[0], peer_id, round_, "contribution",
                                                    swarm_pb2.Contribution)
            if contribution.peer_id != peer_id:
                raise AuditFailure("identity", f"contribution names peer {contribution.peer_id}")
        except AuditFailure as e:  # the served bytes themselves are the evidence
            return failed(peer_id, round_, e.check, e.evidence, hashlib.sha256(b"".join(records)).digest())
        except NoVerdict as e:
            logger.info(f"cannot audit {peer_id} in round {round_}: {e}")
            return None
        verdict = audit(self.config, self.peer.task, self.peer.learner, record, contribution, bundle, round_,
                        peer_id, self.rng, model_digest=self.peer.digest)
        if verdict is None or not verdict.passed or not parts:  # None: we hold another model; no judgement
            return verdict
        problem = check_binding(contribution.sketch, contribution.token_count, parts, self.total_length,
                                self.config.trust.binding_tolerance)
        if problem is not None and problem.startswith((WEIGHT, MISMATCH)):
            return failed(peer_id, round_, "binding", problem, verdict.contribution_digest)
        if problem is not None:  # a reducer that failed or contradicts others: no evidence against the sender
            logger.info(f"binding of {peer_id} in round {round_} not checked: {problem}")
        return verdict

    def open_signed(self, data: bytes, peer_id: str, round_: int, kind: str, body_type):
        """(record, body) of a record ``peer_id`` served, checked: from a peer holding a token (NoVerdict if the
        verifier knows none), signed with the key that token binds to its peer id ("signature"), for this run,
        kind and round, with a fresh nonce."""
        try:
            record = parse_record(data)
        except RecordError as e:
            raise AuditFailure("record", str(e)) from None
        admission = self.peer.admission
        if admission is not None:
            token = admission.token_of(peer_id)
            if token is None:
                raise NoVerdict(f"{peer_id} holds no current token as far as this verifier knows")
            if record.public_key != token.public_key:
                raise AuditFailure("signature", "signed with a key that is not the one bound to this peer id")
        try:
            check_signature(record)
        except RecordError as e:
            raise AuditFailure("signature", str(e)) from None
        try:
            return record, open_record(record, run_id=self.config.run.id, kind=kind, body_type=body_type,
                                       rounds=(round_, round_), replay=self.replay)
        except RecordError as e:
            raise AuditFailure("record", str(e)) from None

    # ---- verdicts ------------------------------------------------------------------------------
    def publish(self, verdict: swarm_pb2.Verdict) -> None:
        record = sign_record(self.session.key, "verdict", self.config.run.id, verdict.round, verdict)
        self.peer.dht.store(verdicts_key(self.config.run.id, verdict.round), record.SerializeToString(),
                            get_dht_time() + VERDICT_LIFETIME, subkey=f"{self.peer_id}/{verdict.peer_id}",
                            return_future=True)
        if self.session.membership is not None:
            self.session.membership.client.report_verdict(verdict)
        if not verdict.passed:
            self.flagged.add(verdict.peer_id)
            logger.warning(f"{verdict.peer_id} failed {verdict.check} in round {verdict.round}: {verdict.evidence}")
        self.log.write("verdict", verdict.round, peer=verdict.peer_id, passed=verdict.passed, check=verdict.check,
                       evidence=verdict.evidence)

    def shutdown(self) -> None:
        self.peer.shutdown()
