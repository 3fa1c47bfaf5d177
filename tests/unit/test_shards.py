import hashlib
import struct

import pytest

from protocol.shards import DOMAIN, question_ids


def test_deterministic_and_in_range():
    ids = question_ids(7, 3, "QmPeer", 50, 123)
    assert ids == question_ids(7, 3, "QmPeer", 50, 123)
    assert len(ids) == 50 and all(0 <= i < 123 for i in ids)
    assert question_ids(7, 3, "QmPeer", 0, 123) == []


def test_pinned_values():
    # Computed once from the documented encoding: a change here breaks every verifier.
    assert question_ids(0, 0, "QmPeerA", 8, 1000) == [533, 217, 729, 908, 429, 239, 141, 575]
    assert question_ids(42, 7, "QmPeerB", 5, 7473) == [4931, 7259, 566, 2290, 2111]
    assert question_ids(-1, 3, "p", 4, 2**40) == [82811627858, 20552188374, 403387600502, 542960729011]


def test_matches_documented_encoding():
    run_seed, round_, peer, i = -5, 11, "QmPéer", 2
    message = (struct.pack(">I", len(DOMAIN)) + DOMAIN + struct.pack(">qQ", run_seed, round_)
               + struct.pack(">I", len(peer.encode())) + peer.encode() + struct.pack(">Q", i))
    expected = int.from_bytes(hashlib.sha256(message).digest(), "big") % 1_000_003
    assert question_ids(run_seed, round_, peer, 3, 1_000_003)[i] == expected


def test_inputs_change_the_shard():
    base = question_ids(1, 5, "QmPeerA", 16, 10_000)
    assert question_ids(1, 5, "QmPeerB", 16, 10_000) != base
    assert question_ids(1, 6, "QmPeerA", 16, 10_000) != base
    assert question_ids(2, 5, "QmPeerA", 16, 10_000) != base
    # Length prefixes: moving bytes between peer id and the rest must not collide.
    assert question_ids(1, 5, "QmPeerA\x00", 16, 10_000) != base


def test_roughly_uniform():
    bins, n = 10, 20_000
    counts = [0] * bins
    for peer in ("a", "b", "c", "d"):
        for i in question_ids(3, 9, peer, n // 4, bins):
            counts[i] += 1
    expected = n / bins
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 40, counts  # 9 degrees of freedom: p(chi2 > 27.9) = 0.001


@pytest.mark.parametrize("kwargs", [
    dict(count=-1), dict(dataset_size=0), dict(dataset_size=-3),
    dict(round_=-1), dict(run_seed=2**63), dict(round_=2**64),
])
def test_bad_inputs(kwargs):
    args = dict(run_seed=0, round_=0, peer_id="p", count=4, dataset_size=10) | kwargs
    with pytest.raises(ValueError):
        question_ids(**args)
