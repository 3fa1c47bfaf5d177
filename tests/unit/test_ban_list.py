"""The coordinator's ban list in parts (node/swarm/ban_list.py): hundreds of bans stay under hivemind's value
limit, every part fits the DHT rule of the bans key, and a reader takes only the newest complete list."""

from __future__ import annotations

import secrets
import time

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from node.swarm.ban_list import MAX_BAN_PARTS, ban_list_parts, newest_ban_list, publish_bans
from node.swarm.run_records import RunRecords
from protocol import swarm_pb2
from protocol.identity import SigningKey
from protocol.keys import bans_key
from protocol.records import MAX_RECORD_BYTES, sign_record

RUN = "ban-run"
COORDINATOR = SigningKey()
RULES = RunRecords(RUN, COORDINATOR.public_key)


def peer_ids(count: int) -> list[str]:
    """Strings as long as real (base58, RSA) peer ids."""
    return [f"Qm{secrets.token_hex(22)}" for _ in range(count)]


class BansDHT:
    """One DHT node's view of the bans key: per subkey the value with the latest expiration, each first held to
    the key's rule (as node/swarm/run_records.py does on every node)."""

    def __init__(self):
        self.parts: dict[object, tuple[bytes, float]] = {}

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                           MSGPackSerializer.dumps(value), expiration_time)
        assert key == bans_key(RUN) and RULES.refusal(record) is None, RULES.refusal(record)
        held = self.parts.get(subkey)
        if held is None or expiration_time > held[1]:
            self.parts[subkey] = (value, expiration_time)

    def read(self):
        bans, dropped = newest_ban_list({subkey: value for subkey, (value, _) in self.parts.items()},
                                        COORDINATOR.public_key, RUN)
        assert dropped == []
        return bans


def test_hundreds_of_bans_go_in_parts_under_the_record_limit_and_read_back_whole():
    banned = peer_ids(600)  # ~28 KiB of peer ids: one value would hang hivemind's DHT
    parts = ban_list_parts(banned)
    assert len(parts) >= 3 and [part.part for part in parts] == list(range(len(parts)))
    assert all(part.parts == len(parts) and part.ByteSize() < MAX_RECORD_BYTES - 1024 for part in parts)
    dht = BansDHT()
    publish_bans(dht, COORDINATOR, RUN, banned)
    assert dht.read().banned == frozenset(banned)


def test_no_bans_is_one_empty_part_and_too_many_is_an_error():
    (part,) = ban_list_parts([])
    assert part.parts == 1 and list(part.peer_ids) == []
    with pytest.raises(ValueError, match="more than"):
        ban_list_parts(peer_ids(MAX_BAN_PARTS * 200))


def test_a_list_missing_a_part_or_mixing_two_signings_is_not_taken():
    banned = peer_ids(400)
    dht = BansDHT()
    publish_bans(dht, COORDINATOR, RUN, banned)
    first = dht.read()
    # a newer, longer list of which only part 0 arrived so far: it replaces part 0 of the first list
    time.sleep(0.01)
    newer = BansDHT()
    publish_bans(newer, COORDINATOR, RUN, [*banned, *peer_ids(10)])
    dht.parts[0] = newer.parts[0]
    assert dht.read() is None  # neither signing is complete: no list, rather than half of one
    dht.parts.update(newer.parts)
    assert dht.read().signed_at > first.signed_at and len(dht.read().banned) == 410


def test_an_unban_is_a_newer_shorter_list():
    banned = peer_ids(400)
    dht = BansDHT()
    publish_bans(dht, COORDINATOR, RUN, banned)
    time.sleep(0.01)
    publish_bans(dht, COORDINATOR, RUN, banned[1:])
    # the first list's last part lingers under its subkey until it expires; the newest complete list wins
    assert dht.read().banned == frozenset(banned[1:])


def test_parts_not_the_coordinator_s_or_under_another_index_are_dropped_with_a_reason():
    dht = BansDHT()
    publish_bans(dht, COORDINATOR, RUN, peer_ids(3))
    part = dht.parts[0][0]
    forged = sign_record(SigningKey(), "bans", RUN, 0, swarm_pb2.BanList(peer_ids=["x"], parts=1)).SerializeToString()
    bans, dropped = newest_ban_list({0: part, 1: part, 2: forged, 3: "text"}, COORDINATOR.public_key, RUN)
    assert len(bans.banned) == 3
    assert len(dropped) == 3 and all(line.startswith("ban list part under") for line in dropped), dropped
