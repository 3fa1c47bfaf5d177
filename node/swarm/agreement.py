"""After an all-reduce, check through the DHT that every member of the group holds the same result.

Rule: a member accepts the result only if *every* member of the group (as formed by matchmaking)
published a digest equal to its own within the wait. A member that publishes nothing is treated as
a disagreement, not ignored: it may have died after some reducers had counted its gradient and
others had not, and only it knew. A round lost this way costs one round; a silently mixed gradient
would cost a diverged model.

Members that both end ok hold identical tensors. Members can still end differently (one saw the last
digest just before its wait ran out, another just after); no rule without a further round trip avoids
that, so the model-digest comparison after the step stays the backstop and the odd peer resyncs.
"""

from __future__ import annotations

import hashlib
import time
from typing import Iterable, Optional, Sequence

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from node.errors import one_line
from protocol.digest import DIGEST_CHARS, tensors_digest
from protocol.keys import AGREEMENT_LIFETIME, agreement_key

POLL_INTERVAL = 0.1


def result_digest(tensors: Sequence[torch.Tensor]) -> str:
    return tensors_digest([(str(i), tensor) for i, tensor in enumerate(tensors)])


def group_key(prefix: str, round_: int, member_tokens: Iterable[str]) -> str:
    """A DHT key unique to this group in this round: the members' per-call random tokens, sorted."""
    return agreement_key(prefix, round_, hashlib.sha256("\n".join(sorted(member_tokens)).encode()).hexdigest()[:16])


def parse_agreement(key: str, value) -> str:
    """The digest in a member's agreement value under ``key`` (the value names its key, so that DHT nodes can
    tell what it is: node/swarm/run_records.py); ValueError if it is not one."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == key and isinstance(value[1], str)
            and len(value[1]) == DIGEST_CHARS):
        raise ValueError(f"not an agreement digest: {value!r:.80}")
    return value[1]


def agree(
    dht: hivemind.DHT, key: str, me: str, members: Sequence[str], digest: str, timeout: float
) -> Optional[str]:
    """Publish ``digest`` under ``key`` as ``me`` and wait for the other ``members``' digests.

    Returns None when all members published ``digest``, else the reason they do not agree.
    """
    deadline = time.monotonic() + timeout
    try:  # not awaited: store's True/False is only the last replica's answer, what members read back decides
        dht.store(key, [key, digest], get_dht_time() + AGREEMENT_LIFETIME, subkey=me, return_future=True)
    except Exception as e:
        return f"could not publish the digest: {one_line(e)}"
    while True:
        published = _published(dht, key, deadline)
        differing = sorted(member for member in members if published.get(member, digest) != digest)
        if differing:
            return f"digest differs from {', '.join(differing)}"
        missing = sorted(member for member in members if member not in published)
        if not missing:
            return None
        if time.monotonic() + POLL_INTERVAL >= deadline:
            return f"no digest within {timeout:.1f}s from {', '.join(missing)}"
        time.sleep(POLL_INTERVAL)


def _published(dht: hivemind.DHT, key: str, deadline: float) -> dict:
    """{member: digest} found under ``key``; a lookup is bounded by the deadline."""
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=max(deadline - time.monotonic(), 0.01))
    except Exception:  # a slow or failed lookup is the same as nothing published yet
        return {}
    if found is None or not isinstance(found.value, dict):
        return {}
    published = {}
    for subkey, entry in found.value.items():
        try:
            published[subkey] = parse_agreement(key, entry.value)
        except ValueError as e:  # counts as a differing digest: the member cannot be agreed with
            published[subkey] = f"malformed ({e})"
    return published
