"""The coordinator's web dashboard: ``/`` (HTML page), ``/api/status`` (JSON), ``/metrics`` (Prometheus).

Every request renders a fresh ``snapshot()`` (the ledger's ``StatusReply``), so the views are as
current as the ledger and this server keeps no state of its own. A failing snapshot answers 500
with one line and the server goes on serving: the dashboard must outlive a bad moment of the
ledger. Runs in a background thread of the coordinator process (stdlib ``ThreadingHTTPServer``:
a handful of viewers and scrapers, no need for more).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from google.protobuf import json_format

from coordinator.dashboard.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.dashboard.metrics import render_metrics
from coordinator.dashboard.page import render_page
from protocol import swarm_pb2 as pb

logger = logging.getLogger(__name__)

Snapshot = Callable[[], pb.StatusReply]


class DashboardError(OSError):
    """The dashboard cannot listen where it was asked to (port taken, address not local)."""


def status_json(reply: pb.StatusReply) -> str:
    """The proto3 JSON mapping (NaN accuracy as the string "NaN", int64 as numbers): standard
    JSON that ``json_format.ParseDict(..., StatusReply())`` reads back."""
    return json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True,
                                                preserving_proto_field_name=True, unquote_int64_if_possible=True),
                      indent=1)


ROUTES: dict[str, tuple[str, Callable[[pb.StatusReply], str]]] = {
    "/": ("text/html; charset=utf-8", render_page),
    "/api/status": ("application/json", status_json),
    "/metrics": (METRICS_CONTENT_TYPE, render_metrics),
}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    timeout = 30  # seconds a silent client may hold its connection (and thread)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        route = ROUTES.get(path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                       f"not found: {path} (try /, /api/status or /metrics)\n")
            return
        content_type, render = route
        try:
            body = render(self.server.snapshot())
        except Exception as e:  # the ledger may fail for a moment; the dashboard stays up
            logger.warning("dashboard: %s failed", self.path, exc_info=True)
            message = " ".join(f"{type(e).__name__}: {e}".split())
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8",
                       f"error: status unavailable: {message}\n")
            return
        self._send(HTTPStatus.OK, content_type, body)

    def _send(self, status: HTTPStatus, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        logger.debug("dashboard %s: " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot: Snapshot):
        self.snapshot = snapshot
        super().__init__(address, _Handler)


class DashboardServer:
    """``DashboardServer(snapshot).start()`` serves until ``stop()``; ``url`` is where."""

    def __init__(self, snapshot: Snapshot, host: str = "127.0.0.1", port: int = 0):
        self.snapshot, self.host, self.port = snapshot, host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the dashboard is not started")
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "DashboardServer":
        if self._server is not None:
            raise RuntimeError("the dashboard is already started")
        try:
            self._server = _Server((self.host, self.port), self.snapshot)
        except OSError as e:
            raise DashboardError(f"dashboard cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
