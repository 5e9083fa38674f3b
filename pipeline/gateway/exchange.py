"""One proxied request (:class:`Exchange`): routed by its body's ``model``
(:func:`forward`), sent to one instance, its response relayed to the client.

When the chosen replica fails before sending back a single byte (connection refused or reset,
closed before its status line), the request is resent to another ready replica; once any byte
of a response has reached the client, never. The body is kept in the pieces it was read into
(:class:`~pipeline.gateway.wire.BodyCollector`: the one copy the gateway already holds) until
the response head arrives, so a resend costs no second copy.

What passes through untouched: the request body (read whole, to find ``model``, then sent as
received), the request target with its query, every end-to-end header except the
credentials, and the response (status line, headers, and body bytes as they arrive, chunk
framing included). What changes: hop-by-hop headers are dropped, ``Host`` and
``Content-Length`` are set, the client's ``Authorization`` / ``x-api-key`` are replaced by the
instance's own ``Authorization: Bearer`` (vLLM rejects ``x-api-key``), and ``X-Forwarded-For``
gets the client's address.

Concurrency: everything runs on one event loop thread; callbacks never block. The only races
are with the peers, and each is handled where it lands: the client leaving (the upstream
connection is aborted, which vLLM sees as a disconnect and cancels the request), an instance
closing a pooled keep-alive connection just as it is reused (retried once on a fresh
connection when nothing came back), an instance dying before it answered (resent to another
replica, if there is one), an instance dying mid-response (the client's connection is
closed, so it sees a truncated response rather than a clean end), an instance that sends no
response head within ``upstream_timeout`` of the request (504, never resent: it may still be
working on it; the instance is marked suspect). Only the wait for the head is bounded: once it
has come, a stream runs as long as the instance keeps sending.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from pipeline.gateway.endpoints import error_body
from pipeline.gateway.states import unavailable
from pipeline.gateway.upstream import EJECT_SECONDS
from pipeline.gateway.wire import HOP_BY_HOP, ChunkedReader, HttpError

if TYPE_CHECKING:
    from pipeline.gateway.client import ClientConn
    from pipeline.gateway.conn import Body
    from pipeline.gateway.proxy import Gateway
    from pipeline.gateway.upstream import Pool, Replicas, UpstreamConn
    from pipeline.gateway.wire import ModelScanner, RequestHead, ResponseHead

# Client request headers the gateway sets itself, or that belong to the client's connection.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"authorization",
    b"x-api-key",
    b"x-forwarded-for",
}
# Upstream response headers that belong to the upstream connection.
_DROP_RESPONSE = HOP_BY_HOP - {b"transfer-encoding", b"trailer"}
_DROP_RESPONSE_DECHUNKED = HOP_BY_HOP


class Exchange:
    """One proxied request, from its routing to the last byte of its response."""

    __slots__ = (
        "body_pieces",
        "client",
        "dechunk",
        "done",
        "first_byte",
        "gateway",
        "head_parts",
        "head_sent",
        "model",
        "path",
        "pool",
        "ready_seen",
        "replicas",
        "request",
        "retried",
        "reused",
        "sent_at",
        "started",
        "status",
        "tried",
        "upstream",
    )

    def __init__(
        self,
        gateway: Gateway,
        client: ClientConn,
        pool: Pool,
        replicas: Replicas,
        model: str,
        path: bytes,
        head_parts: tuple[bytes, bytes],
        body: list[bytes],
    ) -> None:
        self.gateway = gateway
        self.client = client
        self.pool = pool
        self.replicas = replicas
        self.model = model
        self.path = path
        # The head's instance-independent parts (request line; headers), to address another
        # replica; the head for this one, then the body's pieces (references, not copies).
        self.head_parts = head_parts
        self.request = [gateway.request_head(pool.upstream, *head_parts), *body]
        self.tried: tuple[Pool, ...] = ()
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.upstream: UpstreamConn | None = None
        self.head_sent = False
        self.done = False
        self.status = 0
        self.retried = False
        self.reused = False
        self.dechunk: ChunkedReader | None = None
        self.body_pieces = 0
        # When the request was last sent (monotonic): the gateway's housekeeping answers 504
        # once upstream_timeout has passed with no response head (no timer per request).
        self.sent_at = 0.0
        # A held request: when the gateway learned its instance was ready (perf_counter).
        self.ready_seen: float | None = None

    @property
    def instance(self) -> str:
        return self.pool.upstream.name

    def start(self) -> None:
        conn = self.pool.acquire()
        if conn is not None:
            self._send(conn, reused=True)
        else:
            self.gateway.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.pool.connect()
        except (OSError, TimeoutError) as exc:
            if self.done:
                return
            why = getattr(exc, "strerror", None) or type(exc).__name__
            up = self.pool.upstream
            self.gateway.say(f"instance {up.name}: cannot connect to {up.host}:{up.port}: {why}")
            self.pool.down_until = time.monotonic() + EJECT_SECONDS
            if self._failover("connect_failed"):
                return
            # Stopped on request a moment ago, in states up to one refresh old: say so, as a
            # request that came a moment later would be told.
            self.gateway.states.refresh(force=True)
            status = self.gateway.states.status(up.name)
            if len(self.replicas.pools) == 1 and not status.ready:
                message, wait = unavailable(up.name, status)
                self.gateway.metrics.error(self.model, self.instance, "not_ready")
                self.fail(503, f"model {self.model!r} is unavailable: {message}", retry_after=wait)
                return
            self.gateway.metrics.error(self.model, self.instance, "connect_failed")
            which = f"instance {up.name!r}"
            if len(self.replicas.pools) > 1:
                which = f"no replica accepts connections; the last, {which},"
            self.fail(
                503,
                f"model {self.model!r} is unavailable: {which} does not accept connections ({why})",
                retry_after=5,
            )
            return
        if self.done:  # the client left while we connected
            self.pool.release(conn)
            return
        self._send(conn, reused=False)

    def _failover(self, reason: str) -> bool:
        """The current instance failed before sending back a byte (so nothing reached the
        client): resend the request to another ready replica not tried yet. False when
        there is none (the caller answers the client). Each replica is tried at most once."""
        if self.done or self.head_sent or len(self.replicas.pools) == 1:
            return False
        gateway = self.gateway
        failed = self.pool
        self.tried = (*self.tried, failed)
        gateway.states.refresh()
        pool = self.replicas.pick(gateway, self.tried)
        if pool is None:
            return False
        old, new = failed.upstream.name, pool.upstream.name
        gateway.metrics.retry(self.model, old, reason)
        gateway.say(f"instance {old}: {reason.replace('_', ' ')} before answering; resent to {new}")
        gateway.count(old, -1)
        gateway.count(new, 1)
        self.pool = pool
        self.request[0] = gateway.request_head(pool.upstream, *self.head_parts)
        self.retried = False
        self.start()
        return True

    def _send(self, conn: UpstreamConn, *, reused: bool) -> None:
        self.upstream = conn
        self.reused = reused
        conn.begin(self)
        assert conn.transport is not None
        # The head, then the body's pieces as they were read: no copy of the body.
        conn.transport.writelines(self.request)
        if self.client.writing_paused:
            conn.transport.pause_reading()
        self.sent_at = time.monotonic()
        if self.ready_seen is not None:
            self.gateway.metrics.held_dispatch.observe(time.perf_counter() - self.ready_seen)
            self.ready_seen = None

    def check_timeout(self, now: float) -> None:
        """Called by the gateway's housekeeping (about once a second): past upstream_timeout
        since the request was sent with no response head, answer 504 and mark the instance
        suspect (its replicas are preferred) until it answers in time again. Not resent: the
        instance may still be working on it, and another wait as long would follow."""
        timeout = self.gateway.config.upstream_timeout
        conn = self.upstream
        if self.done or self.head_sent or now - self.sent_at < timeout or conn is None:
            # (No connection: between two sends, a resend connecting under its own limit.)
            return
        gateway, name, pool = self.gateway, self.instance, self.pool
        pool.mark_suspect(gateway.states.status(name).ready_at)
        gateway.metrics.error(self.model, name, "upstream_timeout")
        gateway.say(
            f"instance {name}: no response within {timeout:g}s (upstream_timeout): 504, and "
            "its replicas are preferred until it answers in time"
        )
        self.upstream = None
        conn.exchange = None
        conn.closed = True
        if conn.transport is not None:
            # Not close(): a hung instance may never read what is still to be written.
            conn.transport.abort()
        self.fail(
            504,
            f"instance {name!r} sent no response within {timeout:g} s (upstream_timeout); "
            "it may be hung",
        )

    # ---- from the upstream connection --------------------------------------------------
    def on_head(self, resp: ResponseHead, *, chunked: bool, until_close: bool) -> None:
        self.first_byte = time.perf_counter()
        self.status = resp.status
        pool = self.pool
        if pool.suspect and resp.status < 500:
            pool.suspect = False
            self.gateway.say(f"instance {self.instance}: answered in time again, not suspect")
        # No resend past this point: let the body go (the transport holds what it has yet
        # to write) rather than keep it for the whole response.
        self.request = []
        client = self.client
        drop = _DROP_RESPONSE
        if chunked and client.http10:
            # An HTTP/1.0 client knows no chunked coding: send the payload, end by closing.
            self.dechunk = ChunkedReader(collect=True, status=502)
            drop = _DROP_RESPONSE_DECHUNKED
            client.keep_alive = False
        if until_close:
            client.keep_alive = False
        parts = [resp.status_line, b"\r\n"]
        for name, line, _ in resp.headers:
            if name not in drop:
                parts.append(line)
                parts.append(b"\r\n")
        if not client.keep_alive:
            parts.append(b"connection: close\r\n")
        elif client.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.head_sent = True
        client.write(b"".join(parts))

    def on_body(self, data: bytes) -> None:
        self.body_pieces += 1
        if self.dechunk is None:
            self.client.write(data)
            return
        with contextlib.suppress(HttpError):
            self.dechunk.feed(data)
        if self.dechunk.parts:
            self.client.write(b"".join(self.dechunk.parts))
            self.dechunk.parts.clear()

    def on_complete(self, conn: UpstreamConn, reusable: bool) -> None:
        self.upstream = None
        if self.done:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        self.done = True
        if reusable:
            self.pool.release(conn)
        else:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self.gateway.finished(self)
        self.client.exchange_done()

    def on_upstream_lost(self, exc: Exception | None, *, protocol_error: bool) -> None:
        conn, self.upstream = self.upstream, None
        if self.done:
            return
        nothing_back = conn is not None and conn.received == 0
        if not self.head_sent and nothing_back and not protocol_error:
            if self.reused and not self.retried:
                # A pooled connection the instance closed as we reused it, or the instance
                # died: another replica if there is one, else a fresh connection to this one.
                if self._failover("upstream_closed"):
                    return
                self.retried = True
                self.gateway.spawn(self._connect())
                return
            # A fresh connection closed unanswered: the instance is failing.
            self.pool.down_until = time.monotonic() + EJECT_SECONDS
            if self._failover("upstream_closed"):
                return
        name = self.instance
        if not self.head_sent:
            what = "sent a malformed response" if protocol_error else "closed the connection"
            self.gateway.metrics.error(self.model, name, "upstream_closed")
            self.gateway.say(f"instance {name}: {what} before answering")
            self.fail(502, f"instance {name!r} {what} before answering (did it crash?)")
            return
        # Mid-response: the client must see a truncated message, not a clean end.
        self.done = True
        self.gateway.metrics.error(self.model, name, "upstream_closed")
        self.gateway.say(f"instance {name}: connection lost in the middle of a response")
        self.status = 502 if not self.status else self.status
        self.gateway.finished(self)
        self.client.abort()

    # ---- from the client -----------------------------------------------------------------
    def client_gone(self) -> None:
        """The client disconnected: abort the upstream request (vLLM cancels it)."""
        if self.done:
            return
        self.done = True
        self.status = 499  # nginx's "client closed request"
        self.gateway.metrics.error(self.model, self.instance, "client_disconnected")
        self.gateway.finished(self)
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()

    def fail(self, code: int, message: str, *, retry_after: int | None = None) -> None:
        """Answer the client with an error instead of the instance's response."""
        self.done = True
        self.status = code
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self.gateway.finished(self)
        self.client.respond(
            code, error_body(self.path, code, message), retry_after=retry_after, model=None
        )
        self.client.exchange_done()


