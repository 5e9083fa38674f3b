"""The gateway's own answers: ``/health``, ``/v1/models`` (and ``/v1/models/<name>``) and
``/metrics``, their bodies, errors in the client's dialect (:func:`error_body`) and status
lines.

These endpoints read the instances' states as last refreshed (:mod:`~pipeline.gateway.states`)
and the gateway's own counts; they never reach an instance. A request for one of them may carry
a body: it is read and dropped, and the connection stays open (:data:`LOCAL_HANDLERS`); it must
arrive with its head, within ``header_timeout``. A HEAD request gets each answer's head alone
(:meth:`ClientConn.respond <pipeline.gateway.client.ClientConn.respond>`).
"""

from __future__ import annotations

import json
import os
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

from pipeline.gateway.states import GIVEN_UP

if TYPE_CHECKING:
    from pipeline.gateway.client import ClientConn
    from pipeline.gateway.conn import Body
    from pipeline.gateway.proxy import Gateway
    from pipeline.gateway.wire import RequestHead

OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
) % (
    len(body := json.dumps({"error": {"message": "too many connections", "type": "server_error",
                                      "param": None, "code": "service_unavailable"}}).encode()),
    body,
)  # fmt: skip
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


def status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


def error_body(path: bytes, code: int, message: str, *, param: str | None = None) -> bytes:
    """An error in the client's dialect: Anthropic's for /v1/messages, OpenAI's otherwise."""
    if path.startswith(b"/v1/messages"):
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
        }.get(code, "api_error")
        data: dict[str, object] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = {
            401: "authentication_error",
            404: "invalid_request_error",
            400: "invalid_request_error",
            413: "invalid_request_error",
        }.get(code, "server_error" if code >= 500 else "invalid_request_error")
        code_name = {401: "invalid_api_key", 404: "model_not_found" if param else "not_found"}
        data = {
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": code_name.get(code, HTTPStatus(code).phrase.lower().replace(" ", "_")),
            }
        }
    return json.dumps(data).encode()


# ---- the local endpoints' handlers (the client's gateway is the one answering) ---------------
def health(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    client.respond(200, health_body(client.gateway), model=None)


def metrics(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    client.respond(
        200,
        metrics_body(client.gateway),
        content_type=b"text/plain; version=0.0.4; charset=utf-8",
        model=None,
    )


def models(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    found = models_body(client.gateway, None) or b""
    client.respond(200, found, model=None)


def model(client: ClientConn, req: RequestHead, body: Body, _: object) -> None:
    path = req.path
    name = path[len(b"/v1/models/") :].decode("utf-8", "replace")
    found = models_body(client.gateway, name)
    if found is None:
        message = f"model {name!r} is not served here (ready: {ready_list(client.gateway)})"
        client.respond(404, error_body(path, 404, message, param="model"), model=None)
    else:
        client.respond(200, found, model=None)


# Handlers that read (and drop) a request's body rather than close the connection over it.
LOCAL_HANDLERS = frozenset({health, metrics, models, model})


# ---- the bodies -------------------------------------------------------------------------------
def ready_list(gateway: Gateway) -> str:
    status = gateway.states.status
    ready = [
        m for m, names in sorted(gateway.route_names.items()) if any(status(n).ready for n in names)
    ]
    return ", ".join(ready) or "none"


def health_body(gateway: Gateway) -> bytes:
    gateway.states.refresh()
    instances = []
    for up in gateway.config.instances:
        status = gateway.states.status(up.name)
        instances.append(
            {
                "name": up.name,
                "state": status.state,
                "ready": status.ready,
                "models": list(up.models),
                "reason": None if status.ready else status.reason,
                "restarts": status.restarts,
                "inflight": gateway.inflight[up.name],
            }
        )
    ready = all(
        i["ready"] or (up.managed and i["state"] not in GIVEN_UP)
        for i, up in zip(instances, gateway.config.instances, strict=True)
    )
    data = {
        "status": "ok" if ready else "degraded",
        "gateway": {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - gateway.started_mono, 3),
            "connections": len(gateway.clients),
            "auth": bool(gateway.keys),
        },
        "instances": instances,
    }
    return json.dumps(data).encode()


def models_body(gateway: Gateway, only: str | None) -> bytes | None:
    """/v1/models (``only`` None) or /v1/models/<only>: the names some ready instance
    serves, each once (replicas: as the first ready one, in config order, reports it)."""
    gateway.states.refresh()
    data = []
    listed: set[str] = set()
    for up in gateway.config.instances:
        status = gateway.states.status(up.name)
        # An on-demand model is listed awake or not: a request for it starts it.
        if not status.ready and not (up.managed and status.state not in GIVEN_UP):
            continue
        created = int(status.ready_at or gateway.started)
        for model in up.models:
            if (only is not None and model != only) or model in listed:
                continue
            listed.add(model)
            item = {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": up.models[0],
                "parent": None,
            }
            if only is not None:
                return json.dumps(item).encode()
            data.append(item)
    if only is not None:
        return None
    return json.dumps({"object": "list", "data": data}).encode()


def metrics_body(gateway: Gateway) -> bytes:
    gateway.states.refresh()
    gauges: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
        (
            "gateway_instance_ready",
            "gauge",
            "1 when the instance is running (requests for its models are forwarded).",
            [
                ({"instance": name}, 1.0 if gateway.states.status(name).ready else 0.0)
                for name in gateway.pools
            ],
        ),
        (
            "gateway_instance_suspect",
            "gauge",
            "1 while the instance is suspect: it sent no response head within upstream_timeout "
            "and has not answered in time since (its replicas are preferred).",
            [
                (
                    {"instance": name},
                    1.0 if pool.suspected(gateway.states.status(name).ready_at) else 0.0,
                )
                for name, pool in gateway.pools.items()
            ],
        ),
        (
            "gateway_inflight_requests",
            "gauge",
            "Requests being forwarded, by instance.",
            [({"instance": name}, float(n)) for name, n in gateway.inflight.items()],
        ),
        (
            "gateway_idle_upstream_connections",
            "gauge",
            "Keep-alive connections to instances waiting for reuse.",
            [({"instance": name}, float(len(p.idle))) for name, p in gateway.pools.items()],
        ),
        (
            "gateway_client_connections",
            "gauge",
            "Open client connections.",
            [({}, float(len(gateway.clients)))],
        ),
        (
            "gateway_start_time_seconds",
            "gauge",
            "When the gateway started (Unix time).",
            [({}, gateway.started)],
        ),
    ]
    return gateway.metrics.render(gauges).encode()
