"""The gateway: a pass-through HTTP/1.1 reverse proxy on asyncio protocols.

One :class:`Gateway` owns the listening socket, the routing table, a pool of keep-alive
connections per instance, the :class:`~pipeline.gateway.states.StateFollower` and the metrics.
Each client connection is a :class:`ClientConn`; each proxied request an :class:`Exchange`
between it and one :class:`UpstreamConn`.

Replicas (several instances serving one model name) are a :class:`Replicas` group: a request
goes to the ready replica with the fewest requests in flight, ties taken in turn. When the
chosen one fails before sending back a single byte (connection refused or reset, closed before
its status line), the request is resent to another ready replica; once any byte of a response
has reached the client, never. The body is kept as the pieces it arrived in (the one copy the
gateway already holds) until the response head arrives, so a resend costs no second copy.

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
closed, so it sees a truncated response rather than a clean end).

Flow control: a client that reads slowly pauses reading from its instance (``pause_writing``),
so nothing is buffered without bound; pipelined requests wait in the client's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple, cast

from pipeline.gateway.config import GatewayConfig, Upstream
from pipeline.gateway.metrics import Metrics
from pipeline.gateway.states import StateFollower, unavailable
from pipeline.gateway.wire import (
    HOP_BY_HOP,
    MAX_HEAD,
    ChunkedReader,
    HttpError,
    ModelScanner,
    RequestHead,
    RequestReader,
    ResponseHead,
    StopParsing,
    parse_response_head,
)

# Requests routed by the body's "model": OpenAI, Anthropic and vLLM's own JSON endpoints.
ROUTED = frozenset(
    {
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/v1/messages",
        b"/v1/messages/count_tokens",
        b"/tokenize",
        b"/detokenize",
        b"/pooling",
        b"/classify",
        b"/score",
        b"/v1/score",
        b"/rerank",
        b"/v1/rerank",
        b"/v2/rerank",
    }
)
# Bytes of a pipelined next request buffered while one is in flight, before reading pauses.
MAX_PIPELINED = 1024 * 1024
CONNECT_TIMEOUT = 10.0
# vLLM (uvicorn) closes idle keep-alive connections after 5 s: drop ours before that.
UPSTREAM_IDLE = 4.0
MAX_IDLE_PER_INSTANCE = 64
# How long a kept-alive connection may wait for its next request.
CLIENT_IDLE = 300.0
# Connections past the cap kept for /health and /metrics, and how long they may take.
HEALTH_RESERVE = 16
RESERVE_HEAD_TIMEOUT = 5.0
# File descriptors kept free for the listening socket, logs and the state file.
SPARE_FDS = 64
HOUSEKEEPING = 1.0
DRAIN_SECONDS = 5.0
# A replica that refused a connection, or closed a fresh one before answering, is passed
# over while others are ready for this long (the supervisor's state file says more, later).
EJECT_SECONDS = 2.0

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

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _IDLE = range(5)
# Where a client connection is: between requests, in a head, in a body.
_WAIT, _BODY = 10, 11

_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
) % (
    len(body := json.dumps({"error": {"message": "too many connections", "type": "server_error",
                                      "param": None, "code": "service_unavailable"}}).encode()),
    body,
)  # fmt: skip
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

# Bodies are kept as the pieces they arrived in, and forwarded as such.
Body = list[bytes] | None
Handler = Callable[["ClientConn", RequestHead, Body, ModelScanner | None], None]


class _Pending(NamedTuple):
    req: RequestHead
    handler: Handler
    pieces: Body
    scanner: ModelScanner | None


# One read buffer for every connection of the process. With a plain Protocol, asyncio's recv
# allocates a fresh 256 KiB bytes per read (mmap, mremap, munmap: three syscalls for each
# streamed chunk); a BufferedProtocol reads into memory it is given. Sharing one buffer is
# safe because the event loop calls get_buffer() and buffer_updated() back to back for one
# read, on one thread, and buffer_updated() copies the bytes out before returning.
_READ_SIZE = 256 * 1024
_READ_VIEW = memoryview(bytearray(_READ_SIZE))


class _Reader(asyncio.BufferedProtocol):
    """Reads through the shared buffer and hands each read to :meth:`data_received`."""

    __slots__ = ()
    # Each connection class (upstream, client) defines how it consumes what was read.
    data_received: Callable[[bytes], None]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_VIEW[:nbytes].tobytes())


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


def error_body(path: bytes, code: int, message: str, *, param: str | None = None) -> bytes:
    """An error in the client's dialect: Anthropic's for /v1/messages, OpenAI's otherwise."""
    if path.startswith(b"/v1/messages"):
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
        }.get(code, "api_error")
        data: dict[str, object] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = {
            401: "authentication_error",
            404: "invalid_request_error",
            400: "invalid_request_error",
            413: "invalid_request_error",
        }.get(code, "server_error" if code >= 500 else "invalid_request_error")
        code_name = {401: "invalid_api_key", 404: "model_not_found" if param else "not_found"}
        data = {
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": code_name.get(code, HTTPStatus(code).phrase.lower().replace(" ", "_")),
            }
        }
    return json.dumps(data).encode()


