"""The gateway's client connections under clients that do not play along: pipelining without
reading the answers, bodies that trickle in, connections left idle at the cap, HEAD.

Each test runs its own ``python -m pipeline.gateway`` (short timeouts, a small cap, one key)
in front of an instance that is never reached: every request here is answered by the gateway
itself (``/health``, ``/metrics``, ``/v1/models``, errors), which is what these failures were
about. Raw sockets on loopback, every read under a timeout; memory is the gateway process's
``VmRSS`` and timings are generous bounds (the suite runs four tests at once on two cores).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h11
import pytest
from conftest import free_port, wait_for
from test_gateway import in_process_gateway, read_responses, request, start_gateway, stop

from pipeline.gateway.config import GatewayConfig, Upstream

KEY = "conn-gw-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 1.0
CAP = 6
# An upper bound saying "it was not left hanging" on a loaded machine.
NOT_HUNG = 15.0
MIB = 1024 * 1024


def config(port: int, **limits: object) -> GatewayConfig:
    """A gateway with one key, short timeouts and ``limits``, in front of an instance that
    nothing listens for (no request here reaches it)."""
    values: dict[str, object] = {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT}
    values.update(limits)
    return GatewayConfig(
        host="127.0.0.1",
        port=port,
        keys=(KEY,),
        instances=(Upstream("alpha", "127.0.0.1", free_port(), None, ("alpha",)),),
        **values,  # type: ignore[arg-type]
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., tuple[int, subprocess.Popen[bytes]]]]:
    """Starts a gateway (``gateway(max_connections=4)``): (port, process); stopped after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**limits: object) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        procs.append(start_gateway(config(port, **limits), tmp_path / f"gateway-{port}.log"))
        return port, procs[-1]

    try:
        yield start
    finally:
        for proc in procs:
            stop(proc)


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def get(path: str, *lines: str, method: str = "GET") -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: gw", *lines]) + "\r\n\r\n").encode()


