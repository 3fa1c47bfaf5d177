"""``grpo-swarm keygen``: a peer's or an admin's Ed25519 key, and the public-key files other roles read.

The private key is PKCS#8 PEM (mode 0600, never overwritten); next to it ``<key>.pub`` holds the public key
as one base64 line, the format of ``--admin-key`` and of ``--verifier-keys`` (one key per line).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from protocol.identity import PUBLIC_KEY_BYTES, IdentityError, SigningKey


def public_key_text(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode()


def generate_key(path: str | Path) -> SigningKey:
    """Write a new key to ``path`` and its public key to ``path.pub``; refuses to overwrite either."""
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise IdentityError(f"{existing} exists; not overwriting a key (choose another --out)")
    key = SigningKey()
    key.save(path)
    public_path.write_text(public_key_text(key.public_key) + "\n")
    return key


def read_public_keys(path: str | Path) -> list[bytes]:
    """The public keys in a file of base64 lines (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise IdentityError(f"{path}: cannot read public keys ({e.strerror or e})") from None
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error:
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise IdentityError(f"{path}:{number}: not a base64 Ed25519 public key (as `grpo-swarm keygen` writes)")
        keys.append(key)
    if not keys:
        raise IdentityError(f"{path}: no public key in it")
    return keys


def read_public_key(path: str | Path) -> bytes:
    keys = read_public_keys(path)
    if len(keys) != 1:
        raise IdentityError(f"{path}: holds {len(keys)} public keys, expected one")
    return keys[0]