class Pool:
    """Idle keep-alive connections to one instance; most recently used first."""

    __slots__ = ("down_until", "gateway", "idle", "upstream")

    def __init__(self, gateway: Gateway, upstream: Upstream) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.idle: list[UpstreamConn] = []
        # monotonic time until which this instance is passed over (it just failed)
        self.down_until = 0.0

    def acquire(self) -> UpstreamConn | None:
        """An idle connection younger than UPSTREAM_IDLE, or None (open a new one)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > UPSTREAM_IDLE:
                conn.transport.close()
                continue
            return conn
        return None

    def release(self, conn: UpstreamConn) -> None:
        """Keep ``conn`` for reuse (or close it when the pool is full)."""
        transport = conn.transport
        if conn.closed or transport is None or len(self.idle) >= MAX_IDLE_PER_INSTANCE:
            if transport is not None:
                transport.close()
            return
        if not transport.is_reading():
            # A slow client paused this connection on the read that ended the response: the
            # next request must not wait for that client's resume_writing.
            transport.resume_reading()
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def discard(self, conn: UpstreamConn) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        keep = []
        for conn in self.idle:
            if now - conn.idle_since > UPSTREAM_IDLE and conn.transport is not None:
                conn.transport.close()
            elif not conn.closed:
                keep.append(conn)
        self.idle = keep

    async def connect(self) -> UpstreamConn:
        """A new connection. Raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        up = self.upstream
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConn(self), up.host, up.port),
            CONNECT_TIMEOUT,
        )
        return conn


class Replicas:
    """The instances serving one model name (one, or its replicas), and whose turn it is.

    Names served by the same instances share one group, so their rotation is one."""

    __slots__ = ("names", "pools", "turn")

    def __init__(self, pools: tuple[Pool, ...]) -> None:
        self.pools = pools
        self.names = tuple(p.upstream.name for p in pools)
        self.turn = 0

    def pick(self, gateway: Gateway, exclude: tuple[Pool, ...] = ()) -> Pool | None:
        """The ready instance with the fewest requests in flight (ties: the next in turn),
        preferring those not failed in the last EJECT_SECONDS; None when none is ready.
        Reads the states as last refreshed; O(replicas)."""
        pools = self.pools
        status = gateway.states.status
        if len(pools) == 1:
            pool = pools[0]
            if pool in exclude or not status(pool.upstream.name).ready:
                return None
            return pool
        inflight = gateway.inflight
        now = time.monotonic()
        count = len(pools)
        best: Pool | None = None
        best_key = (True, 0)
        at = 0
        for step in range(count):
            index = (self.turn + step) % count
            pool = pools[index]
            name = pool.upstream.name
            if pool in exclude or not status(name).ready:
                continue
            key = (pool.down_until > now, inflight[name])
            if best is None or key < best_key:
                best, best_key, at = pool, key, index
        if best is not None:
            self.turn = at + 1
        return best


