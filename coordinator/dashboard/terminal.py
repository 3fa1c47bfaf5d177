"""``grpo-swarm status``: the dashboard's content as rich renderables for a terminal."""

from __future__ import annotations

import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

from coordinator.dashboard.format import (
    Point,
    ago,
    downsample,
    number,
    peer_state,
    peers_title,
    series,
    short_digest,
    short_id,
    state_counts,
)
from protocol import swarm_pb2 as pb

BLOCKS = "▁▂▃▄▅▆▇█"
STATE_STYLES = {"live": "green", "idle": "yellow", "banned": "bold red"}


def sparkline(points: list[Point], width: int = 60) -> str:
    """One unicode block per point (bucket means past ``width``), scaled from min to max."""
    values = [v for _, v in downsample(points, width)]
    if not values:
        return ""
    low, high = min(values), max(values)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[round(top * (v - low) / (high - low)) if high > low else top // 2] for v in values)


def render_status(reply: pb.StatusReply, now: float | None = None, last_rounds: int = 10) -> Group:
    """A header line, the DHT bootstrap addresses, the reward sparkline, the peers table and the
    last ``last_rounds`` rounds."""
    now = time.time() if now is None else now
    counts = state_counts(reply, now)
    header = Text.assemble(("run ", "dim"), (reply.run_id or "–", "bold"),
                           ("  round ", "dim"), (str(reply.round), "bold"),
                           ("  config ", "dim"), short_digest(reply.config_digest), ("  peers ", "dim"),
                           (f"{counts['live']} live", STATE_STYLES["live"]), ", ",
                           (f"{counts['idle']} idle", STATE_STYLES["idle"]), ", ",
                           (f"{counts['banned']} banned", STATE_STYLES["banned"]))
    lines = [header, _reward_line(reply), _peers_table(reply, now), _rounds_table(reply, last_rounds)]
    if reply.initial_peers:
        lines.insert(1, Text.assemble(("DHT bootstrap  ", "dim"), " ".join(reply.initial_peers)))
    return Group(*lines)


def _reward_line(reply: pb.StatusReply) -> Text:
    points = series(reply, "reward")
    if not points:
        return Text("reward  no rounds yet", style="dim")
    values = [v for _, v in points]
    return Text.assemble(("reward  ", "dim"), (sparkline(points), "cyan"),
                         (f"  rounds {points[0][0]}–{points[-1][0]}, min {min(values):.3f}, max {max(values):.3f}",
                          "dim"))


def _peers_table(reply: pb.StatusReply, now: float) -> Table:
    table = Table(title=peers_title(reply), title_justify="left",
                  caption=None if reply.peers else "no peers registered yet")
    for column in ("peer", "address", "role", "round", "contributed", "verdicts ✓/✗", "state", "last seen"):
        table.add_column(column, justify="right" if column in ("round", "contributed", "verdicts ✓/✗") else "left")
    for peer in reply.peers:
        state = peer_state(peer, now)
        table.add_row(short_id(peer.peer_id), peer.address or "–", peer.role, str(peer.round),
                      str(peer.rounds_contributed), f"{peer.verdicts_passed}/{peer.verdicts_failed}",
                      Text(state, style=STATE_STYLES[state]), ago(peer.last_seen, now))
    return table


def _rounds_table(reply: pb.StatusReply, last_rounds: int) -> Table:
    table = Table(title=f"last {last_rounds} rounds", title_justify="left")
    for column in ("round", "peers", "reward", "accuracy", "all-reduce s"):
        table.add_column(column, justify="right")
    for r in sorted(reply.rounds, key=lambda r: r.round)[-last_rounds:]:
        table.add_row(str(r.round), str(r.peers), number(r.reward), number(r.accuracy),
                      number(r.allreduce_seconds, ".2f"))
    return table
