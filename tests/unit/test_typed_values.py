"""Values that travel between peers or out of a round are typed, and another peer's are parsed strictly."""

from types import SimpleNamespace

import pytest

from node.peer.session import _dht_settings
from node.peer.settings import PeerSettings
from node.peer.swarm_peer import SyncOutcome
from node.swarm.averaging import AllReduceOutcome, FailureKind, RoundFailure
from node.swarm.dht import DHTSettings
from node.swarm.gather import RoundGather
from protocol.config import ConfigError


def test_a_round_gather_survives_the_wire_and_a_malformed_one_is_refused():
    gather = RoundGather.new(7)
    assert RoundGather.from_wire(gather.to_wire()) == gather and len(gather.nonce) == 8
    for bad in (None, "peer:7:abcd", [7], [7, b"x" * 8, 1], [-1, b"x" * 8], [True, b"x" * 8], ["7", b"x" * 8],
                [7, b"short"], [7, "x" * 8], {"round": 7}):
        with pytest.raises(ValueError, match="not a round gather"):
            RoundGather.from_wire(bad)


def test_outcomes_carry_a_kind_not_text_to_parse():
    failed = AllReduceOutcome(RoundFailure(FailureKind.MIXED_ROUNDS, "the group mixed rounds [3, 4]"))
    assert not failed.ok and failed.reason == "the group mixed rounds [3, 4]" and failed.bindings() == []
    assert AllReduceOutcome().ok and AllReduceOutcome().reason == ""
    assert FailureKind("mixed-rounds") is FailureKind.MIXED_ROUNDS  # as a run log stores it
    assert SyncOutcome("resynced-digest").resynced and not SyncOutcome("outvoted-no-state").resynced


@pytest.mark.parametrize("build, message", [
    (lambda: DHTSettings(host_maddrs=["/ip4/1.2.3.4/tcp/x"]), "--host-maddrs: '/ip4/1.2.3.4/tcp/x' is not a valid"),
    (lambda: DHTSettings(join_retries=0), "--join-retries: must be >= 1 (got 0)"),
    (lambda: PeerSettings(out="o", coordinator="nohost"), "--coordinator: 'nohost' is not HOST:PORT"),
    (lambda: PeerSettings(out="o", dht={"startup_timeout": -1}), "--startup-timeout: must be > 0 (got -1)"),
    (lambda: PeerSettings(out="o", dht=DHTSettings()).replaced(dht={"initial_peers": ["nope"]}),
     "--initial-peers: 'nope' is not a valid multiaddr"),
])
def test_bad_settings_name_the_flag(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_dht_addresses_a_coordinator_lists_are_checked_and_named_as_its():
    settings = PeerSettings(out="o", coordinator="127.0.0.1:9")
    listed = SimpleNamespace(initial_peers=["/ip4/127.0.0.1/tcp/5/p2p/QmXVaDzBNPdXELMUCHcnRmyFpqHFmrEEjkFmXcwqsJjbHv"])
    assert _dht_settings(settings, listed, "id").initial_peers == listed.initial_peers
    with pytest.raises(ConfigError, match="the coordinator at 127.0.0.1:9 lists DHT addresses that are not multiaddrs"):
        _dht_settings(settings, SimpleNamespace(initial_peers=["garbage"]), "id")
    with pytest.raises(ConfigError, match="lists no DHT addresses: pass --initial-peers"):
        _dht_settings(settings, SimpleNamespace(initial_peers=[]), "id")


def test_a_dht_request_with_an_undecodable_token_is_refused(tmp_path):
    from hivemind.proto.auth_pb2 import AccessToken as HivemindToken

    from node.swarm.hivemind.authorizer import SwarmAuthorizer
    from protocol import swarm_pb2
    from protocol.identity import P2PIdentity, SigningKey

    identity = P2PIdentity.load_or_create(tmp_path / "p2p.id")
    authorizer = SwarmAuthorizer(identity, SigningKey().public_key, "run", swarm_pb2.AccessToken())
    assert authorizer.is_token_valid(HivemindToken(username="x", signature=b"\xff\xff not a token")) is False
