"""The gateway's end of the supervisor's control channel (the protocol is described in
:mod:`pipeline.serve.control`): a Unix socket connection, made again whenever it drops.

The gateway tells the supervisor what only it knows (the requests in flight to each instance and
held for it, and which instances a held request wants) and answers its ``release`` questions:
an instance with nothing in flight or held is *released* (routed nothing more) until it has
been put away and is running again, so no request is ever cut by a sleep or a stop. The
supervisor tells the gateway when its state file changed, so a held request goes out the
moment its instance is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.gateway.proxy import Gateway

RECONNECT = (0.05, 1.0)


class ControlLink:
    """One connection to the supervisor at ``path``; :meth:`run` keeps it up."""

    def __init__(self, gateway: Gateway, path: str) -> None:
        self.gateway = gateway
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        self._dirty: set[str] = set()
        self._flushing = False

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def run(self) -> None:
        delay = RECONNECT[0]
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT[1])
                continue
            delay = RECONNECT[0]
            self.writer = writer
            self._connected()
            try:
                while line := await reader.readline():
                    self._handle(line)
            except (OSError, ValueError):
                pass
            finally:
                self.writer = None
                # The supervisor forgets its questions when we go: so do we.
                self.gateway.released.clear()
                with contextlib.suppress(OSError):
                    writer.close()
            await asyncio.sleep(RECONNECT[0])

    def _connected(self) -> None:
        gateway = self.gateway
        gateway.say(f"control channel to the supervisor up ({self.path})")
        for up in gateway.config.instances:
            if up.managed:
                self.note(up.name)
        gateway.states.refresh(force=True)
        gateway.holding.kick()
        for replicas, queue in gateway.holding.queues.items():
            if queue:
                gateway.holding.want(replicas)

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        gateway = self.gateway
        op = message.get("op")
        name = message.get("instance")
        if op == "changed":
            gateway.states.refresh(force=True)
            gateway.forget_released()
            gateway.holding.kick()
        elif op == "running" and isinstance(name, str) and name in gateway.inflight:
            ready_at, at = message.get("ready_at"), message.get("at")
            if isinstance(ready_at, float) and isinstance(at, float):
                gateway.states.push_running(name, ready_at, at)
                gateway.forget_released()
                gateway.holding.kick()
        elif op == "healthy" and isinstance(name, str) and name in gateway.inflight:
            gateway.warm(name)
        elif op == "release" and isinstance(name, str) and name in gateway.inflight:
            ok = gateway.inflight[name] == 0 and gateway.holding.queued(name) == 0
            if ok:
                gateway.released[name] = gateway.states.status(name).ready_at
            self.send({"op": "released", "instance": name, "ok": ok})
        elif op == "keep" and isinstance(name, str):
            gateway.released.pop(name, None)

    def send(self, message: dict[str, object]) -> None:
        writer = self.writer
        if writer is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def note(self, name: str) -> None:
        """``name``'s requests in flight or held changed: tell the supervisor, once per turn
        of the event loop however many changed."""
        self._dirty.add(name)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        gateway = self.gateway
        dirty, self._dirty = self._dirty, set()
        for name in sorted(dirty):
            if name in gateway.inflight:
                self.send(
                    {
                        "op": "activity",
                        "instance": name,
                        "inflight": gateway.inflight[name],
                        "queued": gateway.holding.queued(name),
                    }
                )
