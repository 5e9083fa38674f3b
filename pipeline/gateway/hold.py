"""Requests held while an on-demand model starts or wakes.

A request for a model whose instances are all managed (they may be put away) and none of
which is running is not refused: it is *held* (:class:`Held`, the client connection's
``exchange`` meanwhile), and the supervisor is asked, over the control channel
(:mod:`pipeline.gateway.control`), to start or wake one of them. Each model's queue
(:class:`Holding`) holds up to ``max_queued`` requests for up to ``queue_timeout`` seconds; beyond
either the client gets 503 with ``Retry-After``. As soon as the states show an instance running
(the supervisor says so at once: ``changed``), every held request goes out through
:func:`~pipeline.gateway.exchange.forward`, in the order they came. When the instances fail
instead (a start or wake that failed, a stop), each held request gets a 503 that names why. A
client that disconnects while held leaves the queue.

Everything runs on the event loop thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pipeline.gateway.endpoints import error_body
from pipeline.gateway.states import GIVEN_UP, unavailable

if TYPE_CHECKING:
    from pipeline.gateway.client import ClientConn
    from pipeline.gateway.conn import Body
    from pipeline.gateway.proxy import Gateway
    from pipeline.gateway.upstream import Replicas
    from pipeline.gateway.wire import ModelScanner, RequestHead

# Asked again for a start at most this often while requests wait (a reconnected supervisor).
REWANT_SECONDS = 1.0
# What a client is told to wait before trying again, when the queue is full or timed out.
RETRY_AFTER = 10


class Held:
    """One request waiting for its model's instance to start or wake."""

    __slots__ = (
        "body",
        "client",
        "done",
        "holding",
        "model",
        "replicas",
        "req",
        "scanner",
        "since",
        "upstream",
    )

    def __init__(
        self,
        holding: Holding,
        client: ClientConn,
        req: RequestHead,
        body: Body,
        scanner: ModelScanner | None,
        model: str,
        replicas: Replicas,
    ) -> None:
        self.holding = holding
        self.client = client
        self.req = req
        self.body = body
        self.scanner = scanner
        self.model = model
        self.replicas = replicas
        self.since = time.monotonic()
        self.done = False
        self.upstream = None  # what ClientConn's flow control looks at: nothing yet

    # ---- from the client connection (the Exchange interface) ------------------------------
    def client_gone(self) -> None:
        if self.done:
            return
        self.done = True
        self.holding.remove(self)
        self.holding.gateway.metrics.error(self.model, "", "client_disconnected")

    def check_timeout(self, now: float) -> None:
        if self.done:
            return
        timeout = self.holding.gateway.config.queue_timeout
        if now - self.since >= timeout:
            why = self.holding.why(self.replicas)
            self.fail(
                f"model {self.model!r} did not become ready within {timeout:g}s "
                f"(queue_timeout): {why}",
                "queue_timeout",
            )

    # ---- from the queue --------------------------------------------------------------------
    def release(self, ready_seen: float) -> None:
        """Its model has a running instance (the gateway learned it at ``ready_seen``,
        perf_counter): route it now (held again if it lost the race)."""
        from pipeline.gateway.exchange import Exchange, forward

        self.done = True
        client = self.client
        client.exchange = None
        self.holding.gateway.metrics.held_for(self.model, time.monotonic() - self.since)
        forward(client, self.req, self.body, self.scanner)
        exchange = client.exchange
        if exchange is None:
            client.exchange_done()  # answered at once: on to its next request
        elif isinstance(exchange, Exchange):
            if exchange.sent_at:  # sent at once, on a kept-alive connection
                seconds = time.perf_counter() - ready_seen
                self.holding.gateway.metrics.held_dispatch.observe(seconds)
            else:
                exchange.ready_seen = ready_seen

    def fail(self, message: str, kind: str, retry_after: int | None = RETRY_AFTER) -> None:
        self.done = True
        self.holding.remove(self)
        client = self.client
        client.exchange = None
        instance = self.replicas.names[0] if len(self.replicas.names) == 1 else ""
        client.respond(
            503,
            error_body(self.req.path, 503, message),
            retry_after=retry_after,
            model=self.model,
            instance=instance,
        )
        self.holding.gateway.metrics.error(self.model, instance, kind)
        client.exchange_done()


