"""Run discovery over a real DHT on 127.0.0.1: the published run, several runs, a mismatched config,
announcements that must be dropped."""

import time

import pytest

from node.peer.announce import check_same_run, discover_run, publish_run, published_runs
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from protocol import swarm_pb2
from protocol.config import ConfigError, load_config
from protocol.identity import SigningKey
from protocol.keys import RUNS_KEY
from protocol.records import sign_record

KEY = SigningKey()


@pytest.fixture
def dhts():
    first = start_dht(DHTSettings(host_maddrs=[LOOPBACK]))
    second = start_dht(DHTSettings(initial_peers=[str(a) for a in first.get_visible_maddrs()], host_maddrs=[LOOPBACK]))
    yield first, second
    second.shutdown()
    first.shutdown()


def test_a_joiner_learns_the_published_run_and_a_different_config_is_refused(dhts):
    first, second = dhts
    config = load_config(overrides=["run.id=alpha", "rollout.group_size=4"])
    publish_run(first, config, KEY)
    assert discover_run(second, None, timeout=10).config.digest() == config.digest()
    check_same_run(second, config)
    with pytest.raises(ConfigError, match="differs from the one the swarm trains"):
        check_same_run(second, load_config(overrides=["run.id=alpha", "rollout.group_size=8"]))

    publish_run(first, load_config(overrides=["run.id=beta"]), KEY)
    with pytest.raises(ConfigError, match="several runs \\(alpha, beta\\)"):
        discover_run(second, None, timeout=10)
    assert discover_run(second, "beta", timeout=10).config.run.id == "beta"
    with pytest.raises(ConfigError, match="'gamma' is not published"):
        discover_run(second, "gamma", timeout=10)


def test_no_published_run_is_a_clear_error(dhts):
    _, second = dhts
    with pytest.raises(ConfigError, match="no run is published"):
        discover_run(second, None, timeout=1)


def test_announcements_of_an_admitted_run_count_only_when_its_coordinator_signed_them(dhts):
    first, second = dhts
    coordinator = SigningKey()
    config = load_config(overrides=["run.id=admitted"])
    publish_run(first, config, coordinator, coordinator_address="127.0.0.1:50051")
    announcement = discover_run(second, "admitted", timeout=10)
    assert announcement.coordinator_public_key == coordinator.public_key
    assert announcement.coordinator_address == "127.0.0.1:50051"

    # someone else re-announces the run as if the coordinator had (its key inside, its own signature)
    body = swarm_pb2.RunAnnouncement(config_json="{}", config_digest=config.digest(),
                                     coordinator_public_key=coordinator.public_key)
    forged = sign_record(SigningKey(), "run", "admitted", 0, body).SerializeToString()
    first.store(RUNS_KEY, forged, time.time() + 7200, subkey="admitted")  # outlives the real one
    assert "admitted" not in published_runs(second)
    first.store(RUNS_KEY, b"not a record", time.time() + 7300, subkey="admitted")
    assert published_runs(second) == {}
