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

``GET /health`` answers 200 once ready; ``GET /v1/models`` lists the served name and requires
``Authorization: Bearer $VLLM_API_KEY`` when that is set; ``GET /env`` returns the environment
variables named in ``?names=A,B`` (for tests of what the supervisor passes).
"""

from __future__ import annotations

import json
import os
import signal
import sys
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


def main(argv: list[str]) -> int:
    env = os.environ
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
    name = _arg(argv, "--served-model-name", _arg(argv, "--model", "standin"))
    key = env.get("VLLM_API_KEY")
    never_ready = bool(env.get("STANDIN_NEVER_READY"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            print("standin: " + fmt % args, flush=True)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/health":
                self._send(503 if never_ready else 200, {})
            elif url.path == "/env":
                names = parse_qs(url.query).get("names", [""])[0].split(",")
                self._send(200, {n: os.environ.get(n) for n in names if n})
            elif url.path == "/v1/models":
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    self._send(401, {"error": "Unauthorized"})
                else:
                    self._send(200, {"object": "list", "data": [{"id": name}]})
            else:
                self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"standin: listening on {host}:{port}", flush=True)
    if crash_after:
        deadline = time.monotonic() + float(crash_after)
        server.timeout = 0.1
        while time.monotonic() < deadline:
            server.handle_request()
        print("standin: crashing (STANDIN_CRASH_AFTER)", flush=True)
        return 3
    server.serve_forever()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["-m", "vllm.entrypoints.openai.api_server"]:
        args = args[2:]
    sys.exit(main(args))
