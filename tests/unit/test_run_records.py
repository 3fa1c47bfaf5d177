"""Every DHT key of an admitted run has a rule on every DHT node (node/swarm/run_records.py): the records
the run's own code writes fit it, and records poisoned in each way an admitted peer can poison them do not.
The rules run here on the records hivemind would hand a DHT node; tests/system/swarm/test_run_records.py
runs them between real DHT processes."""

import inspect
import random
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer

from node.peer.announce import publish_run
from node.swarm.admission import push_token
from node.swarm.agreement import AgreementSigner, agree, agreement_record, group_key
from node.swarm.ban_list import publish_bans
from node.swarm.progress import Progress, progress_record, publish_progress
from node.swarm.run_records import RunRecords
from protocol import keys, swarm_pb2
from protocol.config import RunConfig
from protocol.identity import P2PIdentity, SigningKey, hivemind_public_key
from protocol.records import sign_record
from protocol.tokens import issue_token

RUN = "hardened"
COORDINATOR = SigningKey()
PREFIX = keys.averaging_prefix(RUN)
DIGEST = "ab" * 32


def new_identity() -> P2PIdentity:
    return P2PIdentity(rsa.generate_private_key(public_exponent=65537, key_size=1024))


IDENTITY = new_identity()
PEER, OTHER = IDENTITY.peer_id, new_identity().peer_id
PEER_KEY, OTHER_KEY = SigningKey(), SigningKey()  # the keys PEER's and OTHER's tokens bind
RULES = RunRecords(RUN, COORDINATOR.public_key)


class RecordingDHT:
    """What the run's own writers ask the DHT to store, as the DHT node receives it."""

    def __init__(self):
        self.records: list[tuple[str, DHTRecord]] = []

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        self.records.append((key, as_record(key, value, expiration_time, subkey)))

    def get(self, key, latest=False, return_future=False):
        raise TimeoutError("nothing to read here")

    def run_coroutine(self, coroutine):
        coroutine.close() if inspect.iscoroutine(coroutine) else None


def as_record(key: str, value, expiration: float, subkey=None) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                     MSGPackSerializer.dumps(value), expiration)


def signed(kind: str, round_: int, body, key: SigningKey = None, run_id: str = RUN, **kwargs) -> bytes:
    return sign_record(key or SigningKey(), kind, run_id, round_, body, **kwargs).SerializeToString()


def token(peer_id=PEER, signer=COORDINATOR, lifetime=60.0):
    key = {PEER: PEER_KEY, OTHER: OTHER_KEY}.get(peer_id) or SigningKey()
    return issue_token(signer, peer_id=peer_id, public_key=key.public_key,
                       p2p_public_key=hivemind_public_key(IDENTITY.public_der), run_id=RUN, role="trainer",
                       lifetime=lifetime)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def contribution(round_=3, peer_id=PEER, key=PEER_KEY):
    return signed("contribution", round_, swarm_pb2.Contribution(peer_id=peer_id, token_count=9.0, sketch=[0.5] * 256),
                  key=key)


def verdict(round_=3, peer_id=PEER):  # by OTHER, a verifier
    return signed("verdict", round_, swarm_pb2.Verdict(peer_id=peer_id, round=round_, passed=True), key=OTHER_KEY)


def written_by_the_run() -> dict[str, DHTRecord]:
    """One record under every key, each written by the code that writes it in a run (the DHT node has met both
    peers' tokens, as it does when they talk to it)."""
    RULES.book.add(token())
    RULES.book.add(token(peer_id=OTHER))
    dht = RecordingDHT()
    config = RunConfig().updated(run={"id": RUN})
    publish_run(dht, config, COORDINATOR, coordinator_address="127.0.0.1:1")
    push_token(dht, token())
    publish_bans(dht, COORDINATOR, RUN, [OTHER])
    publish_progress(dht, PEER_KEY, RUN, PEER, Progress(4, DIGEST))
    agree(dht, group_key(PREFIX, 4, ["a", "b"]), 4, PEER, [PEER], DIGEST, timeout=0.01,
          signer=AgreementSigner(PEER_KEY, RUN))
    now = time.time()
    dht.store(keys.contributions_key(RUN, 3), contribution(), now + keys.CONTRIBUTION_LIFETIME, subkey=PEER)
    dht.store(keys.verdicts_key(RUN, 3), verdict(), now + keys.VERDICT_LIFETIME, subkey=f"{OTHER}/{PEER}")
    # hivemind's averager: declare_averager and _declare_for_download_periodically
    dht.store(keys.matchmaking_key(PREFIX, 3), True, now + 5, subkey=PeerID.from_base58(PEER).to_bytes())
    dht.store(keys.state_donors_key(PREFIX), 7, now + 30, subkey=PeerID.from_base58(PEER).to_bytes())
    return {name_of(key): record for key, record in dht.records}


