"""``grpo-swarm bench <name>``: each benchmark is a function of the parsed CLI args."""

from __future__ import annotations

from node.bench import grpo, verifier
from node.swarm import bench_allreduce, bench_trust

BENCHES = {"grpo": grpo.run, "allreduce": bench_allreduce.run_from_args, "verifier": verifier.run,
           "trust": bench_trust.run_from_args}


def run_bench(args):
    return BENCHES[args.bench](args)
