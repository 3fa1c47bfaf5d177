"""One GRPO peer for the equivalence test: a real round on the tiny model, all-reduced with the swarm.

It saves the batch it trained on and its parameters after the step, so the test can redo the
round centrally on the union of the peers' batches and compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from node.swarm.averaging import RoundAverager
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.train.learner import Learner
from node.train.models import load_policy
from protocol.config import SwarmSection, load_config
from protocol.tasks import load_task

# Adam's first step is -lr * g / (|g| + eps): where |g| is near eps, float-order noise in g is
# amplified by lr / eps. eps = 1e-6 keeps that below the comparison's tolerance.
OVERRIDES = ["rollout.group_size=4", "rollout.questions_per_peer=3", "rollout.max_new_tokens=6",
             "optim.adam_epsilon=1e-6"]


def build_learner() -> Learner:
    config = load_config(overrides=OVERRIDES)
    return Learner(load_policy(config.model, config.run.seed), config, load_task(config.task.name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dht = start_dht(DHTSettings(initial_peers=args.initial_peers, host_maddrs=[LOOPBACK]))
    print(json.dumps({"event": "ready", "maddrs": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)
    learner = build_learner()
    swarm = SwarmSection(min_group_size=args.peers, target_group_size=args.peers, matchmaking_time=5.0,
                         allreduce_timeout=30.0)
    averager = RoundAverager(dht, [tuple(p.shape) for p in learner.params], swarm, prefix="equivalence")
    task = learner.task
    questions = [task.question(3 * args.rank + i) for i in range(3)]
    batch = learner.collect(questions, torch.Generator().manual_seed(args.rank))
    # The untrained preset scores 0 on every question, so real advantages would all be 0 and the
    # step empty: seeded advantages give every row a real, distinct gradient.
    batch.advantages = torch.randn(batch.advantages.shape, generator=torch.Generator().manual_seed(100 + args.rank))
    torch.save(dataclasses.asdict(batch), args.out_dir / f"batch{args.rank}.pt")
    gradient = learner.gradient(batch)
    outcome = averager.average(gradient.tensors, gradient.weight, round_=0)
    if outcome.ok:
        torch.save(outcome.tensors, args.out_dir / f"gradient{args.rank}.pt")
        learner.apply(outcome.tensors)
        torch.save([p.detach() for p in learner.params], args.out_dir / f"params{args.rank}.pt")
    print(json.dumps({"event": "result", "ok": outcome.ok, "reason": outcome.reason}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
