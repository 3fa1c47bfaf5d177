"""``grpo-swarm bench <name>``: each benchmark is a function of the parsed CLI args."""

from __future__ import annotations

from node.bench import grpo
from node.swarm import bench_allreduce

BENCHES = {"grpo": grpo.run, "allreduce": bench_allreduce.run_from_args}


def run_bench(args):
    return BENCHES[args.bench](args)
