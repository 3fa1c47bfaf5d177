"""A swarm peer reduced to what the coordinator's checkpointer meets: it serves its state in SwarmPeer.state's
format and publishes its signed (round, model digest) under the run's progress key, as node/peer/swarm_peer.py does.

Prints one JSON line {"event": "ready", "maddrs": [...], "peer_id": ..., "public_key": hex, "digest": ...}
and serves until stdin closes. ``--lie`` publishes a digest that is not the served model's (a peer serving a
poisoned state).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from node.swarm.averaging import RoundAverager
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.progress import Progress, publish_progress
from node.train.learner import Learner
from node.train.models import load_policy
from node.train.state import served_state
from protocol.config import load_config
from protocol.digest import model_digest
from protocol.identity import SigningKey
from protocol.tasks import load_task


def trained_learner(config, seed: int) -> Learner:
    """The run's model after one optimizer step on a random gradient: parameters and Adam state differ from θ_0."""
    policy = load_policy(config.model, config.run.seed)
    learner = Learner(policy, config, load_task(config.task.name, config.task.options))
    generator = torch.Generator().manual_seed(seed)
    learner.apply([torch.randn(p.shape, generator=generator) for p in learner.params])
    return learner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--lie", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config)
    learner = trained_learner(config, seed=args.round)

    dht = start_dht(DHTSettings(initial_peers=args.initial_peers, host_maddrs=[LOOPBACK]))
    averager = RoundAverager.for_run(dht, config, learner.params,
                                     state_provider=lambda: served_state(learner.params, learner.optimizer, args.round))
    digest, key = model_digest(learner.policy.model), SigningKey()
    published = Progress(args.round, "0" * 64 if args.lie else digest)
    publish_progress(dht, key, config.run.id, str(dht.peer_id), published)
    print(json.dumps({"event": "ready", "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                      "peer_id": str(dht.peer_id), "public_key": key.public_key.hex(), "digest": digest}), flush=True)
    sys.stdin.read()
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
