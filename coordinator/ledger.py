"""The run's ledger: one SQLite file (WAL) with peers, rounds, contributions, verdicts, bans and metrics.

Every write is one transaction, committed before the RPC that caused it answers, so a ``kill -9`` of the
coordinator loses nothing it acknowledged (WAL with ``synchronous=NORMAL`` survives a process kill; only an
OS crash can lose the last commits). Each write also stores the nonce of the signed record that caused it,
in the same transaction: a replayed record is refused even after a restart, and a refused request leaves
nothing behind.

The file names its run and config digest; opening another run's ledger, or a file that is not a ledger,
is a LedgerError, never a silent mix of two runs.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from protocol import swarm_pb2
from protocol.records import DEFAULT_MAX_AGE

SCHEMA_VERSION = 2
APPLICATION_ID = 0x67727077  # "grpw": marks the file as a grpo-swarm ledger
NONCE_HORIZON = 2 * DEFAULT_MAX_AGE  # records older than this are refused by age anyway

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE peers (
    peer_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, p2p_public_key BLOB NOT NULL, role TEXT NOT NULL,
    address TEXT NOT NULL, registered_at REAL NOT NULL, last_seen REAL NOT NULL, round INTEGER NOT NULL DEFAULT 0,
    model_digest TEXT NOT NULL DEFAULT '', banned INTEGER NOT NULL DEFAULT 0, ban_reason TEXT NOT NULL DEFAULT '');
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, reward REAL, accuracy REAL, allreduce_seconds REAL, peers INTEGER NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE contributions (
    peer_id TEXT NOT NULL, round INTEGER NOT NULL, token_count REAL, mean_reward REAL, grad_norm REAL,
    model_digest TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (peer_id, round));
CREATE TABLE verdicts (
    verifier TEXT NOT NULL, peer_id TEXT NOT NULL, round INTEGER NOT NULL, passed INTEGER NOT NULL,
    "check" TEXT NOT NULL, evidence TEXT NOT NULL, contribution_digest BLOB NOT NULL, at REAL NOT NULL);
CREATE INDEX verdicts_by_peer ON verdicts (peer_id);
CREATE TABLE bans (
    peer_id TEXT NOT NULL, reason TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL, lifted_at REAL,
    lifted_by TEXT);
CREATE TABLE metrics (peer_id TEXT NOT NULL, round INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (peer_id, round, name));
CREATE INDEX metrics_by_round ON metrics (round, name);
CREATE TABLE nonces (nonce BLOB PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX nonces_by_age ON nonces (at);
"""
# Trainers' reports of peers they caught breaking the protocol (service.py Heartbeat): one per reporter and culprit.
REPORTS_TABLE = """
CREATE TABLE reports (peer_id TEXT NOT NULL, reporter TEXT NOT NULL, round INTEGER NOT NULL, what TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (peer_id, reporter))"""
SCHEMA += REPORTS_TABLE + ";\n"
MIGRATIONS = {1: [REPORTS_TABLE]}  # the statements that bring a ledger of schema vN to vN+1
LIVE_SECONDS = 120.0  # a trainer heard from this recently is live: it has a voice on reported culprits
PEERS_PAGE = 500  # peers in one status reply (76 KB measured with 500 peers and p2p addresses)
ROUNDS_PAGE = 1000  # rounds in one status reply (34 KB measured)
MIN_REPORTERS = 2  # one reporter bans no one, even when it is the only trainer heard from (after an outage)


class LedgerError(RuntimeError):
    """The ledger file cannot be used for this run (not a ledger, another run, newer schema)."""


class ReplayedRecord(ValueError):
    """A signed record whose nonce the ledger has already consumed."""


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    public_key: bytes
    p2p_public_key: bytes
    role: str
    address: str
    banned: bool
    ban_reason: str