def name_of(key: str) -> str:
    """The protocol.keys function (or constant) that made ``key``."""
    for name, make in inspect.getmembers(keys, inspect.isfunction):
        for args in ((RUN,), (RUN, 3), (PREFIX,), (PREFIX, 3), (PREFIX, 4, key.rsplit(".", 1)[-1])):
            try:
                if make(*args) == key:
                    return name
            except TypeError:
                continue
    assert key == keys.RUNS_KEY, key
    return "RUNS_KEY"


def test_every_key_the_run_writes_has_a_rule_and_the_run_s_records_fit_it():
    written = written_by_the_run()
    every_key = {name for name, _ in inspect.getmembers(keys, inspect.isfunction) if name.endswith("_key")}
    assert set(written) == every_key - {"averaging_prefix"} | {"RUNS_KEY"}
    for name, record in written.items():
        assert RULES.refusal(record) is None, name


def test_every_round_s_matchmaking_key_has_the_rule_and_no_other_group_key_does():
    now, peer_bytes = time.time(), PeerID.from_base58(PEER).to_bytes()
    for round_ in (0, 1, 255, 256, 10_000):
        assert RULES.refusal(as_record(keys.matchmaking_key(PREFIX, round_), True, now + 5, subkey=peer_bytes)) is None
    for bits in ("", "0", "1" * (keys.ROUND_KEY_BITS + 1)):
        assert "no rule" in RULES.refusal(as_record(f"{PREFIX}.0b{bits}", True, now + 5, subkey=peer_bytes))


def test_a_key_no_rule_claims_is_refused():
    now = time.time()
    assert "no rule" in RULES.refusal(as_record("greeting", "hi", now + 60))
    assert "no rule" in RULES.refusal(as_record("greeting", "hi", now + 60, subkey=PEER))
    assert "no rule" in RULES.refusal(as_record("greeting", signed("banner", 0, b"x"), now + 60))
    other_run = signed("contribution", 3, swarm_pb2.Contribution(peer_id=PEER), run_id="elsewhere")
    assert "no rule" in RULES.refusal(as_record(keys.contributions_key("elsewhere", 3), other_run, now + 60,
                                                subkey=PEER))


