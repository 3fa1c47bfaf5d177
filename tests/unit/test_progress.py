"""Progress records are signed, each identity has one voice, and a state is trusted only at the position more
than half of the live identities published (node/swarm/progress.py)."""

import time
from types import SimpleNamespace

from node.swarm.progress import Progress, majority_position, progress_record, published_progress, read_progress
from protocol.identity import SigningKey
from protocol.records import RecordError, sign_record

RUN, DIGEST, OTHER_DIGEST = "progress-test", "ab" * 32, "cd" * 32


def test_a_progress_record_is_read_strictly():
    key = SigningKey()
    assert read_progress(progress_record(key, RUN, Progress(3, DIGEST)), RUN) == (key.public_key, Progress(3, DIGEST))
    now = time.time()
    bad = {
        "unsigned dict": {"round": 3, "digest": DIGEST},
        "not a record": b"\x00junk",
        "another run": progress_record(key, "elsewhere", Progress(3, DIGEST)),
        "another kind": sign_record(key, "verdict", RUN, 3, DIGEST.encode()).SerializeToString(),
        "stale": signed_at(key, now - 600),
        "from the future": signed_at(key, now + 600),
        "negative round": progress_record(key, RUN, Progress(-1, DIGEST)),
        "short digest": progress_record(key, RUN, Progress(3, "ab")),
        "not hex": progress_record(key, RUN, Progress(3, "zz" * 32)),
        "broken signature": flipped_last_byte(progress_record(key, RUN, Progress(3, DIGEST))),
    }
    assert [name for name, value in bad.items() if not refused(value)] == []


def signed_at(key, timestamp):
    return sign_record(key, "progress", RUN, 3, DIGEST.encode(), timestamp=timestamp).SerializeToString()


def flipped_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 1])


def refused(value) -> bool:
    try:
        read_progress(value, RUN)
    except RecordError:
        return True
    return False


class ProgressDHT:
    """A DHT that holds one progress dictionary, as dht_get reads it."""

    def __init__(self, entries: dict):
        self.value = {peer: SimpleNamespace(value=value) for peer, value in entries.items()}

    def get(self, key, latest=False, return_future=False):
        found = SimpleNamespace(value=self.value)
        return SimpleNamespace(result=lambda timeout=None: found) if return_future else found


def test_each_admitted_identity_has_one_voice():
    """A record counts only under the peer whose token binds its key: no peer speaks for another."""
    alice, bob, mallory = SigningKey(), SigningKey(), SigningKey()
    keys = {"alice": alice.public_key, "bob": bob.public_key, "mallory": mallory.public_key}
    dht = ProgressDHT({
        "alice": progress_record(alice, RUN, Progress(5, DIGEST)),
        "bob": progress_record(mallory, RUN, Progress(9, OTHER_DIGEST)),  # mallory's vote under bob's name
        "carol": progress_record(mallory, RUN, Progress(9, OTHER_DIGEST)),  # a name with no token
        "mallory": {"round": 9, "digest": OTHER_DIGEST},  # unsigned
    })
    assert published_progress(dht, RUN, keys.get) == {"alice": Progress(5, DIGEST)}
    assert set(published_progress(dht, RUN)) == {"alice", "bob", "carol"}  # an open swarm binds no key


def test_only_a_majority_of_identities_makes_a_position():
    honest, ahead = Progress(10, DIGEST), Progress(11, OTHER_DIGEST)
    assert majority_position({"a": honest, "b": honest, "c": honest, "m": ahead}) == honest
    assert majority_position({"a": honest, "m": ahead}) is None  # a claim alone is no reason to trust
    assert majority_position({"a": honest, "b": honest, "m1": ahead, "m2": ahead}) is None
    assert majority_position({"a": honest}) == honest
    assert majority_position({}) is None
