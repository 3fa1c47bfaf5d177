"""DHT admission: real DHT processes on 127.0.0.1 that speak only to holders of a coordinator token."""

import time

import pytest
from hivemind.p2p import PeerID

from node.swarm.admission import Admission, push_bans
from node.swarm.agreement import group_key
from node.swarm.ban_list import publish_bans
from node.swarm.dht import LOOPBACK, DHTSettings, SwarmJoinError, start_dht
from node.swarm.progress import Progress, progress_record, publish_progress, published_progress
from node.swarm.run_records import dht_auth_kwargs
from protocol import swarm_pb2
from protocol.identity import P2PIdentity, SigningKey, hivemind_public_key
from protocol.keys import (
    BANS_LIFETIME,
    averaging_prefix,
    bans_key,
    matchmaking_key,
    progress_key,
    state_donors_key,
    tokens_key,
)
from protocol.records import sign_record
from protocol.tokens import issue_token
from tests.waiting import wait_for

RUN = "adm"


SIGNING_KEY, SECOND_KEY = SigningKey(), SigningKey()  # the keys the tokens of "first" and "second" bind
KEYS = {"first": SIGNING_KEY, "second": SECOND_KEY}


def token_for(identity, signer, lifetime=60.0, key=None):
    key = key or SigningKey()
    return issue_token(signer, peer_id=identity.peer_id, public_key=key.public_key,
                       p2p_public_key=hivemind_public_key(identity.public_der), run_id=RUN, role="trainer",
                       lifetime=lifetime)


@pytest.fixture
def dhts(tmp_path):
    """start(name, signer, initial_peers) -> DHT; every DHT started is shut down (and killed if stuck)."""
    started = []

    def start(name, signer, initial_peers=(), **kwargs):
        identity = P2PIdentity.load_or_create(tmp_path / name)
        settings = DHTSettings(initial_peers=list(initial_peers), host_maddrs=[LOOPBACK],
                               identity_path=str(tmp_path / name), join_retries=1)
        token = token_for(identity, signer, key=KEYS.get(name))
        dht = start_dht(settings, **dht_auth_kwargs(identity, COORDINATOR.public_key, RUN, token), **kwargs)
        started.append(dht)
        return dht, identity

    yield start
    for dht in started:
        dht.shutdown()
        if dht.is_alive():
            dht.kill()
        dht.join(10)
    assert not any(dht.is_alive() for dht in started)


COORDINATOR = SigningKey()


def test_only_token_holders_join_and_a_ban_cuts_a_peer_off(dhts):
    first, _ = dhts("first", COORDINATOR)
    maddrs = [str(m) for m in first.get_visible_maddrs()]
    second, second_id = dhts("second", COORDINATOR, maddrs)
    publish_progress(second, SECOND_KEY, RUN, second_id.peer_id, Progress(1, "ab" * 32))
    wait_for(lambda: published_progress(first, RUN) == {second_id.peer_id: Progress(1, "ab" * 32)}, 10,
             "progress record stored through an admitted peer", interval=0.2)

    with pytest.raises(SwarmJoinError, match="none of the initial_peers responded"):
        dhts("rogue", SigningKey(), maddrs)  # a token signed by someone else: every request refused

    push_bans(first, [second_id.peer_id])
    publish_progress(second, SECOND_KEY, RUN, second_id.peer_id, Progress(2, "cd" * 32))
    time.sleep(1.0)
    assert published_progress(first, RUN) == {second_id.peer_id: Progress(1, "ab" * 32)}


def test_admission_reads_tokens_and_signed_bans_from_the_dht(dhts):
    first, first_id = dhts("first", COORDINATOR)
    maddrs = [str(m) for m in first.get_visible_maddrs()]
    second, second_id = dhts("second", COORDINATOR, maddrs)
    good, forged, expired = (token_for(second_id, COORDINATOR), token_for(first_id, SigningKey()),
                             token_for(first_id, COORDINATOR, lifetime=-1))
    second.store(tokens_key(RUN), good.SerializeToString(), time.time() + 60, subkey=second_id.peer_id)
    second.store(tokens_key(RUN), forged.SerializeToString(), time.time() + 60, subkey=first_id.peer_id)
    second.store(tokens_key(RUN), good.SerializeToString(), time.time() + 60, subkey="someone-else")
    admission = Admission(RUN, COORDINATOR.public_key)
    admission.refresh(first)
    assert admission.admitted() == {second_id.peer_id}
    assert admission.add_token(first_id.peer_id, expired.SerializeToString()).startswith("token expired")

    publish_bans(second, SigningKey(), RUN, [second_id.peer_id])  # not the coordinator's: ignored
    admission.refresh(first)
    assert admission.admitted() == {second_id.peer_id}
    publish_bans(second, COORDINATOR, RUN, [second_id.peer_id])
    time.sleep(0.2)
    admission.refresh(first)
    assert admission.admitted() == set() and admission.banned == {second_id.peer_id}