class Ledger:
    """The ledger of one run. Thread-safe: the gRPC workers share one connection behind a lock."""

    def __init__(self, path: str | Path, run_id: str, config_digest: str):
        self.path = Path(path)
        self.run_id, self.config_digest = run_id, config_digest
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._open_or_create()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise LedgerError(f"{self.path}: not a grpo-swarm ledger ({e})") from None
        except LedgerError:
            self._db.close()
            raise

    def _open_or_create(self) -> None:
        """Check what the file is before changing anything in it (even the journal mode is a write)."""
        application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and tables == 0:
            self._set_journal()
            with self._write() as db:
                for statement in SCHEMA.split(";")[:-1]:
                    db.execute(statement)
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("run_id", self.run_id),
                                                                 ("config_digest", self.config_digest),
                                                                 ("created_at", repr(time.time()))])
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return
        if application_id != APPLICATION_ID:
            raise LedgerError(f"{self.path}: not a grpo-swarm ledger (an SQLite file of something else)")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION or any(old not in MIGRATIONS for old in range(version, SCHEMA_VERSION)):
            raise LedgerError(f"{self.path}: ledger schema v{version}, this coordinator reads v{SCHEMA_VERSION}")
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("run_id") != self.run_id:
            raise LedgerError(f"{self.path}: ledger of run {meta.get('run_id')!r}, not {self.run_id!r} "
                              "(use another --out for another run)")
        if meta.get("config_digest") != self.config_digest:
            raise LedgerError(f"{self.path}: run {self.run_id!r} was started with config "
                              f"{meta.get('config_digest', '')[:12]}, this config is {self.config_digest[:12]} "
                              "(a run's config cannot change; start a new run id)")
        self._set_journal()
        if version < SCHEMA_VERSION:
            with self._write() as db:
                for old in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[old]:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _set_journal(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self, nonce: Optional[bytes] = None, timestamp: Optional[float] = None) -> Iterator[sqlite3.Connection]:
        """One transaction; with ``nonce``, the record's nonce is consumed in it (ReplayedRecord if seen)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if nonce is not None:
                    try:
                        self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, timestamp))
                    except sqlite3.IntegrityError:
                        raise ReplayedRecord("replayed record (nonce already used)") from None
                    self._db.execute("DELETE FROM nonces WHERE at < ?", (time.time() - NONCE_HORIZON,))
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    # ---- peers ---------------------------------------------------------------------------------
    def peer(self, peer_id: str) -> Optional[PeerRow]:
        rows = self._read("SELECT peer_id, public_key, p2p_public_key, role, address, banned, ban_reason "
                          "FROM peers WHERE peer_id = ?", (peer_id,))
        if not rows:
            return None
        peer_id, public_key, p2p_public_key, role, address, banned, ban_reason = rows[0]
        return PeerRow(peer_id, public_key, p2p_public_key, role, address, bool(banned), ban_reason)

    def register(self, peer_id: str, public_key: bytes, p2p_public_key: bytes, role: str, address: str,
                 nonce: bytes, timestamp: float, now: float) -> None:
        """Add the peer, or refresh the role and address of a peer registered before with the same key."""
        with self._write(nonce, timestamp) as db:
            db.execute("INSERT INTO peers (peer_id, public_key, p2p_public_key, role, address, registered_at, "
                       "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET "
                       "role = excluded.role, address = excluded.address, last_seen = excluded.last_seen",
                       (peer_id, public_key, p2p_public_key, role, address, now, now))

    def touch(self, peer_id: str, nonce: bytes, timestamp: float, now: float) -> None:
        """A token renewal: the peer is alive."""
        with self._write(nonce, timestamp) as db:
            db.execute("UPDATE peers SET last_seen = ? WHERE peer_id = ?", (now, peer_id))

    def signing_key_of(self, peer_id: str) -> Optional[bytes]:
        """The Ed25519 key a registered, unbanned peer signs its records with; None for anyone else."""
        row = self.peer(peer_id)
        return None if row is None or row.banned else row.public_key

    def banned_peers(self) -> list[str]:
        return [row[0] for row in self._read("SELECT peer_id FROM peers WHERE banned = 1 ORDER BY peer_id")]

    def ban(self, peer_id: str, reason: str, by: str, nonce: bytes, timestamp: float, now: float) -> bool:
        """Ban ``peer_id``; False when it already was (the record is consumed all the same)."""
        with self._write(nonce, timestamp) as db:
            return self._ban(db, peer_id, reason, by, now)

    @staticmethod
    def _ban(db: sqlite3.Connection, peer_id: str, reason: str, by: str, now: float) -> bool:
        changed = db.execute("UPDATE peers SET banned = 1, ban_reason = ? WHERE peer_id = ? AND banned = 0",
                             (reason, peer_id)).rowcount
        if changed:
            db.execute("INSERT INTO bans (peer_id, reason, by, at) VALUES (?, ?, ?, ?)", (peer_id, reason, by, now))
        return bool(changed)

    def unban(self, peer_id: str, by: str, nonce: bytes, timestamp: float, now: float) -> bool:
        """Lift the ban on ``peer_id``; False when it was not banned."""
        with self._write(nonce, timestamp) as db:
            changed = db.execute("UPDATE peers SET banned = 0, ban_reason = '' WHERE peer_id = ? AND banned = 1",
                                 (peer_id,)).rowcount
            if changed:
                db.execute("UPDATE bans SET lifted_at = ?, lifted_by = ? WHERE peer_id = ? AND lifted_at IS NULL",
                           (now, by, peer_id))
            return bool(changed)

    # ---- rounds --------------------------------------------------------------------------------
    def heartbeat(self, peer_id: str, round_: int, model_digest: str, metrics: dict[str, float], nonce: bytes,
                  timestamp: float, now: float, exclusions: Sequence[swarm_pb2.Exclusion] = ()) -> dict[str, str]:
        """Record a peer's report on round ``round_``: its metrics (a later report of the same metric for the
        same round replaces the earlier one: a retried round counts once), and a contribution when it took
        part (metrics has "reward" and no "stepped" = 0); then refresh that round's aggregates. With it, the
        peers it caught breaking the protocol: each one more than half of the live trainers (itself not
        counted) have now reported is banned. Returns {peer: why} of those this heartbeat banned."""
        with self._write(nonce, timestamp) as db:
            db.execute("UPDATE peers SET last_seen = ?, round = max(round, ?), model_digest = ? WHERE peer_id = ?",
                       (now, round_, model_digest, peer_id))
            banned = self._report(db, peer_id, exclusions, now) if exclusions else {}
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)",
                           [(peer_id, round_, name, value, now) for name, value in sorted(metrics.items())])
            if "reward" in metrics and metrics.get("stepped", 1.0) != 0:
                db.execute("INSERT OR REPLACE INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (peer_id, round_, metrics.get("token_count"), metrics["reward"], metrics.get("grad_norm"),
                            model_digest, now))
            self._update_round(db, round_, now)
        return banned

    def _report(self, db: sqlite3.Connection, reporter: str, exclusions: Sequence[swarm_pb2.Exclusion],
                now: float) -> dict[str, str]:
        """Keep ``reporter``'s reports (of registered peers only) and ban each culprit whose reporters are
        more than half of the live, unbanned trainers other than it, and at least MIN_REPORTERS. Nobody can
        check what a reporter saw, so one reporter (or a minority of colluding identities) bans no one."""
        db.executemany("INSERT OR REPLACE INTO reports SELECT ?, ?, ?, ?, ? WHERE EXISTS "
                       "(SELECT 1 FROM peers WHERE peer_id = ?)",
                       [(e.peer_id, reporter, e.round, e.what, now, e.peer_id) for e in exclusions])
        live = {row[0] for row in db.execute("SELECT peer_id FROM peers WHERE role = 'trainer' AND banned = 0 AND "
                                             "last_seen >= ?", (now - LIVE_SECONDS,))}
        banned = {}
        for culprit in sorted({e.peer_id for e in exclusions}):
            voters = live - {culprit}
            reports = db.execute("SELECT reporter, round, what FROM reports WHERE peer_id = ? ORDER BY round",
                                 (culprit,)).fetchall()
            reporters = {reporter for reporter, _, _ in reports} & voters
            if 2 * len(reporters) <= len(voters) or len(reporters) < MIN_REPORTERS:
                continue
            _, round_, what = reports[-1]
            reason = f"reported by {len(reporters)} of {len(voters)} live trainers (round {round_}: {what})"
            if self._ban(db, culprit, reason, "reports", now):
                banned[culprit] = reason
        return banned

    @staticmethod
    def _update_round(db: sqlite3.Connection, round_: int, now: float) -> None:
        """A round's reward, accuracy and all-reduce time are the medians of what its peers reported: each peer
        reports for itself, and a median stays among the honest reports while fewer than half of them lie."""
        rewards = [row[0] for row in db.execute("SELECT mean_reward FROM contributions WHERE round = ?", (round_,))]

        def median_of(name: str) -> Optional[float]:
            values = [row[0] for row in db.execute("SELECT value FROM metrics WHERE round = ? AND name = ?",
                                                   (round_, name))]
            return statistics.median(values) if values else None

        known = [reward for reward in rewards if reward is not None]
        reward = statistics.median(known) if known else None
        db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?)",
                   (round_, reward, median_of("accuracy"), median_of("allreduce_seconds"), len(rewards), now))

    def has_verdict(self, verifier: str, peer_id: str, round_: int) -> bool:
        """Whether ``verifier`` already judged ``peer_id``'s round ``round_`` (one verdict each: no verifier fills
        the ledger with repeats)."""
        return bool(self._read("SELECT 1 FROM verdicts WHERE verifier = ? AND peer_id = ? AND round = ? LIMIT 1",
                               (verifier, peer_id, round_)))

    def furthest_round(self) -> int:
        """The furthest round any peer reported (0 before any report)."""
        return self._read("SELECT coalesce(max(round), 0) FROM peers")[0][0]

    # ---- verdicts ------------------------------------------------------------------------------
    def verdict(self, verifier: str, verdict: swarm_pb2.Verdict, nonce: bytes, timestamp: float, now: float) -> bool:
        """Record a verdict; a failed one bans the audited peer in the same transaction. The verifier's
        round is the latest it audited (it sends no heartbeats). Returns whether this verdict banned the peer."""
        with self._write(nonce, timestamp) as db:
            db.execute("INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (verifier, verdict.peer_id, verdict.round, int(verdict.passed), verdict.check,
                        verdict.evidence, verdict.contribution_digest, now))
            db.execute("UPDATE peers SET last_seen = ?, round = max(round, ?) WHERE peer_id = ?",
                       (now, verdict.round, verifier))
            if verdict.passed:
                return False
            reason = f"failed {verdict.check or 'audit'} in round {verdict.round}: {verdict.evidence}"
            return self._ban(db, verdict.peer_id, reason, verifier, now)

    # ---- status --------------------------------------------------------------------------------
    def status(self, page: Optional[swarm_pb2.StatusRequest] = None) -> swarm_pb2.StatusReply:
        """One page of the run's status (``page`` None: the first peers and the latest rounds); limits above
        PEERS_PAGE and ROUNDS_PAGE are cut to them, so a reply stays small however many peers registered."""
        page = page or swarm_pb2.StatusRequest()
        peers_limit = min(page.peers_limit or PEERS_PAGE, PEERS_PAGE)
        rounds_limit = min(page.rounds_limit or ROUNDS_PAGE, ROUNDS_PAGE)
        with self._lock:
            peers = self._db.execute(
                "SELECT p.rowid, p.peer_id, p.address, p.role, p.banned, p.ban_reason, p.last_seen, p.round, "
                "(SELECT count(*) FROM contributions c WHERE c.peer_id = p.peer_id), "
                "(SELECT count(*) FROM verdicts v WHERE v.peer_id = p.peer_id AND v.passed = 1), "
                "(SELECT count(*) FROM verdicts v WHERE v.peer_id = p.peer_id AND v.passed = 0) "
                "FROM peers p WHERE p.rowid > ? ORDER BY p.rowid LIMIT ?", (page.peers_after, peers_limit)).fetchall()
            columns = "round, reward, accuracy, allreduce_seconds, peers"
            if page.HasField("rounds_after"):
                rounds = self._db.execute(f"SELECT {columns} FROM rounds WHERE round > ? ORDER BY round LIMIT ?",
                                          (page.rounds_after, rounds_limit)).fetchall()
            else:
                rounds = self._db.execute(f"SELECT * FROM (SELECT {columns} FROM rounds ORDER BY round DESC "
                                          "LIMIT ?) ORDER BY round", (rounds_limit,)).fetchall()
            (peers_total, furthest), = self._db.execute("SELECT count(*), coalesce(max(round), 0) FROM peers")
            (rounds_total, last_round), = self._db.execute("SELECT count(*), coalesce(max(round), 0) FROM rounds")
        reply = swarm_pb2.StatusReply(run_id=self.run_id, config_digest=self.config_digest,
                                      round=max(furthest, last_round), peers_total=peers_total,
                                      rounds_total=rounds_total)
        for index, peer_id, address, role, banned, ban_reason, last_seen, round_, contributed, passed, failed in peers:
            reply.peers.add(index=index, peer_id=peer_id, address=address, role=role, banned=bool(banned),
                            ban_reason=ban_reason, last_seen=last_seen, round=round_, rounds_contributed=contributed,
                            verdicts_passed=passed, verdicts_failed=failed)
        for round_, reward, accuracy, allreduce_seconds, count in rounds:
            reply.rounds.add(round=round_, reward=_or_nan(reward), accuracy=_or_nan(accuracy),
                             allreduce_seconds=_or_nan(allreduce_seconds), peers=count)
        return reply


def _or_nan(value: Optional[float]) -> float:
    return math.nan if value is None else value
