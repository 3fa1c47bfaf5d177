"""Checkpoints: exact round trip, and a corrupt one is refused without touching the model."""

import pytest
import torch

from node.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from protocol.digest import model_digest


def make_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, optimizer = make_model(0)
    path = save_checkpoint(tmp_path, 7, model, optimizer, {"run": {"id": "x"}})
    assert latest_checkpoint(tmp_path) == path and read_checkpoint(path).round == 7

    other, other_opt = make_model(1)
    assert model_digest(other) != model_digest(model)
    checkpoint = load_checkpoint(path, other, other_opt)
    assert checkpoint.config == {"run": {"id": "x"}}
    assert model_digest(other) == model_digest(model)
    for a, b in zip(optimizer.state.values(), other_opt.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_latest_picks_the_highest_round(tmp_path):
    model, optimizer = make_model(0)
    for round_ in (5, 20, 10):
        save_checkpoint(tmp_path, round_, model, optimizer, {})
    assert latest_checkpoint(tmp_path).name == "round-000020"
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.joinpath("model.safetensors").write_bytes(b"garbage"), "model.safetensors is corrupt"),
    (lambda p: p.joinpath("model.safetensors").unlink(), "missing model.safetensors"),
    (lambda p: p.joinpath("manifest.json").write_text("{not json"), "unreadable manifest"),
    (lambda p: p.joinpath("optimizer.safetensors").write_bytes(b"x" * 10), "optimizer.safetensors is corrupt"),
])
def test_corrupt_checkpoint_is_refused_and_model_untouched(tmp_path, damage, message):
    model, optimizer = make_model(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    damage(path)
    victim, victim_opt = make_model(1)
    before = model_digest(victim)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, victim, victim_opt)
    assert model_digest(victim) == before


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    model, optimizer = make_model(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path, torch.nn.Linear(4, 2))
