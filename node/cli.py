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

    # A node given only initial peers (or a coordinator) learns the run from the swarm.
    joining_as_is = (args.initial_peers or args.coordinator) and args.config is None and not args.overrides
    run_swarm_node(args, None if joining_as_is else _load(args))


def cmd_verifier(args) -> None:
    from node.join import run_verifier_node

    run_verifier_node(args)


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


def cmd_coordinator(args) -> None:
    from coordinator.server import run_coordinator

    run_coordinator(args, _load(args))


def cmd_export(args) -> None:
    from node.export import export_checkpoint

    config = _load(args) if args.config or args.overrides else None
    print(f"wrote {export_checkpoint(args.checkpoint, args.out, config)}")


def cmd_keygen(args) -> None:
    from node.keygen import generate_key, public_key_text

    key = generate_key(args.out)
    print(f"wrote {args.out} (private, mode 0600) and {args.out}.pub")
    print(f"public key: {public_key_text(key.public_key)}")


def cmd_status(args) -> None:
    from rich.console import Console

    from coordinator.status_view import render_status
    from node.coordinator_client import coordinator_status

    Console().print(render_status(coordinator_status(args.coordinator)))


def cmd_admin(args) -> None:
    from node.coordinator_client import admin_action
    from protocol.identity import SigningKey

    print(admin_action(args.coordinator, SigningKey.load(args.key), args.command, args.peer_id, args.reason))


def _coordinator_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's gRPC address")


def _swarm_args(parser: argparse.ArgumentParser) -> None:
    swarm = parser.add_argument_group("swarm")
    swarm.add_argument("--coordinator", metavar="HOST:PORT",
                       help="an admitted run's coordinator: register with it and join its swarm")
    swarm.add_argument("--key", help="Ed25519 signing key (PEM; created if missing); default: a new one per start")
    swarm.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                       help="addresses of peers already in the swarm; none: start a new swarm (or ask --coordinator)")
    swarm.add_argument("--run-id", help="which published run to join when the swarm has several")
    _dht_args(swarm, "libp2p identity file: the same peer id across restarts (with --coordinator, default OUT/p2p.id)")
    swarm.add_argument("--client-mode", action="store_true", help="accept no incoming connections (behind NAT)")
    swarm.add_argument("--no-relay", action="store_true", help="do not use libp2p circuit relays")
    swarm.add_argument("--use-auto-relay", action="store_true", help="look for relays automatically (NAT)")
    swarm.add_argument("--join-retries", type=int, default=3, help="tries to reach the initial peers")


def _dht_args(group, identity_help: str) -> None:
    """Where a DHT peer (node, verifier or coordinator) listens, is dialled, and who it is."""
    group.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], metavar="MULTIADDR",
                       help="DHT addresses to listen on")
    group.add_argument("--announce-maddrs", nargs="*", default=None, metavar="MULTIADDR",
                       help="DHT addresses other peers should dial (e.g. your public IP)")
    group.add_argument("--identity", help=identity_help)
    group.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for the libp2p daemon to start")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-swarm", description="Decentralized GRPO training over a swarm.")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a training peer")
    _config_args(node)
    node.add_argument("--solo", action="store_true", help="train alone on this machine (no swarm)")
    node.add_argument("--out", default="runs/solo", help="folder for metrics, plot and checkpoints")
    node.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (solo)")
    node.add_argument("--checkpoint", help="start from this coordinator checkpoint (round-NNNNNN folder)")
    _swarm_args(node)
    node.set_defaults(func=cmd_node)

    verifier = sub.add_parser("verifier", help="audit the contributions of a run's trainers (follows the model)")
    verifier.add_argument("--out", default="runs/verifier", help="folder for verdicts.jsonl and its libp2p identity")
    verifier.add_argument("--seed", type=int, default=0, help="seed of the choice of what to audit")
    _swarm_args(verifier)
    verifier.set_defaults(func=cmd_verifier)

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
    from node.bench import verifier as verifier_bench
    from node.swarm import bench_trust

    audit = bench_sub.add_parser("verifier", help="cost of an audit next to the contribution's, false positives, "
                                                  "attacks caught")
    _config_args(audit)
    verifier_bench.add_arguments(audit)
    audit.set_defaults(func=cmd_bench)
    trust = bench_sub.add_parser("trust", help="binding error per compression; how far one bad sender moves the "
                                               "average with and without clipping")
    bench_trust.add_arguments(trust)
    trust.set_defaults(func=cmd_bench)

    coordinator = sub.add_parser("coordinator", help="serve a run: bootstrap DHT, admission, ledger, checkpoints, "
                                                     "dashboard")
    _config_args(coordinator)
    coordinator.add_argument("--out", default="runs/coordinator",
                             help="folder for its key, libp2p identity, ledger and checkpoints (reuse it to restart)")
    coordinator.add_argument("--bind", default="0.0.0.0", metavar="HOST", help="address the gRPC API and the "
                                                                               "dashboard listen on")
    coordinator.add_argument("--grpc-port", type=int, default=50051, help="gRPC API port (0: any free port)")
    coordinator.add_argument("--http-port", type=int, default=8080, help="dashboard port (0: any free port)")
    coordinator.add_argument("--public-address", metavar="HOST:PORT",
                             help="gRPC address nodes dial (default: the announced or bound host, --grpc-port)")
    _dht_args(coordinator, "libp2p identity file (default: OUT/p2p.id)")
    coordinator.add_argument("--key", help="the coordinator's Ed25519 key (default: OUT/coordinator.pem, created)")
    coordinator.add_argument("--admin-key", metavar="PUB", help="public key file (keygen's .pub) allowed to ban and "
                                                                "unban (default: the coordinator's own key)")
    coordinator.add_argument("--verifier-keys", metavar="FILE", help="public keys (one per line) allowed to register "
                                                                     "as verifiers (default: any key)")
    coordinator.add_argument("--token-lifetime", type=float, default=None,
                             help="seconds an access token is valid (default: the run's trust.token_lifetime)")
    coordinator.add_argument("--renew-grace", type=float, default=600.0,
                             help="seconds after expiry that a token may still be renewed")
    coordinator.set_defaults(func=cmd_coordinator)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    _config_args(export)
    export.add_argument("checkpoint", help="checkpoint folder (round-NNNNNN)")
    export.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    export.set_defaults(func=cmd_export)

    keygen = sub.add_parser("keygen", help="create an Ed25519 key (peer or admin) and print its public key")
    keygen.add_argument("--out", required=True, help="private key file to create (never overwritten); "
                                                     "the public key goes to OUT.pub")
    keygen.set_defaults(func=cmd_keygen)

    status = sub.add_parser("status", help="a coordinator's view of the run: peers, rounds, reward")
    _coordinator_args(status)
    status.set_defaults(func=cmd_status)

    for action, verb in (("ban", "ban a peer: its token is not renewed and peers drop it"),
                         ("unban", "lift a ban")):
        admin = sub.add_parser(action, help=verb)
        admin.add_argument("peer_id", metavar="PEER", help="the peer id (base58)")
        _coordinator_args(admin)
        admin.add_argument("--key", required=True, help="the admin's Ed25519 key (PEM)")
        admin.add_argument("--reason", default="", help="shown in the ledger and the dashboard")
        admin.set_defaults(func=cmd_admin)
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
