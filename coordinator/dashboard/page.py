"""The dashboard's HTML page: run facts, reward / accuracy / all-reduce charts and the peers table.

Everything is rendered on the server, charts included (inline SVG), so the page needs no
external asset and no script to show the run; a small inline script re-fetches the page
every few seconds and swaps it in, keeping the last status on screen while the coordinator
is down. Each chart carries machine-checkable markers: ``data-rounds`` on the ``<svg>`` and
one ``<circle data-round=N data-value=V>`` per plotted point.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from html import escape

from coordinator.dashboard.format import (
    Point,
    ago,
    downsample,
    last_value,
    number,
    peer_state,
    peers_title,
    series,
    short_digest,
    short_id,
    state_counts,
)
from protocol import swarm_pb2 as pb

REFRESH_SECONDS = 10
MAX_POINTS = 240  # per chart; longer runs are averaged into this many buckets
WIDTH, HEIGHT = 400, 220
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 14, 46  # plot margins inside the SVG


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    field: str          # the RoundInfo field it plots
    y_label: str
    spec: str           # format spec of its values
    color: str
    y_min: float | None = None  # fixed bounds; None: from the data
    y_max: float | None = None


CHARTS = (
    Chart("reward-curve", "Mean reward", "reward", "reward", ".3f", "#2563eb"),
    Chart("accuracy-curve", "Held-out accuracy", "accuracy", "accuracy", ".2f", "#059669", 0.0, 1.0),
    Chart("allreduce-chart", "All-reduce time", "allreduce_seconds", "seconds", ".2f", "#9333ea", 0.0),
)


def render_page(reply: pb.StatusReply, now: float | None = None) -> str:
    now = time.time() if now is None else now
    title = f"grpo-swarm · {reply.run_id or 'run'}"
    charts = "\n".join(_figure(chart, series(reply, chart.field)) for chart in CHARTS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<main id="status" data-run-id="{escape(reply.run_id)}" data-round="{reply.round}">
<header>
<h1>grpo-swarm <span class="run">{escape(reply.run_id or '–')}</span></h1>
{_facts(reply, now)}
{_bootstrap(reply)}
</header>
<section class="charts">
{charts}
</section>
<section>
<h2>{escape(peers_title(reply).capitalize())}</h2>
{_peers_table(reply, now)}
</section>
<footer><span id="refresh-state">status at {time.strftime('%H:%M:%S UTC', time.gmtime(now))};
refreshes every {REFRESH_SECONDS} s</span> · <a href="api/status">/api/status</a> · <a href="metrics">/metrics</a>
</footer>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _facts(reply: pb.StatusReply, now: float) -> str:
    counts = state_counts(reply, now)
    allreduce = last_value(reply, "allreduce_seconds")
    facts = [
        ("round", str(reply.round)),
        ("peers", f"{counts['live']} live · {counts['idle']} idle · {counts['banned']} banned"),
        ("reward", number(last_value(reply, "reward"))),
        ("accuracy", number(last_value(reply, "accuracy"))),
        ("all-reduce", f"{allreduce:.2f} s" if math.isfinite(allreduce) else "–"),
        ("config", short_digest(reply.config_digest)),
    ]
    items = "".join(f'<div id="fact-{key.replace("-", "")}"><dt>{key}</dt><dd>{escape(value)}</dd></div>'
                    for key, value in facts)
    return f'<dl class="facts" title="config digest {escape(reply.config_digest)}">{items}</dl>'


def _bootstrap(reply: pb.StatusReply) -> str:
    """Where a new node joins: the coordinator's DHT addresses (nodes given ``--coordinator`` ask for them)."""
    if not reply.initial_peers:
        return ""
    addresses = " ".join(f"<code>{escape(m)}</code>" for m in reply.initial_peers)
    return f'<p id="bootstrap">DHT bootstrap {addresses}</p>'


def _peers_table(reply: pb.StatusReply, now: float) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("peer", "address", "role", "round", "rounds contributed",
                                              "verdicts pass / fail", "state", "last seen"))
    rows = []
    for peer in reply.peers:
        state = peer_state(peer, now)
        rows.append(
            f'<tr class="{state}" data-peer-id="{escape(peer.peer_id)}" data-state="{state}">'
            f'<td class="id" title="{escape(peer.peer_id)}">{escape(short_id(peer.peer_id))}</td>'
            f'<td class="address">{escape(peer.address or "–")}</td><td>{escape(peer.role)}</td>'
            f'<td class="num">{peer.round}</td><td class="num">{peer.rounds_contributed}</td>'
            f'<td class="num"><span class="pass">{peer.verdicts_passed}</span> / '
            f'<span class="fail">{peer.verdicts_failed}</span></td>'
            f'<td><span class="badge {state}">{state}</span></td><td>{ago(peer.last_seen, now)}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="8" class="empty">no peers registered yet</td></tr>')
    return f'<table id="peers"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _figure(chart: Chart, points: list[Point]) -> str:
    return f"<figure><figcaption>{chart.title}</figcaption>{svg_chart(chart, points)}</figure>"


