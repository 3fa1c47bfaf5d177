"""The coordinator's ban list in the DHT, in parts: one value of hundreds of peer ids would pass the ~16 KiB at
which hivemind's DHT hangs (docs/DESIGN.md), so the coordinator cuts the sorted list into parts of at most
BAN_PART_BYTES of peer ids, signs every part with one timestamp, and stores part i under ``bans_key(run)``,
subkey i.

A reader takes the newest list whose parts are all there (same timestamp, every index of ``parts``): a list
still arriving, or the parts of two signings mixed, never replace a complete one, so a peer never drops a ban
(or takes an unban) on half a list. An older signing cannot bury a newer one: DHT nodes keep, per subkey, the
value with the latest expiration, and a part expires BANS_LIFETIME after its own signing
(node/swarm/run_records.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import hivemind

from protocol import swarm_pb2
from protocol.keys import BANS_LIFETIME, bans_key
from protocol.records import RecordError, open_record, parse_record, sign_record

BAN_PART_BYTES = 8 * 1024  # of peer ids per part: a signed part stays well under MAX_RECORD_BYTES
MAX_BAN_PARTS = 64  # about 5,000 bans of 46-character peer ids


@dataclass(frozen=True)
class BanList:
    signed_at: float
    banned: frozenset[str]


def ban_list_parts(banned: Iterable[str]) -> list[swarm_pb2.BanList]:
    """The sorted list cut into parts of at most BAN_PART_BYTES of peer ids (one empty part when nobody is
    banned); raises ValueError past MAX_BAN_PARTS."""
    parts: list[list[str]] = [[]]
    size = 0
    for peer_id in sorted(set(banned)):
        entry = len(peer_id.encode()) + 3  # protobuf's tag and length
        if parts[-1] and size + entry > BAN_PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(peer_id)
        size += entry
    if len(parts) > MAX_BAN_PARTS:
        raise ValueError(f"{sum(map(len, parts))} bans need {len(parts)} parts of the ban list, "
                         f"more than {MAX_BAN_PARTS}")
    return [swarm_pb2.BanList(peer_ids=ids, part=index, parts=len(parts)) for index, ids in enumerate(parts)]


def publish_bans(dht: hivemind.DHT, coordinator_key, run_id: str, banned: Iterable[str]) -> None:
    """The coordinator's signed ban list, which peers read each round (works while it is down)."""
    signed_at = time.time()
    for part in ban_list_parts(banned):
        record = sign_record(coordinator_key, "bans", run_id, 0, part, timestamp=signed_at)
        dht.store(bans_key(run_id), record.SerializeToString(), signed_at + BANS_LIFETIME, subkey=part.part,
                  return_future=True)


def read_ban_part(data, subkey, coordinator_public_key: bytes, run_id: str) -> tuple[float, swarm_pb2.BanList]:
    """(when signed, the part) of a ban-list part the coordinator signed, stored under its own index as subkey;
    raises RecordError otherwise."""
    if not isinstance(data, bytes):
        raise RecordError(f"{type(data).__name__}, not a signed record")
    record = parse_record(data)
    if record.public_key != coordinator_public_key:
        raise RecordError("ban list not signed by the coordinator")
    part = open_record(record, run_id=run_id, kind="bans", body_type=swarm_pb2.BanList, max_age=BANS_LIFETIME)
    if not part.part < part.parts <= MAX_BAN_PARTS:
        raise RecordError(f"ban list part {part.part} of {part.parts} (at most {MAX_BAN_PARTS} parts)")
    if type(subkey) is not int or subkey != part.part:  # a bool equals 0 or 1, and is no index
        raise RecordError(f"part {part.part} under subkey {subkey!r:.40}")
    return record.timestamp, part


def newest_ban_list(parts: Mapping[object, bytes], coordinator_public_key: bytes, run_id: str,
                    ) -> tuple[Optional[BanList], list[str]]:
    """The newest complete list among the parts found under ``bans_key`` (subkey -> value), and why each part
    that is not the coordinator's, or not under its own index, was dropped."""
    signings: dict[tuple[float, int], dict[int, list[str]]] = {}
    dropped = []
    for subkey, data in parts.items():
        try:
            signed_at, part = read_ban_part(data, subkey, coordinator_public_key, run_id)
        except RecordError as e:
            dropped.append(f"ban list part under {subkey!r:.40}: {e}")
            continue
        signings.setdefault((signed_at, part.parts), {})[part.part] = list(part.peer_ids)
    complete = [(signed_at, found) for (signed_at, count), found in signings.items() if len(found) == count]
    if not complete:
        return None, dropped
    signed_at, found = max(complete, key=lambda item: item[0])
    return BanList(signed_at, frozenset(peer for ids in found.values() for peer in ids)), dropped
