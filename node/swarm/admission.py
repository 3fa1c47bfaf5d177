"""Admission: only peers holding a current coordinator token (and not banned) take part.

Two doors, both keyed on the libp2p peer id that the p2p daemon authenticates:

- DHT RPCs: hivemind's TokenAuthorizerBase signs every request and response with the peer's libp2p
  RSA key and attaches an access token; ``SwarmAuthorizer`` (node/swarm/hivemind/authorizer.py) accepts
  only tokens our coordinator signed for this run, naming that same RSA key, and not banned.
- Averaging RPCs (which hivemind does not authorize): the averager admits the peer ids in
  ``Admission.admitted()``, built from the tokens peers publish under ``tokens_key(run)`` and the
  coordinator's signed ban list under ``bans_key(run)``, in parts (node/swarm/ban_list.py; the averager:
  node/swarm/hivemind/averager.py).

The authorizer lives in the DHT process; the host renews the token with the coordinator and pushes
it (and the ban list) there with ``push_token`` / ``push_bans``. A token outlives a coordinator
outage by its remaining lifetime, so peers train on while the coordinator restarts.

Any admitted peer may store to the DHT, where the value with the latest expiration wins. So every
DHT node also refuses, under the tokens and ban-list keys, values the coordinator did not sign and
expirations past their token's or list's own (node/swarm/run_records.py, which holds every key of the
run to a rule): otherwise one peer could bury the others' renewed tokens, or the newest ban list, under
its own bytes.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

import hivemind
from google.protobuf.message import DecodeError

from node.swarm.ban_list import BanList, newest_ban_list
from node.swarm.dht import dht_get
from node.swarm.hivemind.authorizer import bans_installer, token_installer
from protocol import swarm_pb2
from protocol.keys import bans_key, tokens_key
from protocol.tokens import TokenError, check_token

logger = logging.getLogger(__name__)


def read_token(data: bytes, coordinator_public_key: bytes, run_id: str, peer_id: str) -> swarm_pb2.AccessToken:
    """``peer_id``'s current token of this run, signed by the coordinator; raises TokenError otherwise."""
    try:
        token = swarm_pb2.AccessToken.FromString(data)
    except (DecodeError, ValueError, TypeError) as e:
        raise TokenError(f"not a token ({e})") from None
    check_token(token, coordinator_public_key, run_id=run_id, peer_id=peer_id)
    return token


def push_token(dht: hivemind.DHT, token: swarm_pb2.AccessToken) -> None:
    """Hand a renewed token to the DHT process and publish it for the averagers of other peers."""
    dht.run_coroutine(token_installer(token))
    dht.store(tokens_key(token.run_id), token.SerializeToString(), token.expires_at, subkey=token.peer_id,
              return_future=True)


def push_bans(dht: hivemind.DHT, banned: Iterable[str]) -> None:
    dht.run_coroutine(bans_installer(banned))


class Admission:
    """The host's view of who may take part: current tokens from the DHT minus the coordinator's bans."""

    def __init__(self, run_id: str, coordinator_public_key: bytes):
        self.run_id, self.coordinator_public_key = run_id, coordinator_public_key
        self.tokens: dict[str, swarm_pb2.AccessToken] = {}
        self.banned: set[str] = set()
        self._bans_signed_at = 0.0

    def add_token(self, peer_id: str, data: bytes) -> Optional[str]:
        """Keep ``data`` as ``peer_id``'s token if it is one; returns why not otherwise."""
        try:
            token = read_token(data, self.coordinator_public_key, self.run_id, peer_id)
        except TokenError as e:
            return str(e)
        known = self.tokens.get(peer_id)
        if known is None or token.expires_at >= known.expires_at:
            self.tokens[peer_id] = token
        return None

    def set_bans(self, bans: BanList) -> None:
        """Take the coordinator's ban list if it is newer than the one held."""
        if bans.signed_at >= self._bans_signed_at:
            self._bans_signed_at = bans.signed_at
            self.banned = set(bans.banned)

    def refresh(self, dht: hivemind.DHT) -> None:
        """Read the run's tokens and ban list from the DHT (invalid entries are dropped with a log line)."""
        found = dht_get(dht, tokens_key(self.run_id))
        if found is not None and isinstance(found.value, dict):
            for peer_id, entry in found.value.items():
                problem = self.add_token(str(peer_id), entry.value) if isinstance(entry.value, bytes) else "not bytes"
                if problem:
                    logger.debug(f"token of {peer_id} dropped: {problem}")
        found = dht_get(dht, bans_key(self.run_id))
        if found is not None and isinstance(found.value, dict):
            parts = {subkey: entry.value for subkey, entry in found.value.items()}
            bans, dropped = newest_ban_list(parts, self.coordinator_public_key, self.run_id)
            for problem in dropped:
                logger.warning(f"{problem}: dropped")
            if bans is not None:
                self.set_bans(bans)

    def token_of(self, peer_id: str) -> Optional[swarm_pb2.AccessToken]:
        """``peer_id``'s current token, or None (none seen, expired, or banned)."""
        token = self.tokens.get(peer_id)
        if token is None or peer_id in self.banned or time.time() > token.expires_at:
            return None
        return token

    def admitted(self) -> set[str]:
        return {peer_id for peer_id in self.tokens if self.token_of(peer_id) is not None}
