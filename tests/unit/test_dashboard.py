"""The coordinator's dashboard served for real on 127.0.0.1 (in this process): ``/metrics`` as Prometheus
reads it, ``/api/status`` as JSON, the page's HTML, and the terminal view. tests/system/test_dashboard_browser.py
shows the page in headless Chromium."""

import json
import time
import urllib.error
import urllib.request

import pytest
from google.protobuf import json_format
from rich.console import Console

from coordinator.dashboard.format import IDLE_AFTER_S, ago, downsample, peer_state, short_id
from coordinator.dashboard.metrics import escape_label, render_metrics
from coordinator.dashboard.page import MAX_POINTS, render_page
from coordinator.dashboard.server import DashboardError, DashboardServer
from coordinator.dashboard.terminal import BLOCKS, render_status, sparkline
from protocol import swarm_pb2 as pb
from tests.browser import parse_dom
from tests.sample_status import BOOTSTRAP, PEER_IDS, ROUNDS, make_reply, reward_at, serving_dashboard


@pytest.fixture
def dashboard():
    with serving_dashboard() as served:
        yield served

def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_metrics_are_prometheus_text(dashboard):
    server, _ = dashboard
    status, content_type, body = fetch(server.url + "metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for line in body.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    families = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")}
    assert {name.split("{")[0] for name in samples} <= families

    assert samples["grpo_swarm_round"] == ROUNDS
    assert samples['grpo_swarm_peers{state="live"}'] == 2
    assert samples['grpo_swarm_peers{state="banned"}'] == 1
    assert samples["grpo_swarm_reward"] == pytest.approx(reward_at(ROUNDS - 1))
    assert samples["grpo_swarm_accuracy"] == pytest.approx(0.5 + 0.02 * 11)
    assert samples["grpo_swarm_allreduce_seconds"] == pytest.approx(0.1 + 0.01 * 11)
    assert samples[f'grpo_swarm_peer_rounds_contributed{{peer="{PEER_IDS[0]}"}}'] == 12
    assert samples[f'grpo_swarm_peer_verdicts{{peer="{PEER_IDS[2]}",result="fail"}}'] == 2
    assert samples[f'grpo_swarm_peer_verdicts{{peer="{PEER_IDS[2]}",result="pass"}}'] == 1
    assert samples[f'grpo_swarm_peer_banned{{peer="{PEER_IDS[2]}"}}'] == 1


def test_metrics_escape_labels_and_leave_out_missing_values():
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    reply = pb.StatusReply(run_id='odd"run', peers=[pb.PeerInfo(peer_id='x"\\\ny', last_seen=time.time())])
    text = render_metrics(reply)
    assert 'grpo_swarm_peer_banned{peer="x\\"\\\\\\ny"} 0' in text.splitlines()
    assert 'run_id="odd\\"run"' in text
    # no round ran yet: the families are declared but have no sample (not NaN)
    lines = text.splitlines()
    for family in ("grpo_swarm_reward", "grpo_swarm_accuracy", "grpo_swarm_allreduce_seconds"):
        assert f"# TYPE {family} gauge" in lines
        assert not [line for line in lines if line.startswith(family + " ")]


def test_api_status_is_the_snapshot_as_json(dashboard):
    server, state = dashboard
    status, content_type, body = fetch(server.url + "api/status")
    assert status == 200 and content_type == "application/json"
    data = json.loads(body)  # strict JSON: NaN travels as the string "NaN"
    assert data["round"] == ROUNDS and data["rounds"][0]["accuracy"] == "NaN"
    assert data["peers"][2]["banned"] is True and data["peers"][0]["verdicts_failed"] == 0
    parsed = json_format.ParseDict(data, pb.StatusReply())
    assert parsed.SerializeToString(deterministic=True) == state["reply"].SerializeToString(deterministic=True)


def test_unknown_path_is_404_and_a_failing_snapshot_is_500(dashboard):
    server, state = dashboard
    status, _, body = fetch(server.url + "admin")
    assert status == 404 and body.startswith("not found: /admin")

    state["reply"] = RuntimeError("database is locked\nretry later")
    for path in ("", "metrics", "api/status"):
        status, _, body = fetch(server.url + path)
        assert (status, body) == (500, "error: status unavailable: RuntimeError: database is locked retry later\n")

    state["reply"] = make_reply()  # the server kept serving
    status, _, body = fetch(server.url + "?refresh=1")
    assert status == 200 and "test-run" in body


