"""The supervisor's control channel with the gateway: a Unix socket beside ``state.json``.

Only the supervisor and the gateway use it. The socket is created with mode 0600 in the state
dir (umask 077 while it is bound), and a peer whose uid (``SO_PEERCRED``) is not ours is
refused, so no other user, and nothing off this machine, can ask for a start or see a
request count.

Messages are JSON objects, one per line, both ways:

- gateway -> supervisor:
  ``{"op": "want", "instance": N}`` (a request is held for N: start or wake it);
  ``{"op": "activity", "instance": N, "inflight": I, "queued": Q}`` (the requests in flight
  to N and held for it, sent when either changes);
  ``{"op": "released", "instance": N, "ok": true|false}`` (the answer to ``release``).
- supervisor -> gateway:
  ``{"op": "release", "instance": N}``: may N be put away? The gateway answers ``ok`` only if
  it has no request in flight to N, and from then on routes nothing to N (it holds the
  requests for it) until N has left ``running``, or until ``{"op": "keep", "instance": N}``;
  ``{"op": "changed"}``: ``state.json`` was written (the gateway re-reads it at once rather
  than at its next housekeeping);
  ``{"op": "running", "instance": N, "ready_at": T, "at": W}``: N has just become ready (sent
  at once, before the state file that says so is written: held requests go out sooner);
  ``{"op": "healthy", "instance": N}``: N's server answers, and the supervisor's first request
  (or its wake) is under way: the gateway opens the connections its held requests will need.

The server runs in threads; :meth:`ControlServer.take` hands the messages to the supervisor's
loop, and :attr:`ControlServer.arrived` is set when one comes (the loop waits on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import struct
import threading
from pathlib import Path

# sun_path holds 108 bytes, the terminating NUL included.
MAX_PATH = 107
MAX_LINE = 64 * 1024
SEND_TIMEOUT = 1.0


class ControlError(OSError):
    """The control socket cannot be served (path too long, cannot bind)."""


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None: unknown)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Accepts the gateway's connections on ``path`` and queues what they send."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.arrived = threading.Event()
        self._queue: queue.SimpleQueue[dict[str, object]] = queue.SimpleQueue()
        self._peers: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False

    def start(self) -> None:
        """Bind and listen (mode 0600); raises ControlError with the reason."""
        raw = os.fsencode(self.path)
        if len(raw) > MAX_PATH:
            raise ControlError(
                f"the control socket's path {self.path} is {len(raw)} bytes, over the "
                f"{MAX_PATH} a Unix socket allows: use a shorter state dir "
                "(AUTO_INFER_VLLM_STATE_DIR)"
            )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)  # noqa: PTH101 - the socket, whatever umask did
        sock.listen(8)
        self._sock = sock
        threading.Thread(target=self._accept, name="control accept", daemon=True).start()

    def _accept(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if peer_uid(conn) not in (os.getuid(), None):
                conn.close()
                continue
            conn.settimeout(SEND_TIMEOUT)
            with self._lock:
                self._peers.append(conn)
            threading.Thread(
                target=self._read, args=(conn,), name="control read", daemon=True
            ).start()
            self._queue.put({"op": "connected"})
            self.arrived.set()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while not self._closed:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._take_line(line)
                if len(buf) > MAX_LINE:
                    break  # not our peer's protocol
        except OSError:
            pass
        finally:
            with self._lock:
                if conn in self._peers:
                    self._peers.remove(conn)
            conn.close()
            self._queue.put({"op": "disconnected"})
            self.arrived.set()

    def _take_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if isinstance(message, dict) and isinstance(message.get("op"), str):
            self._queue.put(message)
            self.arrived.set()

    def take(self) -> list[dict[str, object]]:
        """Every message received since the last call, in order."""
        self.arrived.clear()
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    @property
    def connected(self) -> bool:
        with self._lock:
            return bool(self._peers)

    def send(self, message: dict[str, object]) -> bool:
        """Send to every connected peer; a peer that does not take it within SEND_TIMEOUT is
        dropped. True when at least one peer got it."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        sent = False
        with self._lock:
            peers = list(self._peers)
        for conn in peers:
            try:
                conn.sendall(data)
                sent = True
            except OSError:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return sent

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        with self._lock:
            peers, self._peers = self._peers, []
        for conn in peers:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
