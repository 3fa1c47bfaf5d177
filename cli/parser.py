"""The ``grpo-swarm`` command line: one subcommand per role or tool.

Flags that become settings take their help text from the settings' field docstrings and leave their
defaults to the settings (a flag not given is not passed), so each default and description is written once.
"""

from __future__ import annotations

import argparse

from cli import commands


def _doc(model, field: str) -> str:
    return model.model_fields[field].description or ""


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config (TOML); defaults apply to anything it leaves out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set rollout.group_size=16 (repeatable)")


def _dht_args(group, identity_help: str) -> None:
    """Where a DHT peer (node, verifier or coordinator) listens, is dialled, and who it is."""
    from node.swarm.dht import DHTSettings

    group.add_argument("--host-maddrs", nargs="*", metavar="MULTIADDR", help=_doc(DHTSettings, "host_maddrs"))
    group.add_argument("--announce-maddrs", nargs="*", metavar="MULTIADDR", help=_doc(DHTSettings, "announce_maddrs"))
    group.add_argument("--identity", help=identity_help)
    group.add_argument("--startup-timeout", type=float, help=_doc(DHTSettings, "startup_timeout"))


def _swarm_args(parser: argparse.ArgumentParser) -> None:
    from node.peer.settings import PeerSettings
    from node.swarm.dht import DHTSettings

    swarm = parser.add_argument_group("swarm")
    swarm.add_argument("--coordinator", metavar="HOST:PORT", help=_doc(PeerSettings, "coordinator"))
    swarm.add_argument("--key", help=_doc(PeerSettings, "key"))
    swarm.add_argument("--initial-peers", nargs="*", metavar="MULTIADDR",
                       help=_doc(DHTSettings, "initial_peers") + " (with --coordinator: the coordinator's)")
    swarm.add_argument("--run-id", help=_doc(PeerSettings, "run_id"))
    _dht_args(swarm, "libp2p identity file: the same peer id across restarts (with --coordinator, default OUT/p2p.id)")
    swarm.add_argument("--client-mode", action="store_true", help=_doc(DHTSettings, "client_mode"))
    swarm.add_argument("--no-relay", action="store_true", help="do not use libp2p circuit relays")
    swarm.add_argument("--use-auto-relay", action="store_true", help=_doc(DHTSettings, "use_auto_relay"))
    swarm.add_argument("--join-retries", type=int, help=_doc(DHTSettings, "join_retries"))


def _coordinator_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's gRPC address")


def _bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks, printed as tables with ratios against a baseline")
    benches = bench.add_subparsers(dest="bench", required=True)

    grpo = benches.add_parser("grpo", help="rollout tokens/s and GRPO step time, next to TRL's GRPOTrainer")
    grpo.add_argument("--repeats", type=int, default=3)
    grpo.set_defaults(func=commands.cmd_bench_grpo)

    allreduce = benches.add_parser("allreduce", help="all-reduce time of N local peers next to the loopback bound; "
                                                     "timeouts and compression from the [swarm] section")
    allreduce.add_argument("--peers", type=int, default=4, help="peer processes on this machine")
    allreduce.add_argument("--size", type=float, default=10.0, help="MB of fp32 gradient to all-reduce")
    allreduce.add_argument("--rounds", type=int, default=5)
    allreduce.set_defaults(func=commands.cmd_bench_allreduce)

    verifier = benches.add_parser("verifier", help="cost of an audit next to the contribution's, false positives, "
                                                   "the attack catalogue")
    verifier.add_argument("--contributions", type=int, default=50, help="honest contributions to produce and audit")
    verifier.add_argument("--peers", type=int, default=4, help="honest peer ids the rounds cycle through")
    verifier.add_argument("--no-attacks", action="store_true", help="skip the attack catalogue")
    verifier.set_defaults(func=commands.cmd_bench_verifier)

    trust = benches.add_parser("trust", help="binding error per compression; how far one bad sender moves the "
                                             "average with and without clipping")
    trust.add_argument("--peers", type=int, default=4, help="senders (the last one plays the bad sender)")
    trust.add_argument("--large-size", type=int, default=20_000_000, help="values of the resampled vector")
    trust.set_defaults(func=commands.cmd_bench_trust)
    for parser in (grpo, allreduce, verifier, trust):
        _config_args(parser)