def poisoned(now: float) -> dict[str, list[DHTRecord]]:
    """Per key: records an admitted peer could store to bury, fake or overflow the real ones."""
    p = PEER
    progress, contributions = keys.progress_key(RUN), keys.contributions_key(RUN, 3)
    RULES.book.add(token())  # this DHT node has met PEER: it knows the key PEER signs with
    stranger = new_identity().peer_id  # a peer id whose token this node has never seen
    forged = progress_record(SigningKey(), RUN, Progress(4, DIGEST))
    honest = progress_record(PEER_KEY, RUN, Progress(4, DIGEST))
    agreement, other_group = group_key(PREFIX, 4, ["a", "b"]), group_key(PREFIX, 5, ["a", "b"])
    peer_bytes = PeerID.from_base58(PEER).to_bytes()
    return {
        "progress": [
            as_record(progress, {"round": 4}, now + 60, subkey=p),  # the malformed value that once stopped every node
            as_record(progress, {"round": 4, "digest": DIGEST}, now + 60, subkey=p),  # unsigned
            as_record(progress, forged, now + 60, subkey=p),  # signed by another key than p's token binds
            as_record(progress, honest, now + 60),  # plain: would replace every peer's
            as_record(progress, honest, now + 3600, subkey=p),  # outlives every refresh
            as_record(progress, progress_record(PEER_KEY, RUN, Progress(4, "x" * 5000)), now + 60, subkey=p),
            as_record(progress, progress_record(PEER_KEY, "elsewhere", Progress(4, DIGEST)), now + 60, subkey=p),
            as_record(progress, honest, now + 60, subkey="not-a-peer"),
            as_record(progress, progress_record(SigningKey(), RUN, Progress(4, DIGEST)), now + 60, subkey=stranger),
            as_record(progress, honest, now + 60, subkey=peer_bytes),
        ],
        "contributions": [
            as_record(contributions, contribution(peer_id=OTHER), now + 60, subkey=p),  # someone else's, under p
            as_record(contributions, contribution(key=SigningKey()), now + 60, subkey=p),  # not signed by p's key
            as_record(contributions, contribution(round_=4), now + 60, subkey=p),  # round 4's under round 3's key
            as_record(contributions, flip_last_byte(contribution()), now + 60, subkey=p),  # a broken signature
            as_record(contributions, contribution(), now + 3600, subkey=p),
            as_record(contributions, contribution(), now + 60),
            as_record(contributions, signed("contribution", 3, swarm_pb2.Contribution(peer_id=p),
                                            timestamp=now + 3600), now + 3600, subkey=p),  # signed in the future
            as_record(contributions, signed("verdict", 3, swarm_pb2.Verdict(peer_id=p, round=3)), now + 60,
                      subkey=p),
        ],
        "verdicts": [
            as_record(keys.verdicts_key(RUN, 3), verdict(peer_id=OTHER), now + 60, subkey=f"{OTHER}/{p}"),
            as_record(keys.verdicts_key(RUN, 3), verdict(), now + 60, subkey=f"nobody/{p}"),
            as_record(keys.verdicts_key(RUN, 3), verdict(), now + 7300, subkey=f"{OTHER}/{p}"),
        ],
        "agreement": [
            as_record(agreement, [agreement, DIGEST], now + 60, subkey=p),  # unsigned
            as_record(agreement, agreement_record(PEER_KEY, RUN, agreement, 4, "0"), now + 60, subkey=p),
            as_record(agreement, agreement_record(PEER_KEY, RUN, other_group, 5, DIGEST), now + 60, subkey=p),
            as_record(agreement, agreement_record(PEER_KEY, RUN, other_group, 4, DIGEST), now + 60, subkey=p),
            as_record(agreement, agreement_record(SigningKey(), RUN, agreement, 4, DIGEST), now + 60, subkey=p),
            as_record(agreement, agreement_record(PEER_KEY, RUN, agreement, 4, DIGEST), now + 600, subkey=p),
            as_record(agreement, agreement_record(PEER_KEY, RUN, agreement, 4, DIGEST), now + 60),
            as_record(agreement, agreement_record(PEER_KEY, RUN, agreement.replace(PREFIX, "other-grads"), 4, DIGEST),
                      now + 60, subkey=p),
        ],
        "runs": [
            as_record(keys.RUNS_KEY, signed("run", 0, swarm_pb2.RunAnnouncement()), now + 60, subkey=RUN),
            as_record(keys.RUNS_KEY, signed("run", 0, swarm_pb2.RunAnnouncement(), key=COORDINATOR, run_id="x"),
                      now + 60, subkey="x"),
            as_record(keys.RUNS_KEY, b"not a record", now + 60, subkey=RUN),
        ],
        "tokens": [
            as_record(keys.tokens_key(RUN), token(signer=SigningKey()).SerializeToString(), now + 60, subkey=p),
            as_record(keys.tokens_key(RUN), token(peer_id=OTHER).SerializeToString(), now + 60, subkey=p),
            as_record(keys.tokens_key(RUN), token().SerializeToString(), now + 600, subkey=p),
            as_record(keys.tokens_key(RUN), "text", now + 60, subkey=p),
        ],
        "bans": [
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(peer_ids=[p], parts=1)), now + 60,
                      subkey=0),  # not the coordinator's
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(parts=1), key=COORDINATOR,
                                                 timestamp=now - 60), now + keys.BANS_LIFETIME, subkey=0),
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(parts=1), key=COORDINATOR), now + 60,
                      subkey=p),
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(part=1, parts=2), key=COORDINATOR),
                      now + 60, subkey=0),  # another part's subkey
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(parts=1), key=COORDINATOR), now + 60,
                      subkey=False),  # a bool, not the index 0
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(part=0, parts=0), key=COORDINATOR),
                      now + 60, subkey=0),
            as_record(keys.bans_key(RUN), signed("bans", 0, swarm_pb2.BanList(parts=1), key=COORDINATOR),
                      now + 60),  # a plain value over every part
        ],
        "hivemind": [
            as_record(keys.matchmaking_key(PREFIX, 3), "yes", now + 5, subkey=peer_bytes),
            as_record(keys.matchmaking_key(PREFIX, 3), True, now + 5, subkey=b"\x00garbage"),
            as_record(keys.matchmaking_key(PREFIX, 3), True, now + 86400, subkey=peer_bytes),
            as_record(keys.matchmaking_key(PREFIX, 3), True, now + 5),
            as_record(keys.state_donors_key(PREFIX), float("inf"), now + 30, subkey=peer_bytes),
            as_record(keys.state_donors_key(PREFIX), float("nan"), now + 30, subkey=peer_bytes),
            as_record(keys.state_donors_key(PREFIX), True, now + 30, subkey=peer_bytes),
            as_record(keys.state_donors_key(PREFIX), 7, now + 30, subkey=PEER),
        ],
    }


