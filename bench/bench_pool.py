"""Benchmark of the model pool: a mixed trace over three models and one pool slot.

    .venv/bin/python bench/bench_pool.py [--requests 300] [--cold-start 1.0] [--seed 7]

Three stand-in models (``tests/standin_server.py``, no vLLM needed): each takes
``--cold-start`` seconds to start (a model load) and 20 ms to answer. One trace (bursts of
requests for one model, a few at once, then idle gaps; seeded) is replayed, in one run, against:

- **everything awake**: the three started at boot (the baseline: what the trace costs when
  nothing has to start);
- **today**: one slot and no pool: the first model runs, the other two are stopped, and their
  clients see 503;
- **the pool**: the three on demand, ``[pool] max_awake = 1``, behind the gateway.

Printed: failed requests (target 0 with the pool, against today's), the number of switches,
the p50 and p95 added wait per request against everything awake, and the gateway's own overhead
per held request: from the moment the supervisor records the instance ready (``ready_at``) to
the moment the instance receives the held request (target <= 1 ms). The stand-ins have no sleep
mode, so every switch here is a cold start (put away means stopped, as on the CPU build); what
a GPU changes is printed as a projection from vLLM's published figures, not measured here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standin_server.py"
MODELS = ("a", "b", "c")
KEY = "bench-pool-key"
SERVICE_DELAY = 0.02
# vLLM's blog (2025-10-26, "zero-reload model switching with vLLM sleep mode"): a switch
# through sleep mode was 18 to 200 times faster than a cold reload.
PUBLISHED_SPEEDUP = (18, 200)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sent:
    index: int
    model: str
    at: float  # offset in the trace, seconds
    status: int = 0
    latency: float = 0.0
    sent_wall: float = 0.0
    received_at: float | None = None  # when the instance read it (the stand-in's clock)
    served_by: str = ""


def make_trace(requests: int, seed: int) -> list[Sent]:
    """Bursts of 3 to 10 requests for one model (a, b, c weighted 5:3:2), spread over 0.3 s,
    then an idle gap of 0.1 to 1 s."""
    rng = random.Random(seed)
    out: list[Sent] = []
    now = 0.0
    while len(out) < requests:
        model = rng.choices(MODELS, weights=(5, 3, 2))[0]
        for _ in range(min(rng.randint(3, 10), requests - len(out))):
            out.append(Sent(len(out), model, now + rng.uniform(0, 0.3)))
        now += 0.3 + rng.uniform(0.1, 1.0)
    return sorted(out, key=lambda s: s.at)


def one(port: int, sent: Sent, timeout: float) -> None:
    body = json.dumps({"model": sent.model, "messages": []})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    began = time.monotonic()
    sent.sent_wall = time.time()
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )
        resp = conn.getresponse()
        data = resp.read()
        sent.status = resp.status
        if resp.status == 200:
            reply = json.loads(data)
            sent.received_at = reply.get("received_at")
            sent.served_by = reply.get("served_by", "")
    except OSError:
        sent.status = -1
    finally:
        sent.latency = time.monotonic() - began
        conn.close()


def replay(port: int, trace: list[Sent], timeout: float) -> list[Sent]:
    """Send each request at its offset, each on its own connection and thread."""
    trace = [Sent(s.index, s.model, s.at) for s in trace]
    threads = []
    start = time.monotonic()
    for sent in trace:
        delay = start + sent.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(port, sent, timeout), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout + 5)
    return trace


def instance_times(log: Path) -> tuple[list[float], list[float]]:
    """From a stand-in's log: when each of its starts began listening, and when it answered
    each first request (the supervisor's ``/v1/completions``, 1 token)."""
    listening: list[float] = []
    first: list[float] = []
    text = log.read_text() if log.exists() else ""  # never started: no log
    for line in text.splitlines():
        if line.startswith("standin: listening on "):
            listening.append(float(line.rsplit(" at ", 1)[1]))
        elif line.startswith("standin: POST /v1/completions answered at "):
            first.append(float(line.rsplit(" at ", 1)[1]))
    return listening, first


def config_text(tmp: Path, prefix: Path, ports: dict[str, int], mode: str, cold: float) -> str:
    lines = [
        "[master]",
        f'env_prefix = "{prefix}"',
        "[gateway]",
        "enable = true",
        'host = "127.0.0.1"',
        f"port = {ports['gateway']}",
        f'api_keys = ["{KEY}"]',
        "[instance.control]",
        f'log_dir = "{tmp / "logs" / mode}"',
        "gpu_ids = []",
        "ready_timeout = 60",
        "stop_grace = 5",
        f'env = {{ STANDIN_SLOW_START = "{cold}", STANDIN_RESPONSE_DELAY = "{SERVICE_DELAY}", '
        'STANDIN_LOG_TIMES = "1" }',
    ]
    if mode == "pool":
        lines += ['start = "on-demand"', 'unload = "stop"']
    lines += ["[instance.server]", 'model = "standin"', 'host = "127.0.0.1"']
    for name in MODELS:
        lines += [
            f"[instance.{name}.server]",
            f"port = {ports[name]}",
            f'served_model_name = "{name}"',
        ]
    if mode == "pool":
        lines += ["[pool.one]", 'instances = ["a", "b", "c"]', "max_awake = 1"]
    return "\n".join(lines) + "\n"


def run_mode(
    tmp: Path, prefix: Path, mode: str, trace: list[Sent], cold: float
) -> tuple[list[Sent], dict]:
    ports = {name: free_port() for name in (*MODELS, "gateway")}
    config = tmp / f"{mode}.toml"
    config.write_text(config_text(tmp, prefix, ports, mode, cold))
    state = tmp / f"state-{mode}"
    env = {
        **os.environ,
        "PIPELINE_STATE_DIR": str(state),
        "AUTO_INFER_VLLM_CONFIG": str(config),
    }
    doit = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
    subprocess.run([*doit, "serve"], env=env, cwd=REPO, capture_output=True, check=True)
    try:
        if mode == "today":
            subprocess.run(
                [*doit, "stop", "b", "c"], env=env, cwd=REPO, capture_output=True, check=True
            )
        done = replay(ports["gateway"], trace, timeout=120)
        final = json.loads((state / "serve" / "state.json").read_text())
        final["metrics"] = metrics(ports["gateway"])
        final["times"] = {m: instance_times(tmp / "logs" / mode / f"{m}.log") for m in MODELS}
    finally:
        subprocess.run([*doit, "stop"], env=env, cwd=REPO, capture_output=True)
    return done, final


def metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"authorization": f"Bearer {KEY}"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def dispatch_figures(text: str) -> tuple[int, float, float, float]:
    """From the gateway's ``gateway_held_dispatch_seconds``: (count, mean seconds, share
    within 1 ms, the smallest bucket bound holding the median)."""
    buckets: list[tuple[float, int]] = []
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("gateway_held_dispatch_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if bound == "+Inf" else float(bound), int(line.split()[-1]))
            )
        elif line.startswith("gateway_held_dispatch_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("gateway_held_dispatch_seconds_count"):
            count = float(line.split()[-1])
    if not count:
        return 0, float("nan"), float("nan"), float("nan")
    within = next((n for bound, n in buckets if bound == 0.001), 0) / count
    median = next(bound for bound, n in buckets if n >= count / 2)
    return int(count), total / count, within, median


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--cold-start", type=float, default=1.0, help="a model's load, seconds")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    trace = make_trace(args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as name:
        tmp = Path(name)
        prefix = tmp / "env"
        (prefix / "bin").mkdir(parents=True)
        python = prefix / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
        python.chmod(0o755)
        results = {}
        for mode in ("awake", "today", "pool"):
            print(f"replaying {len(trace)} requests: {mode} ...", flush=True)
            results[mode] = run_mode(tmp, prefix, mode, trace, args.cold_start)

    awake, _ = results["awake"]
    pool, final = results["pool"]
    failed = {mode: sum(1 for s in results[mode][0] if s.status != 200) for mode in results}
    starts = sum(final["instances"][m].get("wakes", 0) for m in MODELS)
    added = [p.latency - a.latency for p, a in zip(pool, awake, strict=True) if p.status == 200]
    # A held request: sent before the instance that served it answered the supervisor's
    # first request of that start (from then on the instance is ready). What the pool added
    # beyond waiting for that start: its latency from that answer on, less the same request's
    # latency with everything awake (which has the gateway, the stand-in and the client in
    # it too). That is the supervisor recording the instance running and telling the gateway,
    # and the gateway sending out what it held (a new connection to the new instance).
    held_overhead, readiness = [], []
    for sent, same in zip(pool, awake, strict=True):
        if sent.status != 200 or sent.received_at is None:
            continue
        listening, first = final["times"][sent.served_by]
        checks = [t for t in first if t <= sent.received_at]
        if not checks or sent.sent_wall >= max(checks):
            continue
        check = max(checks)
        done = sent.sent_wall + sent.latency
        held_overhead.append(done - check - same.latency)
        began = [t for t in listening if t <= check]
        if began:
            readiness.append(check - max(began))
    span = trace[-1].at
    print(
        f"trace: {len(trace)} requests over {span:.1f} s (seed {args.seed}), models a:b:c "
        f"{sum(s.model == 'a' for s in trace)}:{sum(s.model == 'b' for s in trace)}:"
        f"{sum(s.model == 'c' for s in trace)}, cold start {args.cold_start:g} s, answer "
        f"{SERVICE_DELAY * 1000:.0f} ms; CPU count {os.cpu_count()}, load "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"failed requests: pool {failed['pool']} (target 0), today {failed['today']} "
        f"(b and c stopped: 503), everything awake {failed['awake']}: "
        f"{'PASS' if failed['pool'] == 0 else 'FAIL'}"
    )
    print(f"switches: {starts} starts of a model ({starts - 1} switches after the first)")
    print(
        f"added wait per request against everything awake: p50 {percentile(added, 0.5):.3f} s, "
        f"p95 {percentile(added, 0.95):.3f} s, max {max(added, default=0):.3f} s "
        f"(median latency awake {statistics.median(a.latency for a in awake) * 1000:.1f} ms)"
    )
    count, mean, within, median = dispatch_figures(final["metrics"])
    print(
        f"gateway's own overhead per held request (from learning its instance is ready to the "
        f"request written to it; its /metrics): mean "
        f"{mean * 1000:.3f} ms, median <= {median * 1000:g} ms, {within:.0%} within 1 ms, over "
        f"{count} held requests (target <= 1 ms): {'PASS' if median <= 0.001 else 'FAIL'}"
    )
    if held_overhead:
        med = statistics.median(held_overhead) * 1000
        print(
            f"  end to end, what a held request paid beyond its instance's start (its latency "
            f"after the instance answered our first request, less the same request's with "
            f"everything awake; the supervisor's notice and a burst of held requests at once "
            f"included): p50 {med:.2f} ms, p95 {percentile(held_overhead, 0.95) * 1000:.2f} ms "
            f"over {len(held_overhead)}"
        )
        print(
            f"  before that, the readiness check (listening -> /health 200 -> the answer to "
            f"our first request, {SERVICE_DELAY * 1000:.0f} ms of it the answer): "
            f"p50 {statistics.median(readiness) * 1000:.1f} ms"
        )
    else:
        print("gateway overhead per held request: no held request was seen")
    waits = [p.latency for p in pool if p.status == 200]
    low, high = PUBLISHED_SPEEDUP
    cold_total = (starts - 1) * args.cold_start
    print(
        "projection, not measured here: on a GPU a switch is a wake, not a cold start; at "
        f"vLLM's published {low} to {high} times faster switches, this trace's "
        f"{starts - 1} switches of a {args.cold_start:g} s cold start would cost "
        f"{cold_total / high:.2f} to {cold_total / low:.2f} s of waiting in all instead of "
        f"about {cold_total:.0f} s (p95 latency with the pool: {percentile(waits, 0.95):.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
