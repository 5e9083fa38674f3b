"""An adversarial pass over a running gateway: hostile HTTP requests, each with the outcome a
safe gateway must give, counted by family.

    .venv/bin/python scripts/adversarial_gateway.py [--only SUBSTRING] [--verbose]

Starts two stand-in instances (``tests/standin_server.py``: ``alpha`` answers at once, ``hung``
never answers a POST) and one gateway in front of them, configured as the issue's pass was
(``header_timeout = 3``, ``body_timeout = 2``, ``max_connections = 64``, one key,
``upstream_timeout = 2`` when the gateway knows that key), all on free loopback ports in a
private temp dir. Then runs each case on raw sockets and prints one line per case (``ok`` or
``FAIL`` with what was seen), and the counts per family. Exit status 1 when a case fails.

The families: memory (pipelined answers to a socket that never reads; tiny chunks), time
(slow heads and bodies, idle connections, the connection cap), head (HEAD answers),
model (how ``model`` is read), smuggling (framing a second parser would read differently),
paths (vLLM's dev and admin endpoints), auth and hang (an instance that never answers).
Memory limits are generous (tens of MiB for megabytes of input) and time limits are the
configured timeouts plus seconds, so the verdicts hold on a loaded machine. The regression
tests in tests/test_gateway*.py pin one case per failure found; this script is the wider net.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h11

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.gateway.config import CONFIG_VAR, GatewayConfig, Upstream  # noqa: E402

STANDIN = REPO / "tests" / "standin_server.py"
KEY = "adversarial-key-0123456789"
HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
UPSTREAM_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    port: int
    pid: int

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the gateway in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class Failed(Exception):
    """The case's outcome is unsafe; the message says what was seen."""


def check(condition: bool, seen: str) -> None:
    if not condition:
        raise Failed(seen)


# ---- raw HTTP helpers ---------------------------------------------------------------------


def req(
    method: str,
    path: str,
    *,
    body: bytes = b"",
    key: bool = False,
    extra: str = "",
    length: bool = True,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\n"
    if key:
        head += f"Authorization: Bearer {KEY}\r\n"
    if body and length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def read_until_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends within ``timeout``; True when it closed (EOF or reset)."""
    sock.settimeout(0.2)
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def responses(data: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse ``data`` as the answers to requests of ``methods``, in order, as a strict client
    (h11) would. Raises Failed when the bytes do not parse."""
    out = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "gw")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise Failed(f"a strict client cannot parse the answers: {exc}") from exc
            if event is h11.NEED_DATA:
                return out + ([(status, headers, body)] if status else [])
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
            elif isinstance(event, h11.ConnectionClosed):
                return out
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            break
    extra = conn.trailing_data[0]
    if extra:
        raise Failed(f"{len(extra)} bytes after the last answer: {extra[:60]!r}")
    return out


def exchange(target: Target, data: bytes, timeout: float = 10.0) -> tuple[int, bytes, bool]:
    """Send ``data`` on a new connection; return (status of the first answer, all bytes read
    before close or ``timeout``, closed?)."""
    with target.connect() as sock:
        sock.sendall(data)
        got, closed = read_until_close(sock, timeout)
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
    return status, got, closed


