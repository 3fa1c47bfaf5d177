"""After an all-reduce, check through the DHT that every member of the group holds the same result.

Rule: a member accepts the result only if *every* member of the group (as formed by matchmaking)
published a digest equal to its own within the wait. A member that publishes nothing is treated as
a disagreement, not ignored: it may have died after some reducers had counted its gradient and
others had not, and only it knew. A round lost this way costs one round; a silently mixed gradient
would cost a diverged model.

Each digest is a signed record naming its group's key; in an admitted run a member's digest counts only if
signed by the key its token binds, so no member can publish a "disagreement" under another's name.

Members that both end ok hold identical tensors. Members can still end differently (one saw the last
digest just before its wait ran out, another just after); no rule without a further round trip avoids
that, so the model-digest comparison after the step stays the backstop and the odd peer resyncs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from node.errors import one_line
from node.swarm.progress import KeyOf
from protocol import swarm_pb2
from protocol.digest import DIGEST_CHARS, tensors_digest
from protocol.identity import SigningKey
from protocol.keys import AGREEMENT_LIFETIME, agreement_key
from protocol.records import RecordError, check_signature, parse_record, sign_record

POLL_INTERVAL = 0.1


def result_digest(tensors: Sequence[torch.Tensor]) -> str:
    return tensors_digest([(str(i), tensor) for i, tensor in enumerate(tensors)])


def group_key(prefix: str, round_: int, member_tokens: Iterable[str]) -> str:
    """A DHT key unique to this group in this round: the members' per-call random tokens, sorted."""
    return agreement_key(prefix, round_, hashlib.sha256("\n".join(sorted(member_tokens)).encode()).hexdigest()[:16])


@dataclass(frozen=True)
class AgreementSigner:
    """How a member signs its digest, and whose signatures it believes: ``key_of(peer)`` is the key ``peer``'s
    token binds (None: not admitted); ``key_of`` None believes any signer (an open swarm)."""

    key: SigningKey
    run_id: str
    key_of: Optional[KeyOf] = None


def agreement_record(key: SigningKey, run_id: str, group: str, round_: int, digest: str) -> bytes:
    """A member's signed digest of its group's result; the body names the group's key, so that DHT nodes can
    tell what the record is and where it belongs (node/swarm/run_records.py)."""
    return sign_record(key, "agreement", run_id, round_, f"{group}\n{digest}".encode()).SerializeToString()


def read_agreement(data, run_id: str) -> tuple[swarm_pb2.SignedRecord, str, str]:
    """(record, the key it names, digest) of a signed agreement record of ``run_id``; ValueError otherwise."""
    record = parse_record(data)
    check_signature(record)
    if record.run_id != run_id or record.kind != "agreement":
        raise RecordError(f"a {record.kind!r} record of run {record.run_id!r}, not an agreement digest")
    group, _, digest = record.body.decode("utf-8", errors="replace").partition("\n")
    if len(digest) != DIGEST_CHARS:
        raise RecordError(f"an agreement digest of {len(digest)} characters")
    return record, group, digest


def agree(
    dht: hivemind.DHT, key: str, round_: int, me: str, members: Sequence[str], digest: str, timeout: float,
    signer: AgreementSigner,
) -> Optional[str]:
    """Publish ``digest`` under ``key`` as ``me`` (signed) and wait for the other ``members``' digests.

    Returns None when all members published ``digest``, else the reason they do not agree.
    """
    deadline = time.monotonic() + timeout
    record = agreement_record(signer.key, signer.run_id, key, round_, digest)
    try:  # not awaited: store's True/False is only the last replica's answer, what members read back decides
        dht.store(key, record, get_dht_time() + AGREEMENT_LIFETIME, subkey=me, return_future=True)
    except Exception as e:
        return f"could not publish the digest: {one_line(e)}"
    while True:
        published = _published(dht, key, deadline, signer)
        differing = sorted(member for member in members if published.get(member, digest) != digest)
        if differing:
            return f"digest differs from {', '.join(differing)}"
        missing = sorted(member for member in members if member not in published)
        if not missing:
            return None
        if time.monotonic() + POLL_INTERVAL >= deadline:
            return f"no digest within {timeout:.1f}s from {', '.join(missing)}"
        time.sleep(POLL_INTERVAL)


def _published(dht: hivemind.DHT, key: str, deadline: float, signer: AgreementSigner) -> dict:
    """{member: digest} found under ``key``, each signed by its member; a lookup is bounded by the deadline."""
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=max(deadline - time.monotonic(), 0.01))
    except Exception:  # a slow or failed lookup is the same as nothing published yet
        return {}
    if found is None or not isinstance(found.value, dict):
        return {}
    published = {}
    for subkey, entry in found.value.items():
        try:
            record, group, digest = read_agreement(entry.value, signer.run_id)
            if group != key:
                raise RecordError(f"names group {group!r:.80}")
            if signer.key_of is not None and record.public_key != signer.key_of(str(subkey)):
                raise RecordError("not signed by the key of its token")
        except ValueError as e:  # counts as a differing digest: the member cannot be agreed with
            digest = f"malformed ({e})"
        published[subkey] = digest
    return published
