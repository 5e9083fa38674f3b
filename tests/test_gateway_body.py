"""Request bodies at the gateway: how they are kept (``BodyCollector``) and how their ``model``
is read (``ModelScanner``): as vLLM reads it, with the standard library's ``json.loads``.

Pure tests on bytes (each body fed whole, split at every offset, and byte by byte), a property
test against ``json.loads`` on generated objects (seeded: the same objects every run), and
raw-socket tests against a gateway process in front of two stand-ins (tests/standin_server.py,
which reads bodies with ``json.loads`` as vLLM does). Memory is read from the gateway's
``/proc/PID/status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_gateway import request, start_gateway, start_standin, stop

from pipeline.gateway.config import GatewayConfig, Upstream
from pipeline.gateway.wire import BODY_PIECE, BodyCollector, BodyModel, ModelScanner

KEY = "body-gw-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 1024 * 1024

DUPLICATE = 'more than one "model" key'
NOT_STRING = '"model" is not a string'
INVALID = '"model" is not a valid string'
TOO_LONG = '"model" is longer than'


def scan(body: bytes, cuts: list[int]) -> BodyModel:
    scanner = ModelScanner()
    start = 0
    for cut in [*cuts, len(body)]:
        scanner.feed(body[start:cut])
        start = cut
    return scanner.result()


def assert_reads(body: bytes, is_object: bool, model: str | None, problem: str | None) -> None:
    """``body`` reads as expected whole, split at every offset, and byte by byte."""
    for cuts in [[], *([i] for i in range(1, len(body))), list(range(1, len(body)))]:
        found = scan(body, cuts)
        assert (found.is_object, found.model) == (is_object, model), (body, cuts, found)
        if problem is None:
            assert found.problem is None, (body, cuts, found)
        else:
            assert found.problem is not None and problem in found.problem, (body, cuts, found)


# ---- the model, as json.loads reads it ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "a"}', "a"),
        (b'{"mod\\u0065l": "a"}', "a"),
        (b'{"\\u006d\\u006F\\u0064\\u0065\\u006C": "a"}', "a"),  # 30 bytes, any case of hex
        (b'{"model": "b\\u0065ta"}', "beta"),
        (b'{"model": "a\\/b\\\\c\\"d"}', 'a/b\\c"d'),
        (b'{"model": "\\ud83d\\ude00 caf\xc3\xa9"}', "\U0001f600 caf\u00e9"),
        (b' \t\r\n{ \n"model"\t:\r"a" , "x" : [ ] }\n\t', "a"),
        (b'\xef\xbb\xbf{"model": "a"}', "a"),  # json.loads(bytes) skips a UTF-8 BOM
        (b'{"messages": [{"model": "b", "content": "\\"model\\": \\"c\\""}], "model": "a"}', "a"),
        (b'{"metadata": {"model": "b", "x": {"model": "c"}}, "model": "a"}', "a"),
        (b'{"x": "{\\"model\\": \\"b\\"}", "model": "a", "y": "model"}', "a"),
        (b'{"model": "a", "models": ["b"], "Model": "c", "model ": "d", "mode": "e"}', "a"),
        (b'{"n": -1.5e10, "t": true, "f": false, "z": null, "model": "a", "w": NaN}', "a"),
        (b'{"model": ""}', ""),
    ],
)
def test_the_model_is_read_as_json_loads_reads_it(body, model):
    assert_reads(body, True, model, None)
    assert json.loads(body)["model"] == model


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"messages": [{"model": "a"}], "metadata": {"model": "b"}}',
        b'{"x": "\\"model\\": \\"a\\""}',
        b'{"model": null}',  # vLLM: null is its default model, as if absent
        b'{"mod\\u0065l": null}',
        b'{"modelx": "a", "xmodel": "b", "mo\\u0064el\\u0020": "c"}',
    ],
)
def test_a_body_without_a_top_level_model_string_has_no_model(body):
    assert_reads(body, True, None, None)
    assert json.loads(body).get("model") is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"model": "a", "model": "b"}', DUPLICATE),
        (b'{"model": "a", "model": "a"}', DUPLICATE),
        (b'{"model": "a", "mod\\u0065l": "b"}', DUPLICATE),
        (b'{"\\u006dodel": "a", "m\\u006fdel": "b"}', DUPLICATE),
        (b'{"model": 1, "x": {"model": "c"}, "model": "b"}', DUPLICATE),
        (b'{"model": "a", "messages": [], "model": null}', DUPLICATE),
        (b'{"model": 3}', NOT_STRING),
        (b'{"model": true}', NOT_STRING),
        (b'{"model": nullx}', NOT_STRING),
        (b'{"model": ["a"]}', NOT_STRING),
        (b'{"model": {"model": "a"}}', NOT_STRING),
        (b'{"model": "a\\x"}', INVALID),  # a bad escape
        (b'{"model": "a\\ud800"}', INVALID),  # a lone surrogate: not UTF-8 to route by
        (b'{"model": "a\nb"}', INVALID),  # a raw control byte
        (b'{"model": "a\xffb"}', INVALID),  # not UTF-8
        (b'{"model": "' + b"a" * 1025 + b'"}', TOO_LONG),
    ],
)
def test_a_model_the_gateway_cannot_route_by_is_a_problem(body, problem):
    assert_reads(body, True, None, problem)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"  \n",
        b'[{"model": "a"}]',
        b'"model"',
        b"3",
        b"not json",
        b'{"model": "a"} trailing',
        b'{"model": "a"}{"model": "b"}',
        b'{"model": "a"',
        b'{"model": "a}',
        b'{"model" "a"}',
        b'{"model": "a" "x": 1}',
        b'{"model": "a",, "x": 1}',
        b'{"model": "a"]',
        b'\xef\xbb{"model": "a"}',  # the start of a BOM only
        b'{"model": "a"}\xef\xbb\xbf',
        '{"model": "a"}'.encode("utf-16"),  # json.loads takes it; refused, never misrouted
    ],
)
def test_what_is_not_one_json_object_is_said_so(body):
    assert_reads(body, False, None, None)


def test_an_overlong_key_is_not_kept_nor_taken_for_model():
    long_key = b'"' + b"m" * 10_000 + b'"'
    body = b"{" + long_key + b': "a", "model": "b", ' + long_key + b": 1}"
    assert_reads(body, True, "b", None)


# ---- a property: the scanner agrees with json.loads -------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "/": "\\/", "\b": "\\b"}
_STRINGS = ["alpha", "beta", "model", 'q"uo\\te', "caf\u00e9", "\U0001f600", "", '{"model":"x"}']
_KEYS = ["model", "model", "messages", "metadata", "mode", "Model", "x", "model "]


class _Obj(list):
    """A JSON object as the list of its pairs (so that a key may come twice)."""


def _value(rng: random.Random, depth: int) -> object:
    roll = rng.random()
    if depth >= 3 or roll < 0.45:
        return rng.choice([None, True, False, 0, -1.5, 1e20, *_STRINGS])
    if roll < 0.75:
        return _Obj((rng.choice(_KEYS), _value(rng, depth + 1)) for _ in range(rng.randrange(4)))
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _ws(rng: random.Random) -> str:
    return "".join(rng.choice(" \t\r\n") for _ in range(rng.choice([0, 0, 0, 1, 2])))


def _string(text: str, rng: random.Random) -> str:
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\' or code < 0x20 or rng.random() < 0.25:
            form = "\\u%04x" if rng.random() < 0.5 else "\\u%04X"
            if char in _ESCAPES and rng.random() < 0.5:
                out.append(_ESCAPES[char])
            elif code > 0xFFFF:
                code -= 0x10000
                out.append(form % (0xD800 + (code >> 10)) + form % (0xDC00 + (code & 0x3FF)))
            else:
                out.append(form % code)
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _encode(value: object, rng: random.Random) -> str:
    if isinstance(value, _Obj):
        pairs = [f"{_ws(rng)}{_string(k, rng)}{_ws(rng)}:{_ws(rng)}{_encode(v, rng)}{_ws(rng)}"
                 for k, v in value]  # fmt: skip
        return "{" + ",".join(pairs) + _ws(rng) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_ws(rng) + _encode(v, rng) + _ws(rng) for v in value) + "]"
    if isinstance(value, str):
        return _string(value, rng)
    return json.dumps(value)


def test_the_scanner_agrees_with_json_loads_on_generated_objects():
    rng = random.Random(17)
    seen = {"model": 0, "duplicate": 0, "absent": 0, "not a string": 0}
    for _ in range(3000):
        top = _Obj((rng.choice(_KEYS), _value(rng, 1)) for _ in range(rng.randrange(6)))
        body = (_ws(rng) + _encode(top, rng) + _ws(rng)).encode()
        # As vLLM reads it (json.loads, then a dict: the last of two keys wins); the pairs
        # show the duplicates the dict hides.
        pairs = json.loads(body, object_pairs_hook=list)
        models = [v for k, v in pairs if k == "model"]
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randrange(4))))
        found = scan(body, cuts)
        assert found.is_object, body
        if len(models) > 1:
            seen["duplicate"] += 1
            assert found.model is None and DUPLICATE in (found.problem or ""), body
        elif not models or models[0] is None:
            seen["absent"] += 1
            assert found == (True, None, None), body
        elif isinstance(models[0], str):
            seen["model"] += 1
            assert found == (True, dict(pairs)["model"], None), body
        else:
            seen["not a string"] += 1
            assert found.model is None and NOT_STRING in (found.problem or ""), body
    assert min(seen.values()) > 100, seen  # every outcome was exercised


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
    assert scanner.result() == (True, "a", None)


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


def instance_requests(env: dict) -> dict[str, int]:
    return {
        name: json.loads(request(port, "GET", "/stats")[2])["requests"]
        for name, port in env["ports"].items()
    }


def send(port: int, path: str, body: bytes) -> tuple[int, dict]:
    status, _, raw = request(port, "POST", path, body, {**AUTH, "Content-Type": "application/json"})
    return status, json.loads(raw)


def test_regression_an_escaped_duplicate_model_key_is_refused(env):
    """``{"model":"alpha","mod\\u0065l":"beta"}`` went to alpha, by the first key; vLLM's
    json.loads reads the second, beta. Now refused, and no instance sees it."""
    port = env["config"].port
    before = instance_requests(env)
    body = b'{"model": "alpha", "mod\\u0065l": "beta", "messages": []}'
    status, data = send(port, "/v1/chat/completions", body)
    assert status == 400, data
    error = data["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert DUPLICATE in error["message"] and "alpha, beta" in error["message"]
    status, data = send(port, "/v1/messages", body)
    assert status == 400 and data["type"] == "error", data
    assert DUPLICATE in data["error"]["message"]
    assert instance_requests(env) == before


def test_an_escaped_model_key_routes_where_the_instance_reads_it(env):
    """The old scanner compared raw bytes: ``"mod\\u0065l"`` was no model at all (400)."""
    status, data = send(
        env["config"].port, "/v1/chat/completions", b'{"mod\\u0065l": "b\\u0065ta"}'
    )
    assert status == 200 and data["served_by"] == "beta", data


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b'{"model": 7}', NOT_STRING), (b'{"model": "a\\q"}', INVALID),
     (b'{"model": "' + b"x" * 2000 + b'"}', TOO_LONG)],
)  # fmt: skip
def test_a_model_that_cannot_be_routed_by_is_400_saying_why(env, body, problem):
    status, data = send(env["config"].port, "/v1/chat/completions", body)
    assert status == 400 and problem in data["error"]["message"], data


def test_regression_a_lone_surrogate_model_is_400_not_a_dropped_connection(env):
    """``"a\\ud800"`` decoded to a str that cannot be encoded: looking it up raised in the
    event loop's callback, which dropped the connection unanswered (a traceback in the log)."""
    status, data = send(env["config"].port, "/v1/chat/completions", b'{"model": "a\\ud800"}')
    assert status == 400 and INVALID in data["error"]["message"], data
    assert "Traceback" not in (env["root"] / "gateway.log").read_text()


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
