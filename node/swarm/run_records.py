"""Every DHT node of an admitted run holds every value under the run's keys to that key's rule.

Any admitted peer can ask any DHT node to store any value under any key, subkey and expiration, and the
value with the latest expiration wins (a plain value even replaces a whole subkey dictionary). So each
DHT node refuses a record, whether a peer asks it to store one or another node returns one, unless it
fits the rule of its key (``KeyRule``): its shape (plain or one subkey per peer), the subkey's form, the
value's schema and size, and an expiration no later than the value's own lifetime allows.

=================================  ==================  ===========================================  =========
key (protocol/keys.py)             subkey              value                                        lives
=================================  ==================  ===========================================  =========
runs                               the run id          a "run" record the coordinator signed         1 h
{run}.tokens                       peer id             the coordinator's token for that peer id      its token
{run}.bans                         part index (int)    that part of the coordinator's signed bans    1 h
{run}.progress                     peer id             {round, digest}                               60 s
{run}.r{N}.contrib                 peer id             a signed contribution of that peer, round N   300 s
{run}.r{N}.verdicts                verifier/peer id    a signed verdict on that peer, round N        1 h
{prefix}.digests.r{N}.{group}      peer id             a signed digest of that peer, naming this key 120 s
{prefix}.0b{bits} (hivemind)       peer id bytes       bool: looking for a group (bits: the round)  matchmaking
{prefix}.all_averagers (hivemind)  peer id bytes       a finite number: the state's priority         state period
=================================  ==================  ===========================================  =========

A node sees only the hash of a key, so round-indexed keys are recognised from their values: a signed
record names its run, kind and round (an agreement digest also its group's key), and the node checks that
these hash to the key the record is under. A key no rule claims is refused: an admitted run's DHT holds the
run's records and nothing else. Signatures on signed records are checked here; that the signer is the peer
its subkey names (the key its token binds) is checked by readers, who hold the tokens.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from node.errors import one_line
from node.swarm.admission import read_token
from node.swarm.agreement import read_agreement
from node.swarm.ban_list import read_ban_part
from node.swarm.hivemind.authorizer import SwarmAuthorizer
from node.swarm.progress import read_progress
from protocol import swarm_pb2
from protocol.identity import P2PIdentity
from protocol.keys import (
    AGREEMENT_LIFETIME,
    BANS_LIFETIME,
    CONTRIBUTION_LIFETIME,
    PROGRESS_LIFETIME,
    RUN_RECORD_LIFETIME,
    RUNS_KEY,
    VERDICT_LIFETIME,
    averaging_prefix,
    bans_key,
    contributions_key,
    matchmaking_keys,
    progress_key,
    state_donors_key,
    tokens_key,
    verdicts_key,
)
from protocol.records import MAX_RECORD_BYTES, check_signature, parse_body, parse_record

logger = logging.getLogger(__name__)
EXPIRATION_SLACK = 30.0  # seconds an expiration may pass its value's lifetime (clock skew, signing then storing)
# The coordinator stores tokens and ban lists with exactly their own expirations; a slack of 30 s would let an
# old ban list outlive one signed less than 30 s after it.
EXACT_SLACK = 1.0
MAX_VALUE_BYTES = MAX_RECORD_BYTES + 16  # any key's, before parsing (a signed record and msgpack's header)
MAX_SUBKEY_BYTES = 256  # two peer ids and a slash, in msgpack
SMALL_VALUE_BYTES = 512  # progress, agreement digests, hivemind's flags and priorities
TOKEN_BYTES = 4096
# hivemind declares a matchmaking entry until the step's scheduled time and a state donor for its
# declare_state_period (30 s by default); both are refreshed, so a cap of minutes loses nothing honest.
HIVEMIND_LIFETIME = 300.0
AGREEMENT_KEY = re.compile(r"^(?P<prefix>.+)\.digests\.r(?P<round>\d+)\.(?P<group>[0-9a-f]{16})$")


class RefusedRecord(ValueError):
    """A DHT record that breaks its key's rule; the message says which part."""


