"""``grpo-swarm``: one console script, one subcommand per role.

Expected failures (bad config, unknown model, missing data set, corrupt
checkpoint) print one ``error:`` line and exit 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config (TOML); defaults apply to anything it leaves out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set rollout.group_size=16 (repeatable)")


def _load(args):
    from protocol.config import load_config

    return load_config(args.config, args.overrides)


def cmd_node(args) -> None:
    if args.solo:
        from node.solo import train_solo

        train_solo(_load(args), Path(args.out), resume=args.resume)
        return
    from node.join import run_swarm_node

    # A node given only initial peers learns the run from the swarm.
    joining_as_is = args.initial_peers and args.config is None and not args.overrides
    run_swarm_node(args, None if joining_as_is else _load(args))


def cmd_distill(args) -> None:
    from rich.console import Console

    from node.distill import DistillSettings, distill
    from node.evaluate import evaluate
    from node.models import load_policy
    from node.progress import loss_progress
    from protocol.tasks import load_task

    config = _load(args)
    task = load_task(config.task.name, config.task.options)
    student = load_policy(config.model, config.run.seed)
    teacher = load_policy(config.model, config.run.seed, path=args.teacher) if args.teacher else None
    ws = config.warm_start
    console = Console()
    with loss_progress(console, "distill", ws.steps) as on_step:
        distill(student, task, DistillSettings(ws.steps, ws.batch_size, ws.lr, seed=config.run.seed), teacher,
                on_step=on_step)
    student.model.save_pretrained(args.out)
    student.tokenizer.save_pretrained(args.out)
    result = evaluate(student, task, config.eval.questions, config.rollout.max_new_tokens)
    console.print(f"saved {args.out}; held-out accuracy {result.accuracy:.3f} on {result.questions} questions")


def cmd_eval(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from node.checkpoint import load_checkpoint
    from node.evaluate import evaluate
    from node.models import load_policy
    from protocol.tasks import load_task

    config = _load(args)
    task = load_task(config.task.name, config.task.options)
    target = Path(args.model) if args.model else None
    is_checkpoint = target is not None and (target / "manifest.json").exists()
    policy = load_policy(config.model, config.run.seed, path=None if is_checkpoint else args.model)
    if is_checkpoint:
        load_checkpoint(target, policy.model)
    result = evaluate(policy, task, config.eval.questions, config.rollout.max_new_tokens)
    table = Table(title=f"{config.task.name}: held-out accuracy {result.accuracy:.3f} ({result.questions} questions)")
    for column in ("prompt", "completion", "answer"):
        table.add_column(column)
    for row in result.examples:
        table.add_row(*row)
    Console().print(table)


def cmd_simulate(args) -> None:
    from coordinator.simulate import simulate

    simulate(_load(args), args.peers, Path(args.out))


def cmd_bench(args) -> int:
    from node.bench import run_bench

    result = run_bench(args)  # the allreduce bench returns an exit status; the others their measurements
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-swarm", description="Decentralized GRPO training over a swarm.")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a training peer")
    _config_args(node)
    node.add_argument("--solo", action="store_true", help="train alone on this machine (no swarm)")
    node.add_argument("--out", default="runs/solo", help="folder for metrics, plot and checkpoints")
    node.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (solo)")
    swarm = node.add_argument_group("swarm")
    swarm.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                       help="addresses of peers already in the swarm; none: start a new swarm")
    swarm.add_argument("--run-id", help="which published run to join when the swarm has several")
    swarm.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], metavar="MULTIADDR",
                       help="addresses to listen on")
    swarm.add_argument("--announce-maddrs", nargs="*", default=None, metavar="MULTIADDR",
                       help="addresses other peers should dial (e.g. your public IP)")
    swarm.add_argument("--identity", help="libp2p identity file: the same peer id across restarts")
    swarm.add_argument("--client-mode", action="store_true", help="accept no incoming connections (behind NAT)")
    swarm.add_argument("--no-relay", action="store_true", help="do not use libp2p circuit relays")
    swarm.add_argument("--use-auto-relay", action="store_true", help="look for relays automatically (NAT)")
    swarm.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for the libp2p daemon to start")
    swarm.add_argument("--join-retries", type=int, default=3, help="tries to reach the initial peers")
    node.set_defaults(func=cmd_node)

    distill = sub.add_parser("distill", help="distill a student from reference solutions or a teacher model")
    _config_args(distill)
    distill.add_argument("--teacher", help="teacher model (name or folder); default: the task's reference solutions")
    distill.add_argument("--out", required=True, help="folder to save the student (save_pretrained)")
    distill.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", help="held-out accuracy of a checkpoint or a Hugging Face model")
    _config_args(ev)
    ev.add_argument("model", nargs="?", help="checkpoint folder, model folder or hub name (default: config model)")
    ev.set_defaults(func=cmd_eval)

    simulate = sub.add_parser("simulate", help="a local swarm: a bootstrap peer and N node processes on 127.0.0.1")
    _config_args(simulate)
    simulate.add_argument("--peers", type=int, default=4, help="node processes to start")
    simulate.add_argument("--out", default="runs/simulate", help="folder for metrics, plot and node logs")
    simulate.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", help="benchmarks, printed as tables with ratios against a baseline")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    grpo = bench_sub.add_parser("grpo", help="rollout tokens/s and GRPO step time, next to TRL's GRPOTrainer")
    _config_args(grpo)
    grpo.add_argument("--repeats", type=int, default=3)
    grpo.set_defaults(func=cmd_bench)
    allreduce = bench_sub.add_parser("allreduce", help="all-reduce time of N local peers next to the loopback bound")
    from node.swarm.bench_allreduce import add_arguments

    add_arguments(allreduce)
    allreduce.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from node.errors import EXPECTED_ERRORS

    try:
        status = args.func(args)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
