"""The coordinator's gRPC API, served by a real ``grpo-swarm coordinator`` process and called over real gRPC:
what it grants, and that every bad request gets a clear status and leaves the run's status unchanged."""

import time

import grpc
import pytest

from coordinator.dashboard.format import short_id
from node.peer.announce import published_runs
from node.peer.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    admin_action,
    all_peers,
    registration_record,
)
from node.swarm.admission import Admission
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.run_records import dht_auth_kwargs
from protocol import swarm_pb2
from protocol.identity import SigningKey, binding_bytes, hivemind_public_key
from protocol.keyfiles import generate_key
from protocol.records import MAX_EXCLUSIONS, sign_record, signing_bytes
from protocol.tokens import issue_token
from tests.command import grpo_swarm
from tests.system.control_plane.conftest import RUN_ID

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def admin_pem(tmp_path_factory):
    """The admin's key file (keygen writes admin.pem.pub next to it)."""
    path = tmp_path_factory.mktemp("admin") / "admin.pem"
    generate_key(path)
    return path


@pytest.fixture(scope="module")
def admin(admin_pem):
    return SigningKey.load(admin_pem)


@pytest.fixture(scope="module")
def coordinator(coordinator_factory, tmp_path_factory, admin_pem):
    out = tmp_path_factory.mktemp("coordinator") / "out"
    return coordinator_factory(out, "--admin-key", str(admin_pem.with_name("admin.pem.pub")))


@pytest.fixture(scope="module")
def stub(coordinator):
    return coordinator.stub()


def client_for(coordinator, peer, role="trainer") -> CoordinatorClient:
    return CoordinatorClient(coordinator.address, peer.key, peer.identity, RUN_ID, role)


def status_bytes(stub) -> bytes:
    return stub.Status(swarm_pb2.StatusRequest(), timeout=10).SerializeToString(deterministic=True)


def resign(record: swarm_pb2.SignedRecord, key: SigningKey) -> swarm_pb2.SignedRecord:
    record.public_key = key.public_key
    record.signature = key.sign(signing_bytes(record.kind, record.run_id, record.round, record.nonce, record.timestamp,
                                              record.public_key, record.body))
    return record


