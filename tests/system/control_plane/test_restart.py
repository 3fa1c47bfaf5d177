"""Token expiry and renewal, the verifier list, and a coordinator killed with SIGKILL mid-run and restarted on
the same folder: a real ``grpo-swarm coordinator`` process with 2-second tokens, real gRPC clients."""

import signal
import threading
import time

import grpc
import pytest
from google.protobuf import empty_pb2

from coordinator.server import READY_FILE
from coordinator.swarm_round import ROUND_SLACK
from node.peer.coordinator_client import CoordinatorClient, CoordinatorError
from protocol import swarm_pb2
from protocol.identity import SigningKey
from protocol.keyfiles import generate_key
from protocol.records import sign_record
from tests.system.control_plane.conftest import RUN_ID
from tests.system.control_plane.test_service import client_for, refused, status_bytes

LIFETIME, GRACE = 2.0, 4.0
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def verifier_key(tmp_path_factory):
    """The one key allowed to register as a verifier."""
    path = tmp_path_factory.mktemp("verifier") / "verifier.pem"
    generate_key(path)
    return path


def start(coordinator_factory, out, verifier_key, *extra):
    return coordinator_factory(out, "--token-lifetime", str(LIFETIME), "--renew-grace", str(GRACE),
                               "--verifier-keys", str(verifier_key.with_name("verifier.pem.pub")), *extra)


@pytest.fixture(scope="module")
def coordinator(coordinator_factory, tmp_path_factory, verifier_key):
    return start(coordinator_factory, tmp_path_factory.mktemp("coordinator") / "out", verifier_key)


def sleep_until(timestamp: float) -> None:
    time.sleep(max(timestamp - time.time(), 0.0))


def test_only_listed_keys_register_as_verifiers(coordinator, verifier_key, new_peer):
    stranger = new_peer()
    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED.*not on this run's verifier list"):
        client_for(coordinator, stranger, "verifier").register()
    listed = new_peer()
    listed.key = SigningKey.load(verifier_key)
    assert client_for(coordinator, listed, "verifier").register().role == "verifier"
    assert client_for(coordinator, stranger, "trainer").register().role == "trainer"


def test_expired_token_is_renewed_within_the_grace_only(coordinator, new_peer):
    stub = coordinator.stub()
    peer = new_peer()
    client = client_for(coordinator, peer)
    token = client.register()
    assert token.expires_at - token.issued_at == pytest.approx(LIFETIME)
    heartbeat = swarm_pb2.Heartbeat(peer_id=peer.peer_id, round=1, metrics={"reward": 1.0})

    def request(token, kind, body):
        return swarm_pb2.PeerRequest(token=token, record=sign_record(peer.key, kind, RUN_ID, 0, body))

    sleep_until(token.expires_at + 0.2)
    before = status_bytes(stub)
    refused(stub.Heartbeat, request(token, "heartbeat", heartbeat), Code.UNAUTHENTICATED, "token expired")
    assert status_bytes(stub) == before
    renewed = stub.RenewToken(request(token, "renew", empty_pb2.Empty()), timeout=10).token
    assert renewed.expires_at > token.expires_at

    sleep_until(renewed.expires_at + GRACE + 0.2)
    before = status_bytes(stub)
    refused(stub.RenewToken, request(renewed, "renew", empty_pb2.Empty()), Code.UNAUTHENTICATED, "register again")
    assert status_bytes(stub) == before
    # The client copes by itself: its heartbeat finds the token expired, renewal refused, so it registers again.
    client.token = renewed
    assert client.heartbeat(1, "d", {"reward": 1.0}) is not None
    assert client.token.expires_at > renewed.expires_at
    client.close()


