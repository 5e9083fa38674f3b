"""``python -m pipeline.gateway``: run the gateway from ``PIPELINE_GATEWAY_CONFIG``.

Runs on uvloop (a pinned dependency: about 1.5x the requests per core of the stdlib loop,
bench/bench_gateway.py), or on the stdlib loop when uvloop cannot be imported; the code is the
same on both. Exit codes: 0 after a SIGTERM/SIGINT stop, 1 when the port cannot be bound, 2 when
the configuration is missing or malformed (the message never shows a key).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pipeline.errors import PipelineError, error_line
from pipeline.gateway.config import CONFIG_VAR, GatewayConfig, GatewayConfigError
from pipeline.gateway.proxy import serve
from pipeline.settings import load_settings


def main() -> int:
    try:
        settings = load_settings()
    except PipelineError as exc:
        print(error_line(exc.message, "gateway"), file=sys.stderr, flush=True)
        return 2
    if settings.gateway_config is None:
        print(
            error_line(
                f"{CONFIG_VAR} is not set; the gateway is started by `doit serve` "
                "when the serve TOML has [gateway] enable = true",
                "gateway",
            ),
            file=sys.stderr,
            flush=True,
        )
        return 2
    try:
        config = GatewayConfig.from_json(settings.gateway_config)
    except GatewayConfigError as exc:
        print(error_line(str(exc), "gateway"), file=sys.stderr, flush=True)
        return 2
    return event_loop_runner()(serve(config))


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """``uvloop.run`` when uvloop imports, else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    sys.exit(main())