class UpstreamConn(_Reader):
    """One connection to an instance: sends one request at a time and frames its response."""

    __slots__ = (
        "buf",
        "chunks",
        "closed",
        "exchange",
        "idle_since",
        "pool",
        "received",
        "remaining",
        "reusable",
        "state",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.state = _IDLE
        self.buf = b""
        self.remaining = 0
        self.chunks: ChunkedReader | None = None
        self.closed = False
        self.received = 0
        self.reusable = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: other event loops' transports are not subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def begin(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.state = _HEAD
        self.buf = b""
        self.received = 0

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes nobody asked for: the connection cannot be trusted any more.
            self.closed = True
            self.pool.discard(self)
            assert self.transport is not None
            self.transport.close()
            return
        self.received += len(data)
        if self.state == _CHUNKED and ex.dechunk is None:
            # The streaming hot path, inlined: one relayed piece per read.
            try:
                end = self.chunks.feed(data)  # type: ignore[union-attr]
            except HttpError:
                self._broken(ex)
                return
            if end < 0:
                ex.body_pieces += 1
                ex.client.write(data)
            else:
                self._finish(ex, data, end)
        elif self.state == _HEAD:
            self._head(ex, data)
        else:
            self._body(ex, data)

    def _body(self, ex: Exchange, data: bytes) -> None:
        state = self.state
        if state == _CHUNKED:
            assert self.chunks is not None
            try:
                end = self.chunks.feed(data)
            except HttpError:
                self._broken(ex)
                return
            if end < 0:
                ex.on_body(data)
            else:
                self._finish(ex, data, end)
        elif state == _LENGTH:
            if len(data) < self.remaining:
                self.remaining -= len(data)
                ex.on_body(data)
            else:
                self._finish(ex, data, self.remaining)
        else:
            ex.on_body(data)

    def _head(self, ex: Exchange, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._broken(ex)
                    return
                self.buf = buf
                return
            try:
                resp = parse_response_head(buf[:end])
            except HttpError:
                self._broken(ex)
                return
            buf = buf[end + 4 :]
            if 100 <= resp.status < 200:
                # Interim responses (100 Continue, 103 Early Hints) are not relayed.
                continue
            break
        self.buf = b""
        self.reusable = resp.keep_alive
        # Only POST is proxied, so no HEAD: 204 and 304 are the bodiless answers.
        if resp.status in (204, 304):
            ex.on_head(resp, chunked=False, until_close=False)
            self._finish(ex, buf, 0)
            return
        if resp.chunked:
            self.state = _CHUNKED
            self.chunks = ChunkedReader(status=502)
        elif resp.content_length is not None:
            self.state = _LENGTH
            self.remaining = resp.content_length
        else:
            self.state = _UNTIL_CLOSE
            self.reusable = False
        ex.on_head(resp, chunked=resp.chunked, until_close=self.state == _UNTIL_CLOSE)
        if self.state == _LENGTH and self.remaining == 0:
            self._finish(ex, buf, 0)
        elif buf and self.exchange is ex:
            self._body(ex, buf)

    def _finish(self, ex: Exchange, data: bytes, end: int) -> None:
        if end:
            ex.on_body(data[:end] if end < len(data) else data)
        # Bytes past the end of the response would be a protocol error upstream.
        reusable = self.reusable and end == len(data)
        self.state = _IDLE
        self.exchange = None
        self.chunks = None
        ex.on_complete(self, reusable)

    def _broken(self, ex: Exchange) -> None:
        self.exchange = None
        self.closed = True
        assert self.transport is not None
        self.transport.close()
        ex.on_upstream_lost(None, protocol_error=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self.state == _UNTIL_CLOSE:
            ex.on_complete(self, False)
        else:
            ex.on_upstream_lost(exc, protocol_error=False)


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
        "replicas",
        "request",
        "retried",
        "reused",
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
        gateway.inflight[old] -= 1
        gateway.inflight[new] += 1
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

    # ---- from the upstream connection --------------------------------------------------
    def on_head(self, resp: ResponseHead, *, chunked: bool, until_close: bool) -> None:
        self.first_byte = time.perf_counter()
        self.status = resp.status
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


class ClientConn(_Reader):
    """One client connection: reads requests (one at a time, pipelining buffered), answers
    local endpoints itself and hands routed requests to an :class:`Exchange`.

    A request is judged on its head (:meth:`Gateway.route`): a wrong key, an unknown path, a
    body over the limit or a connection over the cap is answered before any of its body is
    read, and ``Expect: 100-continue`` gets its 100 only once the head passed. Deadlines
    (checked by the gateway's housekeeping): the head from accept (or, on a kept-alive
    connection, from its first byte), each body read from the one before, the next request
    from the last answer.
    """

    __slots__ = (
        "body_size",
        "closing",
        "current",
        "dead",
        "deadline",
        "exchange",
        "gateway",
        "handler",
        "http10",
        "keep_alive",
        "peer",
        "pending",
        "phase",
        "pieces",
        "raw",
        "reader",
        "reading_paused",
        "req",
        "reserved",
        "scanner",
        "started",
        "transport",
        "writing_paused",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.reader = RequestReader(self)
        # Requests read whole and waiting their turn: (head, handler, body pieces, scanner),
        # or the HttpError that ended reading.
        self.pending: deque[_Pending | HttpError] = deque()
        self.raw = bytearray()  # bytes read while a request is in flight, not parsed yet
        self.req: RequestHead | None = None
        self.handler: Handler | None = None
        self.pieces: list[bytes] | None = None
        self.scanner: ModelScanner | None = None
        self.body_size = 0
        self.exchange: Exchange | None = None
        self.keep_alive = True
        self.http10 = False
        self.closing = False
        self.dead = False
        self.reserved = False
        self.reading_paused = False
        self.writing_paused = False
        self.peer = b""
        self.phase = _WAIT
        self.started = 0  # requests begun on this connection
        self.deadline = 0.0
        self.current = b"-"  # method and path of the request being answered, for the log

    # ---- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: other event loops' transports are not subclasses.
        self.transport = cast(asyncio.Transport, transport)
        gateway = self.gateway
        open_now = len(gateway.clients)
        if open_now >= gateway.max_connections + HEALTH_RESERVE:
            # Past the cap and its reserve: answer without reading, so no fd is held.
            self.closing = True
            self.transport.write(_OVER_CAPACITY)
            self.transport.close()
            gateway.metrics.error("", "", "over_capacity")
            return
        gateway.clients.add(self)
        # Over the cap: the connection may ask for /health or /metrics, quickly, once.
        self.reserved = open_now >= gateway.max_connections
        timeout = gateway.header_timeout
        if self.reserved:
            timeout = min(timeout, RESERVE_HEAD_TIMEOUT)
        self.deadline = time.monotonic() + timeout
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if isinstance(peer, tuple) else b"unix"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.gateway.clients.discard(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone()

    def eof_received(self) -> bool:
        if self.exchange is not None or self.pending:
            # Half-closed after sending its request: answer it, then close.
            self.keep_alive = False
            return True
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        ex = self.exchange
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        ex = self.exchange
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.dead or self.closing:
            return
        if self.exchange is not None or self.pending:
            self.raw += data
            if len(self.raw) > MAX_PIPELINED and not self.reading_paused:
                self.reading_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        phase = self.phase
        if phase == _BODY:
            self.deadline = time.monotonic() + self.gateway.body_timeout
        elif phase == _WAIT:
            self.phase = _HEAD
            if self.started:
                # A kept-alive connection: the next head's time runs from its first byte.
                # (A new one's from accept, set in connection_made.)
                self.deadline = time.monotonic() + self.gateway.header_timeout
        try:
            self.reader.feed(data)
        except HttpError as exc:
            self.dead = True
            self.pending.append(exc)
        except StopParsing:
            self.dead = True
        else:
            if self.reader.upgraded:
                self.dead = True
        self.dispatch()

    # ---- from the RequestReader ------------------------------------------------------------
    def on_request_head(self, req: RequestHead) -> None:
        gateway = self.gateway
        self.started += 1
        if not req.http10 and req.host_count != 1:
            raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
        if req.host_count > 1:
            raise HttpError(400, "more than one Host header")
        has_body = req.chunked or bool(req.content_length)
        if req.content_length is not None and req.content_length > gateway.max_body:
            raise HttpError(413, f"request body too large (limit {gateway.max_body} bytes)")
        handler, wants_body = gateway.route(self, req)
        self.req = req
        self.handler = handler
        self.body_size = 0
        self.pieces = [] if wants_body else None
        self.scanner = ModelScanner() if wants_body else None
        if has_body:
            if not wants_body and handler not in gateway.local_handlers:
                # Answered on the head: the body is never read, so the connection closes.
                req.keep_alive = False
                self.pending.append(_Pending(req, handler, None, None))
                raise StopParsing
            self.phase = _BODY
            self.deadline = time.monotonic() + gateway.body_timeout
            if req.expect_continue:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self.phase = _WAIT
            self.deadline = 0.0

    def on_request_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.gateway.max_body:
            raise HttpError(413, f"request body too large (limit {self.gateway.max_body} bytes)")
        if self.pieces is not None:
            self.pieces.append(data)
            assert self.scanner is not None
            self.scanner.feed(data)

    def on_request_end(self) -> None:
        assert self.req is not None and self.handler is not None
        self.pending.append(_Pending(self.req, self.handler, self.pieces, self.scanner))
        self.req = self.handler = self.pieces = self.scanner = None
        self.phase = _WAIT
        self.deadline = 0.0

    # ---- writing -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        self.closing = True
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    def respond(
        self,
        code: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        retry_after: int | None = None,
        extra: bytes = b"",
        model: str | None = "",
        instance: str = "",
        head_only: bool = False,
    ) -> None:
        """Answer the current request locally; closes afterwards unless keep-alive.

        ``model`` labels the request in the metrics (None: not counted, e.g. /health)."""
        parts = [
            _status_line(code),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        if retry_after is not None:
            parts.append(f"retry-after: {retry_after}\r\n".encode())
        if code == 401:
            parts.append(b'www-authenticate: Bearer realm="gateway"\r\n')
        parts.append(extra)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(body)
        self.write(b"".join(parts))
        if model is not None:
            self.gateway.metrics.request(model, instance, code)
            if self.gateway.access_log:
                self.gateway.say(
                    f'{self.peer.decode()} "{self.current.decode("utf-8", "replace")}" '
                    f"model={model or '-'} instance={instance or '-'} {code} (gateway)"
                )
        if not self.keep_alive:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    def exchange_done(self) -> None:
        self.exchange = None
        if not self.keep_alive:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return
        self.dispatch()

    # ---- answering requests -----------------------------------------------------------------
    def dispatch(self) -> None:
        """Answer the requests read whole, one at a time; then read what waited meanwhile."""
        gateway = self.gateway
        while self.pending and self.exchange is None and not self.closing:
            item = self.pending.popleft()
            if isinstance(item, HttpError):
                self._reject(item)
                return
            req = item.req
            self.http10 = req.http10
            # A dead reader (refused or upgraded request) reads nothing after this one.
            last = self.dead and not self.pending
            self.keep_alive = (
                req.keep_alive and not gateway.draining and not self.reserved and not last
            )
            self.current = req.method + b" " + req.path
            item.handler(self, req, item.pieces, item.scanner)
            if not self.keep_alive and self.exchange is None and not self.closing:
                self.closing = True
                assert self.transport is not None
                self.transport.close()
        if self.closing or self.exchange is not None or self.pending:
            return
        if self.raw:
            data = bytes(self.raw)
            self.raw.clear()
            if self.reading_paused and self.transport is not None:
                self.reading_paused = False
                self.transport.resume_reading()
            self._feed(data)
        elif self.phase == _WAIT:
            self.deadline = time.monotonic() + CLIENT_IDLE

    def _reject(self, exc: HttpError) -> None:
        self.keep_alive = False
        self.raw.clear()
        body = error_body(b"", exc.status, exc.message)
        self.respond(exc.status, body, retry_after=exc.retry_after)

    def timed_out(self) -> None:
        """The deadline passed with no request in flight: 408 mid-request, else just close."""
        self.closing = True
        assert self.transport is not None
        if self.phase in (_HEAD, _BODY):
            self.transport.write(_TIMEOUT)
        self.transport.close()


class Gateway:
    """Routing, auth, local endpoints and bookkeeping for every connection of one process."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        say: Callable[[str], None] | None = None,
        state_interval: float = 0.02,
    ) -> None:
        self.config = config
        self.say = say or _stderr
        self.header_timeout = config.header_timeout
        self.body_timeout = config.body_timeout
        self.max_body = config.max_body
        self.max_connections = config.max_connections
        self.local_handlers = frozenset({self._health, self._metrics, self._models, self._model})
        self.keys = tuple(k.encode() for k in config.keys)
        self.pools = {up.name: Pool(self, up) for up in config.instances}
        # model name -> its group; names served by the same instances share one group
        groups: dict[tuple[str, ...], Replicas] = {}
        self.routes: dict[bytes, Replicas] = {}
        for model, ups in config.routes().items():
            names = tuple(up.name for up in ups)
            group = groups.get(names)
            if group is None:
                group = groups[names] = Replicas(tuple(self.pools[n] for n in names))
            self.routes[model.encode()] = group
        self.route_names = {m.decode(): g.names for m, g in self.routes.items()}
        # A body without "model" goes to the one group when there is only one.
        self.only_group = next(iter(groups.values())) if len(groups) == 1 else None
        self.auth_lines = {
            up.name: (f"authorization: Bearer {up.key}\r\n".encode() if up.key else b"")
            for up in config.instances
        }
        self.host_lines = {
            up.name: f"host: {up.host}:{up.port}\r\n".encode() for up in config.instances
        }
        self.states = StateFollower(
            config.state_file,
            [up.name for up in config.instances],
            min_interval=state_interval,
            say=self.say,
        )
        self.metrics = Metrics()
        self.clients: set[ClientConn] = set()
        self.inflight: dict[str, int] = dict.fromkeys(self.pools, 0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.access_log = config.access_log

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen. Raises OSError when the address cannot be bound."""
        self._fit_connections()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConn(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
        )
        self.states.refresh(force=True)
        self.spawn(self._housekeeping())

    def _fit_connections(self) -> None:
        """Raise the open-files limit as far as allowed, and keep the cap under it: each
        proxied client holds two descriptors (its own and its instance's)."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 2 * (self.max_connections + HEALTH_RESERVE) + SPARE_FDS
            want += MAX_IDLE_PER_INSTANCE * len(self.pools)
            if soft != resource.RLIM_INFINITY and soft < want:
                soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (OSError, ValueError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        spare = soft - SPARE_FDS - MAX_IDLE_PER_INSTANCE * len(self.pools)
        fits = max(1, spare // 2 - HEALTH_RESERVE)
        if fits < self.max_connections:
            self.say(
                f"max_connections {self.max_connections} does not fit the open-files limit "
                f"({soft}; raise it with `ulimit -n` or docker's --ulimit nofile): using {fits}"
            )
            self.max_connections = fits

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _housekeeping(self) -> None:
        """Follow the state file, drop stale connections and clients past their deadline.

        Runs until cancelled, at least once a second and four times per shortest timeout."""
        interval = min(HOUSEKEEPING, self.header_timeout / 4, self.body_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.states.refresh(force=True)
            for pool in self.pools.values():
                pool.sweep(now)
            for conn in list(self.clients):
                if conn.exchange is not None or conn.transport is None or conn.closing:
                    continue
                if conn.deadline and now > conn.deadline:
                    conn.timed_out()

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting, close idle connections, wait (bounded) for requests in flight."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn in list(self.clients):
                if conn.exchange is None and conn.transport is not None:
                    conn.closing = True
                    conn.transport.close()
            if not any(c.exchange is not None for c in self.clients):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.clients):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in self.pools.values():
            for conn in pool.idle:
                if conn.transport is not None:
                    conn.transport.close()
        for task in list(self.tasks):
            task.cancel()

    # ---- dispatch --------------------------------------------------------------------------
    def route(self, client: ClientConn, req: RequestHead) -> tuple[Handler, bool]:
        """Who answers ``req``, decided on its head: (handler, whether it needs the body).

        Handlers other than the proxy and the local endpoints answer without the body; the
        client's connection then reads none of it (and closes when there was one)."""
        path = req.path
        method = req.method
        get = method in (b"GET", b"HEAD")
        if client.reserved and not (get and path in (b"/health", b"/metrics")):
            return self._over_capacity, False
        if method == b"POST" and path in ROUTED:
            if not self.authorized(req):
                return self._unauthorized, False
            return self._proxy, True
        if get and path == b"/health":
            return self._health, False
        if get and path == b"/metrics":
            return self._metrics, False
        if get and (path == b"/v1/models" or path.startswith(b"/v1/models/")):
            if not self.authorized(req):
                return self._unauthorized, False
            return (self._models if path == b"/v1/models" else self._model), False
        if path in ROUTED or path == b"/v1/models":
            return self._not_allowed, False
        return self._not_found, False

    def _health(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        head_only = req.method == b"HEAD"
        client.respond(200, self.health_body(), model=None, head_only=head_only)

    def _metrics(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        client.respond(
            200,
            self.metrics_body(),
            content_type=b"text/plain; version=0.0.4; charset=utf-8",
            model=None,
            head_only=req.method == b"HEAD",
        )

    def _models(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        found = self.models_body(None) or b""
        client.respond(200, found, model=None, head_only=req.method == b"HEAD")

    def _model(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        path = req.path
        name = path[len(b"/v1/models/") :].decode("utf-8", "replace")
        found = self.models_body(name)
        if found is None:
            message = f"model {name!r} is not served here (ready: {self._ready_list()})"
            client.respond(404, error_body(path, 404, message, param="model"), model=None)
        else:
            client.respond(200, found, model=None, head_only=req.method == b"HEAD")

    def _not_allowed(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        path, method = req.path, req.method
        client.respond(
            405,
            error_body(path, 405, f"{method.decode()} is not allowed on {path.decode()}"),
            extra=b"allow: POST\r\n" if path in ROUTED else b"allow: GET\r\n",
            model=None,
        )

    def _not_found(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        path = req.path
        routed = ", ".join(sorted(p.decode() for p in ROUTED if p.startswith(b"/v1/")))
        message = (
            f"{path.decode('utf-8', 'replace')} is not served by the gateway: POST to "
            f"{routed} (routed by model); GET /v1/models, /health, /metrics"
        )
        client.respond(404, error_body(path, 404, message), model=None)

    def _over_capacity(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        message = (
            f"the gateway has {self.max_connections} connections open (its max_connections); "
            "only /health and /metrics are answered past it: retry shortly"
        )
        client.keep_alive = False
        client.respond(503, error_body(req.path, 503, message), retry_after=1, model=None)
        self.metrics.error("", "", "over_capacity")

    def _unauthorized(self, client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
        self.unauthorized(client, req)

    def authorized(self, req: RequestHead) -> bool:
        keys = self.keys
        if not keys:
            return True
        tokens = []
        auth = req.authorization
        if auth is not None and auth[:7].lower() == b"bearer ":
            tokens.append(auth[7:].strip())
        if req.x_api_key is not None:
            tokens.append(req.x_api_key)
        # compare_digest: the time taken does not tell how much of a key was right.
        return any(hmac.compare_digest(t, k) for t in tokens for k in keys)

    def unauthorized(self, client: ClientConn, req: RequestHead) -> None:
        given = req.authorization is not None or req.x_api_key is not None
        message = (
            "invalid API key" if given else "missing API key"
        ) + " (send Authorization: Bearer <key> or x-api-key: <key>)"
        client.respond(401, error_body(req.path, 401, message), model="")
        self.metrics.error("", "", "unauthorized")

    def _proxy(
        self, client: ClientConn, req: RequestHead, body: Body, scanner: ModelScanner | None
    ) -> None:
        """Route by the body's model (the key was checked on the head) and forward."""
        assert body is not None and scanner is not None
        is_object, model = scanner.result()
        if model is None:
            if self.only_group is not None and is_object:
                replicas = self.only_group
                model = ""
            else:
                what = 'has no "model"' if is_object else "is not a JSON object"
                message = (
                    f"the request body {what}; the gateway routes by it "
                    f"(models: {', '.join(sorted(self.route_names))})"
                )
                client.respond(400, error_body(req.path, 400, message, param="model"))
                return
        else:
            found = self.routes.get(model.encode())
            if found is None:
                message = (
                    f"model {model!r} does not exist here; known models: "
                    f"{', '.join(sorted(self.route_names)) or 'none'}"
                )
                client.respond(
                    404, error_body(req.path, 404, message, param="model"), model="(unknown)"
                )
                self.metrics.error("(unknown)", "", "unknown_model")
                return
            replicas = found
        self.states.refresh()
        pool = replicas.pick(self)
        if pool is None:
            self._unavailable(client, req, model, replicas)
            return
        head = self._head_parts(client, req, body)
        exchange = Exchange(self, client, pool, replicas, model, req.path, head, body)
        self.inflight[pool.upstream.name] += 1
        client.exchange = exchange
        exchange.start()

    def _unavailable(
        self, client: ClientConn, req: RequestHead, model: str, replicas: Replicas
    ) -> None:
        """503: no instance serving ``model`` is ready; why, for each of them."""
        reasons = [unavailable(name, self.states.status(name)) for name in replicas.names]
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
        self.metrics.error(model, instance, "not_ready")

    def _head_parts(
        self, client: ClientConn, req: RequestHead, body: list[bytes]
    ) -> tuple[bytes, bytes]:
        """The request head as every instance gets it, but for ``host`` and the key: (request
        line, headers). Same target, end-to-end headers and body; our connection headers."""
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

    def request_head(self, up: Upstream, line: bytes, headers: bytes) -> bytes:
        """The head for instance ``up``: its ``host`` and its own key (or none)."""
        return b"".join(
            (line, self.host_lines[up.name], headers, self.auth_lines[up.name], b"\r\n")
        )

    def finished(self, ex: Exchange) -> None:
        """Bookkeeping once an exchange has its outcome (exactly once per exchange)."""
        name = ex.instance
        self.inflight[name] -= 1
        now = time.perf_counter()
        total = now - ex.started
        first = ex.first_byte - ex.started if ex.first_byte is not None else None
        self.metrics.request(ex.model, name, ex.status)
        self.metrics.timing(ex.model, name, total, first, ex.body_pieces)
        if self.access_log:
            first_ms = f"{first * 1000:.1f}ms" if first is not None else "-"
            self.say(
                f'{ex.client.peer.decode()} "POST {ex.path.decode("utf-8", "replace")}" '
                f"model={ex.model} instance={name} {ex.status} {total * 1000:.1f}ms "
                f"first={first_ms} pieces={ex.body_pieces}"
            )

    # ---- local endpoints -------------------------------------------------------------------
    def _ready_list(self) -> str:
        status = self.states.status
        ready = [
            m
            for m, names in sorted(self.route_names.items())
            if any(status(n).ready for n in names)
        ]
        return ", ".join(ready) or "none"

    def health_body(self) -> bytes:
        self.states.refresh()
        instances = []
        for up in self.config.instances:
            status = self.states.status(up.name)
            instances.append(
                {
                    "name": up.name,
                    "state": status.state,
                    "ready": status.ready,
                    "models": list(up.models),
                    "reason": None if status.ready else status.reason,
                    "restarts": status.restarts,
                    "inflight": self.inflight[up.name],
                }
            )
        ready = all(i["ready"] for i in instances)
        data = {
            "status": "ok" if ready else "degraded",
            "gateway": {
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started_mono, 3),
                "connections": len(self.clients),
                "auth": bool(self.keys),
            },
            "instances": instances,
        }
        return json.dumps(data).encode()

    def models_body(self, only: str | None) -> bytes | None:
        """/v1/models (``only`` None) or /v1/models/<only>: the names some ready instance
        serves, each once (replicas: as the first ready one, in config order, reports it)."""
        self.states.refresh()
        data = []
        listed: set[str] = set()
        for up in self.config.instances:
            status = self.states.status(up.name)
            if not status.ready:
                continue
            created = int(status.ready_at or self.started)
            for model in up.models:
                if (only is not None and model != only) or model in listed:
                    continue
                listed.add(model)
                item = {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": up.models[0],
                    "parent": None,
                }
                if only is not None:
                    return json.dumps(item).encode()
                data.append(item)
        if only is not None:
            return None
        return json.dumps({"object": "list", "data": data}).encode()

    def metrics_body(self) -> bytes:
        self.states.refresh()
        gauges: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
            (
                "gateway_instance_ready",
                "gauge",
                "1 when the instance is running (requests for its models are forwarded).",
                [
                    ({"instance": name}, 1.0 if self.states.status(name).ready else 0.0)
                    for name in self.pools
                ],
            ),
            (
                "gateway_inflight_requests",
                "gauge",
                "Requests being forwarded, by instance.",
                [({"instance": name}, float(n)) for name, n in self.inflight.items()],
            ),
            (
                "gateway_idle_upstream_connections",
                "gauge",
                "Keep-alive connections to instances waiting for reuse.",
                [({"instance": name}, float(len(p.idle))) for name, p in self.pools.items()],
            ),
            (
                "gateway_client_connections",
                "gauge",
                "Open client connections.",
                [({}, float(len(self.clients)))],
            ),
            (
                "gateway_start_time_seconds",
                "gauge",
                "When the gateway started (Unix time).",
                [({}, self.started)],
            ),
        ]
        return self.metrics.render(gauges).encode()


def _stderr(line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} gateway: {line}", file=sys.stderr, flush=True)


async def serve(config: GatewayConfig, *, say: Callable[[str], None] | None = None) -> int:
    """Run the gateway until SIGTERM or SIGINT; then drain (bounded) and return 0.

    Returns 1 when the address cannot be bound (the supervisor's restart policy applies).
    """
    gateway = Gateway(config, say=say)
    say = gateway.say
    try:
        await gateway.start()
    except OSError as exc:
        say(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = len(config.routes())
    auth = f"{len(config.keys)} key(s)" if config.keys else "none (no api_keys configured)"
    follow = config.state_file or "none (every instance counts as running)"
    loop_name = type(loop).__module__.split(".")[0]
    say(
        f"listening on {config.host}:{config.port} (pid {os.getpid()}, {loop_name} loop): "
        f"{models} model name(s) on {len(config.instances)} instance(s); auth: {auth}; "
        f"state: {follow}"
    )
    await stop.wait()
    say(f"stopping: draining requests in flight (at most {DRAIN_SECONDS:g}s)")
    await gateway.drain()
    say("stopped")
    return 0
