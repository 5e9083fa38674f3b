"""The gateway: a pass-through HTTP/1.1 reverse proxy on asyncio protocols.

One :class:`Gateway` owns the listening socket, the routing table, a pool of keep-alive
connections per instance, the :class:`~pipeline.gateway.states.StateFollower` and the metrics.
Each client connection is a :class:`~pipeline.gateway.client.ClientConn`; each proxied request
an :class:`~pipeline.gateway.exchange.Exchange` between it and one
:class:`~pipeline.gateway.upstream.UpstreamConn`.

Where the rest lives: :mod:`~pipeline.gateway.client` (the client protocol; routing, auth and
limits decided on a request's head; flow control), :mod:`~pipeline.gateway.exchange` (one
proxied request: resends to another replica, what passes through and what changes, the races
with the peers), :mod:`~pipeline.gateway.upstream` (the pools, the choice among replicas, the
connection to an instance), :mod:`~pipeline.gateway.endpoints` (``/health``, ``/v1/models``,
``/metrics``, error bodies, status lines), :mod:`~pipeline.gateway.conn` (the read buffer
every connection shares), :mod:`~pipeline.gateway.hold` (requests held while an on-demand model
starts or wakes) and :mod:`~pipeline.gateway.control` (the supervisor's control channel).
Imports go one way: this module, then control, client, exchange, hold, upstream, endpoints,
conn (hold imports exchange's ``forward`` inside a function, for the one way back).

Everything runs on one event loop thread; callbacks never block.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.gateway.client import CLIENT_IDLE, HEALTH_RESERVE, ClientConn
from pipeline.gateway.config import GatewayConfig, Upstream
from pipeline.gateway.control import ControlLink
from pipeline.gateway.hold import Holding
from pipeline.gateway.metrics import Metrics
from pipeline.gateway.states import InstanceStatus, StateFollower
from pipeline.gateway.upstream import MAX_IDLE_PER_INSTANCE, Pool, Replicas

if TYPE_CHECKING:
    from pipeline.gateway.exchange import Exchange

# File descriptors kept free for the listening socket, logs and the state file.
SPARE_FDS = 64
HOUSEKEEPING = 1.0
DRAIN_SECONDS = 5.0


class Gateway:
    """The listening socket, the routing table (model name -> :class:`Replicas`), the pools and
    the bookkeeping (states, metrics, requests in flight) for every connection of one process."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        say: Callable[[str], None] | None = None,
        state_interval: float = 0.02,
    ) -> None:
        self.config = config
        self.say = say or _stderr
        self.header_timeout = config.header_timeout
        self.body_timeout = config.body_timeout
        self.max_body = config.max_body
        self.max_connections = config.max_connections
        self.keys = tuple(k.encode() for k in config.keys)
        self.pools = {up.name: Pool(self, up) for up in config.instances}
        # model name -> its group; names served by the same instances share one group
        groups: dict[tuple[str, ...], Replicas] = {}
        self.routes: dict[bytes, Replicas] = {}
        for model, ups in config.routes().items():
            names = tuple(up.name for up in ups)
            group = groups.get(names)
            if group is None:
                group = groups[names] = Replicas(tuple(self.pools[n] for n in names))
            self.routes[model.encode()] = group
        self.route_names = {m.decode(): g.names for m, g in self.routes.items()}
        # A body without "model" goes to the one group when there is only one.
        self.only_group = next(iter(groups.values())) if len(groups) == 1 else None
        self.auth_lines = {
            up.name: (f"authorization: Bearer {up.key}\r\n".encode() if up.key else b"")
            for up in config.instances
        }
        self.host_lines = {
            up.name: f"host: {up.host}:{up.port}\r\n".encode() for up in config.instances
        }
        self.states = StateFollower(
            config.state_file,
            [up.name for up in config.instances],
            min_interval=state_interval,
            say=self.say,
        )
        self.metrics = Metrics()
        self.clients: set[ClientConn] = set()
        # Idle keep-alive connections, oldest first: [0] none of whose requests had a key,
        # [1] the others. At the cap, one of them is closed for a new connection.
        self.idle: tuple[dict[ClientConn, None], dict[ClientConn, None]] = ({}, {})
        # How long a connection without a keyed request may idle: no longer than a head.
        self.open_idle = min(CLIENT_IDLE, self.header_timeout)
        self.inflight: dict[str, int] = dict.fromkeys(self.pools, 0)
        # The model pool: held requests, the supervisor's control channel (when an instance
        # is managed), and the instances released to it (name -> their ready_at then): routed
        # nothing until they are running again after being put away.
        self.upstreams = {up.name: up for up in config.instances}
        self.holding = Holding(self)
        self.released: dict[str, float | None] = {}
        self.control: ControlLink | None = None
        if config.control_socket and any(up.managed for up in config.instances):
            self.control = ControlLink(self, config.control_socket)
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.access_log = config.access_log

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen. Raises OSError when the address cannot be bound."""
        self._fit_connections()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConn(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
        )
        self.states.refresh(force=True)
        self.spawn(self._housekeeping())
        if self.control is not None:
            self.spawn(self.control.run())

    def _fit_connections(self) -> None:
        """Raise the open-files limit as far as allowed, and keep the cap under it: each
        proxied client holds two descriptors (its own and its instance's)."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 2 * (self.max_connections + HEALTH_RESERVE) + SPARE_FDS
            want += MAX_IDLE_PER_INSTANCE * len(self.pools)
            if soft != resource.RLIM_INFINITY and soft < want:
                soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (OSError, ValueError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        spare = soft - SPARE_FDS - MAX_IDLE_PER_INSTANCE * len(self.pools)
        fits = max(1, spare // 2 - HEALTH_RESERVE)
        if fits < self.max_connections:
            self.say(
                f"max_connections {self.max_connections} does not fit the open-files limit "
                f"({soft}; raise it with `ulimit -n` or docker's --ulimit nofile): using {fits}"
            )
            self.max_connections = fits

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _housekeeping(self) -> None:
        """Follow the state file, drop stale connections and clients past their deadline,
        answer 504 for requests whose instance sent no response head within upstream_timeout.

        Runs until cancelled, at least once a second and four times per shortest timeout."""
        upstream_timeout = self.config.upstream_timeout
        interval = min(
            HOUSEKEEPING, self.header_timeout / 4, self.body_timeout / 4, upstream_timeout / 4
        )
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.states.refresh(force=True)
            self.forget_released()
            self.holding.kick()
            for pool in self.pools.values():
                pool.sweep(now)
            for conn in list(self.clients):
                if conn.exchange is not None:
                    conn.exchange.check_timeout(now)
                    continue
                if conn.transport is None:
                    continue
                if conn.deadline and now > conn.deadline:
                    conn.timed_out()

    def evict_idle(self) -> bool:
        """Close the idle keep-alive connection idle longest, one without a keyed request
        first, to make room for a new one. False when none is idle."""
        for parked in self.idle:
            if parked:
                next(iter(parked)).evict()
                return True
        return False

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting, close idle connections, wait (bounded) for requests in flight."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        self.holding.fail_all("the gateway is stopping (`doit stop`); the request was not sent")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn in list(self.clients):
                if conn.exchange is None and conn.transport is not None:
                    conn.closing = True
                    conn.transport.close()
            if not any(c.exchange is not None for c in self.clients):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.clients):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in self.pools.values():
            for conn in pool.idle:
                if conn.transport is not None:
                    conn.transport.close()
        for task in list(self.tasks):
            task.cancel()

    # ---- requests' bookkeeping --------------------------------------------------------------
    def count(self, name: str, delta: int) -> None:
        """One more (or fewer) request in flight to instance ``name``; a managed instance's
        count goes to the supervisor (it drives idleness)."""
        self.inflight[name] += delta
        if self.control is not None and self.upstreams[name].managed:
            self.control.note(name)

    def routable(self, name: str, status: InstanceStatus | None = None) -> bool:
        """Whether instance ``name`` (whose ``status`` the caller may have read) takes requests:
        running, and not released to be put away."""
        if status is None:
            status = self.states.status(name)
        if not status.ready:
            return False
        released = self.released
        return not released or name not in released or released[name] != status.ready_at

    def warm(self, name: str) -> None:
        """Open, in the background, one connection to instance ``name`` per request held for
        it (beyond its idle ones): sent out the moment it is ready, no connect in between."""
        pool = self.pools[name]
        want = min(self.holding.queued(name), MAX_IDLE_PER_INSTANCE) - len(pool.idle)
        for _ in range(max(0, want)):
            self.spawn(self._warm_one(pool))

    async def _warm_one(self, pool: Pool) -> None:
        try:
            conn = await pool.connect()
        except (OSError, TimeoutError):
            return  # the request will connect itself
        pool.release(conn)

    def forget_released(self) -> None:
        """Releases that are over: the instance left running (or came back) since."""
        for name, ready_at in list(self.released.items()):
            status = self.states.status(name)
            if not status.ready or status.ready_at != ready_at:
                del self.released[name]

    def request_head(self, up: Upstream, line: bytes, headers: bytes) -> bytes:
        """The head for instance ``up``: its ``host`` and its own key (or none)."""
        return b"".join(
            (line, self.host_lines[up.name], headers, self.auth_lines[up.name], b"\r\n")
        )

    def finished(self, ex: Exchange) -> None:
        """Bookkeeping once an exchange has its outcome (exactly once per exchange)."""
        name = ex.instance
        self.count(name, -1)
        now = time.perf_counter()
        total = now - ex.started
        first = ex.first_byte - ex.started if ex.first_byte is not None else None
        self.metrics.request(ex.model, name, ex.status)
        self.metrics.timing(ex.model, name, total, first, ex.body_pieces)
        if self.access_log:
            first_ms = f"{first * 1000:.1f}ms" if first is not None else "-"
            self.say(
                f'{ex.client.peer.decode()} "POST {ex.path.decode("utf-8", "replace")}" '
                f"model={ex.model} instance={name} {ex.status} {total * 1000:.1f}ms "
                f"first={first_ms} pieces={ex.body_pieces}"
            )


def _stderr(line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} gateway: {line}", file=sys.stderr, flush=True)


async def serve(config: GatewayConfig, *, say: Callable[[str], None] | None = None) -> int:
    """Run the gateway until SIGTERM or SIGINT; then drain (bounded) and return 0.

    Returns 1 when the address cannot be bound (the supervisor's restart policy applies).
    """
    gateway = Gateway(config, say=say)
    say = gateway.say
    try:
        await gateway.start()
    except OSError as exc:
        say(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = len(config.routes())
    auth = f"{len(config.keys)} key(s)" if config.keys else "none (no api_keys configured)"
    follow = config.state_file or "none (every instance counts as running)"
    loop_name = type(loop).__module__.split(".")[0]
    say(
        f"listening on {config.host}:{config.port} (pid {os.getpid()}, {loop_name} loop): "
        f"{models} model name(s) on {len(config.instances)} instance(s); auth: {auth}; "
        f"state: {follow}"
    )
    await stop.wait()
    say(f"stopping: draining requests in flight (at most {DRAIN_SECONDS:g}s)")
    await gateway.drain()
    say("stopped")
    return 0
