"""Agreement digests are signed records (node/swarm/agreement.py): in an admitted run a member's digest counts
only if signed by the key its token binds, so no member can fail a round in another member's name."""

from types import SimpleNamespace

from node.swarm.agreement import AgreementSigner, agree, agreement_record, group_key
from protocol.identity import SigningKey

RUN, DIGEST, OTHER = "agree-test", "ab" * 32, "cd" * 32
KEY = group_key("agree-test-grads", 2, ["a:1", "b:2"])
BOB, MALLORY = SigningKey(), SigningKey()


class AgreementDHT:
    """Holds what members published under one agreement key; ``store`` adds this member's record."""

    def __init__(self, published: dict):
        self.published = dict(published)

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        assert key == KEY
        self.published[subkey] = value

    def get(self, key, latest=False, return_future=False):
        found = SimpleNamespace(value={m: SimpleNamespace(value=v) for m, v in self.published.items()})
        return SimpleNamespace(result=lambda timeout=None: found)


def agreement(published: dict, key_of=None) -> str | None:
    keys = {"me": SigningKey(), "bob": BOB}
    signer = AgreementSigner(keys["me"], RUN, key_of and (lambda peer: {**key_of, "me": keys["me"].public_key}[peer]))
    return agree(AgreementDHT(published), KEY, 2, "me", ["me", "bob"], DIGEST, timeout=0.3, signer=signer)


def test_members_agree_on_signed_digests_of_their_group():
    assert agreement({"bob": agreement_record(BOB, RUN, KEY, 2, DIGEST)}) is None
    assert agreement({"bob": agreement_record(BOB, RUN, KEY, 2, DIGEST)}, {"bob": BOB.public_key}) is None
    assert "differs from bob" in agreement({"bob": agreement_record(BOB, RUN, KEY, 2, OTHER)})
    assert "no digest" in agreement({})


def test_a_digest_in_another_member_s_name_or_of_another_group_counts_against_the_round_not_for_it():
    forged = agreement_record(MALLORY, RUN, KEY, 2, DIGEST)
    assert "differs from bob" in agreement({"bob": forged}, {"bob": BOB.public_key})
    elsewhere = agreement_record(BOB, RUN, group_key("agree-test-grads", 2, ["c:3"]), 2, DIGEST)
    assert "differs from bob" in agreement({"bob": elsewhere})
    assert "differs from bob" in agreement({"bob": [KEY, DIGEST]})  # unsigned
