"""Checkpoints from peers' state and their export: a served state loads all or nothing; the coordinator's
checkpointer takes the state from a real peer process over the DHT; ``grpo-swarm export`` writes a folder
that transformers loads with the same logits, and refuses a corrupt checkpoint whole."""

import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.checkpoints import Checkpointer, due_round
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.progress import published_progress
from node.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from node.train.export import export_checkpoint
from node.train.models import load_policy
from node.train.state import StateError, check_served_state, load_served_state, optimizer_tensors, served_state
from protocol.config import load_config
from protocol.digest import model_digest
from tests.command import grpo_swarm
from tests.system.control_plane.state_server import trained_learner
from tests.system.swarm.conftest import Peer
from tests.waiting import wait_for

STATE_SERVER = Path(__file__).with_name("state_server.py")
CONFIG = '[run]\nid = "ckpt-test"\nrounds = 12\n\n[warm_start]\nsteps = 0\n\n[checkpoint]\nevery = 5\n'


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def config(config_path):
    return load_config(config_path)


def state_of(learner, round_):
    return served_state(learner.params, learner.optimizer, round_)


def optimizer_snapshot(optimizer):
    tensors, groups = optimizer_tensors(optimizer)
    return {k: v.clone() for k, v in tensors.items()}, groups


def load(learner, metadata, tensors):
    return load_served_state(learner.params, learner.optimizer,
                             check_served_state(learner.params, learner.optimizer, metadata, tensors))


def test_served_state_loads_exactly(config):
    source, target = trained_learner(config, seed=1), trained_learner(config, seed=2)
    assert load(target, *state_of(source, 7)) == 7
    assert model_digest(target.policy.model) == model_digest(source.policy.model)
    loaded, groups = optimizer_snapshot(target.optimizer)
    expected, expected_groups = optimizer_snapshot(source.optimizer)
    assert groups == expected_groups and loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def damaged(case, metadata, tensors):
    metadata, tensors = dict(metadata), list(tensors)
    if case == "missing round":
        del metadata["round"]
    elif case == "negative round":
        metadata["round"] = -3
    elif case == "tensor missing":
        tensors.pop()
    elif case == "wrong shape":
        tensors[0] = torch.zeros(3, 3)
    elif case == "optimizer of another model":  # as many tensors, but the groups name one parameter fewer
        metadata["param_groups"] = [dict(metadata["param_groups"][0],
                                         params=metadata["param_groups"][0]["params"][:-1])]
    elif case == "optimizer key garbage":
        metadata["optimizer_keys"] = ["x.exp_avg"] + metadata["optimizer_keys"][1:]
    elif case == "another dtype":
        tensors[0] = tensors[0].double()
    elif case == "a NaN weight":
        tensors[0] = tensors[0].clone()
        tensors[0].view(-1)[0] = float("nan")
    elif case == "a zeroed learning rate":
        metadata["param_groups"] = [dict(group, lr=0.0) for group in metadata["param_groups"]]
    elif case in ("a negative second moment", "a moment of another shape", "an infinite moment"):
        index = metadata["optimizer_keys"].index("0.exp_avg_sq") + len(tensors) - len(metadata["optimizer_keys"])
        tensors[index] = {"a negative second moment": -tensors[index].abs() - 1,
                          "a moment of another shape": tensors[index].reshape(-1)[:-1],
                          "an infinite moment": tensors[index] + float("inf")}[case]
    return metadata, tensors


@pytest.mark.parametrize("case", ["missing round", "negative round", "tensor missing", "wrong shape",
                                  "optimizer of another model", "optimizer key garbage", "another dtype",
                                  "a NaN weight", "a zeroed learning rate", "a negative second moment",
                                  "a moment of another shape", "an infinite moment"])
def test_bad_served_state_changes_nothing(config, case):
    source, target = trained_learner(config, seed=1), trained_learner(config, seed=2)
    digest, (optimizer_before, groups_before) = model_digest(target.policy.model), optimizer_snapshot(target.optimizer)
    with pytest.raises(StateError):
        load(target, *damaged(case, *state_of(source, 7)))
    assert model_digest(target.policy.model) == digest
    optimizer_after, groups_after = optimizer_snapshot(target.optimizer)
    assert groups_after == groups_before and all(torch.equal(optimizer_after[k], v)
                                                 for k, v in optimizer_before.items())


def test_due_rounds(config):
    assert [due_round(r, config) for r in (0, 4, 5, 9, 10, 11)] == [5, 5, 10, 10, 12, 12]
    assert due_round(0, config.updated(checkpoint={"every": 0})) == 12


