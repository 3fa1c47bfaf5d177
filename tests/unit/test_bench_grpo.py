"""``grpo-swarm bench grpo`` at a tiny size: without TRL it still measures ours; with TRL both sides."""

import importlib.util
import sys

import pytest

from node.bench.grpo import INSTALL_HINT, ROWS, run_grpo_bench
from protocol.config import load_config

TINY = load_config(overrides=["rollout.questions_per_peer=2", "rollout.group_size=2", "rollout.max_new_tokens=4"])


def bench(capsys) -> tuple[dict, str]:
    results = run_grpo_bench(TINY, repeats=1)
    return results, capsys.readouterr().out


def check(timings) -> None:
    for label, value, _ in ROWS:
        assert value(timings) >= 0 if "memory" in label else value(timings) > 0, label


def test_bench_without_trl_prints_ours_and_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    results, out = bench(capsys)
    assert list(results) == ["ours"]
    check(results["ours"])
    for label, _, _ in ROWS:
        assert label in out
    assert INSTALL_HINT in out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (pip install grpo-swarm[trl])")
def test_bench_with_trl_compares_both_sides(capsys):
    results, out = bench(capsys)
    assert list(results) == ["ours", "TRL"]
    for timings in results.values():
        check(timings)
        assert len(timings.round_s) == 1
    assert "advantage" in out and INSTALL_HINT not in out
