"""What the supervisor reaches the world through: the seams of its constructor as protocols,
and the real implementations it uses by default (spawn in a new session, process groups from
/proc, the ``/health`` probe, the child-subreaper flag).

Tests hand :class:`~pipeline.serve.supervisor.Supervisor` their own spawner, groups, probe,
clock and gang endpoints; nothing here is patched.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Protocol
from urllib.parse import urlsplit

from pipeline.procs import group_alive, signal_group, spawn_detached
from pipeline.serve import gang

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux >= 3.4), not PID 1's.

    An instance's leader that dies leaves its children (vLLM's EngineCore) to the nearest
    subreaper; without one they go to PID 1, and a PID 1 that never reaps (``sleep`` as a
    container's entrypoint) keeps them as zombies for good. True when the kernel agreed.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Spawner(Protocol):
    def __call__(
        self, argv: tuple[str, ...], env: Mapping[str, str], cwd: str, log: IO[bytes]
    ) -> subprocess.Popen[bytes]: ...


class GangServer(Protocol):
    def __call__(
        self, host: str, port: int, board: gang.GangBoard, tokens: Mapping[str, str]
    ) -> gang.Closable: ...


class GangPoll(Protocol):
    def __call__(
        self,
        url: str,
        instance: str,
        token: str,
        params: Mapping[str, object],
        timeout: float,
    ) -> dict[str, object] | None: ...


class Groups(Protocol):
    def alive(self, pgid: int | None) -> bool: ...
    def signal(self, pgid: int | None, sig: int) -> bool: ...


class ProcessGroups:
    """The real process groups: zombie-aware liveness from /proc, ``killpg``."""

    def alive(self, pgid: int | None) -> bool:
        return group_alive(pgid)

    def signal(self, pgid: int | None, sig: int) -> bool:
        return signal_group(pgid, sig)


def default_spawner(
    argv: tuple[str, ...], env: Mapping[str, str], cwd: str, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with output appended to ``log`` (:func:`spawn_detached`).
    Raises OSError."""
    return spawn_detached(argv, cwd=cwd, env=env, log=log)


@dataclass(frozen=True)
class ProbeResult:
    """One ``/health`` probe: whether it answered 200, how long it took (seconds), and why it
    failed (a short phrase: ``timed out after 5 s``, ``connection refused``, ``status 503``)."""

    ok: bool
    latency: float = 0.0
    error: str | None = None


class Probe(Protocol):
    """The ``/health`` check: GET ``url`` within ``timeout`` seconds. A plain bool is accepted
    for a test's fake (:func:`as_result` turns it into a :class:`ProbeResult`)."""

    def __call__(self, url: str, timeout: float) -> ProbeResult | bool: ...


def as_result(value: ProbeResult | bool, latency: float) -> ProbeResult:
    """``value`` as a :class:`ProbeResult`; a bool gets ``latency`` and a generic error."""
    if isinstance(value, ProbeResult):
        return value
    return ProbeResult(bool(value), latency, None if value else "did not answer 200")


def http_check(url: str, timeout: float = 1.0) -> ProbeResult:
    """GET ``url``: ok when it answers 200 within ``timeout`` (each socket operation is
    bounded by it). Never raises; blocks at most a few times ``timeout``."""
    parts = urlsplit(url)
    began = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    error: str | None
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        # Read the (tiny) body so the close is orderly, not a reset the server logs.
        response.read(65536)
        error = None if response.status == 200 else f"status {response.status}"
    except TimeoutError:
        error = f"timed out after {timeout:g} s"
    except ConnectionRefusedError:
        error = "connection refused"
    except OSError as exc:
        error = exc.strerror or type(exc).__name__
    except http.client.HTTPException as exc:
        error = f"bad response ({type(exc).__name__})"
    finally:
        conn.close()
    return ProbeResult(error is None, time.monotonic() - began, error)


def http_probe(url: str, timeout: float = 1.0) -> bool:
    """True when GET ``url`` answers 200 within ``timeout``. Never raises."""
    return http_check(url, timeout).ok


