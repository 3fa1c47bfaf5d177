"""The verdict on one trainer's round, from what it served and what reducers reported it sent.

``judge_contribution`` is where the verifier decides; the verifier (verifier.py) only fetches the
evidence, and ``grpo-swarm bench verifier`` hands it evidence made offline. In order:

1. the served bytes: one record, parsed, signed with the key the sender's token binds to its peer id
   (SIGNATURE), of this run, kind and round, with a fresh nonce (RECORD);
2. the contribution against θ_r and the rollouts (audit.py, IDENTITY through SURPRISAL);
3. binding: the reducers' sketches of what the sender sent add up to its committed sketch, with the
   committed token count as weight (node/swarm/binding.py), in each all-reduce group the sender was in.
   Reports that leave part of the gradient unreported (a reducer failed) or contradict each other are no
   evidence either way.

No judgement (None) when the contribution was made from another model than the verifier's θ_r.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Mapping, Optional, Sequence

from google.protobuf.message import Message

from node.swarm.binding import check_groups
from node.train.learner import Learner
from node.verify.audit import AuditFailure, AuditReport, audit_report
from node.verify.checks import Check
from protocol import swarm_pb2
from protocol.config import RunConfig
from protocol.records import RecordError, ReplayGuard, check_signature, open_record, parse_record
from protocol.tasks import Task

logger = logging.getLogger(__name__)


def record_digest(record: swarm_pb2.SignedRecord) -> bytes:
    return hashlib.sha256(record.SerializeToString(deterministic=True)).digest()


def open_signed(data: bytes, *, run_id: str, round_: int, kind: str, body_type: type[Message],
                bound_key: Optional[bytes], replay: ReplayGuard) -> tuple[swarm_pb2.SignedRecord, Message]:
    """(record, body) of a record a peer served, checked: signed with ``bound_key`` (the key its token binds
    to its peer id; None in an open swarm: any key) and valid, for this run, kind and round, with a fresh
    nonce. Raises AuditFailure (SIGNATURE or RECORD)."""
    try:
        record = parse_record(data)
    except RecordError as e:
        raise AuditFailure(Check.RECORD, str(e)) from None
    if bound_key is not None and record.public_key != bound_key:
        raise AuditFailure(Check.SIGNATURE, "signed with a key that is not the one bound to this peer id")
    try:
        check_signature(record)
    except RecordError as e:
        raise AuditFailure(Check.SIGNATURE, str(e)) from None
    try:
        return record, open_record(record, run_id=run_id, kind=kind, body_type=body_type, rounds=(round_, round_),
                                   replay=replay)
    except RecordError as e:
        raise AuditFailure(Check.RECORD, str(e)) from None


def judge_contribution(config: RunConfig, task: Task, learner: Learner, *, peer_id: str, round_: int,
                       records: Sequence[bytes], bundle: bytes,
                       parts: Mapping[bytes, Sequence[swarm_pb2.PartSketch]],
                       bound_key: Optional[bytes], replay: ReplayGuard, rng: random.Random, model_digest: str,
                       total_length: int) -> Optional[AuditReport]:
    """What the checks found about ``peer_id``'s round ``round_`` (see the module doc); None: no judgement.

    :param records, bundle: what the peer served as its contribution
    :param parts: what reducers reported it sent them, by all-reduce group (their records already checked)
    :param model_digest: of ``learner``'s model, θ_r
    :param total_length: the gradient's length in the flat order of node/swarm/binding.py
    """
    try:
        if len(records) != 1:
            raise AuditFailure(Check.RECORD, f"{len(records)} contribution records for one round")
        record, contribution = open_signed(records[0], run_id=config.run.id, round_=round_, kind="contribution",
                                           body_type=swarm_pb2.Contribution, bound_key=bound_key, replay=replay)
    except AuditFailure as e:  # the served bytes themselves are the evidence
        return AuditReport(e.check, e.evidence, contribution_digest=hashlib.sha256(b"".join(records)).digest())
    report = audit_report(config, task, learner, contribution, bundle, round_, peer_id, rng, model_digest)
    if report is None:
        return None
    report.contribution_digest = record_digest(record)
    if not report.passed or not parts:
        return report
    problem = check_groups(contribution.sketch, contribution.token_count, parts, total_length,
                           config.trust.binding_tolerance)
    if problem is not None and problem.kind.is_evidence:
        report.check, report.evidence = Check.BINDING, str(problem)
    elif problem is not None:  # a reducer that failed or contradicts others: no evidence against the sender
        logger.warning(f"binding of {peer_id} in round {round_} not checked: {problem}")
    return report
