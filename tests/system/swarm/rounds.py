"""Driving rounds among peer_worker peers and checking their results against the exact weighted mean."""

import torch

from tests.system.swarm.peer_worker import input_seed, make_tensors, parse_shapes

SHAPES = parse_shapes("1024x1024,1000,7")  # the worker's default: 4 MB of fp32 in 3 tensors
MARGIN = 10.0  # seconds for a result event to travel and for a loaded 2-core machine
WEIGHTS = {0: 10, 1: 25, 2: 40}  # token counts of ranks 0, 1, 2


def run_round(peers, round_, ready):
    """Ask every peer to average ``round_`` (or each its own, a list); return their results (each within the
    averager's bound)."""
    rounds = round_ if isinstance(round_, list) else [round_] * len(peers)
    for peer, its_round in zip(peers, rounds, strict=True):
        peer.send(f"average {its_round}")
    results = [peer.expect("result", ready["max_seconds"] + MARGIN) for peer in peers]
    for result in results:
        assert result["seconds"] <= ready["max_seconds"], result
        assert result["inputs_unchanged"], result
    return results



def run_agreed_round(peers, round_, ready, attempts=2):
    """``run_round`` until every peer reports ok, at most ``attempts`` times: a peer retries a failed round the
    same way (the inputs depend only on rank and round), and on a loaded 2-core machine hivemind's
    matchmaking now and then counts a member that timed out on its own side. A failure is printed."""
    for attempt in range(1, attempts + 1):
        results = run_round(peers, round_, ready)
        if all(result["ok"] for result in results) or attempt == attempts:
            return results
        print(f"round {round_} attempt {attempt} failed: {[(r['ok'], r['reason']) for r in results]}")


def weighted_mean(round_, weights):
    """The exact answer for peers {rank: weight} in ``round_``."""
    inputs = {rank: make_tensors(input_seed(rank, round_), SHAPES) for rank in weights}
    total = sum(weights.values())
    return [sum(weights[rank] * inputs[rank][i] for rank in weights) / total for i in range(len(SHAPES))]


def saved(swarm, rank, round_):
    return torch.load(swarm.directory / f"rank{rank}_round{round_}.pt")


def assert_all_agree_on_mean(swarm, results, round_, weights):
    assert all(result["ok"] for result in results), [(result["seconds"], result["reason"]) for result in results]
    assert {result["group_size"] for result in results} == {len(weights)}
    assert len({result["digest"] for result in results}) == 1
    truth = weighted_mean(round_, weights)
    for rank in weights:
        error = max((a - b).abs().max().item() for a, b in zip(saved(swarm, rank, round_), truth, strict=True))
        assert error <= 1e-5, f"rank {rank}: max abs error {error}"


def start_three(swarm, *victim_args, extra=()):
    """Ranks 0, 1, 2 with WEIGHTS; rank 2 also gets ``victim_args``, every rank gets ``extra``."""
    def args(rank):
        return ["--rank", str(rank), "--weight", str(WEIGHTS[rank]), *extra]

    first, ready = swarm.start(*args(0))
    others = swarm.start_joined(first, ready, args(1), [*args(2), *victim_args])
    return [first, *others], ready
