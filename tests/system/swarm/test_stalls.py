"""A stalled hivemind process (SIGSTOP: a machine swapping, a process starved of CPU) costs the peer a
bounded wait and a log line, never a hang or a crash; once it runs again, so does the peer."""

import logging
import os
import signal
import time

import pytest
from hivemind.utils.timed_storage import get_dht_time

from node.swarm.averaging import HOST_GRACE, RoundAverager
from node.swarm.dht import LOOPBACK, DHTSettings, dht_get, start_dht
from protocol.config import SwarmSection


@pytest.fixture
def dht():
    dht = start_dht(DHTSettings(host_maddrs=[LOOPBACK]))
    try:
        yield dht
    finally:
        os.kill(dht.pid, signal.SIGCONT)
        dht.shutdown()
        dht.join(10)
        assert not dht.is_alive()


def stopped(pid: int):
    """SIGSTOP ``pid``; the returned callable resumes it."""
    os.kill(pid, signal.SIGSTOP)
    return lambda: os.kill(pid, signal.SIGCONT)


def test_a_read_from_a_stalled_dht_gives_up_and_the_next_one_works(dht, caplog):
    dht.store("stall-key", 7, get_dht_time() + 60)
    resume = stopped(dht.pid)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert dht_get(dht, "stall-key", timeout=2.0) is None
        assert time.monotonic() - started < 10
        assert "DHT read of 'stall-key' failed: TimeoutError" in caplog.text
    finally:
        resume()
    assert dht_get(dht, "stall-key", timeout=10.0).value == 7


def test_a_stalled_averager_takes_the_admitted_set_when_it_runs_again(dht, caplog):
    averager = RoundAverager(dht, [(4,)], SwarmSection(matchmaking_time=1.0), prefix="stall")
    try:
        resume = stopped(averager._averager.pid)
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING):
                averager.set_admitted([str(dht.peer_id)])  # the averager cannot confirm: no exception
            assert HOST_GRACE <= time.monotonic() - started < HOST_GRACE + 5
            assert "has not confirmed the admitted peers" in caplog.text
        finally:
            resume()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            averager.set_admitted([str(dht.peer_id)])  # the queued set is read, and this one confirmed
        assert "has not confirmed" not in caplog.text
    finally:
        averager.shutdown()
    assert not averager._averager.is_alive()
