"""Compression round trips through hivemind's own decoder, and an 8-bit all-reduce that really averages."""

import warnings

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from node.swarm.hivemind.codecs import COMPRESSIONS, make_compression
from tests.system.swarm.peer_worker import input_seed, make_tensors
from tests.system.swarm.rounds import SHAPES, WEIGHTS, run_agreed_round, saved, start_three, weighted_mean

# 8-bit buckets span the tensor's spread, so their error is bounded relative to its std (rms error / std)
RMS_BOUNDS_8BIT = {"uniform8bit": 0.03, "quantile8bit": 0.05}


def close_enough(name, tensor, decoded):
    error = (decoded - tensor).abs()
    if name == "none":
        return torch.equal(decoded, tensor)
    if name == "fp16":
        return bool((error <= 1e-3 * tensor.abs()).all())
    return error.pow(2).mean().sqrt() <= RMS_BOUNDS_8BIT[name] * tensor.std(correction=0)


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "gaussian": torch.randn(100_000, generator=generator),
        "shifted": 5 + 1e-3 * torch.randn(4096, generator=generator),
        "matrix": torch.randn(64, 48, generator=generator),
        "constant": torch.full((1000,), 0.25),
        "scalar": torch.tensor([3.0]),
    }


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_round_trip_is_close(name):
    for label, tensor in sample_tensors().items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated numpy / torch path that a later version breaks
            encoded = make_compression(name).compress(tensor, CompressionInfo.from_tensor(tensor))
            decoded = deserialize_torch_tensor(encoded)  # the decoder a receiving peer uses
        assert decoded.shape == tensor.shape and decoded.dtype == tensor.dtype, label
        assert close_enough(name, tensor, decoded), (label, (decoded - tensor).abs().max())


def test_unknown_compression_is_rejected():
    with pytest.raises(ValueError, match="uniform8bit"):
        make_compression("int4")


def test_uniform8bit_allreduce_averages(swarm):
    """If decoding failed, hivemind would keep each peer's own values; the result must be near the mean."""
    peers, ready = start_three(swarm, extra=("--compression", "uniform8bit", "--target-group-size", "3"))
    results = run_agreed_round(peers, 0, ready)
    assert all(result["ok"] for result in results), [result["reason"] for result in results]
    assert len({result["digest"] for result in results}) == 1
    truth = weighted_mean(0, WEIGHTS)
    for rank in WEIGHTS:
        local = make_tensors(input_seed(rank, 0), SHAPES)
        for averaged, own, exact in zip(saved(swarm, rank, 0), local, truth, strict=True):
            error = (averaged - exact).pow(2).mean().sqrt()
            assert error <= 0.05 * (own - exact).pow(2).mean().sqrt(), (rank, error)
