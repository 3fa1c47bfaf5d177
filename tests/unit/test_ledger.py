"""The ledger on real SQLite files: what it records, what it refuses, and what survives a kill -9."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from coordinator.ledger import Ledger, LedgerError, ReplayedRecord
from protocol import swarm_pb2
from tests.command import ROOT

KEY = b"k" * 32


def nonce() -> bytes:
    return os.urandom(16)


def add_peer(ledger: Ledger, peer_id: str, role: str = "trainer") -> None:
    ledger.register(peer_id, KEY, b"der", role, f"/ip4/10.0.0.1/tcp/1/p2p/{peer_id}", nonce(), time.time(), time.time())


def heartbeat(ledger: Ledger, peer_id: str, round_: int, **metrics) -> None:
    ledger.heartbeat(peer_id, round_, "digest", metrics, nonce(), time.time(), time.time())


def snapshot(ledger: Ledger) -> bytes:
    return ledger.status().SerializeToString(deterministic=True)


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite", "run-a", "digest-a")
    yield ledger
    ledger.close()


def test_rounds_aggregate_the_peers_reports(ledger):
    add_peer(ledger, "A")
    add_peer(ledger, "B")
    heartbeat(ledger, "A", 0, reward=0.25, allreduce_seconds=0.5, token_count=100.0)
    heartbeat(ledger, "B", 0, reward=0.75, allreduce_seconds=1.5)
    heartbeat(ledger, "A", 1, reward=1.0, accuracy=0.5)
    status = ledger.status()
    assert status.run_id == "run-a" and status.config_digest == "digest-a" and status.round == 1
    first, second = status.rounds
    assert (first.round, first.reward, first.allreduce_seconds, first.peers) == (0, 0.5, 1.0, 2)
    assert math.isnan(first.accuracy)  # no eval in round 0
    assert (second.reward, second.accuracy, second.peers) == (1.0, 0.5, 1)
    assert [(p.peer_id, p.rounds_contributed, p.round) for p in status.peers] == [("A", 2, 1), ("B", 1, 0)]


def test_status_pages_hold_peers_in_registration_order_and_the_latest_rounds(ledger, monkeypatch):
    monkeypatch.setattr("coordinator.ledger.PEERS_PAGE", 4)
    monkeypatch.setattr("coordinator.ledger.ROUNDS_PAGE", 3)
    names = [f"P{i:02d}" for i in range(10)]
    for name in reversed(names):  # registration order is not the names' order
        add_peer(ledger, name)
    for round_ in range(7):
        heartbeat(ledger, "P00", round_, reward=0.5)
    first = ledger.status()
    assert (first.peers_total, first.rounds_total, first.round) == (10, 7, 6)
    assert [p.peer_id for p in first.peers] == names[::-1][:4]  # cut to the page size
    assert [r.round for r in first.rounds] == [4, 5, 6]  # the latest, ascending
    seen, after = [], 0
    for _ in range(5):
        page = ledger.status(swarm_pb2.StatusRequest(peers_after=after, peers_limit=3))
        if not page.peers:
            break
        seen += [p.peer_id for p in page.peers]
        after = page.peers[-1].index
    assert seen == names[::-1]
    early = ledger.status(swarm_pb2.StatusRequest(rounds_after=0, rounds_limit=2))
    assert [r.round for r in early.rounds] == [1, 2]


def test_a_round_s_numbers_are_the_medians_of_its_peers_reports(ledger):
    for peer in "ABCL":
        add_peer(ledger, peer)
    for peer, reward in zip("ABC", (0.25, 0.5, 0.75), strict=True):
        heartbeat(ledger, peer, 2, reward=reward, accuracy=reward, allreduce_seconds=1.0)
    heartbeat(ledger, "L", 2, reward=1e6, accuracy=1.0, allreduce_seconds=1e-9)  # one liar among four
    (round_,) = ledger.status().rounds
    assert 0.25 <= round_.reward <= 0.75 and 0.25 <= round_.accuracy <= 0.75
    assert round_.allreduce_seconds == 1.0 and round_.peers == 4


def test_one_verdict_per_verifier_peer_and_round_is_recorded(ledger):
    add_peer(ledger, "A")
    add_peer(ledger, "V", role="verifier")
    assert not ledger.has_verdict("V", "A", 3)
    ledger.verdict("V", swarm_pb2.Verdict(peer_id="A", round=3, passed=True), nonce(), time.time(), time.time())
    assert ledger.has_verdict("V", "A", 3) and not ledger.has_verdict("V", "A", 4)


def test_a_retried_round_counts_once(ledger):
    add_peer(ledger, "A")
    add_peer(ledger, "B")
    heartbeat(ledger, "A", 3, reward=0.0, stepped=0.0, allreduce_seconds=9.0)  # the round failed: no contribution
    assert ledger.status().rounds[0].peers == 0
    heartbeat(ledger, "A", 3, reward=0.5, stepped=1.0, allreduce_seconds=1.0)  # the retry went through
    heartbeat(ledger, "B", 3, reward=0.5, allreduce_seconds=3.0)
    (round_,) = ledger.status().rounds
    assert (round_.peers, round_.reward, round_.allreduce_seconds) == (2, 0.5, 2.0)


def test_failed_verdict_bans_and_unban_lifts(ledger):
    add_peer(ledger, "A")
    add_peer(ledger, "V", role="verifier")
    passed = swarm_pb2.Verdict(peer_id="A", round=1, passed=True)
    failed = swarm_pb2.Verdict(peer_id="A", round=2, passed=False, check="logprobs", evidence="max diff 3.1")
    assert not ledger.verdict("V", passed, nonce(), time.time(), time.time())
    assert ledger.verdict("V", failed, nonce(), time.time(), time.time())
    assert not ledger.verdict("V", failed, nonce(), time.time(), time.time())  # already banned
    peer = ledger.peer("A")
    assert peer.banned and "logprobs" in peer.ban_reason and "max diff 3.1" in peer.ban_reason
    info, verifier = ledger.status().peers
    assert (info.verdicts_passed, info.verdicts_failed, info.banned) == (1, 2, True)
    assert verifier.round == 2  # the latest round it audited
    assert ledger.banned_peers() == ["A"]
    assert ledger.unban("A", "admin", nonce(), time.time(), time.time())
    assert not ledger.unban("A", "admin", nonce(), time.time(), time.time())
    assert ledger.banned_peers() == [] and not ledger.peer("A").banned


def test_a_replayed_record_changes_nothing(ledger):
    add_peer(ledger, "A")
    used = nonce()
    ledger.heartbeat("A", 1, "d", {"reward": 1.0}, used, time.time(), time.time())
    before = snapshot(ledger)
    with pytest.raises(ReplayedRecord):
        ledger.heartbeat("A", 2, "d", {"reward": 0.0}, used, time.time(), time.time())
    with pytest.raises(ReplayedRecord):
        ledger.ban("A", "replayed", "admin", used, time.time(), time.time())
    assert snapshot(ledger) == before


def report(ledger: Ledger, reporter: str, culprit: str, now: float) -> dict[str, str]:
    exclusion = swarm_pb2.Exclusion(peer_id=culprit, round=7, what="returned a non-finite average in round 7")
    return ledger.heartbeat(reporter, 7, "d", {}, nonce(), now, now, exclusions=[exclusion])


def test_a_culprit_is_banned_once_more_than_half_of_the_live_trainers_reported_it(ledger):
    for peer in "ABCDX":
        add_peer(ledger, peer)
    add_peer(ledger, "V", role="verifier")  # no voice: it sends no heartbeats
    now = time.time()
    assert report(ledger, "A", "X", now) == {}  # 1 of the 4 live trainers other than X
    assert report(ledger, "A", "X", now) == {}  # a report again is the same voice
    assert report(ledger, "B", "X", now) == {}  # 2 of 4 is not more than half
    assert not ledger.peer("X").banned
    banned = report(ledger, "C", "X", now)
    assert list(banned) == ["X"] and "reported by 3 of 4 live trainers" in banned["X"]
    assert ledger.peer("X").banned and "non-finite" in ledger.peer("X").ban_reason


def test_trainers_long_silent_have_no_voice_and_one_reporter_never_bans(ledger):
    for peer in "ABCX":
        add_peer(ledger, peer)
    later = time.time() + 1000  # all were last seen 1000 s before (say, a coordinator outage): only reporters live
    assert report(ledger, "A", "nobody", later) == {}  # an unknown peer: nothing kept
    assert report(ledger, "A", "X", later) == {}  # 1 of 1 live trainers, but one word bans no one
    assert list(report(ledger, "B", "X", later)) == ["X"]  # 2 of 2 (C is silent)
    assert ledger.peer("nobody") is None


def test_reopened_ledger_keeps_everything_and_the_nonces(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, "run-a", "digest-a")
    add_peer(ledger, "A")
    used = nonce()
    ledger.heartbeat("A", 4, "d", {"reward": 0.5}, used, time.time(), time.time())
    before = snapshot(ledger)
    ledger.close()
    reopened = Ledger(path, "run-a", "digest-a")
    try:
        assert snapshot(reopened) == before
        with pytest.raises(ReplayedRecord):  # a replay is refused across restarts too
            reopened.heartbeat("A", 5, "d", {"reward": 0.5}, used, time.time(), time.time())
    finally:
        reopened.close()


def test_a_ledger_of_the_previous_schema_is_migrated_and_one_of_a_newer_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, "run-a", "digest-a")
    add_peer(ledger, "A")
    ledger.close()
    with sqlite3.connect(path) as db:  # as schema v1 left it: no reports
        db.execute("DROP TABLE reports")
        db.execute("PRAGMA user_version=1")
    migrated = Ledger(path, "run-a", "digest-a")
    try:
        add_peer(migrated, "B")
        add_peer(migrated, "X")
        report(migrated, "A", "X", time.time())
        assert list(report(migrated, "B", "X", time.time())) == ["X"]
    finally:
        migrated.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(LedgerError, match="schema v99"):
        Ledger(path, "run-a", "digest-a")


def test_another_runs_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path, "run-a", "digest-a").close()
    with pytest.raises(LedgerError, match="ledger of run 'run-a', not 'run-b'"):
        Ledger(path, "run-b", "digest-a")
    with pytest.raises(LedgerError, match="config cannot change"):
        Ledger(path, "run-a", "digest-b")


@pytest.mark.parametrize("content", ["sqlite", "garbage"])
def test_a_file_that_is_not_a_ledger_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "other.db"
    if content == "sqlite":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (text TEXT)")
    else:
        path.write_bytes(b"not a database at all\n" * 100)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a grpo-swarm ledger"):
        Ledger(path, "run-a", "digest-a")
    assert path.read_bytes() == before


WRITER = """
import os, sys, time
from coordinator.ledger import Ledger
ledger = Ledger(sys.argv[1], "run-a", "digest-a")
ledger.register("A", b"k" * 32, b"der", "trainer", "", os.urandom(16), time.time(), time.time())
for round_ in range(100000):
    ledger.heartbeat("A", round_, "d", {"reward": 0.5}, os.urandom(16), time.time(), time.time())
    print(round_, flush=True)
"""


def test_kill_9_loses_nothing_committed(tmp_path):
    """A writer process commits heartbeats as fast as it can and is SIGKILLed mid-stream: every round it
    reported as committed is in the reopened ledger."""
    path = tmp_path / "ledger.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        committed = -1
        deadline = time.monotonic() + 60
        while committed < 200 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            assert line, "the writer stopped early"
            committed = int(line)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert committed >= 200
    ledger = Ledger(path, "run-a", "digest-a")
    try:
        status = ledger.status()
        assert status.peers[0].rounds_contributed >= committed + 1
        assert [r.round for r in status.rounds] == list(range(len(status.rounds)))
    finally:
        ledger.close()