def test_dht_nodes_keep_only_the_coordinators_tokens_and_ban_lists(dhts):
    """An admitted peer cannot bury another peer's token or the newest ban list under its own bytes."""
    first, first_id = dhts("first", COORDINATOR)
    second, _ = dhts("second", COORDINATOR, [str(m) for m in first.get_visible_maddrs()])
    key, victim = tokens_key(RUN), token_for(first_id, COORDINATOR)

    def held_token():  # what first holds (second's answers carry its own junk, so first drops them)
        return first.get(key, latest=True).value[first_id.peer_id].value

    second.store(key, victim.SerializeToString(), victim.expires_at, subkey=first_id.peer_id)
    assert held_token() == victim.SerializeToString()
    second.store(key, b"junk", victim.expires_at + 100, subkey=first_id.peer_id)
    second.store(key, token_for(first_id, SigningKey()).SerializeToString(), victim.expires_at + 100,
                 subkey=first_id.peer_id)
    second.store(key, victim.SerializeToString(), victim.expires_at + 100, subkey=first_id.peer_id)  # outlives it
    assert held_token() == victim.SerializeToString()
    renewed = token_for(first_id, COORDINATOR, lifetime=120.0)
    second.store(key, renewed.SerializeToString(), renewed.expires_at, subkey=first_id.peer_id)
    assert held_token() == renewed.SerializeToString()

    publish_bans(second, COORDINATOR, RUN, ["banned-peer"])
    old = sign_record(COORDINATOR, "bans", RUN, 0, swarm_pb2.BanList(parts=1), timestamp=time.time() - 60)
    second.store(bans_key(RUN), old.SerializeToString(), time.time() + BANS_LIFETIME, subkey=0)  # outlives its own
    second.store(bans_key(RUN), old.SerializeToString(), time.time() + 60)  # a plain value over every part
    publish_bans(second, SigningKey(), RUN, [])  # not the coordinator's
    admission = Admission(RUN, COORDINATOR.public_key)
    admission.refresh(first)
    assert admission.banned == {"banned-peer"}


def test_an_admitted_peer_cannot_poison_any_key_of_the_run(dhts):
    """Every key has a rule on every DHT node (node/swarm/run_records.py; each rule in detail:
    tests/unit/test_run_records.py). Here the poisoner is a real admitted DHT peer, and what honest peers read
    back is what counts: the honest records, each still there, and nothing else."""
    first, first_id = dhts("first", COORDINATOR)
    second, second_id = dhts("second", COORDINATOR, [str(m) for m in first.get_visible_maddrs()])
    honest = Progress(3, "ab" * 32)
    publish_progress(first, SIGNING_KEY, RUN, first_id.peer_id, honest)
    wait_for(lambda: published_progress(first, RUN) == {first_id.peer_id: honest}, 10, "honest progress",
             interval=0.2)
    now, progress, prefix = time.time(), progress_key(RUN), averaging_prefix(RUN)
    ahead = progress_record(SECOND_KEY, RUN, Progress(99, "ff" * 32))
    own_ahead = ahead
    second_bytes = PeerID.from_base58(second_id.peer_id).to_bytes()
    poison = [
        (progress, {"round": 4}, now + 60, first_id.peer_id),  # malformed, under the victim's subkey
        (progress, ahead, now + 60, first_id.peer_id),  # signed by the poisoner, under the victim's subkey
        (progress, own_ahead, now + 3600, second_id.peer_id),  # its own, outliving its refreshes
        (progress, own_ahead, now + 60, None),  # a plain value over every peer's
        (progress, own_ahead, now + 60, "not-a-peer"),
        ("greeting", "hi", now + 60, None),  # a key of no rule
        (state_donors_key(prefix), float("inf"), now + 30, second_bytes),  # a priority above every honest one
        (matchmaking_key(prefix, 0), "yes", now + 5, second_bytes),
        (group_key(prefix, 3, ["x"]), [group_key(prefix, 4, ["x"]), "ab" * 32], now + 60, second_id.peer_id),
    ]
    for key, value, expiration, subkey in poison:
        second.store(key, value, expiration, subkey=subkey)
    time.sleep(1.0)
    assert published_progress(first, RUN) == {first_id.peer_id: honest}
    assert published_progress(second, RUN) == {first_id.peer_id: honest}
    for key, *_ in poison:
        if key != progress:  # nothing else was ever stored under these keys
            assert first.get(key, latest=True) is None, key
