"""Run discovery over a real DHT on 127.0.0.1: the published run, several runs, a mismatched config."""

import pytest

from node.join import check_same_run, discover_run, publish_run
from node.swarm.dht import start_dht
from protocol.config import ConfigError, load_config


@pytest.fixture
def dhts():
    first = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = start_dht(initial_peers=[str(a) for a in first.get_visible_maddrs()],
                       host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield first, second
    second.shutdown()
    first.shutdown()


def test_a_joiner_learns_the_published_run_and_a_different_config_is_refused(dhts):
    first, second = dhts
    config = load_config(overrides=["run.id=alpha", "rollout.group_size=4"])
    publish_run(first, config)
    assert discover_run(second, None, timeout=10).digest() == config.digest()
    check_same_run(second, config)
    with pytest.raises(ConfigError, match="differs from the one the swarm trains"):
        check_same_run(second, load_config(overrides=["run.id=alpha", "rollout.group_size=8"]))

    publish_run(first, load_config(overrides=["run.id=beta"]))
    with pytest.raises(ConfigError, match="several runs \\(alpha, beta\\)"):
        discover_run(second, None, timeout=10)
    assert discover_run(second, "beta", timeout=10).run.id == "beta"
    with pytest.raises(ConfigError, match="'gamma' is not published"):
        discover_run(second, "gamma", timeout=10)


def test_no_published_run_is_a_clear_error(dhts):
    _, second = dhts
    with pytest.raises(ConfigError, match="no run is published"):
        discover_run(second, None, timeout=1)
