"""Our access token inside hivemind's DHT authorization, and pushed into the DHT process.

hivemind's TokenAuthorizerBase signs every DHT request and response with the peer's libp2p RSA key and
attaches an access token. ``SwarmAuthorizer`` carries our coordinator's AccessToken inside hivemind's
(its ``signature`` field holds the whole serialized token) and accepts only tokens our coordinator
signed for this run, naming that same RSA key, and not banned.

The authorizer lives in the DHT process: ``token_installer`` and ``bans_installer`` give coroutines for
``DHT.run_coroutine`` that reach it through the DHT node's protocol. A renewed token replaces hivemind's
cached one (a private attribute), so the next request carries it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterable

from google.protobuf.message import DecodeError
from hivemind.proto.auth_pb2 import AccessToken as HivemindToken
from hivemind.utils.auth import TokenAuthorizerBase

from protocol import swarm_pb2
from protocol.identity import P2PIdentity
from protocol.tokens import TokenError, check_token

logger = logging.getLogger(__name__)
REFRESH_FRACTION = 0.5  # the DHT process asks for the pushed token once half of its lifetime is gone


def wrap_token(token: swarm_pb2.AccessToken) -> HivemindToken:
    return HivemindToken(username=token.peer_id, public_key=token.p2p_public_key,
                         expiration_time=str(token.expires_at), signature=token.SerializeToString())


def unwrap_token(wrapped: HivemindToken) -> swarm_pb2.AccessToken:
    token = swarm_pb2.AccessToken.FromString(wrapped.signature)
    if token.peer_id != wrapped.username or token.p2p_public_key != wrapped.public_key:
        raise TokenError("hivemind token fields differ from the coordinator token inside it")
    return token


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind DHT authorizer admitting holders of a current, unbanned token of this run."""

    def __init__(self, identity: P2PIdentity, coordinator_public_key: bytes, run_id: str,
                 token: swarm_pb2.AccessToken, on_token: Callable[[swarm_pb2.AccessToken], None] = lambda token: None):
        """``on_token`` hears of every valid token a request or response carried."""
        super().__init__(local_private_key=identity.hivemind_key())
        self.coordinator_public_key, self.run_id, self.on_token = coordinator_public_key, run_id, on_token
        self.banned: frozenset[str] = frozenset()
        self._pushed = token
        on_token(token)

    def set_token(self, token: swarm_pb2.AccessToken) -> None:
        self._pushed = token
        self.on_token(token)
        self._local_access_token = None  # taken (and checked) on the next request

    async def get_token(self) -> HivemindToken:
        return wrap_token(self._pushed)

    def is_token_valid(self, access_token: HivemindToken) -> bool:
        try:
            token = unwrap_token(access_token)
            check_token(token, self.coordinator_public_key, run_id=self.run_id)
        except (TokenError, ValueError, DecodeError) as e:  # the token comes from the requesting peer
            logger.debug(f"DHT request refused: {e}")
            return False
        self.on_token(token)
        return token.peer_id not in self.banned

    def does_token_need_refreshing(self, access_token: HivemindToken) -> bool:
        token = swarm_pb2.AccessToken.FromString(access_token.signature)
        return time.time() > token.issued_at + REFRESH_FRACTION * (token.expires_at - token.issued_at)


def token_installer(token: swarm_pb2.AccessToken):
    """For ``DHT.run_coroutine``: the DHT process's authorizer shows ``token`` from now on."""
    return functools.partial(_set_token, token.SerializeToString())


def bans_installer(banned: Iterable[str]):
    """For ``DHT.run_coroutine``: the DHT process's authorizer refuses these peers' tokens."""
    return functools.partial(_set_banned, tuple(sorted(banned)))


async def _set_token(token_bytes: bytes, _dht, node) -> None:
    node.protocol.authorizer.set_token(swarm_pb2.AccessToken.FromString(token_bytes))


async def _set_banned(banned: tuple, _dht, node) -> None:
    node.protocol.authorizer.banned = frozenset(banned)