def forward(client: ClientConn, req: RequestHead, body: Body, scanner: ModelScanner | None) -> None:
    """Route by the body's model (the key was checked on the head) and forward."""
    gateway = client.gateway
    assert body is not None and scanner is not None
    is_object, model, problem = scanner.result()
    if problem is not None:
        # Read otherwise by the instance, or by nobody: refused rather than guessed.
        message = f"{problem}; the gateway routes by it (models: {_models(gateway)})"
        client.respond(400, error_body(req.path, 400, message, param="model"))
        return
    if model is None:
        if gateway.only_group is not None and is_object:
            replicas = gateway.only_group
            model = ""
        else:
            what = 'has no "model"' if is_object else "is not a JSON object"
            message = (
                f"the request body {what}; the gateway routes by it (models: {_models(gateway)})"
            )
            client.respond(400, error_body(req.path, 400, message, param="model"))
            return
    else:
        found = gateway.routes.get(model.encode())
        if found is None:
            message = (
                f"model {model!r} does not exist here; known models: "
                f"{', '.join(sorted(gateway.route_names)) or 'none'}"
            )
            client.respond(
                404, error_body(req.path, 404, message, param="model"), model="(unknown)"
            )
            gateway.metrics.error("(unknown)", "", "unknown_model")
            return
        replicas = found
    gateway.states.refresh()
    pool = replicas.pick(gateway)
    if pool is None:
        # The states may be up to one refresh interval old: an instance that became ready
        # just now (`doit serve` has returned) must not get a 503. One stat, on this path only.
        gateway.states.refresh(force=True)
        pool = replicas.pick(gateway)
    if pool is None:
        if gateway.holding.can_hold(replicas):
            # On-demand: held while the supervisor starts or wakes an instance.
            gateway.holding.hold(client, req, body, scanner, model, replicas)
            return
        _unavailable(client, req, model, replicas)
        return
    head = _head_parts(client, req, body)
    exchange = Exchange(gateway, client, pool, replicas, model, req.path, head, body)
    gateway.count(pool.upstream.name, 1)
    client.exchange = exchange
    exchange.start()


