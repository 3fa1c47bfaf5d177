"""Which donors a state load blames (node/peer/state_sync.py): a donor that serves a state of another model
digest than it published is refused, one whose stream was cut short is only skipped (a cut connection looks
the same, and an honest peer excluded for it was no longer audited by the verifier that excluded it)."""

import pytest

from node.peer.state_sync import load_vouched_state
from node.swarm.progress import Progress
from node.train.state import served_state
from protocol.config import RunConfig
from protocol.digest import model_digest
from tests.system.control_plane.state_server import trained_learner

ROUND = 7


class ServingAverager:
    """Stands in for RoundAverager.download_state: each donor serves what the test set."""

    def __init__(self, served: dict):
        self.served, self.asked = served, []

    def download_state(self, donor: str, timeout: float):
        self.asked.append(donor)
        return self.served[donor]


@pytest.fixture(scope="module")
def states():
    config = RunConfig()
    source, other = trained_learner(config, seed=1), trained_learner(config, seed=2)
    position = Progress(ROUND, model_digest(source.policy.model))
    metadata, tensors = served_state(source.params, source.optimizer, ROUND)
    wrong = served_state(other.params, other.optimizer, ROUND)
    return config, position, (metadata, tensors), wrong


def test_a_cut_stream_is_skipped_without_blame_and_the_next_donor_serves(states):
    config, position, (metadata, tensors), _ = states
    averager = ServingAverager({"cut": (metadata, tensors[:-7]), "whole": (metadata, tensors)})
    target = trained_learner(config, seed=3)
    load = load_vouched_state(averager, target, position, ["cut", "whole"], timeout=30)
    assert averager.asked == ["cut", "whole"]
    assert load.donor == "whole" and load.refused == {}
    assert model_digest(target.policy.model) == position.digest


def test_a_state_of_another_digest_is_refused_and_its_donor_named(states):
    config, position, whole, wrong = states
    averager = ServingAverager({"liar": wrong, "padded": (whole[0], whole[1] + whole[1][:1]), "whole": whole})
    target = trained_learner(config, seed=3)
    load = load_vouched_state(averager, target, position, ["liar", "padded", "whole"], timeout=30)
    assert load.donor == "whole"
    assert set(load.refused) == {"liar", "padded"}
    assert "digest" in load.refused["liar"]
