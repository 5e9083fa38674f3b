"""The gateway's side towards the instances: a pool of keep-alive connections per instance
(:class:`Pool`), the choice among an instance's replicas (:class:`Replicas`), and one
connection to an instance (:class:`UpstreamConn`), which frames each response and hands it to
its :class:`~pipeline.gateway.exchange.Exchange`.

Replicas (several instances serving one model name) are a :class:`Replicas` group: a request
goes to the ready replica with the fewest requests in flight, ties taken in turn. A replica
that just failed is passed over while others are ready (:data:`EJECT_SECONDS`), and so is a
suspect one (it sent no response head within ``upstream_timeout``) until it answers in time
again or the supervisor has restarted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, cast

from pipeline.gateway.conn import Reader
from pipeline.gateway.wire import MAX_HEAD, ChunkedReader, HttpError, parse_response_head

if TYPE_CHECKING:
    from pipeline.gateway.config import Upstream
    from pipeline.gateway.exchange import Exchange
    from pipeline.gateway.proxy import Gateway

CONNECT_TIMEOUT = 10.0
# vLLM (uvicorn) closes idle keep-alive connections after 5 s: drop ours before that.
UPSTREAM_IDLE = 4.0
MAX_IDLE_PER_INSTANCE = 64
# A replica that refused a connection, or closed a fresh one before answering, is passed
# over while others are ready for this long (the supervisor's state file says more, later).
EJECT_SECONDS = 2.0

# Where an upstream connection is in a response: its head, a body framed by length, by chunks
# or by the connection's end; or idle (no request on it).
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _IDLE = range(5)


class Pool:
    """Idle keep-alive connections to one instance; most recently used first."""

    __slots__ = ("down_until", "gateway", "idle", "suspect", "suspect_run", "upstream")

    def __init__(self, gateway: Gateway, upstream: Upstream) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.idle: list[UpstreamConn] = []
        # monotonic time until which this instance is passed over (it just failed)
        self.down_until = 0.0
        # It sent no response head within upstream_timeout (it may be hung), during the run
        # of the instance that became ready at ``suspect_run`` (the state file's ready_at).
        self.suspect = False
        self.suspect_run: float | None = None

    def mark_suspect(self, ready_at: float | None) -> None:
        self.suspect = True
        self.suspect_run = ready_at

    def suspected(self, ready_at: float | None) -> bool:
        """Still suspect: no response head in time since it was marked, and the same run of
        the instance (a restart, seen as another ``ready_at``, clears it)."""
        if self.suspect and ready_at != self.suspect_run:
            self.suspect = False
        return self.suspect

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
        preferring those not suspect, then those not failed in the last EJECT_SECONDS; None
        when none is ready. Reads the states as last refreshed; O(replicas)."""
        pools = self.pools
        status = gateway.states.status
        routable = gateway.routable
        if len(pools) == 1:
            pool = pools[0]
            if pool in exclude or not routable(pool.upstream.name):
                return None
            return pool
        inflight = gateway.inflight
        now = time.monotonic()
        count = len(pools)
        best: Pool | None = None
        best_key = (True, True, 0)
        at = 0
        for step in range(count):
            index = (self.turn + step) % count
            pool = pools[index]
            name = pool.upstream.name
            state = status(name)
            if pool in exclude or not routable(name, state):
                continue
            suspect = pool.suspect and pool.suspected(state.ready_at)
            key = (suspect, pool.down_until > now, inflight[name])
            if best is None or key < best_key:
                best, best_key, at = pool, key, index
        if best is not None:
            self.turn = at + 1
        return best


class UpstreamConn(Reader):
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
