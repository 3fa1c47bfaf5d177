"""``grpo-swarm bench <name>``: each benchmark is a function of the parsed CLI args."""

from __future__ import annotations

from node.bench import grpo

BENCHES = {"grpo": grpo.run}


def run_bench(args):
    return BENCHES[args.bench](args)
