"""A peer commits once per round (node/peer/swarm_peer.py ``commitment_for``): a retry re-sends the same
commitment, and a peer that now holds another θ_r sits the round out instead of committing twice. Reducers
of a failed attempt keep reports of it, so a second commitment would read as a lie about the first."""

from types import SimpleNamespace

from node.peer.swarm_peer import SwarmPeer
from node.swarm.averaging import FailureKind


class RecordingPeer(SwarmPeer):
    """The commitment logic of SwarmPeer without a swarm: the trainer's decisions are recorded."""

    def __init__(self):  # no session: nothing here talks to the network
        self.commitment, self.digest, self.calls = None, "theta-a", []
        self.averager = SimpleNamespace(max_seconds=0.2)
        self.rounds_of_others = 0

    def sample_batch(self, r):
        self.calls.append(("sample", r))
        return f"batch {len(self.calls)}"

    def committed_gradient(self, r, batch):
        return f"gradient of {batch}"

    def commit(self, r, batch, gradient):
        self.calls.append(("commit", r, batch))

    def furthest_other_round(self):
        return self.rounds_of_others

    def publish_progress(self):
        self.calls.append(("progress",))


def test_a_retry_resends_the_one_commitment_of_the_round():
    peer = RecordingPeer()
    first = peer.commitment_for(3)
    assert peer.commitment_for(3) is first and peer.commitment_for(3) is first
    assert peer.calls == [("sample", 3), ("commit", 3, "batch 1")]
    assert (first.round, first.model_digest, first.gradient) == (3, "theta-a", "gradient of batch 1")
    peer.digest = "theta-b"  # a later round under the next model: a new commitment
    following = peer.commitment_for(4)
    assert following.round == 4 and following.model_digest == "theta-b" and following.batch != first.batch
    assert peer.calls[-1] == ("commit", 4, following.batch)


def test_a_peer_holding_another_model_sits_the_round_out():
    peer = RecordingPeer()
    peer.commitment_for(3)
    peer.digest = "theta-majority"  # outvoted after committing: loaded the majority's θ_3
    assert peer.commitment_for(3) is None
    commits = [call for call in peer.calls if call[0] == "commit"]
    peer.rounds_of_others = 4  # the swarm finished round 3
    report = peer.sit_out(3)
    assert report.failure.kind == FailureKind.SAT_OUT and not report.stepped and report.round == 3
    assert [call for call in peer.calls if call[0] == "commit"] == commits  # nothing committed again
    assert peer.calls[-1] == ("progress",)
