"""Peer identities: an Ed25519 signing key per peer, bound to its libp2p (RSA) identity.

The Ed25519 key signs every record the peer publishes. The libp2p key is what the p2p daemon
authenticates connections with (its hash is the peer id), so a registration carries a signature by
both: the coordinator then knows that whoever holds the Ed25519 key also holds the peer id.
Keys are files with mode 0600: Ed25519 as PKCS#8 PEM, libp2p as hivemind writes it
(a libp2p ``PrivateKey`` protobuf holding a DER RSA key).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

PUBLIC_KEY_BYTES = 32
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class IdentityError(ValueError):
    """A key file that is missing, unreadable or of the wrong kind."""


class SigningKey:
    """An Ed25519 private key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey | None = None):
        self._key = key or ed25519.Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def save(self, path: str | os.PathLike) -> None:
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        _write_private(Path(path), pem)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKey":
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except FileNotFoundError:
            raise IdentityError(f"{path}: no such key file (create one with `grpo-swarm keygen --out {path}`)") \
                from None
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{path}: not a PEM private key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise IdentityError(f"{path}: not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "SigningKey":
        if Path(path).exists():
            return cls.load(path)
        key = cls()
        key.save(path)
        return key


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``data``; False for malformed input."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def fingerprint(public_key: bytes) -> str:
    """A short name for a public key in logs and tables."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# ---- libp2p identity ------------------------------------------------------------------------------

class P2PIdentity:
    """The libp2p RSA identity of a peer, read from hivemind's identity file."""

    def __init__(self, key: rsa.RSAPrivateKey):
        self._key = key
        self.public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
        self.peer_id = peer_id_from_public_der(self.public_der)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "P2PIdentity":
        from hivemind.p2p import P2P
        from hivemind.proto import crypto_pb2

        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        try:
            data = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
            key = serialization.load_der_private_key(data, password=None)
        except Exception as e:
            raise IdentityError(f"{path}: not a libp2p identity file ({type(e).__name__}: {e})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(f"{path}: libp2p identity is not an RSA key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PSS, hashes.SHA256())

    def hivemind_key(self):
        """The same key as hivemind's RSAPrivateKey, for signing DHT requests (hivemind.utils.auth)."""
        from hivemind.utils.crypto import RSAPrivateKey

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = self._key
        return key

    def hivemind_public_key(self) -> bytes:
        return self.hivemind_key().get_public_key().to_bytes()


def peer_id_from_public_der(public_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key given as DER SubjectPublicKeyInfo."""
    from hivemind.proto import crypto_pb2

    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    multihash = bytes([0x12, 0x20]) + hashlib.sha256(encoded).digest()  # sha2-256, 32 bytes
    return base58.b58encode(multihash).decode()


def verify_p2p(public_der: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is the libp2p RSA key's PSS signature of ``data``; False for malformed input."""
    try:
        key = serialization.load_der_public_key(public_der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, _PSS, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


BINDING_DOMAIN = b"grpo-swarm/p2p-binding/v1"


def binding_bytes(public_key: bytes, run_id: str, timestamp: float) -> bytes:
    """What a peer's libp2p key signs when it registers: "the holder of this peer id also holds the Ed25519 key
    ``public_key``, in run ``run_id``". ``timestamp`` is the register record's, so the binding is only as
    fresh as the record that carries it (the record's nonce is chosen when it is signed, after this).
    DOMAIN, then each field as u64 length + bytes (run id utf-8, timestamp f64 big-endian)."""
    parts = [BINDING_DOMAIN, public_key, run_id.encode(), struct.pack(">d", timestamp)]
    return b"".join(struct.pack(">Q", len(part)) + part for part in parts)


def hivemind_public_key(public_der: bytes) -> bytes:
    """The encoding hivemind's authorizer uses for the same RSA key (OpenSSH), to match DHT requests."""
    key = serialization.load_der_public_key(public_der)
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
