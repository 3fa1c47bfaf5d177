"""A seeded solo run on the tiny model: GRPO raises held-out accuracy, and resume works.

The warm start (distillation, about a minute on 2 cores) is cached in the session's
GRPO_SWARM_HOME, so the swarm tests start from the same θ_0 without redoing it.
"""

import pytest
from rich.console import Console

from node.runlog import RunLog
from node.train.solo import train_solo
from protocol.config import load_config

ROUNDS = 40


@pytest.fixture(scope="module")
def solo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("solo")
    config = load_config(overrides=[f"run.rounds={ROUNDS}", "eval.every=20", "checkpoint.every=20"])
    summary = train_solo(config, out, console=Console(quiet=True))
    return config, out, summary


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy(solo_run):
    _, out, summary = solo_run
    print(f"held-out accuracy {summary.first_accuracy:.3f} -> {summary.last_accuracy:.3f} "
          f"in {summary.seconds / 60:.1f} min")
    assert summary.first_accuracy > 0.05  # the warm start works: GRPO has signal
    assert summary.last_accuracy >= summary.first_accuracy + 0.06
    train = RunLog(out / "metrics.jsonl").records("train")
    assert [r["round"] for r in train] == list(range(ROUNDS))
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "rewards/correct/mean", "loss", "grad_norm"):
        assert key in train[0], key
    assert (out / "plot.png").stat().st_size > 10_000


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(solo_run):
    config, out, _ = solo_run
    longer = load_config(overrides=[f"run.rounds={ROUNDS + 3}", "eval.every=20", "checkpoint.every=20"])
    train_solo(longer, out, resume=True, console=Console(quiet=True))
    rounds = [r["round"] for r in RunLog(out / "metrics.jsonl").records("train")]
    assert rounds == list(range(ROUNDS + 3))  # rounds 0..39 kept once, 40..42 added
    assert (out / "checkpoints" / f"round-{ROUNDS + 3:06d}").is_dir()