def refused(call, request, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details(), caught.value.details()


def test_registration_grants_a_token_bound_to_both_keys(coordinator, stub, new_peer):
    peer = new_peer()
    client = client_for(coordinator, peer)
    token = client.register("/ip4/10.1.2.3/tcp/4000")
    assert (token.peer_id, token.role, token.run_id, token.public_key) == (peer.peer_id, "trainer", RUN_ID,
                                                                          peer.key.public_key)
    assert token.p2p_public_key == hivemind_public_key(peer.identity.public_der)
    assert token.expires_at - token.issued_at == pytest.approx(600.0)
    assert client.coordinator_public_key.hex() == SigningKey.load(coordinator.out / "coordinator.pem").public_key.hex()

    reply = client.heartbeat(3, "digest-3", {"reward": 0.5, "allreduce_seconds": 0.25, "accuracy": 0.75})
    assert reply.round >= 3 and peer.peer_id not in reply.banned
    status = client.status()
    assert status.run_id == RUN_ID and list(status.initial_peers) == coordinator.info["initial_peers"]
    (info,) = [p for p in status.peers if p.peer_id == peer.peer_id]
    assert (info.address, info.role, info.round, info.rounds_contributed) == ("/ip4/10.1.2.3/tcp/4000", "trainer", 3, 1)
    assert info in stub.ListPeers(swarm_pb2.StatusRequest(), timeout=10).peers
    (round_3,) = [r for r in status.rounds if r.round == 3]
    assert (round_3.reward, round_3.accuracy, round_3.allreduce_seconds) == (0.5, 0.75, 0.25)
    assert client.renew().expires_at > token.expires_at
    client.close()


def bad_registration(case: str, peer, other, run_id: str = RUN_ID) -> swarm_pb2.RegisterRequest:
    """A register request that is wrong in exactly one way."""
    if case == "missing record":
        return swarm_pb2.RegisterRequest()
    if case == "huge":
        record = sign_record(peer.key, "register", run_id, 0, b"\0" * (2 << 20))
        return swarm_pb2.RegisterRequest(record=record)
    timestamp = time.time() - (1000 if case == "stale" else 0)
    registration = swarm_pb2.Registration(peer_id=peer.peer_id, p2p_public_key=peer.identity.public_der,
                                          role="trainer", address="/ip4/10.0.0.9/tcp/1")
    signer = other.identity if case == "proof of possession by another libp2p key" else peer.identity
    registration.p2p_signature = signer.sign(binding_bytes(peer.key.public_key, run_id, timestamp))
    if case == "peer id of another key":
        registration.peer_id = other.peer_id
    if case == "role":
        registration.role = "coordinator"
    if case == "no p2p signature":
        registration.ClearField("p2p_signature")
    kind = "heartbeat" if case == "kind" else "register"
    record = sign_record(peer.key, kind, "other-run" if case == "run" else run_id, 0, registration, timestamp=timestamp)
    if case == "signature":
        record.signature = bytes([record.signature[0] ^ 1]) + record.signature[1:]
    if case == "binding of another Ed25519 key":
        resign(record, other.key)  # a valid record by other.key carrying peer's binding
    return swarm_pb2.RegisterRequest(record=record)


@pytest.mark.parametrize("case, code, fragment", [
    ("missing record", Code.INVALID_ARGUMENT, "needs a signed register record"),
    ("signature", Code.UNAUTHENTICATED, "bad signature"),
    ("proof of possession by another libp2p key", Code.UNAUTHENTICATED, "p2p_signature"),
    ("binding of another Ed25519 key", Code.UNAUTHENTICATED, "p2p_signature"),
    ("peer id of another key", Code.UNAUTHENTICATED, "does not hash to peer id"),
    ("run", Code.INVALID_ARGUMENT, "record for run 'other-run'"),
    ("kind", Code.INVALID_ARGUMENT, "expected a register record"),
    ("stale", Code.INVALID_ARGUMENT, "stale register record"),
    ("role", Code.INVALID_ARGUMENT, "role 'coordinator'"),
    ("no p2p signature", Code.INVALID_ARGUMENT, "needs peer_id, p2p_public_key and p2p_signature"),
    ("huge", Code.RESOURCE_EXHAUSTED, ""),
])
def test_bad_registration_is_refused_and_changes_nothing(stub, new_peer, case, code, fragment):
    peer, other = new_peer(), new_peer()
    before = status_bytes(stub)
    refused(stub.Register, bad_registration(case, peer, other), code, fragment)
    assert status_bytes(stub) == before


def test_replayed_or_conflicting_registration_is_refused(stub, new_peer):
    peer = new_peer()
    request = swarm_pb2.RegisterRequest(record=registration_record(peer.key, peer.identity, RUN_ID, "trainer", ""))
    stub.Register(request, timeout=10)
    before = status_bytes(stub)
    refused(stub.Register, request, Code.UNAUTHENTICATED, "replayed record")
    # the same peer id with another Ed25519 key (a valid binding: the libp2p key holder signed it)
    impostor = swarm_pb2.RegisterRequest(record=registration_record(SigningKey(), peer.identity, RUN_ID, "trainer", ""))
    refused(stub.Register, impostor, Code.ALREADY_EXISTS, "registered with another signing key")
    assert status_bytes(stub) == before


def peer_request(token, key, kind, body, round_=0, run_id=RUN_ID) -> swarm_pb2.PeerRequest:
    return swarm_pb2.PeerRequest(token=token, record=sign_record(key, kind, run_id, round_, body))


@pytest.fixture
def admitted(coordinator, new_peer):
    """A registered trainer and verifier: (peer, token) each."""
    trainer, verifier = new_peer(), new_peer()
    trainer_token = client_for(coordinator, trainer).register()
    verifier_token = client_for(coordinator, verifier, "verifier").register()
    return (trainer, trainer_token), (verifier, verifier_token)


def bad_peer_request(case: str, peer, token, other) -> tuple[str, swarm_pb2.PeerRequest]:
    """(method, request) for a request from an admitted peer that is wrong in exactly one way."""
    heartbeat = swarm_pb2.Heartbeat(peer_id=peer.peer_id, round=1, model_digest="d", metrics={"reward": 1.0})
    if case == "missing token":
        return "Heartbeat", swarm_pb2.PeerRequest(record=sign_record(peer.key, "heartbeat", RUN_ID, 1, heartbeat))
    if case == "token of another coordinator":
        forged = issue_token(other.key, peer_id=peer.peer_id, public_key=peer.key.public_key,
                             p2p_public_key=token.p2p_public_key, run_id=RUN_ID, role="trainer", lifetime=60)
        return "Heartbeat", peer_request(forged, peer.key, "heartbeat", heartbeat, 1)
    if case == "tampered token":
        tampered = swarm_pb2.AccessToken()
        tampered.CopyFrom(token)
        tampered.role = "verifier"
        return "ReportVerdict", peer_request(tampered, peer.key, "verdict",
                                             swarm_pb2.Verdict(peer_id=other.peer_id, passed=False))
    if case == "record by another key":
        return "Heartbeat", peer_request(token, other.key, "heartbeat", heartbeat, 1)
    if case == "wrong kind":
        return "RenewToken", peer_request(token, peer.key, "heartbeat", heartbeat, 1)
    if case == "heartbeat of another peer":
        heartbeat.peer_id = other.peer_id
    if case == "infinite metric":
        heartbeat.metrics["loss"] = float("inf")
    if case == "negative round":
        heartbeat.round = -1
    if case == "huge heartbeat":
        heartbeat.metrics["x" * (2 << 20)] = 1.0
    if case == "round past the swarm":
        heartbeat.round = 10**6  # no trainer published progress: the bound is the ledger's furthest round + slack
    if case == "excludes itself":
        heartbeat.exclusions.add(peer_id=peer.peer_id, round=1, what="lied")
    if case == "too many exclusions":
        for index in range(MAX_EXCLUSIONS + 1):
            heartbeat.exclusions.add(peer_id=f"{other.peer_id}{index}", round=1, what="lied")
    if case == "trainer reports a verdict":
        return "ReportVerdict", peer_request(token, peer.key, "verdict",
                                             swarm_pb2.Verdict(peer_id=peer.peer_id, passed=True))
    return "Heartbeat", peer_request(token, peer.key, "heartbeat", heartbeat, max(heartbeat.round, 0))


@pytest.mark.parametrize("case, code, fragment", [
    ("missing token", Code.INVALID_ARGUMENT, "needs a token and a record"),
    ("token of another coordinator", Code.UNAUTHENTICATED, "not signed by this run's coordinator"),
    ("tampered token", Code.UNAUTHENTICATED, "not signed by this run's coordinator"),
    ("record by another key", Code.UNAUTHENTICATED, "record not signed by the token's key"),
    ("wrong kind", Code.INVALID_ARGUMENT, "expected a renew record"),
    ("heartbeat of another peer", Code.INVALID_ARGUMENT, "sent by"),
    ("infinite metric", Code.INVALID_ARGUMENT, "metric 'loss' is inf"),
    ("negative round", Code.INVALID_ARGUMENT, "round -1 is negative"),
    ("huge heartbeat", Code.RESOURCE_EXHAUSTED, ""),
    ("round past the swarm", Code.FAILED_PRECONDITION, "past the swarm's"),
    ("excludes itself", Code.INVALID_ARGUMENT, "name another peer"),
    ("too many exclusions", Code.INVALID_ARGUMENT, f"more than {MAX_EXCLUSIONS} exclusions"),
    ("trainer reports a verdict", Code.PERMISSION_DENIED, "not a verifier"),
])
def test_bad_peer_request_is_refused_and_changes_nothing(stub, admitted, new_peer, case, code, fragment):
    (peer, token), _ = admitted
    method, request = bad_peer_request(case, peer, token, new_peer())
    before = status_bytes(stub)
    refused(getattr(stub, method), request, code, fragment)
    assert status_bytes(stub) == before


def test_status_comes_in_pages_and_all_peers_reads_them_all(coordinator, stub, new_peer):
    for peer in (new_peer(), new_peer(), new_peer()):
        client_for(coordinator, peer).register()
    whole = stub.Status(swarm_pb2.StatusRequest(), timeout=10)
    assert len(whole.peers) == whole.peers_total >= 3
    paged = all_peers(coordinator.address, page_size=2)
    assert [p.peer_id for p in paged] == [p.peer_id for p in whole.peers]
    indexes = [p.index for p in paged]
    assert indexes == sorted(set(indexes))  # registration order, each once
    second = stub.Status(swarm_pb2.StatusRequest(peers_after=indexes[1], peers_limit=2), timeout=10)
    assert [p.peer_id for p in second.peers] == [p.peer_id for p in whole.peers[2:4]]
    huge = stub.Status(swarm_pb2.StatusRequest(peers_limit=2**32 - 1, rounds_limit=2**32 - 1), timeout=10)
    assert len(huge.peers) == len(whole.peers)  # cut to the coordinator's page, which holds them all here


def test_only_trainers_report_exclusions(stub, admitted):
    (trainer, _), (verifier, token) = admitted
    heartbeat = swarm_pb2.Heartbeat(peer_id=verifier.peer_id, round=1, model_digest="d",
                                    exclusions=[swarm_pb2.Exclusion(peer_id=trainer.peer_id, round=1, what="lied")])
    before = status_bytes(stub)
    refused(stub.Heartbeat, peer_request(token, verifier.key, "heartbeat", heartbeat, 1), Code.PERMISSION_DENIED,
            "only trainers report exclusions")
    assert status_bytes(stub) == before


def test_verdicts_about_unknown_peers_or_oneself_are_refused(stub, admitted, new_peer):
    _, (verifier, token) = admitted
    before = status_bytes(stub)
    unknown = swarm_pb2.Verdict(peer_id=new_peer().peer_id, round=1, passed=False, check="x")
    refused(stub.ReportVerdict, peer_request(token, verifier.key, "verdict", unknown), Code.NOT_FOUND, "unknown peer")
    itself = swarm_pb2.Verdict(peer_id=verifier.peer_id, round=1, passed=True)
    refused(stub.ReportVerdict, peer_request(token, verifier.key, "verdict", itself), Code.INVALID_ARGUMENT,
            "cannot judge itself")
    anonymous = swarm_pb2.Verdict(round=1, passed=True)
    refused(stub.ReportVerdict, peer_request(token, verifier.key, "verdict", anonymous), Code.INVALID_ARGUMENT,
            "needs the audited peer_id")
    assert status_bytes(stub) == before


def test_a_verifier_records_one_verdict_per_peer_and_round(coordinator, stub, new_peer):
    """What one verifier can add to the ledger is bounded: a repeat of a verdict is refused and changes nothing."""
    trainer, verifier = new_peer(), new_peer()
    trainer_client, verifier_client = client_for(coordinator, trainer), client_for(coordinator, verifier, "verifier")
    trainer_client.register()
    verifier_client.register()
    verdict = swarm_pb2.Verdict(peer_id=trainer.peer_id, round=1, passed=True)
    assert verifier_client.report_verdict(verdict)
    before = status_bytes(stub)
    refused(stub.ReportVerdict, peer_request(verifier_client.token, verifier.key, "verdict", verdict, 1),
            Code.ALREADY_EXISTS, "already recorded")
    assert status_bytes(stub) == before
    (info,) = [p for p in stub.Status(swarm_pb2.StatusRequest()).peers if p.peer_id == trainer.peer_id]
    assert info.verdicts_passed == 1
    trainer_client.close()
    verifier_client.close()


def test_failed_verdict_bans_the_peer(coordinator, stub, new_peer):
    trainer, verifier = new_peer(), new_peer()
    trainer_client = client_for(coordinator, trainer)
    trainer_client.register()
    verifier_client = client_for(coordinator, verifier, "verifier")
    verifier_client.register()
    assert verifier_client.report_verdict(swarm_pb2.Verdict(peer_id=trainer.peer_id, round=2, passed=True))
    assert trainer_client.renew()  # a passed verdict changes nothing
    assert verifier_client.report_verdict(swarm_pb2.Verdict(peer_id=trainer.peer_id, round=3, passed=False,
                                                            check="rewards", evidence="claimed 1.0, recomputed 0.1"))
    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED.*banned: failed rewards in round 3"):
        trainer_client.renew()
    (info,) = [p for p in stub.Status(swarm_pb2.StatusRequest()).peers if p.peer_id == trainer.peer_id]
    assert (info.verdicts_passed, info.verdicts_failed, info.banned) == (1, 1, True)
    assert trainer.peer_id in verifier_client.heartbeat(0, "d", {}).banned
    trainer_client.close()
    verifier_client.close()


def test_admin_bans_and_unbans(coordinator, stub, admin, new_peer):
    peer, witness = new_peer(), new_peer()
    client, witness_client = client_for(coordinator, peer), client_for(coordinator, witness)
    client.register()
    witness_client.register()

    before = status_bytes(stub)
    not_admin = sign_record(peer.key, "ban", RUN_ID, 0, swarm_pb2.AdminAction(peer_id=witness.peer_id))
    refused(stub.Ban, not_admin, Code.PERMISSION_DENIED, "not signed by the admin key")
    unknown = sign_record(admin, "ban", RUN_ID, 0, swarm_pb2.AdminAction(peer_id=new_peer().peer_id))
    refused(stub.Ban, unknown, Code.NOT_FOUND, "unknown peer")
    refused(stub.Ban, sign_record(admin, "unban", RUN_ID, 0, swarm_pb2.AdminAction(peer_id=peer.peer_id)),
            Code.INVALID_ARGUMENT, "expected a ban record")
    refused(stub.Ban, sign_record(admin, "ban", RUN_ID, 0, swarm_pb2.AdminAction()), Code.INVALID_ARGUMENT,
            "needs a peer_id")
    assert status_bytes(stub) == before

    ban = sign_record(admin, "ban", RUN_ID, 0, swarm_pb2.AdminAction(peer_id=peer.peer_id, reason="spam"))
    assert stub.Ban(ban, timeout=10).message == f"banned {peer.peer_id}"
    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED.*banned: spam"):
        client.renew()
    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED"):
        client.heartbeat(1, "d", {"reward": 1.0})
    with pytest.raises(CoordinatorError, match="PERMISSION_DENIED"):
        client.register()
    assert peer.peer_id in witness_client.heartbeat(1, "d", {}).banned

    assert admin_action(coordinator.address, admin, "unban", peer.peer_id) == f"unbanned {peer.peer_id}"
    refused(stub.Ban, ban, Code.UNAUTHENTICATED, "replayed record")  # the old ban cannot be replayed
    assert client.renew() and peer.peer_id not in witness_client.heartbeat(1, "d", {}).banned
    client.close()
    witness_client.close()


def test_the_dht_carries_the_announcement_and_the_ban_list(coordinator, admin, new_peer):
    """A registered peer joins the coordinator's DHT with its token and reads what the coordinator publishes."""
    peer, banned = new_peer(), new_peer()
    client = client_for(coordinator, peer)
    token = client.register()
    client_for(coordinator, banned).register()
    admin_action(coordinator.address, admin, "ban", banned.peer_id, "test")
    settings = DHTSettings(initial_peers=coordinator.info["initial_peers"], host_maddrs=[LOOPBACK], client_mode=True)
    dht = start_dht(settings, **dht_auth_kwargs(peer.identity, client.coordinator_public_key, RUN_ID, token))
    try:
        admission = Admission(RUN_ID, client.coordinator_public_key)
        runs = {}
        deadline = time.monotonic() + 30
        while (RUN_ID not in runs or banned.peer_id not in admission.banned) and time.monotonic() < deadline:
            runs = published_runs(dht)
            admission.refresh(dht)
            time.sleep(0.5)
        announcement = runs[RUN_ID]
        assert announcement.coordinator_address == coordinator.address
        assert announcement.coordinator_public_key == client.coordinator_public_key
        assert banned.peer_id in admission.banned
        assert coordinator.info["peer_id"] in admission.admitted()  # the coordinator's own token is published
    finally:
        dht.shutdown()
        client.close()


def test_status_and_ban_commands(coordinator, admin_pem, new_peer, tmp_path):
    peer = new_peer()
    client = client_for(coordinator, peer)
    client.register()
    client.heartbeat(2, "d", {"reward": 0.5})
    shown = grpo_swarm("status", "--coordinator", coordinator.address)
    assert shown.returncode == 0 and RUN_ID in shown.stdout and short_id(peer.peer_id) in shown.stdout, shown.stderr

    stranger = tmp_path / "stranger.pem"
    SigningKey().save(stranger)
    denied = grpo_swarm("ban", peer.peer_id, "--coordinator", coordinator.address, "--key", str(stranger))
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr and "Traceback" not in denied.stderr
    done = grpo_swarm("ban", peer.peer_id, "--coordinator", coordinator.address, "--key", str(admin_pem),
                      "--reason", "cli test")
    assert done.returncode == 0 and f"banned {peer.peer_id}" in done.stdout, done.stderr
    with pytest.raises(CoordinatorError, match="banned: cli test"):
        client.renew()
    done = grpo_swarm("unban", peer.peer_id, "--coordinator", coordinator.address, "--key", str(admin_pem))
    assert done.returncode == 0 and f"unbanned {peer.peer_id}" in done.stdout
    client.close()


def test_status_of_no_coordinator_is_one_line():
    result = grpo_swarm("status", "--coordinator", "127.0.0.1:9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: coordinator 127.0.0.1:9: UNAVAILABLE")
