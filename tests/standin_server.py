"""A tiny stand-in for vLLM's OpenAI server, for the supervisor's fast tests.

Run as ``python standin_server.py -m vllm.entrypoints.openai.api_server --port P ...``: it
accepts vLLM's argv (only ``--host``/``--port``/``--served-model-name``/``--model`` matter) and
behaves as the ``STANDIN_*`` environment variables say:

- ``STANDIN_SLOW_START=S``: sleep S seconds before listening (the port refuses meanwhile).
- ``STANDIN_CRASH_AFTER=S``: exit with code 3 S seconds after it started listening.
- ``STANDIN_CRASH_TIMES=N`` with ``STANDIN_COUNTER=FILE``: crash only on the first N starts.
- ``STANDIN_FAIL=1``: print an error and exit 1 at once (a bad model, say).
- ``STANDIN_IGNORE_SIGTERM=1``: ignore SIGTERM (the supervisor must escalate to SIGKILL).
- ``STANDIN_GRANDCHILD=1``: fork a grandchild that keeps the log open and sleeps; it dies only
  with its process group.
- ``STANDIN_NEVER_READY=1``: listen, but answer ``/health`` with 503 forever.
- ``STANDIN_RESPONSE_DELAY=S``: wait S seconds after reading a ``POST`` before sending any byte
  of its answer (a replica busy generating; for the gateway's replica tests).

``GET /health`` answers 200 once ready; ``GET /v1/models`` lists the served name and requires
``Authorization: Bearer $VLLM_API_KEY`` when that is set; ``GET /env`` returns the environment
variables named in ``?names=A,B`` (for tests of what the supervisor passes).

For the gateway's tests it also speaks HTTP/1.1 with keep-alive and takes ``POST`` on the
OpenAI, Anthropic and vLLM JSON endpoints (``/v1/*`` needs the key, as in vLLM; ``x-api-key``
is not accepted, as in vLLM). The body's ``model`` must be one of the ``--served-model-name``
values (404 otherwise). Without ``"stream": true`` it answers JSON echoing what it received:
``served_by`` (its first name), ``path``, ``query``, ``headers`` (lower-case), ``body_sha256``,
``received_at`` (``time.time()`` when its body was read).
With it, an SSE stream in chunked encoding: ``standin_chunks`` events (default 5), each
``data: {...}`` carrying ``index`` and ``sent_at`` (``time.time()`` when written), with
``standin_delay`` seconds between them, then ``data: [DONE]``. ``GET /stats`` (no key) counts
``requests``, ``streams_started``, ``streams_completed`` and ``streams_aborted`` (the peer went
away mid-stream), for tests of disconnects. Every ``POST`` answer carries ``x-standin-port``
(which replica answered), and a body's ``standin_id`` is logged (``standin: got id ...``) as
soon as it is read, so a test can tell what a replica received even after killing it.

vLLM's sleep mode, as vLLM 0.32's source defines it (``entrypoints/serve/dev``, the worker's
``sleep``/``wake_up``): the endpoints exist only with ``VLLM_SERVER_DEV_MODE=1`` (404
otherwise, as unregistered routes), and answer 500 unless ``--enable-sleep-mode`` was given.
``POST /sleep?level=1`` offloads the weights (to host RAM) and drops the KV cache; ``level=2``
discards the weights too. ``POST /wake_up`` (optionally ``?tags=weights`` and/or
``?tags=kv_cache``) allocates them again: weights discarded at level 2 come back as garbage
until ``POST /collective_rpc`` with ``{"method": "reload_weights"}``. ``GET /is_sleeping`` is
``{"is_sleeping": ...}`` (true while weights or KV cache are not allocated). While asleep, or
with garbage weights, a ``POST`` on ``/v1/*`` answers 500. Knobs: ``STANDIN_BAD_AFTER_WAKE=N``:
the first N answers after each wake are malformed (a reply with no ``choices``), as a wake that
returns wrong output; ``STANDIN_SLEEP_FAIL=1``: ``/sleep`` answers 500. ``GET /stats`` also
counts ``sleeps`` and ``wakes``. Non-streaming answers carry ``choices[0].text`` too, so a
``/v1/completions`` reply reads as one.

``STANDIN_LOG_TIMES=1`` logs each ``POST``'s path with the times (``time.time()``) it arrived
and was answered, for bench/bench_pool.py.

``STANDIN_FAST=1`` runs a minimal asyncio server instead (for bench/bench_gateway.py): keep-alive,
``GET /health``, ``GET /v1/models``, and any ``POST`` answered with a fixed chat completion, or
with ``STANDIN_FAST_CHUNKS`` (default 64) SSE chunks when the body asks for ``"stream": true``,
``STANDIN_FAST_CHUNK_DELAY`` seconds apart (default 0: written back to back).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def _arg(argv: list[str], flag: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def _names(argv: list[str]) -> list[str]:
    """Every value of ``--served-model-name`` (vLLM takes several), else ``--model``."""
    for i, arg in enumerate(argv):
        if arg == "--served-model-name":
            names = []
            for value in argv[i + 1 :]:
                if value.startswith("--"):
                    break
                names.append(value)
            if names:
                return names
        if arg.startswith("--served-model-name="):
            return [arg.split("=", 1)[1]]
    return [_arg(argv, "--model", "standin")]


def main(argv: list[str]) -> int:
    env = os.environ
    if env.get("STANDIN_FAST"):
        return fast_main(argv)
    print(f"standin: pid {os.getpid()} pgid {os.getpgid(0)} argv {argv}", flush=True)
    if env.get("STANDIN_FAIL"):
        print("standin: error: cannot load model (STANDIN_FAIL)", flush=True)
        return 1
    if env.get("STANDIN_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if env.get("STANDIN_GRANDCHILD") and os.fork() == 0:
        # The grandchild: same process group, holds stdout (the log) open.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    time.sleep(float(env.get("STANDIN_SLOW_START", "0")))

    crash_after = env.get("STANDIN_CRASH_AFTER")
    if crash_after and env.get("STANDIN_CRASH_TIMES"):
        counter = Path(env["STANDIN_COUNTER"])
        starts = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(starts + 1))
        if starts >= int(env["STANDIN_CRASH_TIMES"]):
            crash_after = None

    host = _arg(argv, "--host", "127.0.0.1")
    port = int(_arg(argv, "--port", "8000"))
    names = _names(argv)
    name = names[0]
    key = env.get("VLLM_API_KEY")
    never_ready = bool(env.get("STANDIN_NEVER_READY"))
    response_delay = float(env.get("STANDIN_RESPONSE_DELAY", "0"))
    stats = {
        "requests": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_aborted": 0,
        "sleeps": 0,
        "wakes": 0,
    }
    lock = threading.Lock()
    dev_mode = env.get("VLLM_SERVER_DEV_MODE", "0").strip() not in ("", "0")
    sleep_mode = "--enable-sleep-mode" in argv
    # weights: "ok", "offloaded" (level 1), "discarded" (level 2), "garbage" (woken from
    # level 2, not reloaded); kv: "ok" or "dropped".
    memory = {"weights": "ok", "kv": "ok", "bad_left": 0}
    bad_after_wake = int(env.get("STANDIN_BAD_AFTER_WAKE", "0"))
    log_times = bool(env.get("STANDIN_LOG_TIMES"))

    def is_sleeping() -> bool:
        return memory["weights"] in ("offloaded", "discarded") or memory["kv"] == "dropped"

    def count(what: str) -> None:
        with lock:
            stats[what] += 1

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as vLLM (uvicorn): the gateway pools its connections.
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            # One write(2) of a whole line, like the `got id` lines: print() from one handler
            # thread can be flushed half-written by another's, and an id line written between
            # the halves no longer starts a line (a test then missed an id r1 had logged).
            os.write(1, f"standin: {fmt % args}\n".encode())

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.command == "POST":
                self.send_header("x-standin-port", str(port))
            self.end_headers()
            self.wfile.write(data)
            if log_times and self.command == "POST":
                url = urlsplit(self.path)
                os.write(1, f"standin: POST {url.path} answered at {time.time():.6f}\n".encode())

        def _dev(self, url) -> bool:
            """vLLM's dev endpoints; True when this request was one of them (answered)."""
            if url.path not in ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc"):
                return False
            if not dev_mode:
                self._send(404, {"detail": "Not Found"})
                return True
            if url.path == "/is_sleeping":
                with lock:
                    self._send(200, {"is_sleeping": is_sleeping()})
                return True
            if not sleep_mode:
                self._send(500, {"error": "Sleep mode is not enabled"})
                return True
            query = parse_qs(url.query)
            if url.path == "/sleep":
                if env.get("STANDIN_SLEEP_FAIL"):
                    self._send(500, {"error": "sleep failed (STANDIN_SLEEP_FAIL)"})
                    return True
                level = int(query.get("level", ["1"])[0])
                with lock:
                    memory["weights"] = "offloaded" if level == 1 else "discarded"
                    memory["kv"] = "dropped"
                    stats["sleeps"] += 1
                os.write(1, f"standin: asleep (level {level})\n".encode())
                self._send(200, {"status": "sleeping", "level": level})
                return True
            if url.path == "/wake_up":
                tags = query.get("tags") or ["weights", "kv_cache"]
                with lock:
                    if "weights" in tags and memory["weights"] == "offloaded":
                        memory["weights"] = "ok"
                    elif "weights" in tags and memory["weights"] == "discarded":
                        memory["weights"] = "garbage"
                    if "kv_cache" in tags:
                        memory["kv"] = "ok"
                    if not is_sleeping():
                        stats["wakes"] += 1
                        memory["bad_left"] = bad_after_wake
                    awake = not is_sleeping()
                os.write(1, f"standin: wake_up {tags}\n".encode())
                self._send(200, {"status": "awake" if awake else "sleeping", "tags": tags})
                return True
            # /collective_rpc
            body = self._body()
            method = json.loads(body or b"{}").get("method")
            with lock:
                if method == "reload_weights" and memory["weights"] == "garbage":
                    memory["weights"] = "ok"
            self._send(200, {"results": [None]})
            return True

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if self._dev(url):
                return
            if url.path == "/health":
                self._send(503 if never_ready else 200, {})
            elif url.path == "/env":
                wanted = parse_qs(url.query).get("names", [""])[0].split(",")
                self._send(200, {n: os.environ.get(n) for n in wanted if n})
            elif url.path == "/v1/models":
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    self._send(401, {"error": "Unauthorized"})
                else:
                    self._send(200, {"object": "list", "data": [{"id": n} for n in names]})
            elif url.path == "/stats":
                with lock:
                    self._send(200, dict(stats))
            else:
                self._send(404, {"error": "not found"})

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            if self._dev(url):
                return
            body = self._body()
            received_at = time.time()
            if log_times:
                os.write(1, f"standin: POST {url.path} received at {received_at:.6f}\n".encode())
            count("requests")
            if url.path.startswith("/v1/"):
                with lock:
                    unusable = is_sleeping() or memory["weights"] == "garbage"
                    bad = not unusable and memory["bad_left"] > 0
                    if bad:
                        memory["bad_left"] -= 1
                if unusable:
                    self._send(500, {"error": "the engine is asleep or its weights are garbage"})
                    return
                if bad:
                    self._send(200, {"id": "standin-bad", "object": "text_completion"})
                    return
            unauthorized = key and self.headers.get("Authorization") != f"Bearer {key}"
            if url.path.startswith("/v1/") and unauthorized:
                self._send(401, {"error": "Unauthorized"})
                return
            try:
                data = json.loads(body)
            except ValueError:
                self._send(400, {"error": "body is not JSON"})
                return
            if isinstance(data, dict) and "standin_id" in data:
                # One write(2) of a whole line: print() from handler threads interleaves.
                os.write(1, f"standin: got id {data['standin_id']}\n".encode())
            if response_delay:
                time.sleep(response_delay)
            if data.get("model") not in names:
                message = f"The model `{data.get('model')}` does not exist."
                self._send(404, {"error": {"message": message, "code": 404}})
                return
            if data.get("stream"):
                self._stream(data)
                return
            self._send(
                200,
                {
                    "id": "standin-1",
                    "object": "chat.completion",
                    "model": name,
                    "served_by": name,
                    "path": url.path,
                    "query": url.query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                    "received_at": received_at,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "text": "hi",
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

        def _stream(self, data: dict) -> None:
            chunks = int(data.get("standin_chunks", 5))
            delay = float(data.get("standin_delay", 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("x-standin-port", str(port))
            self.end_headers()
            count("streams_started")

            def chunk(payload: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

            try:
                for index in range(chunks):
                    event = {
                        "id": "standin-1",
                        "object": "chat.completion.chunk",
                        "model": name,
                        "index": index,
                        "sent_at": time.time(),
                        "choices": [{"index": 0, "delta": {"content": f"tok{index} "}}],
                    }
                    chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                    if delay:
                        time.sleep(delay)
                chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                count("streams_completed")
            except (BrokenPipeError, ConnectionResetError):
                count("streams_aborted")
                self.close_connection = True

    class Server(ThreadingHTTPServer):
        # uvicorn's (vLLM's) backlog, not socketserver's 5: a gateway sending out ten held
        # requests at once must not see SYNs dropped (and resent a second later).
        request_queue_size = 2048

        def handle_error(self, request: object, client_address: object) -> None:
            # A client that hangs up on a keep-alive connection is normal, not an error.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)  # type: ignore[arg-type]

    server = Server((host, port), Handler)
    print(f"standin: listening on {host}:{port} at {time.time():.6f}", flush=True)
    if crash_after:
        deadline = time.monotonic() + float(crash_after)
        server.timeout = 0.1
        while time.monotonic() < deadline:
            server.handle_request()
        print("standin: crashing (STANDIN_CRASH_AFTER)", flush=True)
        return 3
    server.serve_forever()
    return 0


def fast_main(argv: list[str]) -> int:
    """A minimal keep-alive HTTP/1.1 server on asyncio with canned answers (the benchmark's
    upstream: it must not be the bottleneck)."""
    import asyncio

    host = _arg(argv, "--host", "127.0.0.1")
    port = int(_arg(argv, "--port", "8000"))
    name = _names(argv)[0]
    chunks = int(os.environ.get("STANDIN_FAST_CHUNKS", "64"))
    delay = float(os.environ.get("STANDIN_FAST_CHUNK_DELAY", "0"))

    def response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
        return (
            b"HTTP/1.1 "
            + status.encode()
            + b"\r\ncontent-type: "
            + ctype
            + b"\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    completion = json.dumps(
        {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": 1700000000,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the stand-in."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
        }
    ).encode()
    fixed = response("200 OK", completion)
    health = response("200 OK", b"{}")
    models = response("200 OK", json.dumps({"object": "list", "data": [{"id": name}]}).encode())
    missing = response("404 Not Found", b'{"error": "not found"}')
    events = []
    for index in range(chunks):
        event = {
            "id": "chatcmpl-standin",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": name,
            "choices": [{"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}],
        }
        if index == 0:
            event["choices"][0]["delta"]["role"] = "assistant"
        payload = b"data: " + json.dumps(event).encode() + b"\n\n"
        events.append(b"%x\r\n%s\r\n" % (len(payload), payload))
    last = {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": name,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    tail = b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"
    events.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
    sse_head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    class Fast(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""
            self.busy = False

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while not self.busy:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buf) < end + 4 + length:
                    return
                body = self.buf[end + 4 : end + 4 + length]
                self.buf = self.buf[end + 4 + length :]
                if head.startswith(b"get /health"):
                    self.transport.write(health)
                elif head.startswith(b"get /v1/models"):
                    self.transport.write(models)
                elif not head.startswith(b"post "):
                    self.transport.write(missing)
                elif b'"stream":true' in body.replace(b" ", b""):
                    self.stream()
                else:
                    self.transport.write(fixed)

        def stream(self) -> None:
            if not delay:
                # One write per event: each is its own chunk on the wire.
                self.transport.write(sse_head)
                for event in events:
                    self.transport.write(event)
                return
            self.busy = True
            loop = asyncio.get_running_loop()
            self.transport.write(sse_head)

            def send(index: int) -> None:
                if self.transport.is_closing():
                    return
                self.transport.write(events[index])
                if index + 1 < len(events):
                    loop.call_later(delay, send, index + 1)
                else:
                    self.busy = False
                    if self.buf:
                        self.data_received(b"")

            send(0)

        def connection_lost(self, exc: Exception | None) -> None:
            self.busy = True

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Fast, host, port, reuse_address=True, backlog=1024)
        print(f"standin: fast mode listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["-m", "vllm.entrypoints.openai.api_server"]:
        args = args[2:]
    sys.exit(main(args))
