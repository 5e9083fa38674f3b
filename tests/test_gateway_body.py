"""Request bodies at the gateway: how they are kept (``BodyCollector``).

Pure tests on bytes, and raw-socket tests against a gateway process in front of two stand-ins
(tests/standin_server.py). Memory is read from the gateway's ``/proc/PID/status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_gateway import start_gateway, start_standin, stop

from pipeline.gateway.config import GatewayConfig, Upstream
from pipeline.gateway.wire import BODY_PIECE, BodyCollector, ModelScanner

KEY = "body-gw-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 1024 * 1024

# ---- keeping the body --------------------------------------------------------------------------


def test_tiny_pieces_are_kept_in_few_large_ones_and_scanned_once_each():
    body = json.dumps({"model": "a", "messages": [{"content": "x" * 300_000}]}).encode()
    scanner = ModelScanner()
    collector = BodyCollector(scanner)
    for i in range(0, len(body), 2):
        collector.add(body[i : i + 2])
    pieces = collector.finish()
    assert b"".join(pieces) == body and collector.size == len(body)
    assert len(pieces) <= len(body) // BODY_PIECE + 1
    assert scanner.result()[:2] == (True, "a")


def test_a_body_of_one_piece_or_of_large_pieces_is_not_copied():
    small = b'{"model": "a"}'
    collector = BodyCollector()
    collector.add(small)
    assert collector.finish()[0] is small
    large = [bytes([65 + i]) * (BODY_PIECE + i) for i in range(3)]
    collector = BodyCollector()
    collector.add(b"{")
    for piece in large:
        collector.add(piece)
    collector.add(b"}")
    collector.add(b"\n")
    pieces = collector.finish()
    assert pieces[1:4] == large and all(a is b for a, b in zip(pieces[1:4], large, strict=True))
    assert pieces[0] == b"{" and pieces[4] == b"}\n"


# ---- through a gateway process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("gateway-body")
    ports = {"alpha": free_port(), "beta": free_port()}
    procs = []
    try:
        for name, port in ports.items():
            procs.append(start_standin(port, [name], root / f"{name}.log"))
        config = GatewayConfig(
            host="127.0.0.1",
            port=free_port(),
            keys=(KEY,),
            instances=tuple(
                Upstream(name, "127.0.0.1", port, None, (name,)) for name, port in ports.items()
            ),
            max_body=64 * MIB,
        )
        gateway = start_gateway(config, root / "gateway.log")
        procs.append(gateway)
        yield {"root": root, "ports": ports, "config": config, "gateway": gateway}
    finally:
        for proc in procs:
            stop(proc)


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def chunked_in_twos(payload: bytes) -> bytes:
    """``payload`` (of even length) as a chunked body of 2-byte chunks: ``2\\r\\nxx\\r\\n``..."""
    count = len(payload) // 2
    out = bytearray(7 * count)
    for offset, part in enumerate((b"2", b"\r", b"\n", None, None, b"\r", b"\n")):
        out[offset::7] = part * count if part else payload[offset - 3 :: 2]
    return bytes(out) + b"0\r\n\r\n"


def test_regression_two_byte_chunks_do_not_multiply_memory(env):
    """Each chunk of a chunked body was kept as its own bytes object: 2-byte chunks cost 17 MiB
    of RSS per MiB of payload (48 measured here: 4 MiB took the gateway from 26 to 218 MiB),
    about 1 GiB for one request at the 64 MiB cap. Kept in 64 KiB pieces, the body costs
    about its size. A gateway of its own, so that its peak is this request's."""
    config = dataclasses.replace(env["config"], port=free_port())
    gateway = start_gateway(config, env["root"] / "memory-gateway.log")
    try:
        before = memory_mib(gateway.pid)["VmRSS"]
        payload = json.dumps({"model": "alpha", "messages": [{"content": "x" * (4 * MIB)}]})
        payload += " " * (len(payload) % 2)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        ).encode()
        got = b""
        with socket.create_connection(("127.0.0.1", config.port), timeout=60) as sock:
            sock.sendall(head + chunked_in_twos(payload.encode()))
            with contextlib.suppress(ConnectionResetError):
                while piece := sock.recv(65536):
                    got += piece
        grown = memory_mib(gateway.pid)["VmHWM"] - before
    finally:
        stop(gateway)
    assert got.startswith(b"HTTP/1.1 200 "), got[:300]
    answer = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert answer["body_sha256"] == hashlib.sha256(payload.encode()).hexdigest()
    size = len(payload) / MIB
    # Generous: 4 MiB of payload, at most 3 copies of it and 8 MiB besides (measured: +4).
    assert grown < 3 * size + 8, f"the gateway grew by {grown:.0f} MiB for a {size:.0f} MiB body"
