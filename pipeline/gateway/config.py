"""What the gateway process is told: one JSON value in ``PIPELINE_GATEWAY_CONFIG``.

The planner (:func:`pipeline.serve.plan.gateway_plan`) writes it with :meth:`GatewayConfig.to_json`
and the gateway reads it back with :meth:`GatewayConfig.from_json`: one module owns the format.
It holds secrets (the instances' keys and the gateway's own), so it travels only in the
gateway's environment: never argv, never disk, never a log. ``repr`` leaves the keys out.

Pure and light: dataclasses and ``json`` only (the gateway starts in well under a second).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CONFIG_VAR = "PIPELINE_GATEWAY_CONFIG"
FORMAT_VERSION = 1

# Defaults of the limits (the serve TOML's [gateway] keys; docs/serve-config.md says why).
HEADER_TIMEOUT = 60.0
BODY_TIMEOUT = 60.0
UPSTREAM_TIMEOUT = 600.0
MAX_BODY = 64 * 1024 * 1024
MAX_CONNECTIONS = 4096
MAX_QUEUED = 256
QUEUE_TIMEOUT = 600.0


class GatewayConfigError(ValueError):
    """The JSON value is not a gateway config this version understands."""


@dataclass(frozen=True)
class Upstream:
    """One vLLM instance behind the gateway. Several may list the same model: its replicas."""

    name: str
    host: str
    port: int
    key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()
    # May be put away and brought back: a request for it while it is not running is held
    # while the supervisor starts or wakes it (it needs ``control_socket``).
    managed: bool = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class GatewayConfig:
    """Listen address, client keys, instances (with their keys and model names), state file.

    ``state_file`` is the supervisor's ``state.json``; empty means "no supervisor": every
    instance counts as running (tests and ad-hoc use). ``header_timeout`` (seconds from
    accept, or from a kept-alive request's first byte, to the end of its head, or of its
    body when that is not proxied; also the idle time of a connection without a keyed
    request), ``body_timeout`` (seconds between two reads of a proxied body), ``max_body``
    (bytes) and ``max_connections`` (open client connections, beyond a small reserve for
    /health and /metrics) bound what a client can hold; ``upstream_timeout`` (seconds from a
    request sent to an instance to its response head) bounds what a hung instance can hold.
    """

    host: str
    port: int
    keys: tuple[str, ...] = field(default=(), repr=False)
    instances: tuple[Upstream, ...] = ()
    state_file: str = ""
    # The supervisor's control socket (empty: none; requests are never held) and how many
    # requests per model are held, for how long, while a managed instance starts or wakes.
    control_socket: str = ""
    max_queued: int = MAX_QUEUED
    queue_timeout: float = QUEUE_TIMEOUT
    access_log: bool = False
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    upstream_timeout: float = UPSTREAM_TIMEOUT
    max_body: int = MAX_BODY
    max_connections: int = MAX_CONNECTIONS

    def routes(self) -> dict[str, tuple[Upstream, ...]]:
        """Model name or alias -> the instances serving it, in config order: one, or the
        replicas that share its requests (the planner has checked they serve one model)."""
        table: dict[str, tuple[Upstream, ...]] = {}
        for up in self.instances:
            for model in up.models:
                table[model] = (*table.get(model, ()), up)
        return table

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "host": self.host,
            "port": self.port,
            "keys": list(self.keys),
            "state_file": self.state_file,
            "control_socket": self.control_socket,
            "max_queued": self.max_queued,
            "queue_timeout": self.queue_timeout,
            "access_log": self.access_log,
            "header_timeout": self.header_timeout,
            "body_timeout": self.body_timeout,
            "upstream_timeout": self.upstream_timeout,
            "max_body": self.max_body,
            "max_connections": self.max_connections,
            "instances": [
                {
                    "name": up.name,
                    "host": up.host,
                    "port": up.port,
                    "key": up.key,
                    "models": list(up.models),
                    "managed": up.managed,
                }
                for up in self.instances
            ],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GatewayConfig:
        """Parse :meth:`to_json`'s output; GatewayConfigError (never showing a key) otherwise."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GatewayConfigError(f"{CONFIG_VAR} is not JSON ({exc.msg})") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise GatewayConfigError(
                f"{CONFIG_VAR}: not a version {FORMAT_VERSION} gateway config; "
                "it is written by `doit serve`, not by hand"
            )
        try:
            instances = tuple(
                Upstream(
                    name=str(item["name"]),
                    host=str(item["host"]),
                    port=int(item["port"]),
                    key=None if item.get("key") is None else str(item["key"]),
                    models=tuple(str(m) for m in item["models"]),
                    managed=bool(item.get("managed", False)),
                )
                for item in data["instances"]
            )
            return cls(
                host=str(data["host"]),
                port=int(data["port"]),
                keys=tuple(str(k) for k in data["keys"]),
                instances=instances,
                state_file=str(data.get("state_file") or ""),
                control_socket=str(data.get("control_socket") or ""),
                max_queued=int(data.get("max_queued", MAX_QUEUED)),
                queue_timeout=float(data.get("queue_timeout", QUEUE_TIMEOUT)),
                access_log=bool(data.get("access_log", False)),
                header_timeout=float(data.get("header_timeout", HEADER_TIMEOUT)),
                body_timeout=float(data.get("body_timeout", BODY_TIMEOUT)),
                upstream_timeout=float(data.get("upstream_timeout", UPSTREAM_TIMEOUT)),
                max_body=int(data.get("max_body", MAX_BODY)),
                max_connections=int(data.get("max_connections", MAX_CONNECTIONS)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GatewayConfigError(
                f"{CONFIG_VAR}: malformed gateway config ({type(exc).__name__}: {exc})"
            ) from None
