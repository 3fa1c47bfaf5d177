"""``grpo-swarm keygen`` and the coordinator's start-up refusals, as a user meets them: one ``error:`` line,
exit status 2, and nothing created or changed."""

import base64
import stat

import pytest

from coordinator.ledger import Ledger
from protocol.identity import IdentityError, SigningKey
from protocol.keyfiles import read_public_keys
from tests.command import grpo_swarm, last_error_line
from tests.system.control_plane.conftest import CONFIG, RUN_ID


def test_keygen_writes_a_private_key_and_its_public_key_once(tmp_path):
    path = tmp_path / "keys" / "me.pem"
    made = grpo_swarm("keygen", "--out", str(path))
    assert made.returncode == 0, made.stderr
    key = SigningKey.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = base64.b64encode(key.public_key).decode()
    assert f"public key: {printed}" in made.stdout
    assert read_public_keys(path.with_name("me.pem.pub")) == [key.public_key]

    before = path.read_bytes()
    again = grpo_swarm("keygen", "--out", str(path))
    assert last_error_line(again) == f"error: {path} exists; not overwriting a key (choose another --out)"
    assert path.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    ("", "no public key in it"),
    ("not base64!\n", ":1: not a base64 Ed25519 public key"),
    (base64.b64encode(b"short").decode(), ":1: not a base64 Ed25519 public key"),
])
def test_bad_public_key_files_are_refused(tmp_path, content, message):
    path = tmp_path / "keys.pub"
    path.write_text(content)
    with pytest.raises(IdentityError, match=message):
        read_public_keys(path)


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


def coordinator(config_path, out, *extra):
    return grpo_swarm("coordinator", "--config", str(config_path), "--out", str(out), "--bind", "127.0.0.1",
                      "--grpc-port", "0", "--http-port", "0", *extra)


def test_coordinator_refuses_another_runs_ledger(config_path, tmp_path):
    out = tmp_path / "out"
    Ledger(out / "ledger.sqlite", "another-run", "digest").close()
    before = sorted(p.name for p in out.iterdir())
    result = coordinator(config_path, out)
    assert last_error_line(result).startswith(f"error: {out / 'ledger.sqlite'}: ledger of run 'another-run', "
                                              f"not '{RUN_ID}'")
    assert sorted(p.name for p in out.iterdir()) == before  # no key, no identity made


@pytest.mark.parametrize("option, message", [
    ("--admin-key", "no public key in it"),
    ("--verifier-keys", "no public key in it"),
    ("--key", "not a PEM private key"),
])
def test_coordinator_refuses_bad_key_files(config_path, tmp_path, option, message):
    empty = tmp_path / "empty"
    empty.write_text("")
    result = coordinator(config_path, tmp_path / "out", option, str(empty))
    assert message in last_error_line(result)
    assert not (tmp_path / "out").exists()


def test_coordinator_refuses_a_bad_multiaddr(config_path, tmp_path):
    result = coordinator(config_path, tmp_path / "out", "--host-maddrs", "/ip4/127.0.0.1/tcpp/0")
    assert last_error_line(result).startswith("error: --host-maddrs: '/ip4/127.0.0.1/tcpp/0' is not a valid multiaddr")
    assert not (tmp_path / "out").exists()
