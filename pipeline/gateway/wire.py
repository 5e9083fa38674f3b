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
60 us of CPU per request, so llhttp. The request body is kept by :class:`BodyCollector`: a
large piece as it arrived (no copy), small ones (a chunked body's tiny chunks, a trickling
client's reads) copied together, so its memory is its size whatever it arrived in.

Responses from the instances (vLLM: a peer the gateway trusts, on loopback) are framed by
hand (:func:`parse_response_head`, :class:`ChunkedReader`): the streaming hot path relays each
read as it came and only follows where the chunked body ends; that reader is strict too.

The body's ``model`` is found by :class:`ModelScanner` as the body arrives, one read at a
time, without decoding the JSON: the event loop never spends more than one read's worth of
scanning at once, whatever the body's size (a 51 MB body through ``json.loads`` held it for
0.68 s and tripled the memory). It reads the key as vLLM does: vLLM 0.32 takes request bodies
through FastAPI, which calls Starlette's ``Request.json()``, i.e. the standard library's
``json.loads`` on the body's bytes, and hands the dict to pydantic; so keys and values are
unescaped (``"mod\\u0065l"`` is ``model``), a UTF-8 byte order mark is skipped, and of two
``model`` keys the last wins. Rather than guess which one a client meant, the gateway refuses
a body with two (:class:`BodyModel`).

Pure code, no I/O. Everything works on ``bytes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple, Protocol

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


# A request body is kept in pieces of at least this size (all but its last).
BODY_PIECE = 64 * 1024


class BodyCollector:
    """A request body as it arrives (:meth:`add`), kept in few pieces (:meth:`finish`), each
    handed to ``scanner`` once it is whole.

    A piece of :data:`BODY_PIECE` bytes or more is kept as it came: no copy (a
    ``Content-Length`` body arrives in reads of up to 256 KiB). Smaller ones are copied together
    into pieces of about that size. So a body costs its size plus one object per 64 KiB,
    whatever it arrived in: kept as they came, the 2-byte chunks of a chunked body cost about
    50 bytes of objects per payload byte (a 64 MiB body, 3 GiB). A body of one small piece
    (the common chat request) is not copied either. The scanner sees each piece once, not each
    chunk: one call per 64 KiB instead of one per 2 bytes.
    """

    __slots__ = ("_scanner", "_tail", "pieces", "size")

    def __init__(self, scanner: ModelScanner | None = None) -> None:
        self._scanner = scanner
        self._tail: bytes | bytearray | None = None  # small pieces not yet a whole one
        self.pieces: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        tail = self._tail
        if len(data) >= BODY_PIECE:
            if tail is not None:
                self._push(bytes(tail))
                self._tail = None
            self._push(data)
        elif tail is None:
            self._tail = data  # copied only if another small piece follows
        else:
            if not isinstance(tail, bytearray):
                tail = self._tail = bytearray(tail)
            tail += data
            if len(tail) >= BODY_PIECE:
                self._push(bytes(tail))
                self._tail = None

    def finish(self) -> list[bytes]:
        """The body's pieces, in order (their concatenation is the body). Call once, last."""
        if self._tail is not None:
            self._push(bytes(self._tail))
            self._tail = None
        return self.pieces

    def _push(self, piece: bytes) -> None:
        self.pieces.append(piece)
        if self._scanner is not None:
            self._scanner.feed(piece)


_CONTROL = re.compile(rb"[\x00-\x1f]")


