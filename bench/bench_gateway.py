"""Benchmark of the gateway against the same upstream reached directly, through LiteLLM's proxy
and through vLLM's router.

    .venv/bin/python bench/bench_gateway.py [--duration 5] [--no-litellm] [--no-vllm-router]

In one run, against one fast stand-in upstream (``tests/standin_server.py`` with
``STANDIN_FAST=1``: a fixed chat completion, or 64 SSE chunks 1 ms apart), prints for each of
direct / this gateway / LiteLLM's proxy / vLLM's router, and a plain TCP relay in C (``socat``,
when on PATH: the floor any proxy pays on this machine for the kernel's part of relaying):

- added p50 and p99 latency at concurrency 1 (non-streamed request, keep-alive);
- first-chunk latency of a streamed request, and what the proxy adds to it;
- requests per second at concurrency 32 with the proxy pinned to core 0 (``taskset``), the
  load generator (``wrk`` when on PATH, else a Python asyncio client) and the upstream on
  core 1, and the proxy's CPU use during that run (1.0 = the core is saturated);
- CPU per request (non-streamed) and per streamed chunk (32 concurrent streams, so chunks
  arrive one by one as from a busy server), from ``/proc/<pid>/stat`` deltas of the proxy's
  process tree, reaped children included (per chunk: gross, and net of the per-request cost);
- memory (RSS now, and peak) and startup time (spawn to a 200 from its health endpoint);
- the gateway's requests/s against each other proxy's, as they are and per core of CPU used.

The third-party proxies are installed at exact versions (``LITELLM_REQUIREMENT``,
``VLLM_ROUTER_REQUIREMENT``), each into its own venv under the cache dir, never the project's:
``$XDG_CACHE_HOME/infer-vllm/bench-litellm-venv`` and ``.../bench-vllm-router-venv``, made on
first use (LiteLLM's takes minutes) and rebuilt when the requirement changes (the venv's
``.bench-requirement`` file holds the one it was made for). LiteLLM (``litellm[proxy]``) runs
one worker with its telemetry off and the local model cost map (no remote fetch), its master key
checked and the upstream's key sent. vLLM's router (``vllm-router``, a Rust extension behind a
Python launcher) gets the upstream as its one ``--worker-urls`` entry, policy ``round_robin``,
log level warning; it checks no client key and forwards the client's ``Authorization`` as it
is (so it is sent the upstream's key), and it probes only ``/health`` on the upstream. A proxy
that cannot be installed, started or measured gets a column saying "not measured", and a line
saying why; the other figures still print.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.gateway.config import CONFIG_VAR, GatewayConfig, Upstream  # noqa: E402

STANDIN = REPO / "tests" / "standin_server.py"
MODEL = "bench-model"
UPSTREAM_KEY = "upstream-key"
PROXY_KEY = "sk-bench-key"
CHUNKS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Exact versions, so that figures can be reproduced. LiteLLM: the newest release whose [proxy]
# extra installed from the registry these figures were taken with (later ones pin releases of
# litellm-enterprise or litellm-proxy-extras, or a litellm-proxy package, that it lacks).
LITELLM_REQUIREMENT = "litellm[proxy]==1.108.7"
VLLM_ROUTER_REQUIREMENT = "vllm-router==0.1.17"
PROXY_CORE = "0"
LOAD_CORE = "1"

JSON_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
).encode()
SSE_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 64,
        "stream": True,
    }
).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- processes -------------------------------------------------------------------------------


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


def http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start(
    argv: list[str], env: dict[str, str], log: Path, port: int, health: str, timeout: float
) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``argv`` and wait for ``health`` to answer 200: (process, seconds it took)."""
    with log.open("ab") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if http_ok(port, health):
            return proc, time.monotonic() - started
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({proc.returncode}); see {log}")
        time.sleep(0.005)
    proc.kill()
    raise RuntimeError(f"{' '.join(argv[:4])} not healthy within {timeout}s; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = (entry / "stat").read_bytes()
            ppid = int(raw[raw.rfind(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, its live descendants, and its children that were reaped
    (socat forks one per connection)."""
    total = 0
    for index, member in enumerate(tree(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(f"/proc/{member}/stat").read_bytes()
            fields = raw[raw.rfind(b")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
            if index == 0:
                total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS now, peak RSS) of the process tree, in MB."""
    rss = peak = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
    return rss / 1024, peak / 1024


# ---- a minimal HTTP/1.1 client (the same for every target) ------------------------------------


def request_bytes(port: int, path: str, body: bytes, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Client:
    """One keep-alive connection; ``call`` sends a request and reads the whole response."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def call(self, request: bytes) -> tuple[int, float | None, int]:
        """(status, seconds to the first SSE event or None, SSE events) for one request."""
        started = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        first: float | None = None
        events = 0
        if b"transfer-encoding: chunked" in lower:
            body = b""
            while True:
                if first is None and b"data:" in self.buf:
                    first = time.perf_counter() - started
                end = self.buf.find(b"\r\n0\r\n\r\n")
                if end >= 0 or self.buf.startswith(b"0\r\n\r\n"):
                    cut = end + 7 if end >= 0 else 5
                    body += self.buf[:cut]
                    self.buf = self.buf[cut:]
                    break
                body += self.buf
                self.buf = b""
                self._recv()
            events = body.count(b"data: {")
        else:
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            while len(self.buf) < length:
                self._recv()
            self.buf = self.buf[length:]
        return status, first, events

    def _recv(self) -> None:
        piece = self.sock.recv(262144)
        if not piece:
            raise ConnectionError("server closed the connection")
        self.buf += piece


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- load at concurrency N ----------------------------------------------------------------------


def wrk_rps(
    port: int, path: str, key: str | None, seconds: float, workdir: Path
) -> tuple[float, int]:
    """(requests/s, requests) by wrk with 32 connections on the load core."""
    script = workdir / "post.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(JSON_BODY.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + auth
    )
    out = subprocess.run(
        pinned(
            LOAD_CORE,
            ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script),
             f"http://127.0.0.1:{port}{path}"],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    rps = float(out.split("Requests/sec:")[1].split()[0])
    total = int(out.split(" requests in ")[0].split()[-1])
    if "Non-2xx" in out or "Socket errors" in out:
        say(f"  wrk reported errors: {out.strip().splitlines()[-4:]}")
    return rps, total


async def _load(
    port: int, request: bytes, concurrency: int, seconds: float, streamed: bool
) -> tuple[int, int, int]:
    """Python load generator: (responses, errors, SSE events) in ``seconds``."""
    deadline = time.monotonic() + seconds
    done = errors = events = 0

    async def worker() -> None:
        nonlocal done, errors, events
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        if size == 0:
                            await reader.readline()
                            break
                        data = await reader.readexactly(size + 2)
                        events += data.count(b"data: {")
                else:
                    at = lower.find(b"content-length:")
                    await reader.readexactly(int(lower[at + 15 :].split(b"\r\n", 1)[0]))
                done += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, errors, events


def python_load(
    port: int, request: bytes, concurrency: int, seconds: float, streamed: bool
) -> tuple[int, int, int]:
    """Runs :func:`_load` in a child pinned to the load core; returns its counts."""
    here = str(Path(__file__).parent)
    call = f"_load({port}, {request!r}, {concurrency}, {seconds!r}, {streamed!r})"
    code = (
        f"import asyncio, json, sys; sys.path.insert(0, {here!r}); import bench_gateway as b; "
        f"print(json.dumps(asyncio.run(b.{call})))"
    )
    out = subprocess.run(
        pinned(LOAD_CORE, [sys.executable, "-c", code]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    done, errors, events = json.loads(out)
    return done, errors, events


# ---- one target -------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    key: str | None
    pid: int | None = None  # the proxy's (None: direct)
    startup: float | None = None
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing: str | None = None  # why it was not measured


def measure(target: Target, args: argparse.Namespace, workdir: Path) -> None:
    path = "/v1/chat/completions"
    plain = request_bytes(target.port, path, JSON_BODY, target.key)
    stream = request_bytes(target.port, path, SSE_BODY, target.key)
    quick = target.name != "litellm"
    n_latency = args.requests if quick else max(100, args.requests // 10)
    n_stream = args.streams if quick else max(20, args.streams // 4)
    client = Client(target.port)
    try:
        for _ in range(50):  # warm-up: connections, caches, lazy imports
            assert client.call(plain)[0] == 200, f"{target.name}: not 200"
        for _ in range(3):
            client.call(stream)
        times = []
        for _ in range(n_latency):
            started = time.perf_counter()
            status, _, _ = client.call(plain)
            times.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{target.name}: status {status}")
        target.figures["p50_ms"] = percentile(times, 0.50) * 1000
        target.figures["p99_ms"] = percentile(times, 0.99) * 1000
        firsts, events = [], []
        for _ in range(n_stream):
            status, first, count = client.call(stream)
            assert status == 200 and first is not None
            firsts.append(first)
            events.append(count)
        target.figures["first_chunk_ms"] = statistics.median(firsts) * 1000
        target.figures["events"] = statistics.median(events)
    finally:
        client.close()

    # Requests per second at concurrency 32, and CPU per request.
    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    wall = time.monotonic()
    if shutil.which("wrk"):
        rps, total = wrk_rps(target.port, path, target.key, args.duration, workdir)
    else:
        total, errors, _ = python_load(target.port, plain, 32, args.duration, False)
        rps = total / args.duration
        if errors:
            target.notes.append(f"{errors} non-200 answers under load")
    wall = time.monotonic() - wall
    target.figures["rps"] = rps
    if target.pid:
        cpu = cpu_seconds(target.pid) - cpu_before
        target.figures["cpu_util"] = cpu / wall
        target.figures["cpu_per_request_us"] = cpu / max(total, 1) * 1e6

    # Streamed load: CPU per relayed chunk.
    if target.pid:
        cpu_before = cpu_seconds(target.pid)
        streams, errors, chunks = python_load(
            target.port, stream, args.stream_concurrency, args.duration, True
        )
        time.sleep(0.2)  # let forked relays (socat) exit and be reaped
        cpu = cpu_seconds(target.pid) - cpu_before
        if errors:
            target.notes.append(f"{errors} non-200 streamed answers")
        target.figures["streams"] = streams
        target.figures["cpu_per_chunk_us"] = cpu / max(chunks, 1) * 1e6
        per_request = target.figures["cpu_per_request_us"] / 1e6
        net = (cpu - streams * per_request) / max(chunks, 1)
        target.figures["cpu_per_chunk_net_us"] = max(net, 0.0) * 1e6
        rss, peak = memory_mb(target.pid)
        target.figures["rss_mb"] = rss
        target.figures["peak_mb"] = peak


# ---- third-party proxies: their own venvs ------------------------------------------------------


def bench_venv(cache: Path, name: str, requirement: str, dist: str) -> tuple[Path | None, str]:
    """The benchmark's own venv ``cache/name`` holding ``requirement`` (created on first use,
    rebuilt when the requirement changes): (its bin directory, the installed version of
    ``dist``), or (None, why it could not be installed)."""
    venv = cache / name
    marker = venv / ".bench-requirement"
    if not marker.is_file() or marker.read_text().strip() != requirement:
        say(f"installing {requirement} into {venv} (its own venv; can take minutes)")
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        result = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
             requirement],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
            return None, f"pip install {requirement} failed: {' '.join(errors[:2])}"
        marker.write_text(requirement + "\n")
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
         f"print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    if not version:
        return None, f"{dist} is not importable in {venv} (delete it to rebuild)"
    return venv / "bin", version


def litellm_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))}
    env.update(
        {
            # The cost map bundled with the package, not a download at start.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
            "LITELLM_LOG": "ERROR",
            "DO_NOT_TRACK": "1",
            "DISABLE_SCHEMA_UPDATE": "true",
            "HOME": str(workdir),
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests (c=1)")
    parser.add_argument("--streams", type=int, default=100, help="sequential streams (c=1)")
    parser.add_argument("--chunk-delay", type=float, default=0.001, help="upstream SSE spacing")
    parser.add_argument(
        "--stream-concurrency", type=int, default=32, help="concurrent streams for CPU per chunk"
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--no-vllm-router", action="store_true", help="skip vllm-router")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infer-vllm",
        help="where the LiteLLM and vllm-router venvs are kept",
    )
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        say("warning: fewer than 2 cores: proxy and load share a core")
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    about: list[str] = []  # one line per third-party proxy: what it was, or why not measured
    try:
        up_port = free_port()
        up_env = {
            **os.environ,
            "STANDIN_FAST": "1",
            "STANDIN_FAST_CHUNKS": str(CHUNKS),
            "STANDIN_FAST_CHUNK_DELAY": str(args.chunk_delay),
        }
        upstream, _ = start(
            pinned(LOAD_CORE, [sys.executable, str(STANDIN), "--port", str(up_port),
                               "--served-model-name", MODEL]),
            up_env, workdir / "upstream.log", up_port, "/health", 10,
        )  # fmt: skip
        procs.append(upstream)
        targets.append(Target("direct", up_port, UPSTREAM_KEY))
        say("measuring direct ...")
        measure(targets[-1], args, workdir)

        # This gateway: keys on both sides, as deployed; no state file (always routes).
        gw_port = free_port()
        config = GatewayConfig(
            host="127.0.0.1",
            port=gw_port,
            keys=(PROXY_KEY,),
            instances=(Upstream("bench", "127.0.0.1", up_port, UPSTREAM_KEY, (MODEL,)),),
        )
        gw_env = {**os.environ, CONFIG_VAR: config.to_json(), "PYTHONPATH": str(REPO)}
        startups = []
        for _ in range(3):  # startup: best of 3 (the first pays a cold page cache)
            port = free_port()
            probe_env = {
                **gw_env,
                CONFIG_VAR: GatewayConfig(
                    host="127.0.0.1", port=port, keys=config.keys, instances=config.instances
                ).to_json(),
            }
            proc, took = start(
                pinned(PROXY_CORE, [sys.executable, "-m", "pipeline.gateway"]),
                probe_env, workdir / "gateway-start.log", port, "/health", 10,
            )  # fmt: skip
            stop(proc)
            startups.append(took)
        gateway, _ = start(
            pinned(PROXY_CORE, [sys.executable, "-m", "pipeline.gateway"]),
            gw_env, workdir / "gateway.log", gw_port, "/health", 10,
        )  # fmt: skip
        # Each proxy runs alone on its core while measured: started, measured, stopped.
        targets.append(Target("gateway", gw_port, PROXY_KEY, gateway.pid, min(startups)))
        run_alone(targets[-1], gateway, args, workdir)

        if shutil.which("socat"):
            relay_port = free_port()
            relay, took = start(
                pinned(PROXY_CORE, ["socat", f"TCP-LISTEN:{relay_port},fork,reuseaddr,"
                                    "bind=127.0.0.1", f"TCP:127.0.0.1:{up_port},nodelay"]),
                dict(os.environ), workdir / "socat.log", relay_port, "/health", 10,
            )  # fmt: skip
            targets.append(Target("socat", relay_port, UPSTREAM_KEY, relay.pid, took))
            run_alone(targets[-1], relay, args, workdir)

        if not args.no_litellm:
            about.append(litellm(targets, args, workdir, up_port))
        if not args.no_vllm_router:
            about.append(vllm_router(targets, args, workdir, up_port))
    finally:
        for proc in reversed(procs):
            stop(proc)
    report(targets, args, about)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


# What a third-party proxy may raise while installed, started or measured: it is then reported
# as not measured, with the reason, and the other figures still print.
FAILED = (RuntimeError, OSError, AssertionError, ValueError, subprocess.CalledProcessError)


def litellm(targets: list[Target], args: argparse.Namespace, workdir: Path, up_port: int) -> str:
    """Measure LiteLLM's proxy in front of the upstream; returns the line that describes it."""
    target = Target("litellm", free_port(), PROXY_KEY)
    targets.append(target)
    bin_dir, version = bench_venv(args.cache, "bench-litellm-venv", LITELLM_REQUIREMENT, "litellm")
    if bin_dir is None:
        target.missing = version
        return f"litellm: not measured: {version}"
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{up_port}/v1\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
        "general_settings:\n"
        f"  master_key: {PROXY_KEY}\n"
    )
    log = workdir / "litellm.log"
    try:
        proxy, target.startup = start(
            pinned(PROXY_CORE, [str(bin_dir / "litellm"), "--config", str(cfg), "--host",
                                "127.0.0.1", "--port", str(target.port), "--num_workers", "1"]),
            litellm_env(workdir), log, target.port, "/health/liveliness", 180,
        )  # fmt: skip
        target.pid = proxy.pid
        run_alone(target, proxy, args, workdir)
    except FAILED as exc:
        target.missing = f"{type(exc).__name__}: {exc}; log: {_tail(log)}"
        return f"litellm: {LITELLM_REQUIREMENT}: not measured: {target.missing}"
    return f"litellm: LiteLLM {version} ({LITELLM_REQUIREMENT}, its own venv), 1 worker"


def vllm_router(
    targets: list[Target], args: argparse.Namespace, workdir: Path, up_port: int
) -> str:
    """Measure vLLM's router (Rust) in front of the upstream; returns the line that describes
    it. It checks no client key of its own and forwards the client's ``Authorization`` as it
    is, so its clients send the upstream's key; it probes only ``/health`` on the worker."""
    target = Target("vllm-router", free_port(), UPSTREAM_KEY)
    targets.append(target)
    bin_dir, version = bench_venv(
        args.cache, "bench-vllm-router-venv", VLLM_ROUTER_REQUIREMENT, "vllm-router"
    )
    if bin_dir is None:
        target.missing = version
        return f"vllm-router: not measured: {version}"
    log = workdir / "vllm-router.log"
    try:
        proxy, target.startup = start(
            pinned(PROXY_CORE, [str(bin_dir / "vllm-router"), "--host", "127.0.0.1", "--port",
                                str(target.port), "--worker-urls", f"http://127.0.0.1:{up_port}",
                                "--policy", "round_robin", "--log-level", "warning"]),
            {**os.environ, "HOME": str(workdir)}, log, target.port, "/health", 60,
        )  # fmt: skip
        target.pid = proxy.pid
        run_alone(target, proxy, args, workdir)
    except FAILED as exc:
        target.missing = f"{type(exc).__name__}: {exc}; log: {_tail(log)}"
        return f"vllm-router: {VLLM_ROUTER_REQUIREMENT}: not measured: {target.missing}"
    return (
        f"vllm-router: vllm-router {version} ({VLLM_ROUTER_REQUIREMENT}, its own venv; Rust), "
        "one worker URL, policy round_robin, log level warning, no client keys (passed through)"
    )


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        return " | ".join(line for line in lines[-3:] if line) or "(empty)"
    return "(none)"


def run_alone(
    target: Target, proc: subprocess.Popen[bytes], args: argparse.Namespace, workdir: Path
) -> None:
    """Measure ``target`` (whose process is ``proc``), then stop it, whatever happens."""
    try:
        time.sleep(1.0)  # let its start-up work settle
        say(f"measuring {target.name} ...")
        measure(target, args, workdir)
    finally:
        stop(proc)


def report(targets: list[Target], args: argparse.Namespace, about: list[str]) -> None:
    by = {t.name: t for t in targets}
    measured = {t.name: t for t in targets if t.missing is None}
    direct = by["direct"].figures
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    loader = "wrk" if shutil.which("wrk") else "python asyncio client"
    print(f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(
        f"upstream: stand-in (fast mode) on core {LOAD_CORE}; proxies pinned to core "
        f"{PROXY_CORE}; load at c=32 by {loader} on core {LOAD_CORE}; SSE: {CHUNKS} chunks "
        f"{args.chunk_delay * 1000:g} ms apart, {args.stream_concurrency} streams at once "
        "for CPU per chunk"
    )
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "the stdlib asyncio loop"
    print(f"gateway: python -m pipeline.gateway on {loop}, keys checked and replaced")
    if "socat" in by:
        print("socat: a TCP relay in C (fork per connection, no HTTP): the floor for reference")
    for line in about:
        print(line)
    rows: list[tuple[str, Callable[[Target], str]]] = [
        ("startup (s)", lambda t: f"{t.startup:.2f}" if t.startup is not None else "-"),
        ("latency p50, c=1 (ms)", lambda t: f"{t.figures['p50_ms']:.3f}"),
        ("latency p99, c=1 (ms)", lambda t: f"{t.figures['p99_ms']:.3f}"),
        (
            "added p50 / p99 (ms)",
            lambda t: (
                "-"
                if t.name == "direct"
                else f"{t.figures['p50_ms'] - direct['p50_ms']:.3f} / "
                f"{t.figures['p99_ms'] - direct['p99_ms']:.3f}"
            ),
        ),
        ("first SSE chunk, c=1 (ms)", lambda t: f"{t.figures['first_chunk_ms']:.3f}"),
        (
            "first-chunk overhead (ms)",
            lambda t: (
                "-"
                if t.name == "direct"
                else f"{t.figures['first_chunk_ms'] - direct['first_chunk_ms']:.3f}"
            ),
        ),
        ("SSE events per stream", lambda t: f"{t.figures['events']:.0f}"),
        ("requests/s, c=32", lambda t: f"{t.figures['rps']:.0f}"),
        ("proxy CPU during it (cores)", lambda t: _f(t, "cpu_util", "{:.2f}")),
        ("CPU per request (us)", lambda t: _f(t, "cpu_per_request_us", "{:.0f}")),
        ("CPU per SSE chunk, gross (us)", lambda t: _f(t, "cpu_per_chunk_us", "{:.1f}")),
        ("CPU per SSE chunk, net (us)", lambda t: _f(t, "cpu_per_chunk_net_us", "{:.1f}")),
        ("RSS now / peak (MB)", lambda t: _mem(t)),
    ]
    names = [t.name for t in targets]
    width = max(len(r[0]) for r in rows)
    print()
    print(" " * width + "".join(f"  {n:>16}" for n in names))
    for index, (label, cell) in enumerate(rows):
        cells = [
            cell(by[n]) if by[n].missing is None else ("not measured" if index == 0 else "-")
            for n in names
        ]
        print(f"{label:<{width}}" + "".join(f"  {c:>16}" for c in cells))
    for t in targets:
        for note in t.notes:
            print(f"note: {t.name}: {note}")
    gw = by["gateway"].figures
    print()
    print("targets (issue 6):")
    checks = [
        (
            f"added p50 <= 1 ms (got {gw['p50_ms'] - direct['p50_ms']:.3f})",
            gw["p50_ms"] - direct["p50_ms"] <= 1.0,
        ),
        (
            f"CPU per streamed chunk <= 30 us (got {gw['cpu_per_chunk_us']:.1f}"
            + (
                f"; the C relay: {by['socat'].figures['cpu_per_chunk_us']:.1f})"
                if "socat" in by
                else ")"
            ),
            gw["cpu_per_chunk_us"] <= 30.0,
        ),
        (f"memory < 100 MB (got {gw['peak_mb']:.0f})", gw["peak_mb"] < 100.0),
        (f"startup < 1 s (got {by['gateway'].startup:.2f})", (by["gateway"].startup or 99) < 1.0),
    ]
    if "litellm" in measured:
        per_core = _per_core(gw, measured["litellm"].figures)
        checks.append(
            (f">= 30x LiteLLM's requests/s per core (got {per_core:.0f}x)", per_core >= 30)
        )
    else:
        checks.append((">= 30x LiteLLM's requests/s per core: not measured", False))
    for label, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}")
    print()
    print("the gateway against the others (requests/s at c=32; per core: each divided by the")
    print("CPU its proxy used during that run; added p50 at c=1):")
    for name in ("socat", "litellm", "vllm-router"):
        if name not in by:
            continue
        if name not in measured:
            print(f"  {name}: not measured: {by[name].missing}")
            continue
        other = measured[name].figures
        print(
            f"  {name}: {gw['rps'] / other['rps']:.2f}x its requests/s, "
            f"{_per_core(gw, other):.2f}x per core; added p50 "
            f"{gw['p50_ms'] - direct['p50_ms']:.3f} ms against "
            f"{other['p50_ms'] - direct['p50_ms']:.3f} ms"
        )


def _per_core(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """How many times ``theirs``' requests/s per core of CPU ``ours`` serves."""
    return (ours["rps"] / max(ours["cpu_util"], 1e-9)) / (
        theirs["rps"] / max(theirs["cpu_util"], 1e-9)
    )


def _f(target: Target, key: str, fmt: str) -> str:
    return fmt.format(target.figures[key]) if key in target.figures else "-"


def _mem(target: Target) -> str:
    if "rss_mb" not in target.figures:
        return "-"
    return f"{target.figures['rss_mb']:.0f} / {target.figures['peak_mb']:.0f}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