def _models(gateway: Gateway) -> str:
    return ", ".join(sorted(gateway.route_names)) or "none"


def _unavailable(client: ClientConn, req: RequestHead, model: str, replicas: Replicas) -> None:
    """503: no instance serving ``model`` is ready; why, for each of them."""
    gateway = client.gateway
    reasons = [unavailable(name, gateway.states.status(name)) for name in replicas.names]
    waits = [wait for _, wait in reasons if wait is not None]
    instance = replicas.names[0] if len(replicas.names) == 1 else ""
    client.respond(
        503,
        error_body(
            req.path,
            503,
            f"model {model!r} is unavailable: {'; '.join(why for why, _ in reasons)}",
        ),
        # The soonest any replica should be back (None: none recovers by itself).
        retry_after=min(waits) if waits else None,
        model=model,
        instance=instance,
    )
    gateway.metrics.error(model, instance, "not_ready")


def _head_parts(client: ClientConn, req: RequestHead, body: list[bytes]) -> tuple[bytes, bytes]:
    """The request head as every instance gets it, but for ``host`` and the key: (request
    line, headers). Same target, end-to-end headers and body; our connection headers.
    :meth:`Gateway.request_head <pipeline.gateway.proxy.Gateway.request_head>` adds those
    two for the instance chosen."""
    parts = []
    drop = _DROP_REQUEST
    if req.connection_tokens - {b"close", b"keep-alive"}:
        drop = drop | req.connection_tokens
    for name, line, _ in req.headers:
        if name not in drop:
            parts.append(line)
            parts.append(b"\r\n")
    peer = client.peer
    if req.x_forwarded_for:
        peer = req.x_forwarded_for + b", " + peer
    parts.append(b"x-forwarded-for: " + peer + b"\r\n")
    size = sum(map(len, body))
    parts.append(b"content-length: " + str(size).encode() + b"\r\n")
    return b"".join((req.method, b" ", req.target, b" HTTP/1.1\r\n")), b"".join(parts)