KEYED = f"Authorization: Bearer {KEY}"


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the gateway closes ``sock`` (EOF or reset) within ``within`` seconds, having
    sent nothing more."""
    sock.settimeout(within)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while piece := sock.recv(65536):
            data += piece
    return data


# ---- flow control: the gateway's own answers ----------------------------------------------------


def test_regression_pipelined_metrics_to_a_socket_that_never_reads_do_not_grow_memory(gateway):
    """8 MiB of pipelined GET /metrics on a socket that never read took the gateway from 29 to
    760 MiB (and kept 517 MiB after it closed), and another client's /health took 6.7 s: the
    gateway's own answers were written without looking at the paused transport, and reading
    went on."""
    port, proc = gateway()
    for _ in range(20):  # the metrics' text and the allocator warmed up
        assert request(port, "GET", "/metrics")[0] == 200
    before = rss(proc.pid)
    one = get("/metrics")
    flood = one * (8 * MIB // len(one))
    worst = 0.0
    flooding = threading.Event()
    flooding.set()

    def probe() -> None:
        nonlocal worst
        while flooding.is_set():
            started = time.monotonic()
            assert request(port, "GET", "/health")[0] == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    sent = 0
    with connect(port) as sock:
        prober.start()
        try:
            # Send until the gateway stops reading (a send blocked for a second), or all of it.
            sock.settimeout(1.0)
            deadline = time.monotonic() + 30
            with contextlib.suppress(TimeoutError):
                while sent < len(flood) and time.monotonic() < deadline:
                    sent += sock.send(flood[sent : sent + 65536])
            peak = 0
            for _ in range(10):  # whatever the gateway still does with what it read
                time.sleep(0.2)
                peak = max(peak, rss(proc.pid))
        finally:
            flooding.clear()
            prober.join(30)
    grown = (peak - before) / MIB
    # The bug grew it by 730 MiB; what one connection may hold now is a few hundred KiB.
    assert grown < 48, f"RSS grew by {grown:.0f} MiB for {sent / MIB:.1f} MiB of requests"
    assert worst < 2.0, f"another client's /health took {worst:.2f}s during the flood"
    wait_for(
        lambda: b'"connections": 1,' in request(port, "GET", "/health")[2],
        timeout=10,
        what="the flooding connection to be gone",
    )
    assert (rss(proc.pid) - before) / MIB < 48


def test_pipelined_answers_wait_for_a_client_that_reads_late_and_all_arrive_in_order(gateway):
    """Paused answers resume when the client reads: none lost, none reordered."""
    port, _ = gateway()
    count = 3000
    requests = b"".join(
        get("/metrics") if i % 2 else get(f"/nope-{i}") for i in range(count)
    ) + get("/health", "Connection: close")
    with connect(port, timeout=30) as sock:
        sock.sendall(requests)
        time.sleep(1.0)  # the gateway fills its buffers and stops
        data = read_until_closed(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", data)
    assert len(statuses) == count + 1
    assert statuses == [b"200" if i % 2 else b"404" for i in range(count)] + [b"200"]
    assert data.count(b"/nope-2998") == 1


def test_pipelined_answers_resume_on_the_stdlib_event_loop_too():
    """The same flow control on asyncio's own loop (uvloop's transports are not the same
    code): a client that reads late still gets every answer."""
    port = free_port()
    with in_process_gateway(config(port)):
        count = 2000
        with connect(port, timeout=30) as sock:
            sock.sendall(get("/metrics") * count + get("/health", "Connection: close"))
            time.sleep(0.5)
            data = read_until_closed(sock)
        assert len(re.findall(rb"HTTP/1\.1 200 OK", data)) == count + 1


def test_a_client_that_never_reads_its_answers_is_dropped_after_its_idle_time(gateway):
    """A close would wait for it to read for ever: it is aborted, its descriptor freed."""
    port, _ = gateway()
    with connect(port) as sock:
        sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            for _ in range(200):
                sock.send(get("/metrics") * 2000)
        assert b'"connections": 2,' in request(port, "GET", "/health")[2]
        wait_for(
            lambda: b'"connections": 1,' in request(port, "GET", "/health")[2],
            timeout=HEADER_TIMEOUT + NOT_HUNG,
            what="the connection that does not read to be dropped",
        )


# ---- time limits on requests without a key ------------------------------------------------------


def test_regression_a_slow_body_on_health_is_closed_within_the_header_timeout(gateway):
    """``GET /health`` with ``Content-Length: 1000000``, fed a byte at a time, each before
    ``body_timeout``, outlived ``header_timeout``: each byte reset the body's timer, so one
    client could hold a connection for ever (and 80 of them kept keyed clients out). A request
    without a key now arrives whole within ``header_timeout``."""
    port, _ = gateway()
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(get("/health", "Content-Length: 1000000"))
        sock.settimeout(BODY_TIMEOUT / 4)
        got = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while time.monotonic() - started < HEADER_TIMEOUT + NOT_HUNG:
                sock.sendall(b"x")  # well within body_timeout of the byte before
                try:
                    piece = sock.recv(65536)
                except TimeoutError:
                    continue
                got += piece
                if not piece:
                    break
        took = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + NOT_HUNG, took


def test_a_body_for_health_that_arrives_with_its_head_is_dropped_and_the_connection_kept(
    gateway,
):
    port, _ = gateway()
    with connect(port) as sock:
        sock.sendall(get("/health", "Content-Length: 5") + b"hello" + get("/health"))
        answers = read_responses(sock, 2)
    assert all(b'"instances"' in body for body in answers)


def test_a_head_begun_in_the_read_of_the_request_before_it_has_the_header_timeout(gateway):
    """It waited the idle time (minutes), not a head's."""
    port, _ = gateway()
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(get("/health") + b"GET /hea")
        data = read_until_closed(sock)
        took = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in data, data
    assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + NOT_HUNG, took


