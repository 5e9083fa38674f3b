"""HTTP/1.1 message framing for the gateway: request heads, chunked bodies, the body's ``model``.

Requests are parsed by llhttp (Node.js's parser) through ``httptools``, the binding uvicorn,
and so vLLM itself, uses: a maintained parser, strict by default, instead of one by hand.
llhttp refuses a bare LF or CR, NUL and other control bytes in a header, invalid header-name
bytes (RFC 9110 5.5/5.6.2), obsolete line folding, both ``Content-Length`` and
``Transfer-Encoding``, duplicate ``Content-Length``, chunk sizes that are not pure hex (``0x``),
and chunk data not followed by CRLF. :class:`RequestReader` adds what llhttp leaves to the
application: one ``Transfer-Encoding`` header, and only ``chunked`` (501 otherwise); a bound
on the head's size even when it arrives in one read (431); HTTP/1.0 and 1.1 only (505).
The proxy checks ``Host`` (exactly one on HTTP/1.1).

Why llhttp and not h11 (both refuse the smuggling cases above; measured here, on 2 shared
cores, with an OpenAI SDK's 12-header chat-completions request and a 300-byte body): parsing
it takes 10 us with httptools, this module's callbacks and a fresh parser included, and 30 us
with h11 0.16 (pure Python, per event). The gateway's budget is 1 ms of added latency and
60 us of CPU per request, so llhttp. The request body is handed over in the pieces it
arrived in and forwarded as such (no copy).

Responses from the instances (vLLM: a peer the gateway trusts, on loopback) are framed by
hand (:func:`parse_response_head`, :class:`ChunkedReader`): the streaming hot path relays each
read as it came and only follows where the chunked body ends; that reader is strict too.

The body's ``model`` is found by :class:`ModelScanner` as the body arrives, one read at a
time, without decoding the JSON: the event loop never spends more than one read's worth of
scanning at once, whatever the body's size (a 51 MB body through ``json.loads`` held it for
0.68 s and tripled the memory).

Pure code, no I/O. Everything works on ``bytes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Protocol

import httptools

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096

# Headers that describe one connection, not the message (RFC 9110 7.6.1): never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class HttpError(Exception):
    """A message the gateway cannot accept: answer ``status`` with ``message`` and close."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class StopParsing(Exception):
    """Raised by a :class:`RequestSink` to stop reading a request whose answer is known."""


class RequestHead:
    """A parsed request line and header block.

    ``headers`` holds ``(lower-case name, raw line, value)`` for each header line, in order;
    the few headers the gateway acts on are also pulled out into attributes.
    """

    __slots__ = (
        "authorization",
        "chunked",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "headers",
        "host_count",
        "http10",
        "keep_alive",
        "method",
        "path",
        "target",
        "x_api_key",
        "x_forwarded_for",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.path = b""
        self.http10 = False
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.host_count = 0
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.authorization: bytes | None = None
        self.x_api_key: bytes | None = None
        self.x_forwarded_for: bytes | None = None


class ResponseHead:
    """A parsed status line and header block of an upstream response."""

    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "status", "status_line")

    def __init__(self) -> None:
        self.status_line = b""
        self.status = 0
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True


def _tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def _header_lines(lines: list[bytes], status: int) -> list[tuple[bytes, bytes, bytes]]:
    headers = []
    for line in lines:
        colon = line.find(b":")
        if colon <= 0 or line[:1] in (b" ", b"\t") or line[colon - 1 : colon] in (b" ", b"\t"):
            raise HttpError(status, "malformed header line")
        headers.append((line[:colon].lower(), line, line[colon + 1 :].strip()))
    return headers


def _content_length(value: bytes, current: int | None, status: int) -> int:
    if not value.isdigit():
        raise HttpError(status, "invalid Content-Length")
    length = int(value)
    if current is not None and current != length:
        raise HttpError(status, "conflicting Content-Length headers")
    return length


class RequestSink(Protocol):
    """What a :class:`RequestReader` reports to. Any method may raise HttpError or
    StopParsing, which :meth:`RequestReader.feed` raises in turn."""

    def on_request_head(self, req: RequestHead) -> None: ...

    def on_request_body(self, data: bytes) -> None: ...

    def on_request_end(self) -> None: ...


def _no_body(data: bytes) -> None:
    return None


