"""``grpo-swarm bench verifier`` at a tiny size: costs measured, honest rounds pass, every attack is caught."""

from argparse import Namespace

import pytest

from node.bench import run_bench
from node.bench.verifier import ATTACKS, PROBES
from protocol.config import ConfigError

# Every unit recomputed, so that each attack is caught whichever units it touches.
SMALL = ["warm_start.steps=120", "task.options={digits=1}", "rollout.questions_per_peer=8",
         "rollout.group_size=4", "trust.audit_units=4", "trust.audit_sample=4"]


def bench(contributions=3, peers=2, no_attacks=False):
    return run_bench(Namespace(bench="verifier", config=None, overrides=SMALL, contributions=contributions,
                               peers=peers, no_attacks=no_attacks))


def test_bench_measures_costs_and_catches_every_attack(capsys):
    results = bench()
    out = capsys.readouterr().out
    assert len(results.honest) == 3 and results.false_positives == 0
    assert len(results.contributor_s) == len(results.audit_s) == 3 and len(results.digest_s) == 2
    assert all(s > 0 for s in results.contributor_s + results.audit_s + results.plain_gradient_s)
    assert 0 < results.cost_ratio < 1
    assert set(results.attacks) == set(ATTACKS) | set(PROBES)
    for name, (_, check) in ATTACKS.items():
        assert results.attacks[name].check == check, (name, results.attacks[name].evidence)
    for label in ("verifier: audit", "audit / contributor", "false positives: 0", "logprob_max_abs",
                  "attacks (function level)", "✓"):
        assert label in out
    assert "✗" not in out


def test_bench_without_attacks_and_bad_counts(capsys):
    results = bench(contributions=1, peers=1, no_attacks=True)
    assert results.attacks == {} and results.false_positives == 0
    assert "attacks" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--contributions: must be >= 1"):
        bench(contributions=0)
    with pytest.raises(ConfigError, match="--peers: must be >= 1"):
        bench(peers=0)
