"""The DHT key layout of a run: every role reads and writes these names and nothing else.

Values under these keys are small (docs/DESIGN.md: DHT values over ~16 KiB can hang hivemind); the
per-peer ones use the peer id as subkey, so one key holds the whole round's records.
"""

from __future__ import annotations

RUNS_KEY = "grpo-swarm.runs"  # subkey run id: the run announcement (config, coordinator key)


def averaging_prefix(run_id: str) -> str:
    """hivemind averaging namespace of the run's gradients (and of state sharing)."""
    return f"{run_id}-grads"


def progress_key(run_id: str) -> str:
    """subkey peer id: {round, digest} after each round (node/peer/swarm_peer.py)."""
    return f"{run_id}.progress"


def tokens_key(run_id: str) -> str:
    """subkey peer id: the peer's serialized AccessToken, so others can admit it."""
    return f"{run_id}.tokens"


def bans_key(run_id: str) -> str:
    """no subkey: the coordinator's signed BanList record."""
    return f"{run_id}.bans"


def contributions_key(run_id: str, round_: int) -> str:
    """subkey peer id: the peer's signed Contribution record for the round."""
    return f"{run_id}.r{round_}.contrib"


def verdicts_key(run_id: str, round_: int) -> str:
    """subkey '{verifier}/{contributor}': a verifier's signed Verdict record."""
    return f"{run_id}.r{round_}.verdicts"


ROUND_DATA_RPC = "grpo-swarm.round-data"  # p2p handler name: RoundDataRequest -> stream of RoundData