class TokenBook:
    """The signing key each admitted peer's token binds, as this DHT process has seen the tokens: its own, those
    in the requests and responses its authorizer checked, and those in the token records it validated (every
    peer reads the tokens key each round). A per-peer record is refused unless it is signed by the key its
    subkey's peer holds: so no peer writes under another's name, and nobody fills a key with entries of peer
    ids that hold no token. At most MAX_PEERS peers are kept (the expired go first)."""

    MAX_PEERS = 100_000

    def __init__(self):
        self._keys: dict[str, tuple[bytes, float]] = {}  # peer id -> (signing key, token expiry)

    def add(self, token: swarm_pb2.AccessToken) -> None:
        known = self._keys.get(token.peer_id)
        if known is None or token.expires_at >= known[1]:
            self._keys[token.peer_id] = (token.public_key, token.expires_at)
        if len(self._keys) > self.MAX_PEERS:
            now = time.time()
            self._keys = {peer: entry for peer, entry in self._keys.items() if entry[1] > now}
            while len(self._keys) > self.MAX_PEERS:
                self._keys.pop(next(iter(self._keys)))

    def check_signer(self, peer_id: str, signer: bytes, what: str) -> None:
        known = self._keys.get(peer_id)
        if known is None:
            raise RefusedRecord(f"{what}: a record under {peer_id}, whose token this DHT node has not seen")
        if known[0] != signer:
            raise RefusedRecord(f"{what}: a record under {peer_id} signed by another key than its token's")


@dataclass(frozen=True)
class KeyRule:
    """What a DHT node accepts under one key. ``check(subkey, value)`` parses both (raising on anything else)
    and returns the latest expiration the value allows."""

    name: str
    subkeyed: bool
    max_value_bytes: int
    check: Callable[[Any, Any], float]
    slack: float = EXPIRATION_SLACK