def test_a_client_that_half_closes_gets_every_pipelined_answer_then_the_close(gateway):
    port, _ = gateway()
    with connect(port) as sock:
        sock.sendall(get("/health") + get("/nope") + get("/metrics"))
        sock.shutdown(socket.SHUT_WR)
        data = read_until_closed(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", data) == [b"200", b"404", b"200"]


# ---- idle connections, the cap, 401 ------------------------------------------------------------


def test_regression_idle_keep_alive_connections_without_a_key_keep_no_keyed_client_out(gateway):
    """64 connections that each sent one GET /health and then idled held the cap for the
    300 s idle time, and keyed clients got 503 throughout. At the cap, an idle one is closed
    for the new connection."""
    port, _ = gateway(max_connections=CAP)
    idle = []
    try:
        for _ in range(CAP):
            sock = connect(port)
            sock.sendall(get("/health"))
            assert read_responses(sock, 1)
            idle.append(sock)
        # Answered at once: without a connection to close, it would be a 503 (the reserve).
        status, _, raw = request(port, "GET", "/v1/models", headers=AUTH)
        assert status == 200, raw
        assert closed_by_peer(idle[0], within=5), "the one idle longest made room"
        assert not any(closed_by_peer(sock, within=0.1) for sock in idle[1:])
    finally:
        for sock in idle:
            sock.close()


def test_at_the_cap_idle_connections_without_a_key_are_closed_before_keyed_ones(gateway):
    port, _ = gateway(max_connections=CAP)
    socks: list[socket.socket] = []

    def keyed_request(sock: socket.socket) -> bytes:
        sock.sendall(get("/v1/models", KEYED))
        return read_responses(sock, 1)[0]

    try:
        keyed = connect(port)
        socks.append(keyed)
        assert b'"object": "list"' in keyed_request(keyed)
        unkeyed = []
        for _ in range(CAP - 1):
            sock = connect(port)
            socks.append(sock)
            sock.sendall(get("/health"))
            assert read_responses(sock, 1)
            unkeyed.append(sock)
        # Each new keyed client at the cap closes an idle one without a key, oldest first.
        for i in range(CAP - 1):
            sock = connect(port)
            socks.append(sock)
            assert b'"object": "list"' in keyed_request(sock)
            assert closed_by_peer(unkeyed[i], within=5), i
        assert b'"object": "list"' in keyed_request(keyed), "the keyed one was kept"
        # None without a key is left: the keyed connection idle longest goes next.
        newest = connect(port)
        socks.append(newest)
        assert b'"object": "list"' in keyed_request(newest)
        assert closed_by_peer(socks[CAP], within=5), "the oldest keyed idle connection"
    finally:
        for sock in socks:
            sock.close()


def test_an_idle_connection_without_a_key_is_closed_after_the_header_timeout(gateway):
    port, _ = gateway()
    with connect(port) as unkeyed, connect(port) as keyed:
        unkeyed.sendall(get("/health"))
        keyed.sendall(get("/v1/models", KEYED))
        assert read_responses(unkeyed, 1) and read_responses(keyed, 1)
        started = time.monotonic()
        assert closed_by_peer(unkeyed, within=HEADER_TIMEOUT + NOT_HUNG)
        took = time.monotonic() - started
        assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + NOT_HUNG, took
        # A keyed connection keeps the longer idle time (minutes).
        keyed.sendall(get("/health"))
        assert read_responses(keyed, 1)


def test_regression_a_401_closes_the_connection(gateway):
    """A 401 kept the connection open (for the idle time), a connection the client without
    a key could hold."""
    port, _ = gateway()
    with connect(port) as sock:
        sock.sendall(get("/v1/models") + get("/health"))
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 401 "), data
    assert b"connection: close\r\n" in data.lower()
    assert data.count(b"HTTP/1.1 ") == 1, "nothing after the 401 is answered"


# ---- HEAD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "keyed", "status"),
    [
        ("/nope", False, 404),
        ("/v1/chat/completions", True, 405),
        ("/v1/models/nope", True, 404),
        ("/v1/models", True, 200),
        ("/health", False, 200),
        ("/metrics", False, 200),
    ],
)
def test_regression_a_head_answer_has_no_body_and_the_next_response_parses(
    gateway, path, keyed, status
):
    """404 and 405 answers to HEAD sent their body after the head: on a kept-alive connection
    the next response was misread (h11 says so). h11 checks the framing here."""
    port, _ = gateway()
    headers = [("Host", "gw"), *([("Authorization", f"Bearer {KEY}")] if keyed else [])]
    client = h11.Connection(our_role=h11.CLIENT)
    lengths = {}
    with connect(port) as sock:
        for method in ("HEAD", "GET"):
            sock.sendall(client.send(h11.Request(method=method, target=path, headers=headers)))
            sock.sendall(client.send(h11.EndOfMessage()))
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == status, method
                    lengths[method] = int(dict(event.headers)[b"content-length"])
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            if method == "GET":
                assert len(body) == lengths["GET"] > 0
            client.start_next_cycle()
    if path in ("/health", "/metrics", "/v1/models"):
        # Their text changes from one moment to the next (uptime, counts): about the same.
        assert abs(lengths["HEAD"] - lengths["GET"]) < 64, lengths
    else:
        assert lengths["HEAD"] == lengths["GET"], lengths


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/v1/models", method="HEAD"), 401),
        (get("/health", "Content-Length: 999999999999", method="HEAD"), 413),
        (get("/health", f"Host: {'x' * 70_000}", method="HEAD"), 431),
    ],
    ids=["401", "413", "431"],
)
def test_a_head_refused_before_its_end_gets_the_head_alone(gateway, raw, status):
    port, _ = gateway()
    with connect(port) as sock:
        sock.sendall(raw)
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    assert data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1, data
    length = int(re.search(rb"content-length: (\d+)", data).group(1))
    assert length > 0, "the length a GET's answer has"