def svg_chart(chart: Chart, points: list[Point]) -> str:
    """A line chart of ``(round, value)`` points with min/max labels on both axes."""
    plotted = downsample(points, MAX_POINTS)
    attrs = (f'id="{chart.id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{chart.title} per round" data-rounds="{",".join(str(r) for r, _ in plotted)}" '
             f'data-count="{len(points)}"')
    if not plotted:
        return (f'<svg {attrs}><text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
                f'no data yet</text></svg>')
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    first, last = plotted[0][0], plotted[-1][0]
    low, high = _bounds(chart, [v for _, v in plotted])

    def x(r: int) -> float:
        return LEFT + (plot_w * (r - first) / (last - first) if last > first else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h * (high - min(max(v, low), high)) / (high - low)

    line = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in plotted)
    radius = 3 if len(plotted) <= 60 else 1.6
    markers = "".join(
        f'<circle data-round="{r}" data-value="{v!r}" cx="{x(r):.1f}" cy="{y(v):.1f}" r="{radius}">'
        f'<title>round {r}: {format(v, chart.spec)}</title></circle>' for r, v in plotted)
    bottom, mid_x, mid_y = TOP + plot_h, LEFT + plot_w / 2, TOP + plot_h / 2
    return (
        f'<svg {attrs} style="--series: {chart.color}">'
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>'
        f'<line class="grid" x1="{LEFT}" y1="{mid_y}" x2="{LEFT + plot_w}" y2="{mid_y}"/>'
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{format(high, chart.spec)}</text>'
        f'<text class="tick" x="{LEFT - 6}" y="{bottom + 4}" text-anchor="end">{format(low, chart.spec)}</text>'
        f'<text class="tick" x="{LEFT}" y="{bottom + 18}" text-anchor="start">{first}</text>'
        f'<text class="tick" x="{LEFT + plot_w}" y="{bottom + 18}" text-anchor="end">{last}</text>'
        f'<text class="axis" x="{mid_x}" y="{HEIGHT - 6}" text-anchor="middle">round</text>'
        f'<text class="axis" transform="translate(16 {mid_y}) rotate(-90)" text-anchor="middle">'
        f'{chart.y_label}</text>'
        f'<polyline class="series" points="{line}"/>{markers}</svg>')


def _bounds(chart: Chart, values: list[float]) -> tuple[float, float]:
    low = min(values) if chart.y_min is None else chart.y_min
    high = max(values) if chart.y_max is None else chart.y_max
    if high - low < 1e-9:  # a flat series: give it room above and below
        pad = max(abs(high) * 0.1, 0.5)
        low, high = (low if chart.y_min is not None else low - pad), high + pad
    return low, high


STYLE = """
:root { --fg: #1f2937; --muted: #6b7280; --bg: #f3f4f6; --card: #fff; --line: #e5e7eb;
        --live: #059669; --idle: #b45309; --banned: #dc2626; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 24px; }
h1 { font-size: 22px; margin: 0 0 12px; }
h1 .run { color: var(--muted); font-weight: 500; margin-left: 6px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
.facts { display: flex; flex-wrap: wrap; gap: 10px; margin: 0; }
.facts div { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.facts dt { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.facts dd { margin: 0; font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 14px; margin-top: 18px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
.chart .frame { fill: none; stroke: var(--line); }
.chart .grid { stroke: var(--line); stroke-dasharray: 3 3; }
.chart .tick, .chart .axis, .chart .empty { fill: var(--muted); font-size: 13px; }
.chart .series { fill: none; stroke: var(--series); stroke-width: 1.8; stroke-linejoin: round; }
.chart circle { fill: var(--series); }
table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line);
        border-radius: 8px; overflow: hidden; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #f9fafb; color: var(--muted); font-weight: 600; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id, td.address { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
td.address { max-width: 360px; overflow: hidden; text-overflow: ellipsis; }
td.empty { color: var(--muted); text-align: center; }
tr.banned td { color: var(--muted); }
tr.banned td.id { text-decoration: line-through; }
.pass { color: var(--live); } .fail { color: var(--banned); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600;
         color: #fff; }
.badge.live { background: var(--live); } .badge.idle { background: var(--idle); }
.badge.banned { background: var(--banned); }
#bootstrap { color: var(--muted); margin: 10px 0 0; font-size: 12px; overflow-wrap: anywhere; }
#bootstrap code { color: var(--fg); margin-left: 6px; }
footer { margin-top: 16px; color: var(--muted); font-size: 12px; }
body.stale #refresh-state { color: var(--banned); font-weight: 600; }
"""

SCRIPT = f"""
async function refresh() {{
  try {{
    const response = await fetch(location.pathname, {{cache: "no-store"}});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    document.querySelector("main").replaceWith(page.querySelector("main"));
    document.body.classList.remove("stale");
  }} catch (error) {{
    document.body.classList.add("stale");
    document.getElementById("refresh-state").textContent =
      "coordinator unreachable (" + error.message + "): showing the last status";
  }}
}}
setInterval(refresh, {REFRESH_SECONDS * 1000});
"""
