"""``grpo-swarm bench trust``: the numbers behind ``trust.binding_tolerance`` and ``trust.clip_factor``.

``simulate_allreduce`` is an all-reduce without the network: each reducer gets the parts hivemind's
TensorPartContainer assigns it, each sender's part compressed and decompressed as on the wire (a
reducer's own part is not, as in ExactAllReduceRunner), and reduces them with the real
CheckedPartReducer. So full-size gradients are measured in seconds, on real GRPO gradients of the run's
model (the tiny preset after its warm start, by default):

- binding: relative error between the sum of the reducers' part sketches of a sender (float32, as
  PartSketch carries them) and the sender's own sketch (float32, as Contribution carries it), per
  compression, on the real gradients and on a larger vector resampled from their values;
- bounding: how far one bad sender moves the average, ||avg - clean|| / ||clean|| (clean: the same
  round with the bad sender sending its true gradient), with clipping off and on, and
  ||avg - h|| / ||h|| (h: the honest senders' mean) next to robust.py's bound.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Optional, Sequence

import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from rich.console import Console
from rich.table import Table

from node.swarm.binding import part_offsets
from node.swarm.compression import COMPRESSIONS, make_compression
from node.swarm.reducer import CheckedPartReducer, ReduceRules
from protocol import swarm_pb2
from protocol.sketch import relative_error, sketch_tensors

SEED = 20240601
ATTACKS = ("x100", "-x100", "huge random")
CLIP_FACTORS = (0.0, 1.0, 2.0, 4.0)


def simulate_allreduce(
    senders: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    rules: ReduceRules,
    compression: str = "none",
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> tuple[torch.Tensor, list[dict[str, swarm_pb2.PartSketch]]]:
    """(the flat average, each reducer's {sender: PartSketch}) of one all-reduce in which every sender also
    reduces an equal share; sender i is named str(i)."""
    codec = make_compression(compression)
    peers = len(senders)
    names = [str(sender) for sender in range(peers)]
    split = [TensorPartContainer(tensors, (1.0,) * peers, compression=codec, part_size_bytes=part_size_bytes)
             for tensors in senders]
    parts = [[container.get_raw_input_parts(reducer) for reducer in range(peers)] for container in split]

    def on_the_wire(sender: int, reducer: int, part: torch.Tensor) -> torch.Tensor:
        if sender == reducer:
            return part
        return deserialize_torch_tensor(codec.compress(part, CompressionInfo.from_tensor(part)))

    async def reduce(reducer: int) -> tuple[list[torch.Tensor], dict[str, swarm_pb2.PartSketch]]:
        own = parts[reducer][reducer]
        checked = CheckedPartReducer(tuple(part.shape for part in own), peers, rules=rules,
                                     part_offsets=part_offsets(senders[reducer], own))

        async def send(sender: int) -> list[torch.Tensor]:
            return [await checked.accumulate_part(sender, index, on_the_wire(sender, reducer, part), weights[sender])
                    for index, part in enumerate(parts[sender][reducer])]

        averaged = await asyncio.gather(*(send(sender) for sender in range(peers)))
        return averaged[0], checked.received_sketches(names)

    async def reduce_all():
        return [await reduce(reducer) for reducer in range(peers)]

    results = asyncio.run(reduce_all())
    return torch.cat([part.reshape(-1) for averaged, _ in results for part in averaged]), [r for _, r in results]


def binding_errors(senders: Sequence[Sequence[torch.Tensor]], compression: str) -> list[float]:
    """Per sender: relative error of its reducers' summed part sketches against its own sketch."""
    weights = [1.0] * len(senders)
    _, reports = simulate_allreduce(senders, weights, ReduceRules(sketch_seed=SEED), compression)
    errors = []
    for sender, tensors in enumerate(senders):
        committed = sketch_tensors(tensors, SEED).float()  # a Contribution carries float32
        parts = [report[str(sender)] for report in reports if str(sender) in report]
        summed = sum(torch.tensor(part.sketch, dtype=torch.float64) for part in parts)
        errors.append(relative_error(summed, committed))
    return errors


def attacked(gradient: Sequence[torch.Tensor], attack: str, generator: torch.Generator) -> list[torch.Tensor]:
    if attack == "x100":
        return [100 * t for t in gradient]
    if attack == "-x100":
        return [-100 * t for t in gradient]
    scale = 1e4 * math.sqrt(sum(float(t.norm()) ** 2 for t in gradient) / sum(t.numel() for t in gradient))
    return [scale * torch.randn(t.shape, generator=generator) for t in gradient]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def bound_rows(honest: Sequence[Sequence[torch.Tensor]], honest_weights: Sequence[float],
               bad: Sequence[torch.Tensor], bad_weight: float) -> list[dict]:
    """The bad sender (last) against the honest ones, per attack and clip factor."""
    generator = torch.Generator().manual_seed(SEED)
    weights = [*honest_weights, bad_weight]
    h = sum(w * flat(x) for w, x in zip(honest_weights, honest)) / sum(honest_weights)
    share = bad_weight / sum(weights)
    honest_norm = math.sqrt(sum(float(flat(x).norm()) ** 2 for x in honest))
    exact, _ = simulate_allreduce([*honest, bad], weights, ReduceRules())
    rows = []
    for clip in CLIP_FACTORS:
        rules = ReduceRules(clip_factor=clip)
        clean, _ = simulate_allreduce([*honest, bad], weights, rules)
        for attack in ATTACKS:
            result, _ = simulate_allreduce([*honest, attacked(bad, attack, generator)], weights, rules)
            rows.append(dict(
                clip=clip, attack=attack, share=share,
                moved=float((result - clean).norm() / clean.norm()),
                from_honest=float((result - h).norm() / h.norm()),
                bound=share * (clip * honest_norm + float(h.norm())) / float(h.norm()) if clip else math.inf,
                clean_bias=float((clean - exact).norm() / exact.norm()),
            ))
    return rows


def run_gradients(peers: int, overrides: Sequence[str] = ()) -> list[tuple[list[torch.Tensor], float]]:
    """(gradient tensors, weight) of ``peers`` peers in round 0 of the run's model and task."""
    # imported here: the model stack (transformers) is slow to import and only the bench needs it
    from node.learner import Learner
    from node.solo import shard_batch
    from node.warm_start import warm_started_policy
    from protocol.config import load_config
    from protocol.tasks import load_task

    config = load_config(overrides=list(overrides))
    task = load_task(config.task.name, config.task.options)
    learner = Learner(warm_started_policy(config, task), config, task)
    gradients = []
    for peer in range(peers):
        gradient = learner.gradient(shard_batch(learner, config, task, 0, f"bench-peer-{peer}"))
        gradients.append(([t.detach().clone() for t in gradient.tensors], float(gradient.weight)))
    return gradients


def resampled(gradient: Sequence[torch.Tensor], size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A ``size``-long vector whose values are drawn from ``gradient``'s (so fp16 sees the same magnitudes)."""
    values = flat(gradient)
    picked = values[torch.randint(values.numel(), (size,), generator=generator)]
    return [picked * (torch.randint(0, 2, (size,), generator=generator) * 2 - 1)]


def run_bench(peers: int, large_size: int, overrides: Sequence[str] = (), console: Optional[Console] = None) -> dict:
    console = console or Console()
    gradients = run_gradients(peers, overrides)
    tensors = [g for g, _ in gradients]
    generator = torch.Generator().manual_seed(SEED)
    large = [resampled(g, large_size, generator) for g in tensors]
    binding = {name: {"real": binding_errors(tensors, name), "large": binding_errors(large, name)}
               for name in COMPRESSIONS}
    bounds = bound_rows(tensors[:-1], [w for _, w in gradients[:-1]], tensors[-1], gradients[-1][1])
    print_bench(binding, bounds, sum(t.numel() for t in tensors[0]), large_size, console)
    return dict(binding=binding, bounds=bounds)


def print_bench(binding: dict, bounds: list[dict], size: int, large_size: int, console: Console) -> None:
    table = Table(title="binding: relative error of summed part sketches vs the sender's sketch")
    for column in ("compression", f"real gradients ({size:,} values), max", f"resampled ({large_size:,} values), max"):
        table.add_column(column, justify="right")
    for name, errors in binding.items():
        table.add_row(name, f"{max(errors['real']):.2e}", f"{max(errors['large']):.2e}")
    console.print(table)
    table = Table(title="bounding: one bad sender among honest ones (real gradients, compression none)")
    for column in ("clip factor", "attack", "bad weight share", "||avg - clean|| / ||clean||",
                   "||avg - h|| / ||h||", "bound", "clean round vs exact mean"):
        table.add_column(column, justify="right")
    for row in bounds:
        table.add_row(f"{row['clip']:g}", row["attack"], f"{row['share']:.3f}", f"{row['moved']:.3g}",
                      f"{row['from_honest']:.3g}", f"{row['bound']:.3g}", f"{row['clean_bias']:.2e}")
    console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=4, help="senders (the last one plays the bad sender)")
    parser.add_argument("--large-size", type=int, default=20_000_000, help="values of the resampled vector")
    parser.add_argument("--override", action="append", default=[], help="run config override, e.g. rollout.group_size=8")


def run_from_args(args: argparse.Namespace) -> dict:
    if args.peers < 3 or args.large_size < 1:
        raise ValueError("need --peers >= 3 (two honest senders and a bad one) and --large-size >= 1")
    return run_bench(args.peers, args.large_size, args.override)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    torch.set_num_threads(1)
    run_from_args(parser.parse_args())
