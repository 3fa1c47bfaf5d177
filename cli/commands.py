"""What each ``grpo-swarm`` subcommand does: turn the parsed flags into typed settings and call the library.

No library function takes the argparse Namespace: the run config comes from ``load_config`` and each
process's own flags become PeerSettings, CoordinatorSettings or DHTSettings here (a flag not given leaves
the settings' default). Heavy imports (torch, transformers) happen inside the command that needs them.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocol.config import RunConfig, load_config


def load(args) -> RunConfig:
    return load_config(args.config, args.overrides)


def given(**values) -> dict:
    """The flags that were given (argparse leaves the others None)."""
    return {name: value for name, value in values.items() if value is not None}


def dht_settings(args, **extra):
    """The DHT flags every swarm process has (``extra``: the ones only a node or verifier has)."""
    from node.swarm.dht import DHTSettings

    return DHTSettings(**given(host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
                               identity_path=args.identity, startup_timeout=args.startup_timeout, **extra))


def peer_settings(args):
    from node.peer.settings import PeerSettings

    dht = dht_settings(args, initial_peers=args.initial_peers, client_mode=args.client_mode,
                       use_relay=not args.no_relay, use_auto_relay=args.use_auto_relay, join_retries=args.join_retries)
    return PeerSettings(dht=dht, **given(out=args.out, coordinator=args.coordinator, key=args.key,
                                         run_id=args.run_id, checkpoint=getattr(args, "checkpoint", None)))


def cmd_node(args) -> None:
    if args.solo:
        from node.train.solo import train_solo

        train_solo(load(args), Path(args.out), resume=args.resume)
        return
    from node.peer.run import run_swarm_node

    settings = peer_settings(args)
    # A node given only initial peers (or a coordinator) learns the run from the swarm.
    joining_as_is = settings.joins_existing and args.config is None and not args.overrides
    run_swarm_node(settings, None if joining_as_is else load(args))


def cmd_verifier(args) -> None:
    from node.verify.verifier import run_verifier

    run_verifier(peer_settings(args), seed=args.seed)


def cmd_coordinator(args) -> None:
    from coordinator.server import run_coordinator
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(dht=dht_settings(args), **given(
        out=args.out, bind=args.bind, grpc_port=args.grpc_port, http_port=args.http_port,
        public_address=args.public_address, key=args.key, admin_key=args.admin_key,
        verifier_keys=args.verifier_keys, token_lifetime=args.token_lifetime, renew_grace=args.renew_grace))
    run_coordinator(settings, load(args))


def cmd_simulate(args) -> None:
    from cli.local_swarm.simulate import simulate

    simulate(load(args), args.peers, Path(args.out))


def cmd_distill(args) -> None:
    from rich.console import Console

    from node.progress_bars import loss_progress
    from node.train.distill import DistillSettings, distill
    from node.train.evaluate import evaluate
    from node.train.models import load_policy
    from protocol.tasks import load_task

    config = load(args)
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

    from node.train.checkpoint import load_checkpoint
    from node.train.evaluate import evaluate
    from node.train.models import load_policy
    from protocol.tasks import load_task

    config = load(args)
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


def cmd_export(args) -> None:
    from node.train.export import export_checkpoint

    config = load(args) if args.config or args.overrides else None
    print(f"wrote {export_checkpoint(args.checkpoint, args.out, config)}")


def cmd_keygen(args) -> None:
    from protocol.keyfiles import generate_key, public_key_text

    key = generate_key(args.out)
    print(f"wrote {args.out} (private, mode 0600) and {args.out}.pub")
    print(f"public key: {public_key_text(key.public_key)}")


def cmd_status(args) -> None:
    from rich.console import Console

    from coordinator.dashboard.terminal import render_status
    from node.peer.coordinator_client import coordinator_status

    Console().print(render_status(coordinator_status(args.coordinator)))


def cmd_admin(args) -> None:
    from node.peer.coordinator_client import admin_action
    from protocol.identity import SigningKey

    print(admin_action(args.coordinator, SigningKey.load(args.key), args.command, args.peer_id, args.reason))


def cmd_config_show(args) -> None:
    print(load(args).to_toml(), end="")


def cmd_config_schema(args) -> None:
    print(json.dumps(RunConfig.model_json_schema(), indent=1))


def cmd_bench_grpo(args) -> None:
    from node.bench.grpo import run_grpo_bench

    run_grpo_bench(load(args), args.repeats)


def cmd_bench_allreduce(args) -> int:
    """Exit status 1 if any round failed."""
    from node.bench.allreduce import print_allreduce_table, run_allreduce_bench

    result = run_allreduce_bench(args.peers, args.size, args.rounds, load(args).swarm)
    print_allreduce_table(result)
    return 0 if all(row["ok"] == result["peers"] for row in result["rounds"]) else 1


def cmd_bench_verifier(args) -> None:
    from node.bench.verifier import print_verifier_bench, run_verifier_bench

    config = load(args)
    print_verifier_bench(run_verifier_bench(config, args.contributions, args.peers, not args.no_attacks), config)


def cmd_bench_trust(args) -> None:
    from node.bench.trust import run_trust_bench

    run_trust_bench(load(args), args.peers, args.large_size)