def _coordinator_parser(sub) -> None:
    from coordinator.settings import CoordinatorSettings as Settings

    coordinator = sub.add_parser("coordinator", help="serve a run: bootstrap DHT, admission, ledger, checkpoints, "
                                                     "dashboard")
    _config_args(coordinator)
    coordinator.add_argument("--out", default="runs/coordinator", help=_doc(Settings, "out"))
    coordinator.add_argument("--bind", metavar="HOST", help=_doc(Settings, "bind"))
    coordinator.add_argument("--grpc-port", type=int, help=_doc(Settings, "grpc_port"))
    coordinator.add_argument("--http-port", type=int, help=_doc(Settings, "http_port"))
    coordinator.add_argument("--public-address", metavar="HOST:PORT", help=_doc(Settings, "public_address"))
    _dht_args(coordinator, "libp2p identity file (default: OUT/p2p.id)")
    coordinator.add_argument("--key", help=_doc(Settings, "key"))
    coordinator.add_argument("--admin-key", metavar="PUB", help=_doc(Settings, "admin_key"))
    coordinator.add_argument("--verifier-keys", metavar="FILE", help=_doc(Settings, "verifier_keys"))
    coordinator.add_argument("--token-lifetime", type=float, help=_doc(Settings, "token_lifetime"))
    coordinator.add_argument("--renew-grace", type=float, help=_doc(Settings, "renew_grace"))
    coordinator.set_defaults(func=commands.cmd_coordinator)


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
    node.set_defaults(func=commands.cmd_node)

    verifier = sub.add_parser("verifier", help="audit the contributions of a run's trainers (follows the model)")
    verifier.add_argument("--out", default="runs/verifier", help="folder for verdicts.jsonl and its libp2p identity")
    verifier.add_argument("--seed", type=int, default=0, help="seed of the choice of what to audit")
    _swarm_args(verifier)
    verifier.set_defaults(func=commands.cmd_verifier)

    _coordinator_parser(sub)

    simulate = sub.add_parser("simulate", help="a local swarm: a coordinator, N nodes and a verifier on 127.0.0.1")
    _config_args(simulate)
    simulate.add_argument("--peers", type=int, default=4, help="node processes to start")
    simulate.add_argument("--out", default="runs/simulate", help="folder for metrics, plot and node logs")
    simulate.set_defaults(func=commands.cmd_simulate)

    config = sub.add_parser("config", help="the run config: resolved as TOML, or its JSON schema")
    views = config.add_subparsers(dest="view", required=True)
    show = views.add_parser("show", help="the resolved config as TOML (usable as --config)")
    _config_args(show)
    show.set_defaults(func=commands.cmd_config_show)
    views.add_parser("schema", help="the config's JSON schema, with a description of every field").set_defaults(
        func=commands.cmd_config_schema)

    distill = sub.add_parser("distill", help="distill a student from reference solutions or a teacher model")
    _config_args(distill)
    distill.add_argument("--teacher", help="teacher model (name or folder); default: the task's reference solutions")
    distill.add_argument("--out", required=True, help="folder to save the student (save_pretrained)")
    distill.set_defaults(func=commands.cmd_distill)

    ev = sub.add_parser("eval", help="held-out accuracy of a checkpoint or a Hugging Face model")
    _config_args(ev)
    ev.add_argument("model", nargs="?", help="checkpoint folder, model folder or hub name (default: config model)")
    ev.set_defaults(func=commands.cmd_eval)

    _bench_parsers(sub)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    _config_args(export)
    export.add_argument("checkpoint", help="checkpoint folder (round-NNNNNN)")
    export.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    export.set_defaults(func=commands.cmd_export)

    keygen = sub.add_parser("keygen", help="create an Ed25519 key (peer or admin) and print its public key")
    keygen.add_argument("--out", required=True, help="private key file to create (never overwritten); "
                                                     "the public key goes to OUT.pub")
    keygen.set_defaults(func=commands.cmd_keygen)

    status = sub.add_parser("status", help="a coordinator's view of the run: peers, rounds, reward")
    _coordinator_address(status)
    status.set_defaults(func=commands.cmd_status)

    for action, verb in (("ban", "ban a peer: its token is not renewed and peers drop it"),
                         ("unban", "lift a ban")):
        admin = sub.add_parser(action, help=verb)
        admin.add_argument("peer_id", metavar="PEER", help="the peer id (base58)")
        _coordinator_address(admin)
        admin.add_argument("--key", required=True, help="the admin's Ed25519 key (PEM)")
        admin.add_argument("--reason", default="", help="shown in the ledger and the dashboard")
        admin.set_defaults(func=commands.cmd_admin)
    return parser
