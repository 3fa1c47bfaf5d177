"""GRPO rounds on one machine: the whole loop, with progress, metrics, plot and checkpoints.

Round ``r`` trains θ_r into θ_{r+1} on the peer's deterministic question shard for
``r``. The sampling generator is seeded from (seed, round, peer), so a resumed run
replays exactly the rounds it would have run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from node.progress_bars import loss_progress, progress_bar
from node.runlog import RunLog, plot_run
from node.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from node.train.evaluate import evaluate_and_log
from node.train.learner import Learner, batch_metrics
from node.train.models import load_policy
from node.train.shard import SOLO_PEER, shard_batch
from node.train.warm_start import warm_started_policy
from protocol.config import RunConfig
from protocol.tasks import load_task


@dataclass
class RunSummary:
    first_accuracy: float
    last_accuracy: float
    rounds: int
    seconds: float
    out_dir: Path


def train_solo(config: RunConfig, out_dir: str | Path, resume: bool = False,
               console: Console | None = None) -> RunSummary:
    console = console or Console()
    out_dir = Path(out_dir)
    log = RunLog(out_dir / "metrics.jsonl")
    task = load_task(config.task.name, config.task.options)
    checkpoints = out_dir / "checkpoints"
    start_time = time.time()

    resume_from = latest_checkpoint(checkpoints) if resume else None
    if resume_from is not None:
        policy = load_policy(config.model, config.run.seed)
    else:
        with loss_progress(console, "warm start", config.warm_start.steps) as on_step:
            policy = warm_started_policy(config, task, on_step=on_step)
    learner = Learner(policy, config, task)

    def run_eval(round_: int) -> float:
        return evaluate_and_log(policy, task, config, log, round_)

    if resume_from is not None:
        start = load_checkpoint(resume_from, policy.model, learner.optimizer).round
        log.truncate_after(start)
        console.print(f"resumed from {resume_from} (round {start})")
        evals = log.records("eval")
        first_accuracy = evals[0]["accuracy"] if evals else run_eval(start)
    else:
        log.path.unlink(missing_ok=True)
        start = 0
        first_accuracy = run_eval(0)
    accuracy = first_accuracy

    with progress_bar(console) as progress:
        bar = progress.add_task("GRPO rounds", total=config.run.rounds, completed=start, status="")
        for round_ in range(start, config.run.rounds):
            metrics = solo_round(learner, config, task, round_)
            log.write("train", round_, **metrics)
            done = round_ + 1
            if done % config.eval.every == 0 or done == config.run.rounds:
                accuracy = run_eval(done)
            if config.checkpoint.every and done % config.checkpoint.every == 0:
                save_checkpoint(checkpoints, done, policy.model, learner.optimizer, config.to_dict())
            progress.update(bar, completed=done, status=f"reward {metrics['reward']:.2f}  held-out acc {accuracy:.2f}")

    save_checkpoint(checkpoints, config.run.rounds, policy.model, learner.optimizer, config.to_dict())
    plot_run(log, out_dir / "plot.png", title=f"{config.run.id}: {config.task.name} on {config.model.name}")
    summary = RunSummary(first_accuracy, accuracy, config.run.rounds, time.time() - start_time, out_dir)
    console.print(f"held-out accuracy {summary.first_accuracy:.3f} -> {summary.last_accuracy:.3f} "
                  f"in {summary.seconds / 60:.1f} min; metrics {log.path}, plot {out_dir / 'plot.png'}")
    return summary


def solo_round(learner: Learner, config: RunConfig, task, round_: int, peer_id: str = SOLO_PEER) -> dict:
    """One round on one peer: shard, rollouts, then μ gradient steps on them."""
    batch = shard_batch(learner, config, task, round_, peer_id)
    started = time.time()
    for iteration in range(config.grpo.num_iterations):
        gradient = learner.gradient(batch, iteration)
        grad_norm = learner.apply(gradient.tensors)
    return {**batch_metrics(batch, config.rollout.group_size), **gradient.metrics, "grad_norm": grad_norm,
            "step_seconds": time.time() - started}