class Holding:
    """Every model's queue of held requests, and the bookkeeping the supervisor is told."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.queues: dict[Replicas, dict[Held, None]] = {}
        self.asked: dict[Replicas, float] = {}

    def can_hold(self, replicas: Replicas) -> bool:
        """Whether a request for these instances may wait: they are all managed, the
        supervisor can be asked, and not all of them have given up."""
        gateway = self.gateway
        if not gateway.config.control_socket:
            return False
        ups = gateway.upstreams
        if not all(ups[name].managed for name in replicas.names):
            return False
        states = gateway.states
        return any(states.status(name).state not in GIVEN_UP for name in replicas.names)

    def hold(
        self,
        client: ClientConn,
        req: RequestHead,
        body: Body,
        scanner: ModelScanner | None,
        model: str,
        replicas: Replicas,
    ) -> None:
        queue = self.queues.setdefault(replicas, {})
        limit = self.gateway.config.max_queued
        if len(queue) >= limit:
            message = (
                f"model {model!r} is starting and {len(queue)} requests already wait for it "
                f"(max_queued {limit}); retry later"
            )
            instance = replicas.names[0] if len(replicas.names) == 1 else ""
            client.respond(
                503,
                error_body(req.path, 503, message),
                retry_after=RETRY_AFTER,
                model=model,
                instance=instance,
            )
            self.gateway.metrics.error(model, instance, "queue_full")
            return
        held = Held(self, client, req, body, scanner, model, replicas)
        queue[held] = None
        client.exchange = held  # type: ignore[assignment]  # the same interface
        if len(queue) == 1:
            self.want(replicas)
        self._noted(replicas)

    def want(self, replicas: Replicas) -> None:
        """Ask the supervisor to start or wake these instances (the first put away, or all
        of them while none is on its way: it starts what its budget allows)."""
        self.asked[replicas] = time.monotonic()
        control = self.gateway.control
        if control is None:
            return
        for name in replicas.names:
            control.send({"op": "want", "instance": name})

    def remove(self, held: Held) -> None:
        queue = self.queues.get(held.replicas)
        if queue is not None and held in queue:
            del queue[held]
            self._noted(held.replicas)

    def queued(self, name: str) -> int:
        return sum(len(q) for r, q in self.queues.items() if name in r.names)

    def _noted(self, replicas: Replicas) -> None:
        control = self.gateway.control
        if control is not None:
            for name in replicas.names:
                control.note(name)

    def why(self, replicas: Replicas) -> str:
        states = self.gateway.states
        return "; ".join(unavailable(n, states.status(n))[0] for n in replicas.names)

    def kick(self) -> None:
        """After the states changed: send out what can go, answer what cannot."""
        gateway = self.gateway
        now = time.monotonic()
        for replicas, queue in list(self.queues.items()):
            if not queue:
                continue
            if replicas.pick(gateway) is not None:
                ready_seen = time.perf_counter()
                for held in list(queue):
                    del queue[held]
                    held.release(ready_seen)
                self._noted(replicas)
                continue
            statuses = [gateway.states.status(n) for n in replicas.names]
            if all(s.state in GIVEN_UP for s in statuses):
                why = self.why(replicas)
                for held in list(queue):
                    held.fail(f"model {held.model!r} is unavailable: {why}", "start_failed", None)
            elif now - self.asked.get(replicas, 0.0) >= REWANT_SECONDS:
                self.want(replicas)

    def fail_all(self, message: str) -> None:
        """The gateway stops: every held request gets its answer."""
        for queue in list(self.queues.values()):
            for held in list(queue):
                held.fail(message, "gateway_stopping", None)
