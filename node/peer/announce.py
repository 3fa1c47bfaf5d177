"""Run announcements: how a node that knows only an initial peer learns which run the swarm trains.

The announcement (config, its digest, and for admitted runs the coordinator's public key and gRPC
address) is a signed record under ``RUNS_KEY``, subkey = run id. A run with a coordinator is
announced by the coordinator alone and only announcements signed by its key count; an open swarm
(no coordinator) is announced, and kept alive, by any live peer with its own key.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import hivemind

from node.swarm.dht import dht_get
from protocol import swarm_pb2
from protocol.config import ConfigError, RunConfig
from protocol.identity import SigningKey
from protocol.keys import RUN_RECORD_LIFETIME, RUNS_KEY
from protocol.records import RecordError, open_record, parse_record, sign_record

logger = logging.getLogger(__name__)


@dataclass
class Announcement:
    config: RunConfig
    coordinator_public_key: bytes  # empty for an open swarm
    coordinator_address: str


def publish_run(dht: hivemind.DHT, config: RunConfig, key: SigningKey, coordinator_address: str = "") -> None:
    """Announce ``config``; with ``coordinator_address``, ``key`` is the coordinator's and admission is on."""
    body = swarm_pb2.RunAnnouncement(
        config_json=json.dumps(config.to_dict(), sort_keys=True), config_digest=config.digest(),
        coordinator_public_key=key.public_key if coordinator_address else b"", coordinator_address=coordinator_address)
    record = sign_record(key, "run", config.run.id, 0, body)
    dht.store(RUNS_KEY, record.SerializeToString(), record.timestamp + RUN_RECORD_LIFETIME, subkey=config.run.id)


def read_announcement(run_id: str, data) -> Announcement:
    """Check one announcement record; raises RecordError or ConfigError when it is not a valid one."""
    record = parse_record(data)
    body = open_record(record, run_id=run_id, kind="run", body_type=swarm_pb2.RunAnnouncement,
                       max_age=RUN_RECORD_LIFETIME)
    if body.coordinator_public_key and record.public_key != body.coordinator_public_key:
        raise RecordError("announcement of an admitted run not signed by its coordinator")
    try:
        config = RunConfig.from_dict(json.loads(body.config_json))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"announced config of run {run_id!r} is not JSON ({e})") from None
    if config.run.id != run_id or config.digest() != body.config_digest:
        raise RecordError(f"announced config does not match run {run_id!r} or its digest")
    return Announcement(config, body.coordinator_public_key, body.coordinator_address)


def published_runs(dht: hivemind.DHT) -> dict[str, Announcement]:
    """The valid announcements in the swarm, by run id (invalid ones are dropped with a log line)."""
    found = dht_get(dht, RUNS_KEY)
    if found is None or not isinstance(found.value, dict):
        return {}
    runs = {}
    for run_id, entry in found.value.items():
        try:
            runs[str(run_id)] = read_announcement(str(run_id), entry.value)
        except (RecordError, ConfigError) as e:
            logger.warning(f"announcement of run {run_id!r} dropped: {e}")
    return runs


def check_same_run(dht: hivemind.DHT, config: RunConfig) -> None:
    """A peer that brings its own config must bring the swarm's: a different one would train another model."""
    published = published_runs(dht).get(config.run.id)
    if published is not None and published.config.digest() != config.digest():
        raise ConfigError(f"run {config.run.id!r}: this config differs from the one the swarm trains "
                          "(join without --config/--set to use the swarm's)")


def discover_run(dht: hivemind.DHT, run_id: str | None, timeout: float = 30.0) -> Announcement:
    """The run published in the swarm: the one named ``run_id``, or the only one there is."""
    deadline = time.monotonic() + timeout
    runs: dict = {}
    while time.monotonic() < deadline and not runs:
        runs = published_runs(dht)
        if not runs:
            time.sleep(1.0)
    if not runs:
        raise ConfigError(f"no run is published in this swarm (waited {timeout:.0f}s); pass --config to start one")
    if run_id is None and len(runs) > 1:
        raise ConfigError(f"the swarm has several runs ({', '.join(sorted(runs))}): choose one with --run-id")
    name = run_id or next(iter(runs))
    if name not in runs:
        raise ConfigError(f"run {name!r} is not published in this swarm (found: {', '.join(sorted(runs))})")
    return runs[name]
