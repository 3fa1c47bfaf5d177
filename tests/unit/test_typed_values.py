"""Values that travel between peers or out of a round are typed, and another peer's are parsed strictly."""

import pytest

from node.peer.settings import PeerSettings
from node.peer.swarm_peer import SyncOutcome
from node.swarm.averaging import AllReduceOutcome, FailureKind, RoundFailure, RoundGather
from node.swarm.dht import DHTSettings
from node.swarm.progress import Progress
from protocol.config import ConfigError


def test_a_round_gather_survives_the_wire_and_a_malformed_one_is_refused():
    gather = RoundGather.new(7)
    assert RoundGather.from_wire(gather.to_wire()) == gather and len(gather.nonce) == 8
    for bad in (None, "peer:7:abcd", [7], [7, b"x" * 8, 1], [-1, b"x" * 8], [True, b"x" * 8], ["7", b"x" * 8],
                [7, b"short"], [7, "x" * 8], {"round": 7}):
        with pytest.raises(ValueError, match="not a round gather"):
            RoundGather.from_wire(bad)


def test_a_progress_record_is_parsed_strictly():
    assert Progress.parse({"round": 3, "digest": "ab"}) == Progress(3, "ab")
    for bad in (None, 3, {"round": 3}, {"round": "3", "digest": "ab"}, {"round": -1, "digest": "ab"},
                {"round": 3, "digest": 5}, {"round": 3, "digest": "ab", "extra": 1}, {"round": False, "digest": ""}):
        with pytest.raises(ValueError, match="not a progress record"):
            Progress.parse(bad)


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
