"""Peers that attack the protocol itself rather than lie in a contribution (test_hardening.py runs each in a real
swarm through misbehaving.py). Each is a SwarmPeer subclass; what it does beyond the honest code is below.

- PoisonsProgress: every round, under the progress key, a malformed value and its own signed record claiming a
  far-ahead round under every other peer's name, a plain value over the whole key, and a second vote under a
  made-up peer id, all with expirations past their lifetime.
- LiesAboutState: serves a state of NaN weights with a zeroed learning rate, declares it at the highest
  state-sharing priority, and publishes signed progress far ahead of the swarm with a made-up digest.
- ReturnsNaN: as a reducer, sends NaN back to every member for the part it reduces.
- ForgesAgreement: after each all-reduce, publishes a wrong digest under every other member's name.
- StallsInAllReduce: joins every group it can, then neither sends its parts nor answers as a reducer.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time

import torch
from hivemind.utils.timed_storage import get_dht_time

import node.swarm.averaging
from node.peer.swarm_peer import SwarmPeer
from node.swarm.agreement import agreement_record
from node.swarm.hivemind.allreduce import ExactAllReduceRunner
from node.swarm.progress import Progress, progress_record
from node.train.state import served_state
from protocol.keys import progress_key

FAR_AHEAD = 50
LONG = 3600.0  # seconds: an expiration far past any record's lifetime


def made_up_peer_id(template: str) -> str:
    """A string shaped like ``template`` (a base58 peer id) that names no peer."""
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    return template[:2] + "".join(secrets.choice(alphabet) for _ in template[2:])


class PoisonsProgress(SwarmPeer):
    def publish_progress(self) -> None:
        super().publish_progress()
        key, expires = progress_key(self.config.run.id), get_dht_time() + LONG
        ahead = progress_record(self.key, self.config.run.id, Progress(self.round + FAR_AHEAD, "f" * 64))
        for peer in self.others_progress():
            self.dht.store(key, {"round": self.round}, expires, subkey=peer, return_future=True)
            self.dht.store(key, ahead, expires, subkey=peer, return_future=True)
        self.dht.store(key, ahead, expires, return_future=True)
        self.dht.store(key, ahead, expires, subkey=made_up_peer_id(self.peer_id), return_future=True)


class LiesAboutState(SwarmPeer):
    def state(self):
        metadata, tensors = served_state(self.learner.params, self.learner.optimizer, self.round + FAR_AHEAD)
        metadata["param_groups"] = [dict(group, lr=0.0) for group in metadata["param_groups"]]
        return metadata, [torch.full_like(t, math.nan) if t.is_floating_point() else t for t in tensors]

    def publish_progress(self) -> None:
        record = progress_record(self.key, self.config.run.id, Progress(self.round + FAR_AHEAD, "e" * 64))
        self.dht.store(progress_key(self.config.run.id), record, get_dht_time() + LONG, subkey=self.peer_id,
                       return_future=True)
        self.averager._averager.state_sharing_priority = 1e9  # hivemind's priority: a peer reads it, we do not


class ReturnsNaN(SwarmPeer):
    def __init__(self, session, serve_state: bool = True):
        encoded = ExactAllReduceRunner._encoded  # past the honest reducer's own check

        def nan_encoded(runner, index, averaged_part):  # the averager process is forked after this
            return encoded(runner, index, torch.full_like(averaged_part, math.nan))

        ExactAllReduceRunner._encoded = nan_encoded
        super().__init__(session, serve_state)


class ForgesAgreement(SwarmPeer):
    def __init__(self, session, serve_state: bool = True):
        agree, forger = node.swarm.averaging.agree, self

        def agree_and_forge(dht, key, round_, me, members, digest, timeout, signer):
            wrong = agreement_record(forger.key, signer.run_id, key, round_, "0" * 64)
            for member in members:
                if member != me:
                    dht.store(key, wrong, time.time() + LONG, subkey=member, return_future=True)
            return agree(dht, key, round_, me, members, digest, timeout, signer)

        node.swarm.averaging.agree = agree_and_forge
        super().__init__(session, serve_state)


class StallsInAllReduce(SwarmPeer):
    def __init__(self, session, serve_state: bool = True):
        async def send_nothing(runner, peer_id):
            await asyncio.sleep(LONG)

        async def answer_nothing(runner, stream, context):
            await asyncio.sleep(LONG)
            yield  # an async generator, as hivemind's handler is, that never yields

        # the averager process is forked after this
        ExactAllReduceRunner._communicate_with_peer = send_nothing
        ExactAllReduceRunner.rpc_aggregate_part = answer_nothing
        super().__init__(session, serve_state)


MISBEHAVIOURS = {cls.__name__: cls for cls in (PoisonsProgress, LiesAboutState, ReturnsNaN, ForgesAgreement,
                                               StallsInAllReduce)}
