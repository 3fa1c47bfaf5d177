"""docker/ checked without a Docker engine: the compose file parses, every command in it is a real
``grpo-swarm`` invocation the CLI's own parser accepts, its addresses and volumes agree with each
other, and the Dockerfiles copy files that exist, pin torch as pyproject does and install the package."""

import ipaddress
import re
import shlex
import tomllib
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest
import yaml

from cli.parser import build_parser
from protocol.config import load_config

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent
DOCKERFILES = ("Dockerfile.node", "Dockerfile.coordinator")
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PEERS = [name for name in SERVICES if name != "coordinator"]


def parse_command(argv: list[str]):
    """``argv`` parsed by ``grpo-swarm``'s parser (None for ``--help``); one clear failure otherwise."""
    assert argv and argv[0] == "grpo-swarm", f"not a grpo-swarm invocation: {argv}"
    errors = StringIO()
    try:
        with redirect_stderr(errors):
            return build_parser().parse_args([str(a) for a in argv[1:]])
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return None
        last = errors.getvalue().strip().splitlines()[-1:]
        raise AssertionError(f"`{shlex.join(argv)}` does not parse: {last[0] if last else e}") from None


def coordinator_args():
    return parse_command(SERVICES["coordinator"]["command"])


def test_compose_runs_a_coordinator_three_nodes_and_a_verifier():
    subcommands = sorted(service["command"][1] for service in SERVICES.values())
    assert subcommands == ["coordinator", "node", "node", "node", "verifier"]


@pytest.mark.parametrize("name", list(SERVICES))
def test_service_command_parses(name):
    args = parse_command(SERVICES[name]["command"])
    assert args.command == SERVICES[name]["command"][1]


@pytest.mark.parametrize("name", PEERS)
def test_peers_reach_the_coordinator_and_keep_their_identity(name):
    service, coordinator = SERVICES[name], coordinator_args()
    args = parse_command(service["command"])
    assert args.coordinator == f"coordinator:{coordinator.grpc_port}" == coordinator.public_address
    assert not getattr(args, "initial_peers", None), "nodes learn the DHT address from StatusReply.initial_peers"
    assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    volume, mount = service["volumes"][0].split(":")[:2]
    assert volume == f"{name}-data" and volume in COMPOSE["volumes"]
    for path in (args.key, args.identity, args.out):
        assert Path(path).is_relative_to(mount), f"{name}: {path} is not in its volume {mount}"


def test_peers_do_not_share_volumes():
    volumes = [v.split(":")[0] for service in SERVICES.values() for v in service["volumes"] if not v.startswith(".")]
    assert len(volumes) == len(set(volumes)) == len(SERVICES)


def test_coordinator_addresses_agree():
    service, args = SERVICES["coordinator"], coordinator_args()
    ip = service["networks"]["swarm"]["ipv4_address"]
    subnet = COMPOSE["networks"]["swarm"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(subnet)
    [host_maddr], [announce_maddr] = args.host_maddrs, args.announce_maddrs
    dht_port = host_maddr.rsplit("/", 1)[1]
    assert dht_port != "0", "the DHT port must be fixed: nodes learn the address once"
    assert announce_maddr == f"/ip4/{ip}/tcp/{dht_port}"
    assert {f"{args.http_port}:{args.http_port}", f"{args.grpc_port}:{args.grpc_port}"} <= set(service["ports"])
    assert f"http://127.0.0.1:{args.http_port}/metrics" in " ".join(service["healthcheck"]["test"])
    assert Path(args.identity).is_relative_to("/data") and args.out == "/data"


def test_mounted_run_config_exists_and_loads():
    args = coordinator_args()
    mounts = dict(reversed(v.split(":")[:2]) for v in SERVICES["coordinator"]["volumes"])
    source = DOCKER / mounts[args.config]
    assert source.is_file(), f"{args.config} is mounted from {source}, which does not exist"
    assert load_config(source).run.id == "docker-swarm"


@pytest.mark.parametrize("name", list(SERVICES))
def test_service_builds_from_a_dockerfile_here(name):
    build = SERVICES[name]["build"]
    assert (DOCKER / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).is_file()


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in map(str.strip, lines)
            if line and not line.startswith("#")]


def pinned_torch() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in dependencies if d.startswith("torch=="))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_the_package_pins_torch_and_installs(dockerfile):
    steps = instructions(DOCKER / dockerfile)
    copied = [source for op, args in steps if op == "COPY" for source in args.split()[:-1]]
    for source in copied:
        assert (REPO / source).exists(), f"{dockerfile} copies {source}, which is not in the repo"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    needed = {"pyproject.toml", "README.md"} | {f"{p.rstrip('*')}/" for p in packages["include"]}
    assert needed <= set(copied)

    runs = [args for op, args in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "pip install torch" in r)
    install_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert f"pip install {pinned_torch()} --index-url" in runs[torch_step]
    assert torch_step < install_step, "torch must be installed (pinned, from its index) before the package"

    ignored = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:], "the build context must be limited to what is copied"
    for source in copied:
        assert f"!{source}" in ignored, f"{source} is copied but left out of the build context"


def test_images_bases_and_default_commands():
    def base(dockerfile: str) -> str:
        steps = instructions(DOCKER / dockerfile)
        defaults = dict(args.split("=", 1) for op, args in steps if op == "ARG" and "=" in args)
        image = next(args for op, args in steps if op == "FROM")
        return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)

    assert base("Dockerfile.node").startswith("nvidia/cuda:")
    assert "python3.11" in (DOCKER / "Dockerfile.node").read_text()
    assert base("Dockerfile.coordinator").startswith("python:3.11-slim")
    for dockerfile in DOCKERFILES:
        [cmd] = [args for op, args in instructions(DOCKER / dockerfile) if op == "CMD"]
        parse_command(yaml.safe_load(cmd))  # the exec form is a JSON list