class RunRecords(RecordValidatorBase):
    """The rules of one admitted run's keys (see the module doc), for ``start_dht(record_validators=...)``."""

    def __init__(self, run_id: str, coordinator_public_key: bytes, book: Optional[TokenBook] = None):
        self.run_id, self.coordinator_public_key = run_id, coordinator_public_key
        self.book = book if book is not None else TokenBook()
        self.prefix = averaging_prefix(run_id)
        rules = [
            KeyRule("runs", True, MAX_VALUE_BYTES, self._run),
            KeyRule("tokens", True, TOKEN_BYTES, self._token, slack=EXACT_SLACK),
            KeyRule("bans", True, MAX_VALUE_BYTES, self._bans, slack=EXACT_SLACK),
            KeyRule("progress", True, SMALL_VALUE_BYTES, self._progress),
            KeyRule("state donors", True, SMALL_VALUE_BYTES, _state_donor),
        ]
        keys = [RUNS_KEY, tokens_key(run_id), bans_key(run_id), progress_key(run_id), state_donors_key(self.prefix)]
        self._fixed = {_hashed(key): rule for key, rule in zip(keys, rules, strict=True)}
        matchmaking = KeyRule("matchmaking", True, SMALL_VALUE_BYTES, _matchmaking)
        self._fixed.update({_hashed(key): matchmaking for key in matchmaking_keys(self.prefix)})
        # round-indexed keys: the signed record's kind picks the rule (_named_rule)
        self._by_kind = {
            "contribution": KeyRule("contributions", True, MAX_VALUE_BYTES, self._contribution),
            "verdict": KeyRule("verdicts", True, MAX_VALUE_BYTES, self._verdict),
            "agreement": KeyRule("agreement", True, SMALL_VALUE_BYTES, self._agreement),
        }

    # ---- hivemind's interface -----------------------------------------------------------------------
    def validate(self, record: DHTRecord) -> bool:
        refused = self.refusal(record)
        if refused is not None:
            logger.info(f"DHT record refused: {refused}")
        return refused is None

    # ---- the rules ---------------------------------------------------------------------------------
    def refusal(self, record: DHTRecord) -> Optional[str]:
        """Why ``record`` breaks its key's rule; None when it fits."""
        try:
            self.check(record)
        except Exception as e:  # anything a peer stored: undecodable, oversized, unsigned, stale, misplaced
            return one_line(e)
        return None

    def check(self, record: DHTRecord) -> None:
        """Raises RefusedRecord (or another error, while parsing) unless ``record`` fits its key's rule."""
        if len(record.value) > MAX_VALUE_BYTES or len(record.subkey) > MAX_SUBKEY_BYTES:
            raise RefusedRecord(f"a value of {len(record.value)} bytes under a subkey of {len(record.subkey)} (limits "
                                f"{MAX_VALUE_BYTES}, {MAX_SUBKEY_BYTES})")
        subkey = MSGPackSerializer.loads(record.subkey)  # None for a plain value (hivemind's subkey for one)
        value = MSGPackSerializer.loads(record.value)
        rule = self._fixed.get(record.key) or self._named_rule(record.key, value)
        if rule.subkeyed != (subkey is not None):
            raise RefusedRecord(f"{rule.name}: {'a plain value' if subkey is None else 'a subkey'} where "
                                f"{'subkeys' if rule.subkeyed else 'a plain value'} belong")
        if len(record.value) > rule.max_value_bytes:
            raise RefusedRecord(f"{rule.name}: a value of {len(record.value)} bytes (limit {rule.max_value_bytes})")
        latest = rule.check(subkey, value)
        if not record.expiration_time <= latest + rule.slack:
            raise RefusedRecord(f"{rule.name} under {subkey!r:.60}: expires {record.expiration_time - latest:.0f}s "
                                f"after its value allows")

    def _named_rule(self, key: bytes, value) -> KeyRule:
        """The rule of a round-indexed key, from the signed record stored under it, which names that key."""
        if not isinstance(value, bytes):
            raise RefusedRecord(f"a value under a key of no rule: {value!r:.80}")
        record = parse_record(value)
        if record.run_id == self.run_id and record.kind == "contribution":
            expected = contributions_key(self.run_id, record.round)
        elif record.run_id == self.run_id and record.kind == "verdict":
            expected = verdicts_key(self.run_id, record.round)
        elif record.run_id == self.run_id and record.kind == "agreement":
            expected = record.body.decode("utf-8", errors="replace").partition("\n")[0]
            named = AGREEMENT_KEY.match(expected)
            if named is None or named["prefix"] != self.prefix or int(named["round"]) != record.round:
                raise RefusedRecord(f"an agreement digest naming key {expected!r:.80}, not one of round "
                                    f"{record.round} of this run")
        else:
            raise RefusedRecord(f"a {record.kind!r} record of run {record.run_id!r} under a key of no rule")
        rule = self._by_kind[record.kind]
        if _hashed(expected) != key:
            raise RefusedRecord(f"{rule.name}: the value names key {expected!r}, not the one it is stored under")
        return rule

    def _agreement(self, subkey, value) -> float:
        record, _, _ = read_agreement(value, self.run_id)
        self.book.check_signer(_peer_id(subkey), record.public_key, "agreement")
        return record.timestamp + AGREEMENT_LIFETIME

    def _run(self, subkey, value) -> float:
        if subkey != self.run_id:
            raise RefusedRecord(f"runs: an announcement of run {subkey!r:.60} in run {self.run_id!r}'s DHT")
        record = _signed(value, self.run_id, "run")
        if record.public_key != self.coordinator_public_key:
            raise RefusedRecord("runs: an announcement not signed by the coordinator")
        return record.timestamp + RUN_RECORD_LIFETIME

    def _token(self, subkey, value) -> float:
        if not isinstance(value, bytes):
            raise RefusedRecord(f"tokens: {type(value).__name__}, not a token")
        token = read_token(value, self.coordinator_public_key, self.run_id, _peer_id(subkey))
        self.book.add(token)
        return token.expires_at

    def _progress(self, subkey, value) -> float:
        signer, _ = read_progress(value, self.run_id)
        self.book.check_signer(_peer_id(subkey), signer, "progress")
        return get_dht_time() + PROGRESS_LIFETIME

    def _bans(self, subkey, value) -> float:
        signed_at, _ = read_ban_part(value, subkey, self.coordinator_public_key, self.run_id)
        return signed_at + BANS_LIFETIME

    def _contribution(self, subkey, value) -> float:
        record = _signed(value, self.run_id, "contribution")
        contribution = parse_body(record, swarm_pb2.Contribution)
        if contribution.peer_id != _peer_id(subkey):
            raise RefusedRecord(f"contributions: {contribution.peer_id!r:.60}'s contribution under {subkey!r:.60}")
        self.book.check_signer(subkey, record.public_key, "contributions")
        return record.timestamp + CONTRIBUTION_LIFETIME

    def _verdict(self, subkey, value) -> float:
        record = _signed(value, self.run_id, "verdict")
        verdict = parse_body(record, swarm_pb2.Verdict)
        verifier, _, contributor = subkey.partition("/") if isinstance(subkey, str) else ("", "", "")
        if contributor != verdict.peer_id or verdict.round != record.round:
            raise RefusedRecord(f"verdicts: a verdict on {verdict.peer_id!r:.60} under {subkey!r:.60}")
        self.book.check_signer(_peer_id(verifier), record.public_key, "verdicts")
        return record.timestamp + VERDICT_LIFETIME


