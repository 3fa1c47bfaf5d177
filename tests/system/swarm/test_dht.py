import socket
import time

import psutil
import pytest

from node.swarm.dht import LOOPBACK, DHTSettings, SwarmJoinError, start_dht

UNKNOWN_PEER_ID = "QmXVaDzBNPdXELMUCHcnRmyFpqHFmrEEjkFmXcwqsJjbHv"


def test_two_dhts_connect(swarm):
    first, ready = swarm.start("--mode", "dht", "--rank", "11", "--publish", "hello")
    _, joined = swarm.start("--mode", "dht", "--lookup", "hello", "--initial-peers", *ready["maddrs"])
    assert joined["lookup"] == 11
    assert joined["peer_id"] != ready["peer_id"]


def test_unreachable_initial_peer_fails_after_bounded_retries():
    with socket.socket() as probe:  # a port on which nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{UNKNOWN_PEER_ID}"
    children_before = set(psutil.Process().children(recursive=True))
    started = time.monotonic()
    with pytest.raises(SwarmJoinError) as failure:
        start_dht(DHTSettings(initial_peers=[address], host_maddrs=[LOOPBACK], join_retries=3, startup_timeout=10),
                  backoff=0.2)
    elapsed = time.monotonic() - started
    assert elapsed < 30
    message = str(failure.value)
    assert "\n" not in message and address in message and "3 attempts" in message
    new_children = set(psutil.Process().children(recursive=True)) - children_before
    leftovers = [p.name() for p in new_children if p.name() != "torch_shm_manager"]  # torch's, started once
    assert not leftovers, f"start_dht left processes behind: {leftovers}"
