"""The DHT key layout of a run: every role reads and writes these names and nothing else.

Values under these keys are small (docs/DESIGN.md: DHT values over ~16 KiB can hang hivemind); the
per-peer ones use the peer id as subkey, so one key holds the whole round's records. Each key's records
live at most its LIFETIME; every DHT node of an admitted run holds them to it (node/swarm/run_records.py).
"""

from __future__ import annotations

RUNS_KEY = "grpo-swarm.runs"  # subkey run id: the run announcement (config, coordinator key)

RUN_RECORD_LIFETIME = 3600.0  # seconds, from signing: a run announcement
BANS_LIFETIME = 3600.0  # from signing: the coordinator's ban list
PROGRESS_LIFETIME = 60.0  # a peer's progress record (live peers refresh it every attempt)
CONTRIBUTION_LIFETIME = 300.0  # from signing: a contribution record (the ledger reads it later)
VERDICT_LIFETIME = 3600.0  # from signing: a verifier's verdict
AGREEMENT_LIFETIME = 120.0  # a member's digest of an all-reduce result (long enough for the slowest member)


ROUND_KEY_BITS = 8  # hivemind's group bits name the round modulo 2**8: peers a few rounds apart never meet


def averaging_prefix(run_id: str) -> str:
    """hivemind averaging namespace of the run's gradients (and of state sharing). hivemind keeps two kinds of
    keys under it: ``matchmaking_key`` and ``state_donors_key``; our agreement digests go under ``agreement_key``."""
    return f"{run_id}-grads"


def round_group_bits(round_: int) -> str:
    """hivemind's group bits of a round's matchmaking: a peer looks for (and leads) groups of its own round only,
    so a peer a round behind or ahead costs the others nothing (hivemind's leaders refuse another key)."""
    return format(round_ % (1 << ROUND_KEY_BITS), f"0{ROUND_KEY_BITS}b")


def matchmaking_key(prefix: str, round_: int) -> str:
    """hivemind's group key of ``round_``: subkey peer id bytes, value whether it looks for a group."""
    return f"{prefix}.0b{round_group_bits(round_)}"


def matchmaking_keys(prefix: str) -> list[str]:
    """Every round's group key (they repeat every 2**ROUND_KEY_BITS rounds)."""
    return [matchmaking_key(prefix, round_) for round_ in range(1 << ROUND_KEY_BITS)]


def state_donors_key(prefix: str) -> str:
    """hivemind's state donors: subkey peer id bytes, value the priority of the state it serves."""
    return f"{prefix}.all_averagers"


def agreement_key(prefix: str, round_: int, group: str) -> str:
    """subkey member peer id: the member's signed digest of the group's all-reduce result, naming this key;
    ``group`` is 16 hex digits naming the group (node/swarm/agreement.py)."""
    return f"{prefix}.digests.r{round_}.{group}"


def progress_key(run_id: str) -> str:
    """subkey peer id: {round, digest} after each round (node/peer/swarm_peer.py)."""
    return f"{run_id}.progress"


def tokens_key(run_id: str) -> str:
    """subkey peer id: the peer's serialized AccessToken, so others can admit it."""
    return f"{run_id}.tokens"


def bans_key(run_id: str) -> str:
    """subkey part index (int): that part of the coordinator's signed ban list (node/swarm/ban_list.py)."""
    return f"{run_id}.bans"


def contributions_key(run_id: str, round_: int) -> str:
    """subkey peer id: the peer's signed Contribution record for the round."""
    return f"{run_id}.r{round_}.contrib"


def verdicts_key(run_id: str, round_: int) -> str:
    """subkey '{verifier}/{contributor}': a verifier's signed Verdict record."""
    return f"{run_id}.r{round_}.verdicts"


ROUND_DATA_RPC = "grpo-swarm.round-data"  # p2p handler name: RoundDataRequest -> stream of RoundData
