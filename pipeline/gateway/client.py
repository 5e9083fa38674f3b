"""The client side of the gateway: one :class:`ClientConn` per client connection, and the
decisions taken on a request's head (:func:`route`): which handler answers it, whether its key
is right, whether its body is read at all.

Flow control: a client that reads slowly pauses reading from its instance (``pause_writing``)
and from itself, so nothing is buffered without bound, the gateway's own answers included;
pipelined requests wait, unparsed, in the client's buffer. Idle keep-alive connections are
closed first at the connection cap.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple, cast

from pipeline.gateway import endpoints
from pipeline.gateway.conn import Body, Handler, Reader
from pipeline.gateway.endpoints import (
    LOCAL_HANDLERS,
    OVER_CAPACITY,
    REQUEST_TIMEOUT,
    error_body,
    status_line,
)
from pipeline.gateway.exchange import forward
from pipeline.gateway.wire import (
    BodyCollector,
    HttpError,
    ModelScanner,
    RequestHead,
    RequestReader,
    StopParsing,
)

if TYPE_CHECKING:
    from pipeline.gateway.exchange import Exchange
    from pipeline.gateway.proxy import Gateway

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
# Bytes read ahead of the request being answered (pipelined requests, or the next one's body)
# before reading pauses: one read's worth.
MAX_PIPELINED = 256 * 1024
# What is parsed at once (but a proxied body, whose key was right): a request read whole
# stops parsing there, and the rest of the read waits, unparsed, for its turn. So a read of
# tiny pipelined requests queues at most this many bytes' worth (about 200), not thousands.
FEED_SLICE = 4096
# How long a kept-alive connection may wait for its next request (or not read its answers),
# once a request on it had a key; before that, header_timeout (Gateway.open_idle).
CLIENT_IDLE = 300.0
# Connections past the cap kept for /health and /metrics, and how long they may take.
HEALTH_RESERVE = 16
RESERVE_HEAD_TIMEOUT = 5.0

# Where a client connection is: between requests, in a head, in a body.
_WAIT, _HEAD, _BODY = range(3)


class _Pending(NamedTuple):
    req: RequestHead
    handler: Handler
    pieces: Body
    scanner: ModelScanner | None


class ClientConn(Reader):
    """One client connection: reads requests (one at a time, pipelining buffered), answers
    local endpoints itself and hands routed requests to an :class:`Exchange`.

    A request is judged on its head (:func:`route`): a wrong key, an unknown path, a
    body over the limit or a connection over the cap is answered before any of its body is
    read, and ``Expect: 100-continue`` gets its 100 only once the head passed; a 401 closes
    the connection. Deadlines (checked by the gateway's housekeeping): the head from accept
    (or, on a kept-alive connection, from its first byte); a proxied request's body, each read
    from the one before (``body_timeout``); any other body, with its head (a request without a
    key arrives whole within ``header_timeout``); the next request from the last answer.

    Flow control, the same for every answer, proxied or the gateway's own: while the client
    does not read (``pause_writing``) nothing more is answered, nothing more is read from it
    and its instance's connection is paused too, so a connection holds at most one read
    ahead (:data:`MAX_PIPELINED`), one slice of parsed requests (:data:`FEED_SLICE`) and the
    transport's write buffer plus one answer. It has its idle time to read them; then it is
    aborted.

    Idle keep-alive connections are *parked* (``gateway.idle``, oldest first), those without
    a keyed request apart: at the connection cap the gateway closes one of them for a new
    connection (:meth:`Gateway.evict_idle <pipeline.gateway.proxy.Gateway.evict_idle>`).
    """

    __slots__ = (
        "authed",
        "body",
        "body_size",
        "closing",
        "current",
        "dead",
        "deadline",
        "eof",
        "exchange",
        "gateway",
        "handler",
        "head_only",
        "http10",
        "keep_alive",
        "parked",
        "peer",
        "pending",
        "phase",
        "raw",
        "reader",
        "reading_paused",
        "req",
        "reserved",
        "scanner",
        "started",
        "timed_body",
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
        self.raw = bytearray()  # bytes read but not parsed yet (they wait for their turn)
        self.req: RequestHead | None = None
        self.handler: Handler | None = None
        self.body: BodyCollector | None = None  # the body being read, when it is kept
        self.scanner: ModelScanner | None = None
        self.body_size = 0
        self.exchange: Exchange | None = None
        self.keep_alive = True
        self.http10 = False
        self.head_only = False  # the request being answered is a HEAD: no body in the answer
        self.closing = False
        self.dead = False  # nothing more is parsed (a refused or upgraded request)
        self.eof = False  # the client sent its last byte
        self.reserved = False
        self.authed = False  # a request on this connection had a key (or needed none)
        self.timed_body = False  # each read of the body restarts its deadline (proxied)
        self.parked: dict[ClientConn, None] | None = None  # which idle list holds it
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
        if len(gateway.clients) >= gateway.max_connections:
            # At the cap: an idle keep-alive connection makes room before the reserve is used.
            gateway.evict_idle()
        open_now = len(gateway.clients)
        if open_now >= gateway.max_connections + HEALTH_RESERVE:
            # Past the cap and its reserve: answer without reading, so no fd is held.
            self.closing = True
            self.transport.write(OVER_CAPACITY)
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
        self.unpark()
        self.gateway.clients.discard(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone()

    def eof_received(self) -> bool:
        self.eof = True
        if self.pending or self.raw:
            # Half-closed after sending its requests: answer them; the last one closes.
            return True
        if self.exchange is not None:
            self.keep_alive = False
            return True
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        ex = self.exchange
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()
        # Nor read what it sends meanwhile: it waits in the kernel's buffers, not in ours.
        self._flow()

    def resume_writing(self) -> None:
        self.writing_paused = False
        ex = self.exchange
        if ex is not None:
            if ex.upstream is not None and ex.upstream.transport is not None:
                ex.upstream.transport.resume_reading()
            self._flow()
        elif not self.closing:
            # The answers that waited for the client to read, then reading again.
            self.dispatch()

    def _flow(self) -> None:
        """Pause reading while the client does not read its answers or a read's worth waits
        unparsed; resume once neither holds."""
        pause = self.writing_paused or len(self.raw) > MAX_PIPELINED
        if pause != self.reading_paused and not self.closing and self.transport is not None:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.parked is not None:
            self.unpark()
        if self.dead or self.closing:
            return
        if self.exchange is not None or self.pending or self.raw or self.writing_paused:
            # Not its turn: kept as it came, parsed when the answers before it are out.
            self.raw += data
            if len(self.raw) > MAX_PIPELINED:
                self._flow()
            return
        self._feed(data)
        self.dispatch()

    def _feed(self, data: bytes) -> None:
        """Parse one read, a slice at a time; once a request is read whole, the rest of the
        read waits in ``raw`` (pipelined requests are parsed as they are answered)."""
        end = len(data)
        if end <= FEED_SLICE:
            self._parse(data)
            return
        view = memoryview(data)
        at = 0
        while at < end:
            step = self._slice(end - at)
            self._parse(view[at : at + step])
            at += step
            if self.pending or self.dead or self.closing:
                if at < end and not self.dead:
                    self.raw += view[at:]
                return

    def _slice(self, size: int) -> int:
        """How much of ``size`` unparsed bytes to parse next: all of them in a proxied body
        (a keyed client's upload, parsed as it comes), else at most FEED_SLICE."""
        if self.phase == _BODY and self.timed_body:
            return size
        return min(size, FEED_SLICE)

    def _parse(self, data: bytes | bytearray | memoryview) -> None:
        phase = self.phase
        if phase == _BODY:
            if self.timed_body:
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
        handler, wants_body = route(self, req)
        self.req = req
        self.handler = handler
        self.body_size = 0
        self.scanner = ModelScanner() if wants_body else None
        self.body = BodyCollector(self.scanner) if wants_body else None
        if has_body:
            if not wants_body and handler not in LOCAL_HANDLERS:
                # Answered on the head: the body is never read, so the connection closes.
                req.keep_alive = False
                self.pending.append(_Pending(req, handler, None, None))
                raise StopParsing
            self.phase = _BODY
            # A proxied body (its key was right): body_timeout between reads. A body for a
            # local endpoint is dropped: it has the head's time, not a timer each byte resets.
            self.timed_body = wants_body
            if wants_body:
                self.deadline = time.monotonic() + gateway.body_timeout
            elif not self.deadline:
                # Its head began in the read that ended the request before it.
                self.deadline = time.monotonic() + gateway.header_timeout
            if req.expect_continue:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self.phase = _WAIT
            self.deadline = 0.0

    def on_request_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.gateway.max_body:
            raise HttpError(413, f"request body too large (limit {self.gateway.max_body} bytes)")
        if self.body is not None:
            self.body.add(data)  # which feeds the scanner

    def on_request_end(self) -> None:
        assert self.req is not None and self.handler is not None
        pieces = None if self.body is None else self.body.finish()
        self.pending.append(_Pending(self.req, self.handler, pieces, self.scanner))
        self.req = self.handler = self.body = self.scanner = None
        self.phase = _WAIT
        self.deadline = 0.0

    # ---- writing -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        self.exchange = None
        self.close()

    def close(self) -> None:
        """Close once what was written is sent. A client that does not read it within its
        idle time is aborted by the housekeeping (:meth:`timed_out`): a close waits for it."""
        self.closing = True
        self.unpark()
        self.deadline = time.monotonic() + self.idle_timeout()
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
    ) -> None:
        """Answer the current request locally; closes afterwards unless keep-alive. A HEAD
        request gets the head alone, with the length of the body a GET would get.

        ``model`` labels the request in the metrics (None: not counted, e.g. /health)."""
        parts = [
            status_line(code),
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
        if not self.head_only:
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
            self.close()

    def exchange_done(self) -> None:
        self.exchange = None
        if not self.keep_alive:
            self.close()
            return
        self.dispatch()

    # ---- answering requests -----------------------------------------------------------------
    def dispatch(self) -> None:
        """Answer the requests read whole, in order, one at a time; then parse what waited
        meanwhile, one slice per turn of the event loop (a client pipelining thousands of
        requests does not hold the loop). Stops while a request is proxied (until
        :meth:`exchange_done`) or the client does not read its answers (until
        :meth:`resume_writing`); then reads on once nothing waits."""
        gateway = self.gateway
        sliced = False
        while True:
            if self.closing or self.exchange is not None:
                return
            if self.writing_paused:
                # Answers wait for the client to read; it has the idle time to do so.
                self.deadline = time.monotonic() + self.idle_timeout()
                return
            if self.pending:
                item = self.pending.popleft()
                if isinstance(item, HttpError):
                    self._reject(item)
                    return
                req = item.req
                self.http10 = req.http10
                self.head_only = req.method == b"HEAD"
                # A dead reader (refused or upgraded request) or a client that half-closed
                # sends nothing after this one.
                last = (self.dead or self.eof) and not self.pending and not self.raw
                self.keep_alive = (
                    req.keep_alive and not gateway.draining and not self.reserved and not last
                )
                self.current = req.method + b" " + req.path
                item.handler(self, req, item.pieces, item.scanner)
                if not self.keep_alive and self.exchange is None and not self.closing:
                    self.close()
                continue
            if self.dead or not self.raw:
                break
            if sliced:
                # One slice per turn: the rest after the other connections' callbacks.
                asyncio.get_running_loop().call_soon(self.dispatch)
                return
            sliced = True
            step = self._slice(len(self.raw))
            piece = self.raw[:step]
            del self.raw[:step]
            self._parse(piece)
        # Nothing waits: read on, and time what comes next.
        if self.eof:
            self.close()
            return
        if self.reading_paused:
            self._flow()
        if self.phase == _WAIT:
            if self.reader.in_head:
                # Part of the next head came with the last request: its time runs now.
                self.phase = _HEAD
                self.deadline = time.monotonic() + gateway.header_timeout
            else:
                idle = CLIENT_IDLE if self.authed else gateway.open_idle  # idle_timeout()
                self.deadline = time.monotonic() + idle
                if self.parked is None:
                    parked = gateway.idle[self.authed]
                    parked[self] = None
                    self.parked = parked

    def idle_timeout(self) -> float:
        """How long this connection may wait for its next request: CLIENT_IDLE once a
        request on it had a key, else ``header_timeout`` (at most CLIENT_IDLE)."""
        return CLIENT_IDLE if self.authed else self.gateway.open_idle

    def unpark(self) -> None:
        """Off the gateway's idle list (a request came, or the connection is closing)."""
        parked = self.parked
        if parked is not None:
            self.parked = None
            del parked[self]

    def evict(self) -> None:
        """Close this idle keep-alive connection to make room for a new one (at the cap).

        It leaves the count at once; so that its descriptor goes at once too, one that has
        not read all of its last answer yet is aborted rather than waited for."""
        self.unpark()
        self.closing = True
        self.gateway.clients.discard(self)
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def _reject(self, exc: HttpError) -> None:
        self.keep_alive = False
        self.raw.clear()
        # The refused request, as far as it was read (a HEAD's answer has no body).
        self.head_only = self.reader.current.method == b"HEAD"
        body = error_body(b"", exc.status, exc.message)
        self.respond(exc.status, body, retry_after=exc.retry_after)

    def timed_out(self) -> None:
        """The deadline passed with no request in flight: 408 mid-request, else just close.

        A client that does not read what it is owed (its answers, or what a close waits to
        send) is aborted: a close would wait for it."""
        assert self.transport is not None
        if self.closing or self.writing_paused:
            self.closing = True
            self.unpark()
            self.transport.abort()
            return
        if self.phase in (_HEAD, _BODY):
            self.transport.write(REQUEST_TIMEOUT)
        self.close()


# ---- decisions on the head ---------------------------------------------------------------------
def route(client: ClientConn, req: RequestHead) -> tuple[Handler, bool]:
    """Who answers ``req``, decided on its head: (handler, whether it needs the body).

    Handlers other than the proxy and the local endpoints answer without the body; the
    client's connection then reads none of it (and closes when there was one). A request
    whose key is right marks its connection as keyed (``authed``): it may idle longer, and is
    closed last at the cap."""
    path = req.path
    method = req.method
    get = method in (b"GET", b"HEAD")
    if client.reserved and not (get and path in (b"/health", b"/metrics")):
        return _over_capacity, False
    if method == b"POST" and path in ROUTED:
        if not authorized(client.gateway, req):
            return _unauthorized, False
        client.authed = True
        return forward, True
    if get and path == b"/health":
        return endpoints.health, False
    if get and path == b"/metrics":
        return endpoints.metrics, False
    if get and (path == b"/v1/models" or path.startswith(b"/v1/models/")):
        if not authorized(client.gateway, req):
            return _unauthorized, False
        client.authed = True
        return (endpoints.models if path == b"/v1/models" else endpoints.model), False
    if path in ROUTED or path == b"/v1/models":
        return _not_allowed, False
    return _not_found, False


def authorized(gateway: Gateway, req: RequestHead) -> bool:
    keys = gateway.keys
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


def _unauthorized(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    given = req.authorization is not None or req.x_api_key is not None
    message = (
        "invalid API key" if given else "missing API key"
    ) + " (send Authorization: Bearer <key> or x-api-key: <key>)"
    # Closed after it: a client without the key gets no connection to keep.
    client.keep_alive = False
    client.respond(401, error_body(req.path, 401, message), model="")
    client.gateway.metrics.error("", "", "unauthorized")


def _over_capacity(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    gateway = client.gateway
    message = (
        f"the gateway has {gateway.max_connections} connections open (its max_connections); "
        "only /health and /metrics are answered past it: retry shortly"
    )
    client.keep_alive = False
    client.respond(503, error_body(req.path, 503, message), retry_after=1, model=None)
    gateway.metrics.error("", "", "over_capacity")


def _not_allowed(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    path = req.path
    # A HEAD's answer has the length of a GET's (RFC 9110 9.3.2), so its message too.
    method = b"GET" if req.method == b"HEAD" else req.method
    client.respond(
        405,
        error_body(path, 405, f"{method.decode()} is not allowed on {path.decode()}"),
        extra=b"allow: POST\r\n" if path in ROUTED else b"allow: GET\r\n",
        model=None,
    )


def _not_found(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    path = req.path
    routed = ", ".join(sorted(p.decode() for p in ROUTED if p.startswith(b"/v1/")))
    message = (
        f"{path.decode('utf-8', 'replace')} is not served by the gateway: POST to "
        f"{routed} (routed by model); GET /v1/models, /health, /metrics"
    )
    client.respond(404, error_body(path, 404, message), model=None)
