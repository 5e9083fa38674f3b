"""Benchmark of `doit serve` / `doit status` with 8 stand-in instances (no vLLM needed).

    .venv/bin/python bench/bench_serve.py [--instances 8] [--repeat 10]

Prints, from one run on this machine:
- spawn overhead: time from invoking `doit serve` until the last instance process was
  spawned (target <= 0.5 s beyond the servers' own start), and until `doit serve` returned
  with all ready, against one stand-in started by hand and polled the same way (baseline);
- `doit status` latency (median of N runs; target <= 0.3 s), against `python -c pass` and
  `doit list` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standin_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def baseline_start(count: int) -> float:
    """Seconds for ``count`` stand-ins, started by hand at once, to all answer /health
    (polled every 50 ms): the servers' own start, without any supervisor."""
    ports = [free_port() for _ in range(count)]
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(STANDIN), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        pending = set(ports)
        while pending:
            pending = {p for p in pending if not healthy(p)}
            if time.monotonic() - started > 30:
                raise SystemExit("baseline stand-ins did not start")
            if pending:
                time.sleep(0.05)
        return time.monotonic() - started
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def timed(cmd: list[str], env: dict[str, str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        prefix = tmp / "env"
        (prefix / "bin").mkdir(parents=True)
        python = prefix / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
        python.chmod(0o755)
        lines = [
            "[master]",
            f'env_prefix = "{prefix}"',
            "[instance.control]",
            f'log_dir = "{tmp / "logs"}"',
            "gpu_ids = []",
            "ready_timeout = 60",
            "stop_grace = 5",
            "[instance.server]",
            'model = "standin"',
            'host = "127.0.0.1"',
        ]
        for i in range(args.instances):
            lines += [
                f"[instance.s{i}.server]",
                f"port = {free_port()}",
                f'served_model_name = "s{i}"',
            ]
        config = tmp / "serve.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {**os.environ, "PIPELINE_STATE_DIR": str(tmp / "state")}
        env["AUTO_INFER_VLLM_CONFIG"] = str(config)
        doit = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]

        base = baseline_start(args.instances)
        t0_wall = time.time()
        t0 = time.monotonic()
        subprocess.run([*doit, "serve"], env=env, cwd=REPO, capture_output=True, check=True)
        serve_took = time.monotonic() - t0
        state = json.loads((tmp / "state" / "serve" / "state.json").read_text())
        spawned = [rec["started_at"] for rec in state["instances"].values()]
        last_spawn = max(spawned) - t0_wall

        status = timed([*doit, "status"], env, args.repeat)
        status_json = timed([*doit, "status", "--json"], env, args.repeat)
        listing = timed([*doit, "list"], env, args.repeat)
        python_only = timed([sys.executable, "-c", "pass"], env, args.repeat)
        subprocess.run([*doit, "stop"], env=env, cwd=REPO, capture_output=True, check=True)

    med = statistics.median
    print(
        f"instances: {args.instances} stand-ins (tests/standin_server.py), "
        f"CPU count {os.cpu_count()}, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"baseline: {args.instances} stand-ins started by hand all answer /health "
        f"after {base:.3f} s"
    )
    print(f"doit serve: last instance spawned {last_spawn:.3f} s after invocation")
    print(
        f"doit serve: returned with all {args.instances} ready after {serve_took:.3f} s "
        f"= baseline + {serve_took - base:.3f} s (target: overhead <= 0.5 s)"
    )
    print(
        f"doit status: median {med(status):.3f} s, min {min(status):.3f} s over {args.repeat} "
        "(target <= 0.3 s)"
    )
    print(f"doit status --json: median {med(status_json):.3f} s")
    print(
        f"baselines: python -c pass {med(python_only):.3f} s, doit list {med(listing):.3f} s; "
        f"status / doit list = {med(status) / med(listing):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