def _hashed(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


def _peer_id(subkey) -> str:
    """``subkey`` if it is a peer id in base58 (how our records name peers)."""
    if not isinstance(subkey, str) or not 0 < len(subkey) <= 128:
        raise RefusedRecord(f"subkey {subkey!r:.60} is not a peer id")
    try:
        _multihash(PeerID.from_base58(subkey).to_bytes())
    except Exception:
        raise RefusedRecord(f"subkey {subkey!r:.60} is not a peer id") from None
    return subkey


def _peer_id_bytes(subkey) -> PeerID:
    """``subkey`` if it is a peer id in bytes (how hivemind's averager names peers)."""
    if not isinstance(subkey, bytes):
        raise RefusedRecord(f"subkey {subkey!r:.60} is not a peer id")
    _multihash(subkey)
    return PeerID(subkey)


def _multihash(data: bytes) -> None:
    """A libp2p peer id is the multihash of its public key: sha2-256 (code 0x12, 32 bytes; RSA keys) or identity
    (code 0x00, the key itself, at most 42 bytes; Ed25519 keys). PeerID parses any bytes, so we check."""
    if data[:2] == b"\x12\x20" and len(data) == 34:
        return
    if len(data) >= 2 and data[0] == 0 and data[1] <= 42 and len(data) == 2 + data[1]:
        return
    raise RefusedRecord(f"{data!r:.60} is not a peer id (a sha2-256 or identity multihash)")


def _signed(value, run_id: str, kind: str) -> swarm_pb2.SignedRecord:
    """A signed record of ``kind`` in ``run_id``, signed when it says (not later than the slack from now)."""
    record = parse_record(value)
    check_signature(record)
    if record.run_id != run_id or record.kind != kind:
        raise RefusedRecord(f"a {record.kind!r} record of run {record.run_id!r} where a {kind!r} record belongs")
    if not math.isfinite(record.timestamp) or record.timestamp > get_dht_time() + EXPIRATION_SLACK:
        raise RefusedRecord(f"a {kind} record signed in the future ({record.timestamp})")
    return record


def _matchmaking(subkey, value) -> float:
    _peer_id_bytes(subkey)
    if not isinstance(value, bool):
        raise RefusedRecord(f"matchmaking: {value!r:.60} is not a flag")
    return get_dht_time() + HIVEMIND_LIFETIME


def _state_donor(subkey, value) -> float:
    _peer_id_bytes(subkey)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RefusedRecord(f"state donors: {value!r:.60} is not a finite priority")
    return get_dht_time() + HIVEMIND_LIFETIME


def dht_auth_kwargs(identity: P2PIdentity, coordinator_public_key: bytes, run_id: str,
                    token: swarm_pb2.AccessToken) -> dict:
    """Extra start_dht kwargs for a DHT that speaks only to admitted peers (node/swarm/admission.py) and keeps
    only the run's records, each to its key's rule."""
    book = TokenBook()  # shared in the DHT process: the authorizer meets tokens, the rules use their keys
    return {"authorizer": SwarmAuthorizer(identity, coordinator_public_key, run_id, token, on_token=book.add),
            "record_validators": [RunRecords(run_id, coordinator_public_key, book)]}