def status_of(target: Target, data: bytes) -> int:
    """The first answer's status. The request asks for the connection to be closed after it
    (a gateway that keeps it open costs the case 3 s, not a verdict)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    return exchange(target, head + b"\r\nConnection: close" + sep + body, timeout=3.0)[0]


def health_latency(target: Target) -> float:
    start = time.monotonic()
    status, _, _ = exchange(target, req("GET", "/health", extra="Connection: close\r\n"), 20)
    elapsed = time.monotonic() - start
    check(status == 200, f"/health answered {status} during the case")
    return elapsed


def keyed_chat(target: Target, model: str = "alpha", timeout: float = 10.0) -> int:
    body = json.dumps({"model": model, "messages": []}).encode()
    return exchange(
        target,
        req("POST", "/v1/chat/completions", body=body, key=True, extra="Connection: close\r\n"),
        timeout,
    )[0]


# ---- the cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    run: Callable[[Target], None]


CASES: list[Case] = []


def case(family: str) -> Callable[[Callable[[Target], None]], Callable[[Target], None]]:
    def register(fn: Callable[[Target], None]) -> Callable[[Target], None]:
        CASES.append(Case(family, fn.__name__, fn))
        return fn

    return register


def flood_without_reading(target: Target, one: bytes, total: int = 8 * MiB) -> None:
    """Pipeline ``one`` until ``total`` bytes are sent or the gateway stops reading, on a
    socket that never reads; the gateway's RSS must not grow by tens of MiB, another client's
    /health must stay fast, and memory must come back after the close."""
    base, _ = target.rss()
    sock = target.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    payload = one * (total // len(one))
    sent, end = 0, time.monotonic() + 15
    try:
        while sent < len(payload) and time.monotonic() < end:
            try:
                sent += sock.send(payload[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        time.sleep(0.5)
        rss, _ = target.rss()
        latency = health_latency(target)
    finally:
        sock.close()
    check(
        rss - base < 48 * MiB,
        f"RSS grew by {(rss - base) / MiB:.0f} MiB for {sent / MiB:.1f} MiB pipelined",
    )
    check(latency < 2.0, f"another client's /health took {latency:.1f} s")


@case("memory")
def pipelined_metrics_to_a_socket_that_never_reads(t: Target) -> None:
    flood_without_reading(t, req("GET", "/metrics"))


@case("memory")
def pipelined_401s_to_a_socket_that_never_reads(t: Target) -> None:
    flood_without_reading(t, req("GET", "/v1/models"))


@case("memory")
def pipelined_404s_to_a_socket_that_never_reads(t: Target) -> None:
    flood_without_reading(t, req("GET", "/no/such/path", key=True))


@case("memory")
def pipelined_keyed_models_to_a_socket_that_never_reads(t: Target) -> None:
    flood_without_reading(t, req("GET", "/v1/models", key=True))


@case("memory")
def pipelined_head_health_to_a_socket_that_never_reads(t: Target) -> None:
    flood_without_reading(t, req("HEAD", "/health"))


@case("memory")
def two_byte_chunks_do_not_multiply_memory(t: Target) -> None:
    payload = 8 * MiB
    _, hwm_before = t.rss()
    base, _ = t.rss()
    body = b'{"model":"alpha","messages":[],"pad":"' + b"x" * payload + b'"}'
    with t.connect(timeout=60) as sock:
        sock.sendall(
            req("POST", "/v1/chat/completions", key=True, extra="Transfer-Encoding: chunked\r\n")
        )
        buf = bytearray()
        for i in range(0, len(body), 2):
            buf += b"2\r\n" + body[i : i + 2] + b"\r\n"
            if len(buf) > 256 * 1024:
                sock.sendall(buf)
                buf.clear()
        sock.sendall(bytes(buf) + b"0\r\n\r\n")
        got, _ = read_until_close(sock, 30)
    _, hwm = t.rss()
    check(got.startswith(b"HTTP/1.1 200"), f"answered {got[:40]!r}")
    grew = max(hwm, hwm_before) - base
    check(grew < 6 * payload, f"peak RSS grew by {grew / MiB:.0f} MiB for {payload // MiB} MiB")


# -- time: slow heads and bodies, idle connections, the cap ----------------------------------


def closed_within(t: Target, first: bytes, trickle: bytes, limit: float) -> None:
    """Send ``first``, then one byte of ``trickle`` a second; the gateway must close the
    connection within ``limit`` seconds."""
    start = time.monotonic()
    with t.connect() as sock:
        sock.sendall(first)
        for byte in trickle:
            if time.monotonic() - start > limit + 5:
                break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            _, closed = read_until_close(sock, 1.0)
            if closed:
                break
        else:
            _, closed = read_until_close(sock, 5)
    elapsed = time.monotonic() - start
    check(elapsed < limit, f"the connection was held {elapsed:.1f} s (limit {limit:.0f} s)")


@case("time")
def slow_body_on_health_outlives_header_timeout(t: Target) -> None:
    closed_within(
        t,
        req("GET", "/health", extra="Content-Length: 1000000\r\n"),
        b"x" * 30,
        HEADER_TIMEOUT + 3,
    )


@case("time")
def slow_body_on_unauthenticated_post(t: Target) -> None:
    closed_within(
        t,
        req("POST", "/v1/chat/completions", extra="Content-Length: 1000\r\n"),
        b"x" * 30,
        HEADER_TIMEOUT + 3,
    )


@case("time")
def slow_body_on_metrics_with_chunks(t: Target) -> None:
    closed_within(
        t,
        req("GET", "/metrics", extra="Transfer-Encoding: chunked\r\n"),
        b"1\r\nx\r\n" * 10,
        HEADER_TIMEOUT + 3,
    )


@case("time")
def slow_head(t: Target) -> None:
    closed_within(t, b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 30, HEADER_TIMEOUT + 3)


@case("time")
def slow_body_with_a_wrong_key(t: Target) -> None:
    closed_within(
        t,
        req(
            "POST",
            "/v1/chat/completions",
            extra="Authorization: Bearer wrong\r\nContent-Length: 1000\r\n",
        ),
        b"x" * 30,
        HEADER_TIMEOUT + 3,
    )


@case("time")
def idle_unauthenticated_keep_alive_is_closed(t: Target) -> None:
    start = time.monotonic()
    with t.connect() as sock:
        sock.sendall(req("GET", "/health"))
        _, closed = read_until_close(sock, HEADER_TIMEOUT + 5)
    check(closed, f"still open after {time.monotonic() - start:.0f} s idle")


@case("time")
def a_401_closes_the_connection(t: Target) -> None:
    with t.connect() as sock:
        sock.sendall(req("GET", "/v1/models"))
        got, closed = read_until_close(sock, 2.0)
    check(got.startswith(b"HTTP/1.1 401"), f"answered {got[:40]!r}")
    check(closed, "the connection stayed open after the 401")


def hold_connections(t: Target, count: int, first: bytes) -> list[socket.socket]:
    held = []
    for _ in range(count):
        try:
            sock = t.connect(timeout=5)
            sock.sendall(first)
            held.append(sock)
        except OSError:
            break
    time.sleep(0.3)
    return held


@case("time")
def idle_unauthenticated_connections_do_not_lock_keyed_clients_out(t: Target) -> None:
    held = hold_connections(t, MAX_CONNECTIONS + 20, req("GET", "/health"))
    try:
        status = keyed_chat(t)
    finally:
        for sock in held:
            sock.close()
    check(status == 200, f"a keyed client got {status} with {len(held)} idle connections open")


@case("time")
def idle_keyed_connections_do_not_lock_new_keyed_clients_out(t: Target) -> None:
    held = hold_connections(t, MAX_CONNECTIONS + 20, req("GET", "/v1/models", key=True))
    try:
        status = keyed_chat(t)
    finally:
        for sock in held:
            sock.close()
    check(status == 200, f"a keyed client got {status} with {len(held)} idle connections open")


@case("time")
def half_sent_heads_do_not_lock_keyed_clients_out(t: Target) -> None:
    held = hold_connections(t, MAX_CONNECTIONS + 20, b"GET /health HTTP/1.1\r\nX-A: ")
    try:
        start = time.monotonic()
        status = 0
        while time.monotonic() - start < HEADER_TIMEOUT + 5:
            status = keyed_chat(t)
            if status == 200:
                break
            time.sleep(0.5)
    finally:
        for sock in held:
            sock.close()
    check(status == 200, f"keyed clients got {status} for longer than header_timeout")


# -- head: HEAD answers ------------------------------------------------------------------------


def head_then_get(t: Target, path: str, key: bool) -> tuple[dict[str, str], dict[str, str]]:
    with t.connect() as sock:
        sock.sendall(req("HEAD", path, key=key) + req("GET", path, key=key))
        got, _ = read_until_close(sock, 2.0)
    answers = responses(got, ["HEAD", "GET"])
    check(len(answers) >= 1, f"no answer to HEAD {path}")
    head = answers[0][1]
    get = answers[1][1] if len(answers) > 1 else {}
    return head, get


@case("head")
def head_health_has_no_body_and_gets_length(t: Target) -> None:
    head, get = head_then_get(t, "/health", key=False)
    check(head.get("content-length") == get.get("content-length"), f"{head} vs {get}")


@case("head")
def head_keyed_models_has_no_body_and_gets_length(t: Target) -> None:
    head, get = head_then_get(t, "/v1/models", key=True)
    check(head.get("content-length") == get.get("content-length"), f"{head} vs {get}")


@case("head")
def head_404_has_no_body(t: Target) -> None:
    head, get = head_then_get(t, "/nothing/here", key=True)
    check(head.get("content-length") == get.get("content-length"), f"{head} vs {get}")


@case("head")
def head_405_has_no_body(t: Target) -> None:
    head_then_get(t, "/v1/chat/completions", key=True)


@case("head")
def head_401_has_no_body(t: Target) -> None:
    with t.connect() as sock:
        sock.sendall(req("HEAD", "/v1/models"))
        got, _ = read_until_close(sock, 2.0)
    head, _, rest = got.partition(b"\r\n\r\n")
    check(head.startswith(b"HTTP/1.1 401"), f"answered {got[:40]!r}")
    check(rest == b"", f"{len(rest)} bytes of body after a HEAD's 401")


# -- model: how the body's model is read -----------------------------------------------------


def chat_status(t: Target, raw_body: bytes) -> int:
    return status_of(t, req("POST", "/v1/chat/completions", body=raw_body, key=True))


# name -> (raw body, the status a safe gateway gives); 200 means routed to alpha, which answers.
MODEL_BODIES: dict[str, tuple[bytes, int]] = {
    "escaped_duplicate_model_key_is_refused": (b'{"model":"alpha","mod\\u0065l":"hung"}', 400),
    "plain_duplicate_model_key_is_refused": (
        b'{"model":"hung","messages":[],"model":"alpha"}',
        400,
    ),
    "escaped_model_value_is_read_as_json_reads_it": (b'{"model":"\\u0061lpha","messages":[]}', 200),
    "model_only_inside_a_nested_object_is_no_model": (
        b'{"metadata":{"model":"alpha"},"messages":[]}',
        400,
    ),
    "model_that_is_not_a_string_is_refused": (b'{"model":["alpha"],"messages":[]}', 400),
    "model_after_a_string_holding_a_model_key": (
        b'{"x":"\\"model\\":\\"hung\\"","model":"alpha","messages":[]}',
        200,
    ),
    "invalid_json_is_refused": (b'{"model":"alpha",', 400),
}


def model_case(name: str, body: bytes, want: int) -> None:
    def run(t: Target) -> None:
        status = chat_status(t, body)
        check(status == want, f"answered {status}")

    CASES.append(Case("model", name, run))


for _name, (_body, _want) in MODEL_BODIES.items():
    model_case(_name, _body, _want)


@case("model")
def body_over_the_cap_is_413(t: Target) -> None:
    status = status_of(
        t,
        req("POST", "/v1/chat/completions", key=True, extra=f"Content-Length: {65 * MiB}\r\n"),
    )
    check(status == 413, f"answered {status}")


# -- smuggling: framing that a second parser would read differently --------------------------


def refused(t: Target, data: bytes, allowed: tuple[int, ...] = (400,)) -> None:
    status, got, closed = exchange(t, data, timeout=3.0)
    check(status in allowed, f"answered {status or got[:40]!r}")
    check(closed, "the connection stayed open after a framing error")


SMUGGLING = {
    "content_length_and_chunked": "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "two_transfer_encodings": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "gzip_then_chunked": "Transfer-Encoding: gzip, chunked\r\n",
    "chunked_then_identity": "Transfer-Encoding: chunked, identity\r\n",
    "content_length_list": "Content-Length: 5, 5\r\n",
    "content_length_plus": "Content-Length: +5\r\n",
    "two_content_lengths": "Content-Length: 5\r\nContent-Length: 6\r\n",
    "obs_fold": "X-A: a\r\n b\r\n",
    "space_before_colon": "Transfer-Encoding : chunked\r\n",
    "two_hosts": "Host: other\r\n",
    "nul_in_header_value": "X-A: a\x00b\r\n",
    "header_too_large": "X-Big: " + "a" * 200_000 + "\r\n",
}


def smuggling_case(name: str, extra: str) -> None:
    def run(t: Target) -> None:
        refused(t, req("POST", "/v1/chat/completions", key=True, extra=extra), (400, 431, 501))

    CASES.append(Case("smuggling", name, run))


for _name, _extra in SMUGGLING.items():
    smuggling_case(_name, _extra)


@case("smuggling")
def chunk_size_with_a_prefix(t: Target) -> None:
    refused(
        t,
        req("POST", "/v1/chat/completions", key=True, extra="Transfer-Encoding: chunked\r\n")
        + b"0x5\r\nhello\r\n0\r\n\r\n",
    )


@case("smuggling")
def bare_lf_line_endings(t: Target) -> None:
    refused(t, f"GET /v1/models HTTP/1.1\nHost: gw\nAuthorization: Bearer {KEY}\n\n".encode())


@case("smuggling")
def missing_host(t: Target) -> None:
    refused(t, f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())


@case("smuggling")
def http_1_0_with_chunked(t: Target) -> None:
    refused(
        t,
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {KEY}\r\n\r\n0\r\n\r\n".encode(),
        (400, 501),
    )


# -- paths: vLLM's dev and admin endpoints are never forwarded -------------------------------


def not_forwarded(path: str) -> Callable[[Target], None]:
    def run(t: Target) -> None:
        body = b'{"model":"alpha"}'
        status = status_of(t, req("POST", path, body=body, key=True))
        check(status in (400, 404, 405), f"POST {path} answered {status}")

    return run


for _path in (
    "/reset_prefix_cache",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/v1/load_lora_adapter",
    "/scale_elastic_ep",
    "/v1/../reset_prefix_cache",
    "/v1/chat/completions/../../sleep",
    "/v1/chat/completions%2F..%2F..%2Fsleep",
    "//sleep",
    "/V1/CHAT/COMPLETIONS",
    "/v1/chat/completions;x=1",
):
    CASES.append(Case("paths", f"post {_path}", not_forwarded(_path)))


# -- auth --------------------------------------------------------------------------------------


@case("auth")
def key_in_the_query_string_is_not_a_key(t: Target) -> None:
    status = status_of(t, req("GET", f"/v1/models?api_key={KEY}"))
    check(status == 401, f"answered {status}")


@case("auth")
def a_key_of_the_same_length_is_refused(t: Target) -> None:
    wrong = "x" * len(KEY)
    status = status_of(t, req("GET", "/v1/models", extra=f"Authorization: Bearer {wrong}\r\n"))
    check(status == 401, f"answered {status}")


@case("auth")
def a_key_with_a_prefix_of_the_real_one_is_refused(t: Target) -> None:
    status = status_of(t, req("GET", "/v1/models", extra=f"Authorization: Bearer {KEY[:-1]}\r\n"))
    check(status == 401, f"answered {status}")


@case("auth")
def the_401_never_echoes_the_key_sent(t: Target) -> None:
    sent = "secret-looking-value-42"
    _, got, _ = exchange(
        t, req("GET", "/v1/models", extra=f"Authorization: Bearer {sent}\r\n"), 3.0
    )
    check(sent.encode() not in got, "the answer echoes the key that was sent")


# -- hang: an instance that never answers ------------------------------------------------------


@case("hang")
def a_hung_instance_gives_504_not_a_hang(t: Target) -> None:
    start = time.monotonic()
    status = keyed_chat(t, model="hung", timeout=UPSTREAM_TIMEOUT + 10)
    elapsed = time.monotonic() - start
    check(status == 504, f"answered {status or 'nothing'} after {elapsed:.1f} s")


@case("hang")
def a_hung_instance_does_not_block_another(t: Target) -> None:
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(keyed_chat(t, "hung", 15)))
    thread.start()
    try:
        start = time.monotonic()
        status = keyed_chat(t, "alpha")
        elapsed = time.monotonic() - start
    finally:
        thread.join(20)
    check(status == 200 and elapsed < 2.0, f"alpha answered {status} in {elapsed:.1f} s")


# ---- running ---------------------------------------------------------------------------------


@contextlib.contextmanager
def stack(work: Path) -> Iterator[Target]:
    procs: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "PIPELINE_"))}
    env.pop("VLLM_API_KEY", None)
    ports = {"alpha": free_port(), "hung": free_port(), "gateway": free_port()}
    try:
        for name, extra in (("alpha", {}), ("hung", {"STANDIN_RESPONSE_DELAY": "3600"})):
            with (work / f"{name}.log").open("ab") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, str(STANDIN), "--port", str(ports[name])),
                            *("--served-model-name", name),
                        ],
                        env={**env, **extra},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        limits: dict[str, float] = {
            "header_timeout": HEADER_TIMEOUT,
            "body_timeout": BODY_TIMEOUT,
            "max_connections": MAX_CONNECTIONS,
        }
        if "upstream_timeout" in {f.name for f in dataclasses.fields(GatewayConfig)}:
            limits["upstream_timeout"] = UPSTREAM_TIMEOUT
        config = GatewayConfig(
            host="127.0.0.1",
            port=ports["gateway"],
            keys=(KEY,),
            instances=(
                Upstream("alpha", "127.0.0.1", ports["alpha"], None, ("alpha",)),
                Upstream("hung", "127.0.0.1", ports["hung"], None, ("hung",)),
            ),
            **limits,  # type: ignore[arg-type]
        )
        with (work / "gateway.log").open("ab") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "pipeline.gateway"],
                env={**env, CONFIG_VAR: config.to_json(), "PYTHONPATH": str(REPO)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(gateway)
        target = Target(ports["gateway"], gateway.pid)
        deadline = time.monotonic() + 20
        while True:
            try:
                if status_of(target, req("GET", "/health", extra="Connection: close\r\n")):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"error: the gateway did not start; see {work}/gateway.log")
            time.sleep(0.1)
        yield target
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name has this text")
    parser.add_argument("--verbose", action="store_true", help="print each case's timing")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if args.only in c.name or args.only == c.family]
    counts: dict[str, list[int]] = {}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="adversarial-") as tmp, stack(Path(tmp)) as target:
        for item in chosen:
            start = time.monotonic()
            try:
                item.run(target)
                verdict, ok = "ok", True
            except Failed as exc:
                verdict, ok = f"FAIL: {exc}", False
            except OSError as exc:
                verdict, ok = f"FAIL: {type(exc).__name__}: {exc}", False
            took = f" ({time.monotonic() - start:.1f} s)" if args.verbose else ""
            print(f"{item.family:10} {item.name:70} {verdict}{took}", flush=True)
            tally = counts.setdefault(item.family, [0, 0])
            tally[0 if ok else 1] += 1
            failures += not ok
            if target.rss()[0] > 512 * MiB:
                print("the gateway holds over 512 MiB; stopping the pass")
                break
    print()
    for family, (ok, bad) in counts.items():
        print(f"{family:10} {ok} held, {bad} failed")
    total = sum(ok + bad for ok, bad in counts.values())
    print(f"{'all':10} {total - failures} held, {failures} failed, of {total}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
