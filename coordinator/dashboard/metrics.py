"""``/metrics``: a ``StatusReply`` in Prometheus' text exposition format (version 0.0.4).

Every family is a gauge: the values come from the ledger's current snapshot, not from
counters kept by this process, so a coordinator restart does not reset them. A family
with no value yet (no eval so far) is listed without a sample rather than as NaN.
"""

from __future__ import annotations

import math
import time

from coordinator.dashboard.format import last_value, state_counts
from protocol import swarm_pb2 as pb

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    """Label values escape backslash, double quote and line feed (the format's only escapes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if isinstance(value, int):  # counts print as counts
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        label_text = ",".join(f'{key}="{escape_label(v)}"' for key, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {_value(value)}" if labels else f"{name} {_value(value)}")
    return lines


def _last(reply: pb.StatusReply, field: str) -> list[tuple[dict[str, str], float]]:
    value = last_value(reply, field)
    return [({}, value)] if math.isfinite(value) else []


def render_metrics(reply: pb.StatusReply, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = _family("grpo_swarm_run_info", "The run this coordinator serves (value is always 1).",
                    [({"run_id": reply.run_id, "config_digest": reply.config_digest}, 1)])
    lines += _family("grpo_swarm_round", "Furthest round the coordinator knows of.", [({}, reply.round)])
    lines += _family("grpo_swarm_peers", "Registered peers by state (idle: not heard from for a while).",
                     [({"state": state}, count) for state, count in state_counts(reply, now).items()])
    lines += _family("grpo_swarm_reward", "Mean reward of the last round.", _last(reply, "reward"))
    lines += _family("grpo_swarm_accuracy", "Held-out accuracy of the last eval.", _last(reply, "accuracy"))
    lines += _family("grpo_swarm_allreduce_seconds", "All-reduce time of the last round.",
                     _last(reply, "allreduce_seconds"))
    lines += _family("grpo_swarm_peer_rounds_contributed", "Rounds each peer contributed to.",
                     [({"peer": p.peer_id}, p.rounds_contributed) for p in reply.peers])
    lines += _family("grpo_swarm_peer_verdicts", "Verifier verdicts on each peer's contributions.",
                     [({"peer": p.peer_id, "result": result}, count) for p in reply.peers
                      for result, count in (("pass", p.verdicts_passed), ("fail", p.verdicts_failed))])
    lines += _family("grpo_swarm_peer_banned", "1 for a banned peer, 0 otherwise.",
                     [({"peer": p.peer_id}, int(p.banned)) for p in reply.peers])
    return "\n".join(lines) + "\n"