class RequestReader:
    """Requests on one connection, fed as they arrive: llhttp frames them, this builds each
    :class:`RequestHead` and hands heads, body pieces and ends to ``sink``.

    ``feed`` raises HttpError (400, 413, 431, 501, 505) for a request the gateway must refuse,
    or the sink's StopParsing; after either the reader is dead (the connection must close).
    Pipelined requests in one read are all reported, in order, within one ``feed``.
    """

    __slots__ = (
        "_body",
        "_end",
        "_fed",
        "_head",
        "_in_head",
        "_parser",
        "_req",
        "_size",
        "_te",
        "_url",
        "max_head",
        "upgraded",
    )

    def __init__(self, sink: RequestSink, *, max_head: int = MAX_HEAD) -> None:
        self._head: Callable[[RequestHead], None] = sink.on_request_head
        self._body: Callable[[bytes], None] = sink.on_request_body
        self._end: Callable[[], None] = sink.on_request_end
        self._parser = httptools.HttpRequestParser(self)
        self._req = RequestHead()
        self._url = b""
        self._size = 0
        self._fed = 0
        self._te = 0
        self._in_head = False
        self.max_head = max_head
        # True once a request asked to switch protocols: llhttp stops there, so the
        # connection closes after that request is answered.
        self.upgraded = False

    @property
    def current(self) -> RequestHead:
        """The request being read (or the last one read): its method is known once its
        target began, so a refusal of a HEAD request can leave its body out."""
        return self._req

    @property
    def in_head(self) -> bool:
        """True while part of a request head has been read but not all of it."""
        return self._in_head

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._in_head:
            # A head spread over reads: bounded here, since llhttp keeps a header it is still
            # reading in memory. (One that arrives whole is bounded in the callbacks.)
            self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HttpError | StopParsing):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade:
            self.upgraded = True
            return
        except httptools.HttpParserError as exc:
            raise HttpError(400, f"malformed request ({exc})") from None
        if self._in_head and self._fed > self.max_head:
            raise HttpError(431, "request head too large")

    # ---- llhttp's callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._req = RequestHead()
        self._url = b""
        self._size = 0
        self._fed = 0
        self._te = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        if not self._url:
            # Known from here on (not only once the head is whole): see ``current``.
            self._req.method = self._parser.get_method()
        self._url += url
        self._size += len(url)
        if self._size > self.max_head:
            raise HttpError(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: not forwarded
        self._size += len(name) + len(value) + 4
        if self._size > self.max_head:
            raise HttpError(431, "request head too large")
        req = self._req
        lower = name.lower()
        req.headers.append((lower, name + b": " + value, value))
        if lower == b"content-length":
            req.content_length = int(value)  # llhttp has checked the digits and duplicates
        elif lower == b"transfer-encoding":
            self._te += 1
            if self._te > 1:
                raise HttpError(400, "more than one Transfer-Encoding header")
            if value.lower() != b"chunked":
                raise HttpError(501, "only the chunked transfer coding is supported")
        elif lower == b"host":
            req.host_count += 1
        elif lower == b"connection":
            req.connection_tokens = req.connection_tokens | _tokens(value)
        elif lower == b"authorization":
            req.authorization = value
        elif lower == b"x-api-key":
            req.x_api_key = value
        elif lower == b"expect":
            req.expect_continue = value.lower() == b"100-continue"
        elif lower == b"x-forwarded-for":
            req.x_forwarded_for = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        req = self._req
        if version == "1.0":
            req.http10 = True
        elif version != "1.1":
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        target = self._url
        if target[:1] != b"/":
            # absolute-form (a client that thinks it talks to a forward proxy): keep the path.
            if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
                slash = target.find(b"/", target.find(b"//") + 2)
                target = target[slash:] if slash > 0 else b"/"
            else:
                raise HttpError(400, "unsupported request target")
        req.target = target
        query = target.find(b"?")
        req.path = target if query < 0 else target[:query]
        req.chunked = self._te > 0
        req.keep_alive = parser.should_keep_alive()
        self._head(req)

    def on_body(self, body: bytes) -> None:
        self._body(body)

    def on_message_complete(self) -> None:
        self._end()


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (without its final blank line). Raises HttpError (400/501/505).

    For tests and tools; the proxy reads requests with :class:`RequestReader`."""
    heads: list[RequestHead] = []

    class _Sink:
        on_request_head = staticmethod(heads.append)
        on_request_body = staticmethod(_no_body)
        on_request_end = staticmethod(lambda: None)

    reader = RequestReader(_Sink(), max_head=max(MAX_HEAD, len(head) + 4))
    reader.feed(head + b"\r\n\r\n")
    if not heads:
        raise HttpError(400, "incomplete request head")
    return heads[0]


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream response head. Raises HttpError(502) when it is not HTTP."""
    lines = head.split(b"\r\n")
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(502, "the instance sent a malformed status line")
    resp = ResponseHead()
    resp.status_line = status_line
    resp.status = int(parts[1])
    resp.keep_alive = parts[0] == b"HTTP/1.1"
    resp.headers = _header_lines(lines[1:], 502)
    for name, _, value in resp.headers:
        if name == b"content-length":
            resp.content_length = _content_length(value, resp.content_length, 502)
        elif name == b"transfer-encoding":
            resp.chunked = value.lower().endswith(b"chunked")
        elif name == b"connection":
            tokens = _tokens(value)
            if b"close" in tokens:
                resp.keep_alive = False
            elif b"keep-alive" in tokens:
                resp.keep_alive = True
    if resp.chunked:
        resp.content_length = None
    return resp


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedReader:
    """Follows a chunked body fed in pieces: where it ends, and (``collect``) its payload.

    The gateway passes chunked responses through byte for byte and only needs to know where
    each one ends (to reuse the connection); request bodies are collected (``collect=True``)
    to find their ``model``. ``limit`` bounds the payload size (HttpError 413).
    """

    __slots__ = ("_line", "_remaining", "_state", "collect", "limit", "parts", "size", "status")

    def __init__(self, *, collect: bool = False, limit: int = 0, status: int = 400) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self.collect = collect
        self.limit = limit
        self.status = status
        self.parts: list[bytes] = []
        self.size = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def payload(self) -> bytes:
        return b"".join(self.parts)

    def feed(self, data: bytes) -> int:
        """Consume ``data``; -1 while the body goes on, else the offset just past its end.

        Raises HttpError(``status``) on malformed framing, 413 past ``limit``.
        """
        end = len(data)
        pos = 0
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                if self.collect:
                    self.parts.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
                    self._remaining = 2
            elif state == _DATA_END:
                # The CRLF after a chunk's data: exactly that, or the framing is lost.
                want = b"\r\n"[2 - self._remaining :]
                take = min(self._remaining, end - pos)
                if data[pos : pos + take] != want[:take]:
                    raise HttpError(self.status, "chunk data not followed by CRLF")
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _SIZE
            elif state == _DONE:
                return pos
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self._line += data[pos:]
                    if len(self._line) > MAX_CHUNK_LINE:
                        raise HttpError(self.status, "chunk size line too long")
                    return -1
                line = self._line + data[pos:newline] if self._line else data[pos:newline]
                self._line = b""
                pos = newline + 1
                if state == _SIZE:
                    digits = line.split(b";", 1)[0].rstrip(b"\r \t")
                    # Hex digits only: int(_, 16) alone would take "0x10", "+1" or "1_0".
                    size = int(digits, 16) if _HEX.fullmatch(digits) else -1
                    if size < 0:
                        raise HttpError(self.status, "malformed chunk size")
                    if size == 0:
                        self._state = _TRAILER
                    else:
                        self.size += size
                        if self.limit and self.size > self.limit:
                            raise HttpError(413, "request body too large")
                        self._remaining = size
                        self._state = _DATA
                elif line in (b"", b"\r"):
                    self._state = _DONE
                    return pos
        return -1


def _decode(value: bytes) -> str | None:
    if b"\\" not in value:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        text = json.loads(b'"' + value + b'"')
    except ValueError:
        return None
    return text if isinstance(text, str) else None


# Where a top-level token starts (depth 0 and 1): a structural byte, a string, or a scalar.
_TOP = re.compile(rb'[ \t\r\n]*(?:([{}\[\],:"])|[^{}\[\],:" \t\r\n]+)')
_SCALAR = re.compile(rb'[^{}\[\],:" \t\r\n]+')
# Inside nested values only strings and brackets matter.
_NESTED = re.compile(rb'[{}\[\]"]')
# Model names are short; a longer string value is not one (and is not kept).
_MAX_KEPT = 1024
_KEY, _COLON, _VALUE, _COMMA, _END = range(5)


class ModelScanner:
    """Finds the top-level ``"model"`` string of a JSON object body, fed piece by piece.

    Work per piece is a few C-speed searches per string and bracket, and only the top level's
    keys and the model's value are kept: a 50 MB body costs no copy and no parse, and a read's
    worth of scanning is all the event loop spends at once. Like ``json.loads`` (and so vLLM),
    the last ``model`` key wins. ``result()`` -> ``(is_json_object, model)``; model is None when
    absent or not a string. The check of the JSON is structural (brackets, strings, one
    object); the instance validates the rest and answers for it.
    """

    __slots__ = (
        "_bad",
        "_depth",
        "_esc",
        "_expect",
        "_in_str",
        "_keep",
        "_kept",
        "_key",
        "_model",
        "_scalar",
        "_started",
    )

    def __init__(self) -> None:
        self._depth = 0
        self._started = False
        self._bad = False
        self._in_str = False
        self._esc = False
        self._keep = False
        self._kept: list[bytes] = []
        self._expect = _KEY
        self._key: bytes | None = None
        self._model: bytes | None = None
        self._scalar = False  # the last piece ended inside a top-level number or literal

    def result(self) -> tuple[bool, str | None]:
        if self._bad or not self._started or self._expect != _END or self._in_str:
            return False, None
        return True, None if self._model is None else _decode(self._model)

    def _string_end(self, data: bytes, pos: int) -> int:
        """Offset just past the closing quote of the string being read, or -1 (it goes on)."""
        end = len(data)
        if self._esc:
            self._esc = False
            pos += 1
        while pos < end:
            quote = data.find(b'"', pos)
            slash = data.find(b"\\", pos, quote if quote >= 0 else end)
            if slash < 0:
                if quote < 0:
                    return -1
                return quote + 1
            if slash + 1 >= end:
                self._esc = True
                return -1
            pos = slash + 2
        return -1

    def feed(self, data: bytes) -> None:
        if self._bad:
            return
        pos = 0
        end = len(data)
        if self._scalar:
            self._scalar = False
            more = _SCALAR.match(data)
            if more is not None:
                pos = more.end()
                self._scalar = pos == end
        while pos < end:
            if self._in_str:
                start = pos
                stop = self._string_end(data, pos)
                if self._keep:
                    piece = data[start : stop - 1 if stop >= 0 else end]
                    self._kept.append(piece)
                    if sum(map(len, self._kept)) > _MAX_KEPT:
                        self._keep = False  # not a model name (nor the key "model")
                        self._kept = []
                if stop < 0:
                    return
                self._in_str = False
                pos = stop
                if self._depth == 1:
                    self._string_done()
                continue
            if self._depth >= 2:
                match = _NESTED.search(data, pos)
                if match is None:
                    return
                char = data[match.start()]
                pos = match.end()
                if char == 0x22:  # '"'
                    self._in_str = True
                    self._keep = False
                elif char in b"{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 1:
                        self._expect = _COMMA
                continue
            match = _TOP.match(data, pos)
            if match is None:  # only whitespace left
                return
            pos = match.end()
            char = match.group(1)
            if char is None and pos == end:
                self._scalar = True
            self._token(char)
            if self._bad:
                return

    def _string_done(self) -> None:
        text = b"".join(self._kept) if self._keep else None
        self._kept = []
        if self._expect == _KEY:
            self._key = text
            self._expect = _COLON
        else:  # a value (checked when the string began)
            if self._key == b"model":
                self._model = text
            self._expect = _COMMA

    def _token(self, char: bytes | None) -> None:
        depth = self._depth
        expect = self._expect
        if depth == 0:
            if char == b"{" and not self._started:
                self._started = True
                self._depth = 1
                self._expect = _KEY
            else:
                self._bad = True
            return
        if char == b'"':
            if expect not in (_KEY, _VALUE):
                self._bad = True
                return
            self._in_str = True
            # Keep a key (to compare with "model") and the model's value; skip the rest.
            self._keep = expect == _KEY or self._key == b"model"
        elif char == b":":
            if expect != _COLON:
                self._bad = True
            self._expect = _VALUE
        elif char == b",":
            if expect != _COMMA:
                self._bad = True
            self._expect = _KEY
        elif char == b"}":
            if expect not in (_COMMA, _KEY):
                self._bad = True
            self._depth = 0
            self._expect = _END
        elif char in (b"{", b"["):
            if expect != _VALUE:
                self._bad = True
            if self._key == b"model":
                self._model = None
            self._depth = 2
        elif char is None:  # a scalar: number, true, false, null
            if expect != _VALUE:
                self._bad = True
            if self._key == b"model":
                self._model = None
            self._expect = _COMMA
        else:  # "]" at the top level
            self._bad = True


def find_model(body: bytes) -> tuple[bool, str | None]:
    """The top-level ``model`` string of a JSON object body, without decoding all of it.

    Returns ``(is_json_object, model)``; model is None when absent or not a string.
    """
    scanner = ModelScanner()
    scanner.feed(body)
    return scanner.result()
