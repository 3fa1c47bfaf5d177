"""``grpo-swarm bench trust``: the numbers behind ``trust.binding_tolerance`` and ``trust.clip_factor``.

Each all-reduce here is node/swarm/hivemind/offline.py's (the real reducer, no network), so full-size gradients
are measured in seconds, on real GRPO gradients of the run's model (the tiny preset after its warm
start, by default):

- binding: relative error between the sum of the reducers' part sketches of a sender (float32, as
  PartSketch carries them) and the sender's own sketch (float32, as Contribution carries it), per
  compression, on the real gradients and on a larger vector resampled from their values;
- bounding: how far one bad sender moves the average, ||avg - clean|| / ||clean|| (clean: the same
  round with the bad sender sending its true gradient), with clipping off and on, and
  ||avg - h|| / ||h|| (h: the honest senders' mean) next to the bound of node/swarm/clipping.py.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from node.swarm.hivemind.codecs import COMPRESSIONS
from node.swarm.hivemind.offline import simulate_allreduce
from node.swarm.hivemind.reducer import ReduceRules
from node.train.learner import Learner
from node.train.shard import shard_batch
from node.train.warm_start import warm_started_policy
from protocol.config import ConfigError, RunConfig
from protocol.sketch import relative_error, sketch_tensors
from protocol.tasks import load_task

SEED = 20240601
ATTACKS = ("x100", "-x100", "huge random")
CLIP_FACTORS = (0.0, 1.0, 2.0, 4.0)


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
    h = sum(w * flat(x) for w, x in zip(honest_weights, honest, strict=True)) / sum(honest_weights)
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


def run_gradients(config: RunConfig, peers: int) -> list[tuple[list[torch.Tensor], float]]:
    """(gradient tensors, weight) of ``peers`` peers in round 0 of the run's model and task."""
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


def run_trust_bench(config: RunConfig, peers: int, large_size: int, console: Optional[Console] = None) -> dict:
    if peers < 3 or large_size < 1:
        raise ConfigError("need --peers >= 3 (two honest senders and a bad one) and --large-size >= 1")
    console = console or Console()
    gradients = run_gradients(config, peers)
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