def test_peer_supplied_text_is_escaped():
    reply = make_reply()
    reply.peers[0].address = '<script>alert("x")</script>'
    reply.run_id = "<b>run</b>"
    page = render_page(reply)
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page and "<b>run" not in page
    assert len(parse_dom(page).find_all("script")) == 1  # only the page's own refresh script


def test_long_run_is_averaged_into_a_bounded_chart():
    reply = make_reply(rounds=5000)
    page = render_page(reply)
    reward = parse_dom(page).find("svg", id="reward-curve")
    rounds = [int(r) for r in reward.attrs["data-rounds"].split(",")]
    assert len(rounds) == MAX_POINTS and rounds[-1] == 4999 and rounds == sorted(rounds)
    assert reward.attrs["data-count"] == "5000" and len(reward.find_all("circle")) == MAX_POINTS
    assert len(page) < 250_000
    points = [(r, float(r)) for r in range(10)]
    assert downsample(points, 5) == [(1, 0.5), (3, 2.5), (5, 4.5), (7, 6.5), (9, 8.5)]
    assert downsample(points, 20) == points


def test_empty_run_renders_everywhere():
    reply = pb.StatusReply(run_id="fresh", config_digest="00" * 32)
    dom = parse_dom(render_page(reply))
    assert dom.find("svg", id="reward-curve").attrs["data-rounds"] == ""
    assert "no data yet" in dom.find("svg", id="reward-curve").text
    assert "no peers registered yet" in dom.find("table", id="peers").text
    assert not dom.find_all("p", id="bootstrap")
    assert dom.find("div", id="fact-allreduce").find("dd").text == "–"
    assert "grpo_swarm_round 0" in render_metrics(reply).splitlines()
    console = Console(record=True, width=120)
    console.print(render_status(reply))
    text = console.export_text()
    assert "no rounds yet" in text and "no peers registered yet" in text


def test_dashboard_refuses_a_taken_port_and_stops(dashboard):
    server, _ = dashboard
    with pytest.raises(DashboardError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        DashboardServer(make_reply, port=server.port).start()
    url = server.url
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_terminal_status_view():
    now = time.time()
    console = Console(record=True, width=140)
    console.print(render_status(make_reply(now=now), now=now))
    text = console.export_text()
    assert f"run test-run  round {ROUNDS}  config {'ab' * 6}  peers 2 live, 0 idle, 1 banned" in text
    assert f"DHT bootstrap  {BOOTSTRAP}" in text
    for peer_id in PEER_IDS:
        assert short_id(peer_id) in text
    assert "1/2 │ banned │ 6m ago" in text
    assert "rounds 0–11, min 0.200, max 0.750" in text
    rounds_table = text.split("last 10 rounds")[1]
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in rounds_table.splitlines()
            if line.startswith("│")]
    assert [row[0] for row in rows] == [str(r) for r in range(2, ROUNDS)]
    assert rows[-1] == ["11", "2", "0.750", "0.720", "0.21"]
    assert rows[-2] == ["10", "2", "0.700", "–", "0.20"]  # no eval in round 10


def test_sparkline_and_format_helpers():
    assert sparkline([(r, float(r)) for r in range(8)]) == BLOCKS
    assert sparkline([(r, 1.0) for r in range(3)]) == BLOCKS[3] * 3
    assert len(sparkline([(r, float(r % 7)) for r in range(1000)], width=50)) == 50
    assert sparkline([]) == ""
    now = 1_000_000.0
    assert [ago(now - s, now) for s in (5, 150, 3 * 3600, 3 * 86400)] == ["5s ago", "2m ago", "3h ago", "3d ago"]
    assert ago(0, now) == "never"
    peer = pb.PeerInfo(peer_id="p", last_seen=now - IDLE_AFTER_S - 1)
    assert peer_state(peer, now) == "idle"
    peer.last_seen = now - 1
    assert peer_state(peer, now) == "live"
    peer.banned = True
    assert peer_state(peer, now) == "banned"
    assert short_id("QmShort") == "QmShort" and short_id(PEER_IDS[0]) == "QmTr…AAAAAAA1"
