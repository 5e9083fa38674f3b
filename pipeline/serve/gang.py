"""The gang of a multi-node instance on bare nodes: the leader's control endpoint, the poll.

vLLM's leader watches only its local workers: a dead follower shows at the next request, and a
follower whose leader died may block forever. So on bare nodes (no LWS, Slurm or SkyPilot to
restart the group) the supervisors watch each other:

- the leader's supervisor serves ``GET /gang/<instance>`` on ``master_port + 100``, guarded by
  the shared token (``Authorization: Bearer``); the answer is the gang's view: the leader's
  supervisor session, the generation (one per start of the leader's member) and its state;
- each follower's supervisor polls it every :data:`POLL_INTERVAL` seconds with its rank, the
  generation its member runs, and that member's state: each poll is its heartbeat.

What each side does with that lives in the supervisor (:mod:`pipeline.serve.supervisor`); this
module only carries it. :class:`GangBoard` is the in-memory meeting point on the leader,
shared by the HTTP thread and the supervisor's loop (one lock).
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

# A follower polls this often; each poll is a heartbeat.
POLL_INTERVAL = 1.0
# A follower that polled during this generation and then stayed silent this long is missing.
MISSING_AFTER = 10.0
# A follower stops its member when the leader has not answered for this long.
LEADER_GRACE = 15.0
# Live states of a member (the rest: it is not running for that generation).
UP_STATES = frozenset({"starting", "running"})
_MAX_REASON = 300


@dataclass(frozen=True)
class Heartbeat:
    """What one follower said last, and when (the leader's clock)."""

    rank: int
    generation: int
    session: str
    state: str
    reason: str
    seen: float
    seen_wall: float


class GangBoard:
    """Views published by the leader's supervisor, heartbeats recorded from followers.

    Thread-safe; never blocks beyond its lock. ``clock`` is the supervisor's clock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._views: dict[str, dict[str, Any]] = {}
        self._beats: dict[str, dict[int, Heartbeat]] = {}

    def publish(self, instance: str, view: Mapping[str, Any]) -> None:
        with self._lock:
            self._views[instance] = dict(view)

    def heartbeat(
        self,
        instance: str,
        rank: int,
        generation: int,
        session: str = "",
        state: str = "",
        reason: str = "",
    ) -> dict[str, Any] | None:
        """Record a follower's poll; the gang's view, None for an instance not led here."""
        with self._lock:
            view = self._views.get(instance)
            if view is None:
                return None
            self._beats.setdefault(instance, {})[rank] = Heartbeat(
                rank, generation, session, state, reason[:_MAX_REASON], self._clock(), time.time()
            )
            return dict(view)

    def beats(self, instance: str) -> dict[int, Heartbeat]:
        with self._lock:
            return dict(self._beats.get(instance, {}))


class Closable(Protocol):
    def close(self) -> None: ...


class ControlServer:
    """The leader's control endpoint: a small threaded HTTP server in this process."""

    def __init__(self, host: str, port: int, board: GangBoard, tokens: Mapping[str, str]) -> None:
        """Binds at once (raises OSError); serves in a daemon thread until :meth:`close`."""
        tokens = dict(tokens)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if not parts.path.startswith("/gang/"):
                    self._answer(404, {"error": "not found"})
                    return
                instance = parts.path.removeprefix("/gang/")
                expected = tokens.get(instance)
                sent = self.headers.get("Authorization", "")
                if expected is None or not hmac.compare_digest(
                    sent.encode(), f"Bearer {expected}".encode()
                ):
                    self._answer(401, {"error": "unauthorized"})
                    return
                query = parse_qs(parts.query)

                def one(key: str) -> str:
                    return query.get(key, [""])[0]

                try:
                    rank, generation = int(one("rank")), int(one("generation") or 0)
                except ValueError:
                    self._answer(400, {"error": "rank and generation are integers"})
                    return
                view = board.heartbeat(
                    instance, rank, generation, one("session"), one("state"), one("reason")
                )
                if view is None:
                    self._answer(404, {"error": f"no gang {instance!r} led here"})
                    return
                self._answer(200, view)

            def _answer(self, status: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one poll a second per follower: not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port; bounded (the loop notices within 0.2 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_control_server(
    host: str, port: int, board: GangBoard, tokens: Mapping[str, str]
) -> Closable:
    """The default seam of the supervisor: a real :class:`ControlServer`. Raises OSError."""
    return ControlServer(host, port, board, tokens)


def http_poll(
    url: str, instance: str, token: str, params: Mapping[str, Any], timeout: float
) -> dict[str, Any] | None:
    """One poll of the leader's control endpoint: its view, or None (unreachable, refused,
    not JSON). Never raises; blocks at most about ``timeout``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    path = f"/gang/{quote(instance)}?{urlencode(dict(params))}"
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read(65536)
        if response.status != 200:
            return None
        value = json.loads(body)
        return value if isinstance(value, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            conn.close()