def _http(
    method: str,
    url: str,
    timeout: float,
    body: dict[str, object] | None = None,
    key: str | None = None,
) -> tuple[int, bytes]:
    """One request; (status, body). Raises OSError or http.client.HTTPException."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    headers = {"content-type": "application/json"} if body is not None else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(
            method, target, json.dumps(body).encode() if body is not None else None, headers
        )
        response = conn.getresponse()
        return response.status, response.read(1 << 20)
    finally:
        conn.close()


def _failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, http.client.HTTPException):
        return f"bad response ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _is_sleeping(base_url: str, timeout: float) -> bool | None:
    status, data = _http("GET", f"{base_url}/is_sleeping", timeout)
    if status != 200:
        return None
    value = json.loads(data).get("is_sleeping")
    return value if isinstance(value, bool) else None


SLEEP_POLL = 0.1


def _switch(base_url: str, target: str, asleep: bool, timeout: float) -> ProbeResult:
    """POST ``target`` (``/sleep...`` or ``/wake_up``), then poll ``/is_sleeping`` until it
    says ``asleep``, all within ``timeout``. Never raises."""
    began = time.monotonic()
    path = target.split("?", 1)[0]
    try:
        status, _ = _http("POST", f"{base_url}{target}", timeout)
        if status != 200:
            return ProbeResult(False, time.monotonic() - began, f"{path} answered {status}")
        while time.monotonic() - began < timeout:
            if _is_sleeping(base_url, timeout) is asleep:
                return ProbeResult(True, time.monotonic() - began)
            time.sleep(SLEEP_POLL)
        state = "not asleep" if asleep else "still asleep"
        return ProbeResult(False, time.monotonic() - began, f"{state} {timeout:g} s after {path}")
    except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
        return ProbeResult(False, time.monotonic() - began, _failure(exc, timeout))


class SleepCalls:
    """vLLM's sleep mode over HTTP (the endpoints of a server run with ``--enable-sleep-mode``
    and ``VLLM_SERVER_DEV_MODE=1``, read in vLLM 0.32's source), and the first request after
    a start or wake. Each call blocks up to about ``timeout`` and never raises: it returns
    a :class:`ProbeResult` whose error says what went wrong. The supervisor runs them in
    threads of their own."""

    def sleep(self, base_url: str, timeout: float) -> ProbeResult:
        """``POST /sleep?level=1&mode=wait`` (the weights to host RAM, the KV cache dropped;
        ``wait``: requests in flight finish first, where vLLM's default ``abort`` would cut
        them, although the gateway released the instance with none in flight), then
        ``GET /is_sleeping`` until it says true."""
        return _switch(base_url, "/sleep?level=1&mode=wait", True, timeout)

    def wake(self, base_url: str, timeout: float) -> ProbeResult:
        """``POST /wake_up`` (weights and KV cache), then ``GET /is_sleeping`` until false."""
        return _switch(base_url, "/wake_up", False, timeout)

    def canary(self, base_url: str, model: str, key: str | None, timeout: float) -> ProbeResult:
        """One short completion (1 token, greedy): ok when it answers 200 with a completion
        of at least one token. Wakes have been seen to answer wrongly once; no client's
        request goes to the instance before this one passed."""
        began = time.monotonic()
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        try:
            status, data = _http("POST", f"{base_url}/v1/completions", timeout, body, key)
            if status != 200:
                return ProbeResult(
                    False, time.monotonic() - began, f"the first request answered {status}"
                )
            reply = json.loads(data)
            choices = reply.get("choices") if isinstance(reply, dict) else None
            usage = reply.get("usage") if isinstance(reply, dict) else None
            good = (
                isinstance(choices, list)
                and len(choices) > 0
                and isinstance(choices[0], dict)
                and isinstance(choices[0].get("text"), str)
                and isinstance(usage, dict)
                and isinstance(usage.get("completion_tokens"), int)
                and usage["completion_tokens"] >= 1
            )
            if not good:
                return ProbeResult(
                    False, time.monotonic() - began, "the first request's answer is malformed"
                )
            return ProbeResult(True, time.monotonic() - began)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return ProbeResult(False, time.monotonic() - began, _failure(exc, timeout))