@pytest.mark.parametrize("key", ["progress", "contributions", "verdicts", "agreement", "runs", "tokens", "bans",
                                 "hivemind"])
def test_each_key_refuses_its_poisoned_records(key):
    for i, record in enumerate(poisoned(time.time())[key]):
        assert RULES.refusal(record) is not None, (key, i)
        assert RULES.validate(record) is False


def test_random_bytes_values_and_subkeys_are_refused_and_never_raise():
    """A seeded fuzz of what a DHT node can be handed under each of the run's keys."""
    rng = random.Random(0)
    written = written_by_the_run()

    def junk():
        return rng.choice([
            None, True, rng.randint(-2**63, 2**63 - 1), rng.random(), float("nan"), "", "x" * rng.randint(1, 20000),
            rng.randbytes(rng.randint(0, 64)), rng.randbytes(20000), [rng.random()], {"round": rng.randint(-5, 5)},
            {"round": 1, "digest": DIGEST, "x": 1}, [keys.progress_key(RUN), DIGEST], (1, 2), {1: 2},
        ])

    for name, good in written.items():
        for _ in range(150):
            fields = {"value": good.value, "subkey": good.subkey, "expiration_time": good.expiration_time}
            changes = rng.sample(sorted(fields), rng.randint(1, 3))
            for changed in changes:
                if changed == "expiration_time":
                    fields[changed] = rng.choice([time.time() + 1e6, float("inf"), float("nan")])
                elif rng.random() < 0.2:  # bytes that are not msgpack at all, or truncated
                    fields[changed] = rng.choice([rng.randbytes(rng.randint(0, 40)), fields[changed][:-1]])
                else:
                    fields[changed] = MSGPackSerializer.dumps(junk())
            record = DHTRecord(good.key, fields["subkey"], fields["value"], fields["expiration_time"])
            accepted = RULES.validate(record)  # never raises, whatever the bytes
            if record != good and not could_be_honest(name, changes, record):
                assert accepted is False, (name, record)


def could_be_honest(name: str, changes: list[str], record: DHTRecord) -> bool:
    """A new value that is still well-formed: hivemind's flags and priorities are any bool or number."""
    if changes != ["value"] or name not in ("matchmaking_key", "state_donors_key"):
        return False
    try:
        return isinstance(MSGPackSerializer.loads(record.value), (bool, int, float))
    except Exception:
        return False