@pytest.fixture
def dht():
    """A DHT in this process, for checkpointers (whose averager start makes this process ignore Ctrl-C:
    the handler is put back after the test)."""
    interrupt = signal.getsignal(signal.SIGINT)
    dht = start_dht(DHTSettings(host_maddrs=[LOOPBACK]))
    try:
        yield dht
    finally:
        dht.shutdown()
        signal.signal(signal.SIGINT, interrupt)


@pytest.fixture
def state_servers(tmp_path):
    started = []

    def start(config_path, round_, initial_peers, *extra):
        peer = Peer(["--config", str(config_path), "--round", str(round_), "--initial-peers", *initial_peers, *extra],
                    tmp_path / f"state-server{len(started)}.log", script=STATE_SERVER)
        started.append(peer)
        return peer, peer.expect("ready", 120)

    try:
        yield start
    finally:
        for peer in started:
            peer.kill()


def keys_of(*ready_events):
    """key_of for a Checkpointer: the signing keys state servers published their progress with."""
    keys = {ready["peer_id"]: bytes.fromhex(ready["public_key"]) for ready in ready_events}
    return keys.get


def test_checkpointer_takes_the_state_peers_serve(config, config_path, dht, state_servers, tmp_path):
    _, ready = state_servers(config_path, 5, [str(m) for m in dht.get_visible_maddrs()])
    # peers reported running round 4: they hold round 5's state, and 5 is due (checkpoint.every = 5)
    checkpointer = Checkpointer(dht, config, tmp_path / "checkpoints", furthest_round=lambda: 4, key_of=keys_of(ready),
                                poll=0.2)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 120
        while checkpointer.last_saved < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        checkpointer.stop()
    saved = read_checkpoint(tmp_path / "checkpoints" / "round-000005")
    assert saved.round == 5 and saved.model_digest == ready["digest"] and saved.config == config.to_dict()
    restarted = Checkpointer(dht, config, tmp_path / "checkpoints", lambda: 5, key_of=keys_of(ready))
    restarted.stop()
    assert restarted.last_saved == 5  # a restarted coordinator goes on after its latest checkpoint


def test_checkpointer_takes_no_state_but_the_one_its_donor_published(config, config_path, dht, state_servers,
                                                                       tmp_path):
    """A donor that serves another model than its signed progress names, and progress signed by a key the
    coordinator does not know, are no state to save."""
    _, liar = state_servers(config_path, 5, [str(m) for m in dht.get_visible_maddrs()], "--lie")
    checkpointer = Checkpointer(dht, config, tmp_path / "checkpoints", furthest_round=lambda: 5, key_of=keys_of(liar))
    stranger = Checkpointer(dht, config, tmp_path / "checkpoints", furthest_round=lambda: 5, key_of=lambda peer: None)
    try:
        wait_for(lambda: published_progress(dht, config.run.id), 30, "the state server's progress", interval=0.2)
        assert checkpointer.take() is None and stranger.take() is None
    finally:
        checkpointer.stop()
        stranger.stop()
    assert not (tmp_path / "checkpoints").exists()


def logits(model, tokenizer):
    ids = tokenizer(["12+34=", "7+8="], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_export_loads_in_transformers_with_the_same_logits(config, tmp_path, lora_rank):
    config = config.updated(model={"lora_rank": lora_rank})
    learner = trained_learner(config, seed=3)  # with LoRA, the step moves the adapters off their zero init
    model = learner.policy.model
    path = save_checkpoint(tmp_path / "checkpoints", 5, model, learner.optimizer, config.to_dict())
    out = export_checkpoint(path, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name in exported.state_dict())
    expected = logits(model, learner.policy.tokenizer)
    if lora_rank:
        assert not torch.allclose(expected, logits(load_policy(config.model).model, tokenizer))  # adapters matter
        torch.testing.assert_close(logits(exported, tokenizer), expected, atol=1e-5, rtol=1e-5)  # merged
    else:
        assert torch.equal(logits(exported, tokenizer), expected)


def test_export_command_refuses_a_corrupt_checkpoint_and_writes_nothing(config, tmp_path):
    learner = trained_learner(config, seed=3)
    path = save_checkpoint(tmp_path / "checkpoints", 5, learner.policy.model, learner.optimizer, config.to_dict())
    good = grpo_swarm("export", str(path), "--out", str(tmp_path / "good"))
    assert good.returncode == 0 and (tmp_path / "good" / "config.json").exists(), good.stderr
    taken = grpo_swarm("export", str(path), "--out", str(tmp_path / "good"))
    assert taken.returncode == 2 and "exists and is not an empty folder" in taken.stderr

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = grpo_swarm("export", str(path), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint {path}: model.safetensors is corrupt " \
                                                     "(sha256 mismatch)"
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, learner.policy.model)
