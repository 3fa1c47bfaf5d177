"""The coordinator's dashboard page as headless Chromium shows it (a real browser process)."""

import socket

import pytest

from coordinator.dashboard.format import short_id
from tests.browser import chromium_processes, dump_dom, parse_dom, run_chromium, screenshot
from tests.sample_status import BOOTSTRAP, PEER_IDS, ROUNDS, reward_at, serving_dashboard


@pytest.fixture
def dashboard():
    with serving_dashboard() as served:
        yield served


def test_page_in_headless_chromium(dashboard, tmp_path):
    server, _ = dashboard
    dom = parse_dom(dump_dom(server.url))

    assert dom.find("title").text == "grpo-swarm · test-run"
    assert dom.find("h1").text == "grpo-swarm test-run"
    assert dom.find("main", id="status").attrs["data-round"] == str(ROUNDS)
    assert dom.find("div", id="fact-round").find("dd").text == str(ROUNDS)
    assert dom.find("div", id="fact-peers").find("dd").text == "2 live · 0 idle · 1 banned"
    assert dom.find("p", id="bootstrap").find("code").text == BOOTSTRAP

    rows = dom.find("table", id="peers").find("tbody").find_all("tr")
    assert [row.attrs["data-peer-id"] for row in rows] == PEER_IDS
    assert [row.attrs["data-state"] for row in rows] == ["live", "live", "banned"]
    banned = rows[2]
    assert banned.find("span", **{"class": "badge banned"}).text == "banned"
    assert "1 / 2" in banned.text and "6m ago" in banned.text and short_id(PEER_IDS[2]) in banned.text

    reward = dom.find("svg", id="reward-curve")
    assert reward.attrs["data-rounds"] == ",".join(str(r) for r in range(ROUNDS))
    points = {int(c.attrs["data-round"]): float(c.attrs["data-value"]) for c in reward.find_all("circle")}
    assert points == {r: reward_at(r) for r in range(ROUNDS)}
    assert len(reward.find("polyline").attrs["points"].split()) == ROUNDS
    accuracy = dom.find("svg", id="accuracy-curve")  # rounds without an eval are not drawn
    assert [c.attrs["data-round"] for c in accuracy.find_all("circle")] == ["3", "7", "11"]
    assert len(dom.find("svg", id="allreduce-chart").find_all("circle")) == ROUNDS

    png = screenshot(server.url, tmp_path / "dashboard.png")
    assert png.stat().st_size > 10_000  # a rendered page, not a blank image


def test_a_hanging_page_stops_chromium(tmp_path):
    """A server that accepts and never answers: the helper gives up and leaves no chromium running."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        with pytest.raises(AssertionError, match="chromium did not finish"):
            run_chromium(f"http://127.0.0.1:{silent.getsockname()[1]}/", "--dump-dom", timeout=5, home=tmp_path)
    assert chromium_processes(str(tmp_path)) == []


