"""HTTP/1.1 message framing for the gateway: heads, chunked bodies, the body's ``model``.

Only what a pass-through proxy needs, and strict where a proxy must be (RFC 9112): a request
with both ``Content-Length`` and ``Transfer-Encoding``, differing lengths, whitespace before a
header's colon or an obsolete folded line is refused, since the gateway re-frames every request
it forwards (always with ``Content-Length``) and must not read a message differently from the
client. Header lines are kept as received, so forwarding them re-encodes nothing.

Pure functions and a small state machine; no I/O. Everything works on ``bytes``.
"""

from __future__ import annotations

import json
import re

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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (without its final blank line). Raises HttpError (400/501/505)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "malformed request line")
    req = RequestHead()
    method, target, version = parts
    if version == b"HTTP/1.1":
        pass
    elif version == b"HTTP/1.0":
        req.http10 = True
        req.keep_alive = False
    else:
        raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are supported")
    if target[:1] != b"/":
        # absolute-form (a client that thinks it talks to a forward proxy): keep the path.
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash > 0 else b"/"
        else:
            raise HttpError(400, "unsupported request target")
    req.method = method
    req.target = target
    query = target.find(b"?")
    req.path = target if query < 0 else target[:query]
    req.headers = _header_lines(lines[1:], 400)
    transfer_encoding = None
    for name, _, value in req.headers:
        if name == b"content-length":
            req.content_length = _content_length(value, req.content_length, 400)
        elif name == b"transfer-encoding":
            transfer_encoding = value.lower()
        elif name == b"connection":
            req.connection_tokens = req.connection_tokens | _tokens(value)
        elif name == b"authorization":
            req.authorization = value
        elif name == b"x-api-key":
            req.x_api_key = value
        elif name == b"expect":
            req.expect_continue = value.lower() == b"100-continue"
        elif name == b"x-forwarded-for":
            req.x_forwarded_for = value
    if transfer_encoding is not None:
        if req.content_length is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if transfer_encoding != b"chunked":
            raise HttpError(501, "only the chunked transfer coding is supported")
        req.chunked = True
    if b"close" in req.connection_tokens:
        req.keep_alive = False
    elif req.http10 and b"keep-alive" in req.connection_tokens:
        req.keep_alive = True
    return req


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
                # The CRLF after a chunk's data.
                take = min(self._remaining, end - pos)
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
                    digits = line.split(b";", 1)[0].strip()
                    try:
                        size = int(digits, 16) if digits.isalnum() else -1
                    except ValueError:
                        size = -1
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


# A top-level "model" key: preceded by `{` or `,` (so it is a key, not a value) and followed by
# a string value. Inside a JSON string every quote is escaped, so in valid JSON this can only
# match a real key; whether that key is at the top level is checked separately.
_MODEL_AT = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _model_match(body: bytes, at: int) -> re.Match[bytes] | None:
    match = _MODEL_AT.match(body, at)
    if match is None:
        return None
    before = at - 1
    while before >= 0 and body[before] in b" \t\r\n":
        before -= 1
    return match if before >= 0 and body[before] in b"{," else None


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


def find_model(body: bytes) -> tuple[bool, str | None]:
    """The top-level ``model`` string of a JSON object body, without decoding all of it.

    Returns ``(is_json_object, model)``; model is None when absent or not a string.

    Fast paths (no full parse): the first ``"model"`` key with nothing nested before it (SDKs
    that put ``model`` first), or the last one with nothing nested after it (SDKs that put it
    after ``messages``). Braces inside strings only make these checks fail, never pass wrongly.
    Anything else falls back to ``json.loads``.
    """
    start = body.find(b'"model"')
    if start >= 0:
        match = _model_match(body, start)
        if (
            match is not None
            and body.count(b"{", 0, start) == 1
            and b"[" not in body[:start]
            and body.lstrip()[:1] == b"{"
        ):
            model = _decode(match.group(1))
            if model is not None:
                return True, model
        last = body.rfind(b'"model"')
        match = _model_match(body, last) if last != start or match is None else match
        if match is not None:
            tail = body[match.end() :]
            if (
                tail.count(b"}") == 1
                and tail.rstrip()[-1:] == b"}"
                and b"{" not in tail
                and b"[" not in tail
                and b"]" not in tail
                and body.lstrip()[:1] == b"{"
            ):
                model = _decode(match.group(1))
                if model is not None:
                    return True, model
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False, None
    if not isinstance(data, dict):
        return False, None
    model = data.get("model")
    return True, model if isinstance(model, str) else None
