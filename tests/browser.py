"""Headless Chromium for tests: load a page as a user's browser does, dump its DOM after the
scripts ran, or take a screenshot; and a small DOM reader to check what it shows.

Every chromium run gets a fresh profile and config folder, and every process it started
(the browser, its zygotes, renderers and crashpad handlers, which leave its process group) is
found by that folder's path and killed by pid before the call returns, also on a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import psutil
import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=5000")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    """The chromium binary. Without one a test fails in CI (``CI`` set) and is skipped elsewhere."""
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed: apt-get install -y chromium (.ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_chromium(url: str, *options: str, timeout: float = 60.0, home: Path | None = None) -> str:
    """Run headless chromium on ``url`` with ``options``; returns its stdout. Its profile and config
    go to a new folder inside ``home`` (default: the system's temp folder)."""
    binary = chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-", dir=home, ignore_cleanup_errors=True) as home:
        command = [binary, *FLAGS, f"--user-data-dir={home}/profile", *options, url]
        env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": home}  # crash reports and caches stay in ``home``
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(f"chromium did not finish {url} in {timeout:.0f} s") from None
        finally:
            _kill_processes_using(home)
    if process.returncode != 0:
        raise AssertionError(f"chromium exited {process.returncode} on {url}: {err.strip()[-2000:]}")
    return out


def chromium_processes(folder: str = "") -> list[psutil.Process]:
    """Live chromium processes (zombies excluded), only those naming ``folder`` when given."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        cmdline = process.info["cmdline"] or ()
        if (process.info["status"] != psutil.STATUS_ZOMBIE and "chrom" in (process.info["name"] or "")
                and any(folder in a for a in cmdline)):
            found.append(process)
    return found


def _kill_processes_using(folder: str, wait: float = 10.0) -> None:
    """SIGKILL every chromium process whose command line names ``folder``, and wait until they are gone."""
    deadline = time.monotonic() + wait
    while (left := chromium_processes(folder)) and time.monotonic() < deadline:
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)


def dump_dom(url: str, timeout: float = 60.0) -> str:
    """The page's DOM as serialized HTML after its scripts ran (5 s of virtual time)."""
    return run_chromium(url, "--dump-dom", timeout=timeout)


def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 1000), timeout: float = 60.0) -> Path:
    run_chromium(url, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", timeout=timeout)
    data = path.read_bytes() if path.exists() else b""
    assert data.startswith(PNG_MAGIC), f"chromium wrote no PNG to {path}"
    return path


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list["Element"] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # its text, descendants' included

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list["Element"]:
        """Descendants named ``tag`` whose attributes match (``data_round="3"`` is ``data-round="3"``)."""
        wanted = {key.replace("_", "-"): value for key, value in attrs.items()}
        return [e for e in self.iter() if e.tag == tag and all(e.attrs.get(k) == v for k, v in wanted.items())]

    def find(self, tag: str, **attrs: str) -> "Element":
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs} in the page"
        return found[0]


VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID_TAGS:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        for element in self.stack:
            element.parts.append(data)


def parse_dom(html: str) -> Element:
    """A DOM tree of ``html`` (as chromium's ``--dump-dom`` serializes it)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root
