"""``grpo-swarm verifier``: a peer that follows the model and audits the trainers' contributions.

Each cycle the verifier loads the current state θ_R from peers (it averages nothing), waits until
round R is over, and audits it. For every trainer that took part it asks the trainer itself, over
libp2p, for its signed contribution and rollouts, and every reducer for its signed binding reports
(node/swarm/round_data.py): answers that come over an authenticated connection are attributable, DHT values
are not. The verdict is decided in judge.py.

A sender that put a gradient into the all-reduce without a contribution it can show fails (COMMITMENT).
No verdict at all, because verdicts must never flag an honest peer, for: a peer that cannot be reached
or whose answer was cut off (after retries), a round that has left the peer's window of kept rounds
(the verifier came late), a peer whose token the verifier has not seen, and a round the verifier
holds the wrong model for. Verdicts are signed, stored in the DHT, sent to the coordinator (which
bans on a failure) and logged to ``verdicts.jsonl``.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from node.peer.session import open_session
from node.peer.settings import PeerSettings
from node.peer.swarm_peer import SwarmPeer
from node.runlog import RunLog
from node.swarm.dht import dht_get
from node.swarm.round_data import NotHeld, RoundData, RpcError
from node.verify.audit import AuditFailure, AuditReport
from node.verify.checks import Check
from node.verify.judge import judge_contribution, open_signed
from protocol import swarm_pb2
from protocol.keys import VERDICT_LIFETIME, contributions_key, verdicts_key
from protocol.records import ReplayGuard, sign_record

logger = logging.getLogger(__name__)
FETCH_TIMEOUT = 20.0
POLL_INTERVAL = 0.5


class NoVerdict(Exception):
    """The verifier cannot judge: its own view (of tokens) may lag the swarm's. No evidence either way."""


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
            self.peer.sync_from_peers()  # to the state most trainers published (False: already there, or none)
            if self.peer.round <= last:
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
            if self.peer.furthest_other_round() > round_:
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
            verdict = self.audit_peer(round_, peer_id, reports.get(peer_id, {}))
            if verdict is not None:
                self.publish(verdict)
                verdicts.append(verdict)
        return verdicts

    def binding_reports(self, round_: int, reducers: set[str]) -> dict[str, dict[bytes, list[swarm_pb2.PartSketch]]]:
        """{sender: {group id: the parts reducers of that group say it sent them}}, from reducers' own signed
        records."""
        reports: dict[str, dict[bytes, list]] = {}
        for reducer in sorted(reducers):
            try:
                records, _ = self.peer.service.fetch(reducer, round_, RoundData.BINDINGS, FETCH_TIMEOUT)
            except RpcError as e:
                logger.info(f"no binding reports from {reducer} for round {round_}: {e}")
                continue
            for data in records:
                try:
                    _, binding = open_signed(data, run_id=self.config.run.id, round_=round_, kind="binding",
                                             body_type=swarm_pb2.Binding, bound_key=self.bound_key(reducer),
                                             replay=self.replay)
                except (AuditFailure, NoVerdict) as e:
                    logger.warning(f"binding report of {reducer} dropped: {e}")
                    continue
                for part in binding.parts:
                    reports.setdefault(part.sender, {}).setdefault(binding.group_id, []).append(part)
        return reports

    def bound_key(self, peer_id: str) -> Optional[bytes]:
        """The signing key ``peer_id``'s token binds (None in an open swarm: any key); NoVerdict when this
        verifier knows no current token of it."""
        admission = self.peer.admission
        if admission is None:
            return None
        token = admission.token_of(peer_id)
        if token is None:
            raise NoVerdict(f"{peer_id} holds no current token as far as this verifier knows")
        return token.public_key

    def audit_peer(self, round_: int, peer_id: str,
                   parts: dict[bytes, list[swarm_pb2.PartSketch]]) -> Optional[swarm_pb2.Verdict]:
        try:
            records, bundle = self.peer.service.fetch(peer_id, round_, RoundData.CONTRIBUTION, FETCH_TIMEOUT)
            bound_key = self.bound_key(peer_id)
        except NotHeld as e:
            if parts and not e.evicted(self.config.trust.rollout_history):
                sent = sum(len(group) for group in parts.values())
                return AuditReport(Check.COMMITMENT, f"sent {sent} parts to the all-reduce but shows no "
                                                     f"contribution ({e})").verdict(peer_id, round_)
            logger.info(f"cannot audit {peer_id} in round {round_}: {e}")
            return None
        except (RpcError, NoVerdict) as e:
            logger.info(f"cannot audit {peer_id} in round {round_}: {e}")
            return None
        report = judge_contribution(self.config, self.peer.task, self.peer.learner, peer_id=peer_id, round_=round_,
                                    records=records, bundle=bundle, parts=parts, bound_key=bound_key,
                                    replay=self.replay, rng=self.rng, model_digest=self.peer.digest,
                                    total_length=self.total_length)
        return None if report is None else report.verdict(peer_id, round_)

    # ---- verdicts ------------------------------------------------------------------------------
    def publish(self, verdict: swarm_pb2.Verdict) -> None:
        record = sign_record(self.session.key, "verdict", self.config.run.id, verdict.round, verdict)
        self.peer.dht.store(verdicts_key(self.config.run.id, verdict.round), record.SerializeToString(),
                            record.timestamp + VERDICT_LIFETIME, subkey=f"{self.peer_id}/{verdict.peer_id}",
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


def run_verifier(settings: PeerSettings, seed: int = 0, console: Console | None = None) -> None:
    """Audit the run's contributions until its last round; SIGTERM and Ctrl-C stop it cleanly."""
    console = console or Console()
    stop = {"now": False}
    session = open_session(settings, None, "verifier", console)
    verifier = None
    try:
        console.print(f"verifier {session.dht.peer_id} auditing run {session.config.run.id!r}")
        verifier = Verifier(session, settings.out, seed=seed)
        # Only now: a handler installed before hivemind forks its DHT and averager would be theirs too.
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        verifier.run(stop, round_timeout=verifier.peer.averager.max_seconds + 30)
    finally:
        if verifier is not None:
            verifier.shutdown()
        session.close()
