"""Every parser of what another peer sends, fuzzed with a seeded generator: mutated, truncated, extended and
random bytes, wrong types and boundary values. A parser may accept an input or refuse it with its own error
(a ValueError subclass that callers catch and log); any other exception would crash or hang the honest
peer that read it. DHT records are fuzzed in test_run_records.py."""

import math
import random

import pytest
import torch
from safetensors.torch import save

from node.peer.announce import publish_run, read_announcement
from node.swarm.admission import read_token
from node.swarm.agreement import agreement_record, read_agreement
from node.swarm.ban_list import read_ban_part
from node.swarm.gather import RoundGather
from node.swarm.progress import Progress, progress_record, read_progress
from node.train.state import StateError, check_served_state
from protocol import swarm_pb2
from protocol.bundle import BUNDLE_FORMAT, BUNDLE_TENSORS, BundleError, read_bundle
from protocol.config import ConfigError, RunConfig
from protocol.identity import SigningKey
from protocol.records import RecordError, sign_record
from protocol.sketch import SKETCH_DIM
from protocol.tokens import TokenError, issue_token

RUN, COORDINATOR, KEY = "fuzzed", SigningKey(), SigningKey()
CASES_PER_PARSER = 400


def mutations(rng: random.Random, valid: bytes, count: int):
    """``count`` inputs near ``valid``: bit flips, cuts, splices, repeats, random bytes and other types."""
    for _ in range(count):
        kind = rng.randrange(8)
        data = bytearray(valid)
        if kind == 0 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del data[rng.randrange(len(data) + 1):]
        elif kind == 2:
            data[rng.randrange(len(data) + 1):rng.randrange(len(data) + 1)] = rng.randbytes(rng.randint(0, 64))
        elif kind == 3:
            data = data * rng.randint(2, 4)
        elif kind == 4:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
        elif kind == 5 and data:
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        elif kind == 6:
            yield rng.choice([None, 0, -1, 2**70, 1.5, math.nan, "", "text", [], [1, 2], {}, {"round": 1}, True])
            continue
        yield bytes(data)


def assert_parses_or_refuses(parse, valid, errors, seed):
    """``parse`` accepts ``valid`` and, on every mutation, returns or raises one of ``errors``."""
    parse(valid)
    rng = random.Random(seed)
    for data in mutations(rng, valid, CASES_PER_PARSER):
        try:
            parse(data)
        except errors:
            pass
        except Exception as e:  # noqa: BLE001 - the test is that nothing else escapes
            pytest.fail(f"{parse.__name__} raised {type(e).__name__}: {e} on {data!r:.200}")


def token_bytes() -> bytes:
    return issue_token(COORDINATOR, peer_id="QmPeer", public_key=KEY.public_key, p2p_public_key=b"p2p", run_id=RUN,
                       role="trainer", lifetime=60).SerializeToString()


def ban_list_bytes() -> bytes:
    return sign_record(COORDINATOR, "bans", RUN, 0, swarm_pb2.BanList(peer_ids=["a"], parts=1)).SerializeToString()


def announcement_bytes() -> bytes:
    class Recorder:
        def store(self, key, value, expiration_time, subkey=None, return_future=False):
            self.value = value

    recorder = Recorder()
    publish_run(recorder, RunConfig().updated(run={"id": RUN}), COORDINATOR, coordinator_address="127.0.0.1:9")
    return recorder.value


def bundle_bytes() -> bytes:
    rows, prompt, columns = 4, 3, 5
    tensors = {"question_ids": torch.tensor([0, 1]), "prompt_ids": torch.ones(rows, prompt, dtype=torch.int64),
               "prompt_mask": torch.ones(rows, prompt, dtype=torch.int64),
               "completion_ids": torch.ones(rows, columns, dtype=torch.int64),
               "completion_mask": torch.ones(rows, columns, dtype=torch.int64),
               "sampling_logps": -torch.ones(rows, columns), "truncated": torch.zeros(rows, dtype=torch.bool),
               "rewards": torch.ones(rows), "unit_sketches": torch.zeros(2, SKETCH_DIM, dtype=torch.float64)}
    assert set(tensors) == set(BUNDLE_TENSORS)
    return save(tensors, metadata={"format": BUNDLE_FORMAT, "round": "3", "peer_id": "QmPeer"})


