"""``grpo-swarm bench verifier`` at a tiny size: costs measured, honest rounds pass, every attack is caught."""

import pytest

from node.bench.attacks import ATTACKS
from node.bench.verifier import print_verifier_bench, run_verifier_bench
from protocol.config import ConfigError, load_config

# Every unit recomputed, so that each attack is caught whichever units it touches.
SMALL = load_config(overrides=["warm_start.steps=120", "task.options={digits=1}", "rollout.questions_per_peer=8",
                               "rollout.group_size=4", "trust.audit_units=4", "trust.audit_sample=4"])


def test_bench_measures_costs_and_catches_every_attack(capsys):
    results = run_verifier_bench(SMALL, contributions=3, peers=2)
    print_verifier_bench(results, SMALL)
    out = capsys.readouterr().out
    assert len(results.honest) == 3 and results.false_positives == 0
    assert len(results.contributor_s) == len(results.audit_s) == 3 and len(results.digest_s) == 2
    assert all(s > 0 for s in results.contributor_s + results.audit_s + results.plain_gradient_s)
    assert 0 < results.cost_ratio < 1
    assert set(results.attacks) == set(ATTACKS)
    for name, attack in ATTACKS.items():
        if not attack.probe:
            report = results.attacks[name].report
            assert report is not None and report.check == attack.caught_by, (name, report)
    for label in ("verifier: record, audit and binding checks", "audit / contributor", "false positives: 0",
                  "logprob_max_abs", "attacks (each 2 rounds", "✓"):
        assert label in out
    assert "✗" not in out


def test_bench_without_attacks_and_bad_counts(capsys):
    results = run_verifier_bench(SMALL, contributions=1, peers=2, attacks=False)
    print_verifier_bench(results, SMALL)
    assert results.attacks == {} and results.false_positives == 0
    assert "attacks" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--contributions: must be >= 1"):
        run_verifier_bench(SMALL, contributions=0, peers=2)
    with pytest.raises(ConfigError, match="--peers: must be >= 2"):
        run_verifier_bench(SMALL, contributions=1, peers=1)