def _decode(raw: bytes) -> str | None:
    """A JSON string's bytes between its quotes, as ``json.loads`` reads them (escapes
    decoded); None where ``json.loads`` would refuse them (bad escape, control byte, not
    UTF-8), or where what it reads is no Unicode text (a lone surrogate, ``"\\ud800"``: no
    model is named so, and it cannot be encoded to look the name up)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if b"\\" not in raw:
        return None if _CONTROL.search(raw) else text
    try:
        # A str, not bytes: json.loads would guess the encoding of bytes from the first ones.
        value = json.loads('"' + text + '"')
        value.encode()
    except (ValueError, UnicodeEncodeError):
        return None
    return value if isinstance(value, str) else None


def _is_model_key(raw: bytes) -> bool:
    return raw == b"model" or (b"\\" in raw and _decode(raw) == "model")


class BodyModel(NamedTuple):
    """What a request body says its model is, read as the instance reads it (``json.loads``).

    ``is_object``: the body is one JSON object (checked for its structure: strings closed, as
    many brackets closed as opened, the top level's colons and commas; the instance checks the
    rest and answers for it: a body json.loads refuses never reaches a model). ``model``: its
    top-level ``model`` string; None when there is none, or it is ``null`` (vLLM then uses its
    default model). ``problem``: why the gateway will not route this object by its ``model``
    (two ``model`` keys, a value that is not a string, not valid JSON, or too long to be a
    name), one line for a 400 answer; None when it will.
    """

    is_object: bool
    model: str | None = None
    problem: str | None = None


_BOM = b"\xef\xbb\xbf"
# Where a top-level token starts (depth 0 and 1): a structural byte, a string, or a scalar.
_TOP = re.compile(rb'[ \t\r\n]*(?:([{}\[\],:"])|([^{}\[\],:" \t\r\n]+))')
_SCALAR = re.compile(rb'[^{}\[\],:" \t\r\n]+')
# Inside nested values only strings and brackets matter.
_NESTED = re.compile(rb'[{}\[\]"]')
# "model" with each letter escaped ("\u006d..."): a longer key is not "model" (and not kept).
_MAX_KEY = 30
# Model names are short; a longer string value is not one (and is not kept).
_MAX_MODEL = 1024
# Enough of a scalar value to tell null from anything else.
_MAX_SCALAR = 8
_KEY, _COLON, _VALUE, _COMMA, _END = range(5)
# What the (last) top-level "model" key holds.
_ABSENT, _STRING, _LONG, _SCALAR_VALUE, _CONTAINER = range(5)


class ModelScanner:
    """Finds the top-level ``"model"`` of a JSON object body, fed piece by piece.

    Work per piece is a few C-speed searches per string and bracket, and only the top level's
    short keys and the model's value are kept: a 50 MB body costs no copy and no parse, and a
    piece's worth of scanning is all the event loop spends at once. Keys and the value are
    read as ``json.loads`` (and so vLLM) reads them: escapes decoded, so ``"mod\\u0065l"`` is a
    ``model`` key; keys inside nested values do not count. Where ``json.loads`` would take the
    last of two ``model`` keys, :meth:`result` reports a problem instead, so the gateway never
    routes by a different ``model`` than the instance reads. :meth:`result` is
    :class:`BodyModel`.
    """

    __slots__ = (
        "_bad",
        "_bom",
        "_depth",
        "_esc",
        "_expect",
        "_in_str",
        "_is_model",
        "_keep",
        "_kept",
        "_kept_size",
        "_kind",
        "_limit",
        "_models",
        "_scalar",
        "_started",
        "_value",
    )

    def __init__(self) -> None:
        self._depth = 0
        self._started = False
        self._bad = False
        self._bom = 0  # bytes of a leading byte order mark read; -1 once past the start
        self._in_str = False
        self._esc = False
        self._keep = False  # the string being read is kept (a top-level key, the model)
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._limit = 0
        self._expect = _KEY
        self._is_model = False  # the last top-level key read is "model"
        self._models = 0  # top-level "model" keys seen
        self._kind = _ABSENT
        self._value = b""  # the model's raw string (or scalar) value
        self._scalar = False  # the last piece ended inside a top-level number or literal

    def result(self) -> BodyModel:
        if self._bad or not self._started or self._expect != _END or self._in_str:
            return BodyModel(False)
        if self._models > 1:
            return BodyModel(
                True,
                problem='the request body has more than one "model" key (after JSON '
                "unescaping); send it once",
            )
        kind = self._kind
        if kind == _STRING:
            model = _decode(self._value)
            if model is None:
                return BodyModel(True, problem='the request body\'s "model" is not a valid '
                                 "string (a bad escape, a control byte, not UTF-8)")  # fmt: skip
            return BodyModel(True, model)
        if kind == _ABSENT or (kind == _SCALAR_VALUE and self._value == b"null"):
            return BodyModel(True)
        if kind == _LONG:
            return BodyModel(True, problem=f'the request body\'s "model" is longer than '
                             f"{_MAX_MODEL} bytes: no model is named so")  # fmt: skip
        return BodyModel(True, problem='the request body\'s "model" is not a string')

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

    def _skip_bom(self, data: bytes) -> int:
        """Where the JSON starts in the body's first bytes (json.loads skips a UTF-8 byte
        order mark), or -1 when ``data`` was all (part of) one."""
        seen = self._bom
        take = data[: 3 - seen]
        if not take:
            return -1
        if _BOM.startswith(take, seen):
            seen += len(take)
            if seen < 3:
                self._bom = seen
                return -1
            self._bom = -1
            return len(take)
        self._bom = -1
        if seen:
            self._bad = True  # the start of a byte order mark, then something else
            return -1
        return 0

    def feed(self, data: bytes) -> None:
        if self._bad:
            return
        pos = 0
        end = len(data)
        if self._bom >= 0:
            pos = self._skip_bom(data)
            if pos < 0:
                return
        if self._scalar:
            self._scalar = False
            more = _SCALAR.match(data, pos)
            if more is not None:
                pos = more.end()
                self._scalar = pos == end
                if self._is_model and self._kind == _SCALAR_VALUE:
                    self._value = (self._value + more.group())[:_MAX_SCALAR]
        while pos < end:
            if self._in_str:
                start = pos
                stop = self._string_end(data, pos)
                if self._keep:
                    piece = data[start : stop - 1 if stop >= 0 else end]
                    self._kept_size += len(piece)
                    if self._kept_size > self._limit:
                        self._keep = False  # too long for "model" (or a model's name)
                        self._kept = []
                    else:
                        self._kept.append(piece)
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
            scalar = match.group(2)
            if scalar is not None and pos == end:
                self._scalar = True
            self._token(match.group(1), scalar)
            if self._bad:
                return

    def _string_done(self) -> None:
        text = b"".join(self._kept) if self._keep else None
        self._kept = []
        if self._expect == _KEY:
            self._is_model = text is not None and _is_model_key(text)
            self._models += self._is_model
            self._expect = _COLON
        else:  # a value (checked when the string began)
            if self._is_model:
                if text is None:
                    self._kind = _LONG
                else:
                    self._kind = _STRING
                    self._value = text
            self._expect = _COMMA

    def _token(self, char: bytes | None, scalar: bytes | None) -> None:
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
            self._keep = expect == _KEY or self._is_model
            self._limit = _MAX_KEY if expect == _KEY else _MAX_MODEL
            self._kept_size = 0
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
            if self._is_model:
                self._kind = _CONTAINER
            self._depth = 2
        elif scalar is not None:  # a number, true, false, null
            if expect != _VALUE:
                self._bad = True
            if self._is_model:
                self._kind = _SCALAR_VALUE
                self._value = scalar[:_MAX_SCALAR]
            self._expect = _COMMA
        else:  # "]" at the top level
            self._bad = True


def find_model(body: bytes) -> BodyModel:
    """The top-level ``model`` of a JSON object body, without decoding all of it."""
    scanner = ModelScanner()
    scanner.feed(body)
    return scanner.result()