PARSERS = {
    "signed progress": (lambda d: read_progress(d, RUN), lambda: progress_record(KEY, RUN, Progress(3, "ab" * 32)),
                        RecordError),
    "agreement digest": (lambda d: read_agreement(d, RUN),
                         lambda: agreement_record(KEY, RUN, "fuzzed-grads.digests.r3.0123456789abcdef", 3, "ab" * 32),
                         RecordError),
    "access token": (lambda d: read_token(d, COORDINATOR.public_key, RUN, "QmPeer"), token_bytes, TokenError),
    "ban list part": (lambda d: read_ban_part(d, 0, COORDINATOR.public_key, RUN), ban_list_bytes, RecordError),
    "run announcement": (lambda d: read_announcement(RUN, d), announcement_bytes, (RecordError, ConfigError)),
    "rollout bundle": (read_bundle, bundle_bytes, BundleError),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_a_parser_refuses_what_it_cannot_read_with_its_own_error(name):
    parse, make_valid, errors = PARSERS[name]
    assert_parses_or_refuses(parse, make_valid(), errors, seed=sorted(PARSERS).index(name))


def test_a_round_gather_from_the_wire_is_read_or_refused():
    rng = random.Random(7)
    RoundGather.from_wire(RoundGather.new(3).to_wire())
    values = [None, 3, -1, 2**64, True, "3", b"\x00" * 8, math.inf]
    for _ in range(CASES_PER_PARSER):
        candidate = rng.choice([
            [rng.choice(values), rng.choice(values)],
            [rng.choice(values), rng.randbytes(rng.randint(0, 12))],
            tuple(rng.choice(values) for _ in range(rng.randint(0, 4))),
            {"round": rng.choice(values)},
            rng.choice(values),
        ])
        try:
            RoundGather.from_wire(candidate)
        except ValueError:
            pass


def test_a_served_state_is_checked_or_refused_whatever_its_structure():
    """A donor controls the metadata and the tensors of a state: every structure it can send is refused with a
    StateError, before a value changes."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    params = list(model.parameters())
    state = optimizer.state_dict()
    keys = [f"{i}.{name}" for i in state["state"] for name in sorted(state["state"][i])]
    tensors = [p.detach().clone() for p in params] + [state["state"][int(k.split(".")[0])][k.split(".")[1]]
                                                      for k in keys]
    metadata = {"round": 4, "optimizer_keys": keys, "param_groups": state["param_groups"]}
    before = [p.detach().clone() for p in params]
    assert check_served_state(params, optimizer, metadata, tensors).round == 4
    rng = random.Random(11)
    junk = [None, -1, 2**70, "x", [], {}, math.nan, torch.zeros(0), torch.zeros(2, 3, dtype=torch.float64),
            torch.full((2, 3), math.inf), torch.zeros(2), torch.zeros(()), ["0.exp_avg"] * 2, "0.step", b"\x00"]
    for _ in range(CASES_PER_PARSER):
        bad_metadata, bad_tensors = dict(metadata), list(tensors)
        for _ in range(rng.randint(1, 3)):
            target = rng.randrange(3) if bad_tensors else 0
            if target == 0:
                bad_metadata[rng.choice(["round", "optimizer_keys", "param_groups"])] = rng.choice(junk)
            elif target == 1:
                bad_tensors[rng.randrange(len(bad_tensors))] = rng.choice(junk)
            else:
                del bad_tensors[rng.randrange(len(bad_tensors)):]
        try:
            check_served_state(params, optimizer, bad_metadata, bad_tensors)
        except StateError:
            pass
        except Exception as e:  # noqa: BLE001 - the test is that nothing else escapes
            pytest.fail(f"check_served_state raised {type(e).__name__}: {e}")
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_the_fuzzer_would_notice_a_parser_that_crashes():
    def fragile(data):
        return data[0]  # IndexError on b"", TypeError on None

    with pytest.raises(pytest.fail.Exception, match="fragile raised"):
        assert_parses_or_refuses(fragile, b"abc", ValueError, seed=0)