class Reporter(threading.Thread):
    """A peer heartbeating again and again, each time with a new reward, over the first ROUNDS rounds (with no
    swarm to publish progress, the coordinator takes heartbeats of the first ROUND_SLACK + 1 rounds only);
    ``acknowledged`` are the (round, reward) the coordinator answered."""

    ROUNDS = ROUND_SLACK + 1

    def __init__(self, client: CoordinatorClient):
        super().__init__(daemon=True)
        self.client, self.acknowledged, self.sent = client, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            round_, reward = self.sent % self.ROUNDS, self.sent / 1024
            try:
                if self.client.heartbeat(round_, f"d{round_}", {"reward": reward}) is not None:
                    self.acknowledged.append((round_, reward))
            except CoordinatorError:
                pass  # expired token while the coordinator was down, etc.: the next try renews
            self.sent += 1
            time.sleep(0.02)


def comparable(status: swarm_pb2.StatusReply) -> bytes:
    """The status without the DHT's addresses (a restarted DHT listens on a new port)."""
    status.ClearField("initial_peers")
    return status.SerializeToString(deterministic=True)


def test_kill_9_mid_run_then_restart_loses_nothing(coordinator_factory, tmp_path, verifier_key, new_peer):
    out = tmp_path / "out"
    first = start(coordinator_factory, out, verifier_key)
    admin = SigningKey.load(out / "coordinator.pem")  # the default admin key is the coordinator's own
    busy, banned, verifier = new_peer(), new_peer(), new_peer()
    verifier.key = SigningKey.load(verifier_key)
    busy_client, banned_client = client_for(first, busy), client_for(first, banned)
    verifier_client = client_for(first, verifier, "verifier")
    for client in (busy_client, banned_client, verifier_client):
        client.register()
    ban = sign_record(admin, "ban", RUN_ID, 0, swarm_pb2.AdminAction(peer_id=banned.peer_id, reason="before the crash"))
    first.stub().Ban(ban, timeout=10)

    reporter = Reporter(busy_client)
    reporter.start()
    try:
        deadline = time.monotonic() + 30
        while len(reporter.acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-stream: heartbeats are in flight
        acknowledged = list(reporter.acknowledged)
        assert len(acknowledged) >= 20
        down_since = len(reporter.acknowledged)
        # While it is down: a heartbeat is dropped (None, training goes on), a verdict is not recorded (False),
        # and registering fails with one line after its tries.
        assert verifier_client.heartbeat(1, "d", {}) is None
        assert not verifier_client.report_verdict(swarm_pb2.Verdict(peer_id=busy.peer_id, round=1, passed=True))
        with pytest.raises(CoordinatorError, match=r"UNAVAILABLE: .* \(after 3 tries\)"):
            verifier_client.register()
        assert len(reporter.acknowledged) == down_since and reporter.is_alive()

        second = start(coordinator_factory, out, verifier_key, "--grpc-port", first.address.rsplit(":", 1)[1])
        assert (second.info["peer_id"], second.info["public_key"]) == (first.info["peer_id"], first.info["public_key"])
        status = second.stub().Status(swarm_pb2.StatusRequest(), timeout=10)
        (busy_info,) = [p for p in status.peers if p.peer_id == busy.peer_id]
        recorded = {r.round: r.reward for r in status.rounds}
        # each round holds the last reward answered for it, or a later one (its answer was lost in the kill)
        assert all(recorded.get(round_, -1.0) >= reward for round_, reward in dict(acknowledged).items())
        assert busy_info.rounds_contributed == Reporter.ROUNDS
        assert [p.peer_id for p in status.peers if p.banned] == [banned.peer_id]

        deadline = time.monotonic() + 30  # the client reconnects and renews (or registers again) by itself
        while len(reporter.acknowledged) == down_since and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(reporter.acknowledged) > down_since
    finally:
        reporter.stop.set()
        reporter.join(30)

    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED.*before the crash"):
        banned_client.renew()
    refused(second.stub().Ban, ban, Code.UNAUTHENTICATED, "replayed record")  # nonces survive the crash too
    before = comparable(second.stub().Status(swarm_pb2.StatusRequest(), timeout=10))
    assert second.stop(signal.SIGTERM) == 0 and not (out / READY_FILE).exists()
    third = start(coordinator_factory, out, verifier_key)
    assert comparable(third.stub().Status(swarm_pb2.StatusRequest(), timeout=10)) == before
    for client in (busy_client, banned_client, verifier_client):
        client.close()
