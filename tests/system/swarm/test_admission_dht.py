"""DHT admission: real DHT processes on 127.0.0.1 that speak only to holders of a coordinator token."""

import time

import pytest

from node.swarm.admission import BANS_LIFETIME, Admission, dht_auth_kwargs, publish_bans, push_bans
from node.swarm.dht import LOOPBACK, DHTSettings, SwarmJoinError, start_dht
from protocol import swarm_pb2
from protocol.identity import P2PIdentity, SigningKey, hivemind_public_key
from protocol.keys import bans_key, tokens_key
from protocol.records import sign_record
from protocol.tokens import issue_token

RUN = "adm"


def token_for(identity, signer, lifetime=60.0):
    return issue_token(signer, peer_id=identity.peer_id, public_key=SigningKey().public_key,
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
        dht = start_dht(settings, **dht_auth_kwargs(identity, COORDINATOR.public_key, RUN, token_for(identity, signer)),
                        **kwargs)
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
    assert second.store("greeting", "hi", time.time() + 60)
    assert first.get("greeting", latest=True).value == "hi"

    with pytest.raises(SwarmJoinError, match="none of the initial_peers responded"):
        dhts("rogue", SigningKey(), maddrs)  # a token signed by someone else: every request refused

    push_bans(first, [second_id.peer_id])
    second.store("after-ban", "x", time.time() + 60)
    assert first.get("after-ban", latest=True) is None


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
    old = sign_record(COORDINATOR, "bans", RUN, 0, swarm_pb2.BanList(), timestamp=time.time() - 60)
    second.store(bans_key(RUN), old.SerializeToString(), time.time() + BANS_LIFETIME)  # outlives its own
    publish_bans(second, SigningKey(), RUN, [])  # not the coordinator's
    admission = Admission(RUN, COORDINATOR.public_key)
    admission.refresh(first)
    assert admission.banned == {"banned-peer"}
