"""The overrides of hivemind's internals (node/swarm/hivemind/) against the pinned hivemind, in one check."""

import pytest
from hivemind.averaging.partition import TensorPartReducer

from node.swarm.hivemind import internals


def test_the_pinned_hivemind_has_every_internal_the_overrides_use():
    problems = internals.internals_problems()
    assert problems == [], "hivemind's internals differ from what node/swarm/hivemind expects:\n" + "\n".join(problems)


def test_a_changed_internal_is_named(monkeypatch):
    monkeypatch.delattr(TensorPartReducer, "reset_accumulators")
    monkeypatch.setattr(internals.hivemind, "__version__", "9.9.9")
    problems = internals.internals_problems()
    assert "TensorPartReducer.reset_accumulators is missing" in problems
    assert any("hivemind 9.9.9 is installed" in problem for problem in problems)
    with pytest.raises(internals.HivemindMismatch, match="pin hivemind==1.1.12"):
        internals.require_internals()
