"""Serve state on disk: what the supervisor runs, for ``doit status``, ``stop`` and ``logs``.

One JSON file (``state.json``) written atomically by the supervising process only; any shell
reads it. Process identity is (pid, start time from ``/proc``) so a recycled pid after a reboot
or a long uptime is never mistaken for one of ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.errors import ServeError
from pipeline.fsutil import atomic_write_text
from pipeline.procs import proc_stat_fields

STATE_VERSION = 1


class InstanceState(StrEnum):
    """Every state an instance can be in; :data:`TRANSITIONS` lists the allowed edges, and
    :func:`enter` is the only place a record changes state."""

    PENDING = "pending"  # waiting for the instance it starts after
    STARTING = "starting"  # spawned, /health not yet 200
    RUNNING = "running"  # /health answered 200
    BACKOFF = "backoff"  # failed; restarts after a delay
    STOPPING = "stopping"  # SIGTERM sent to its process group
    STOPPED = "stopped"  # stopped on request
    EXITED = "exited"  # ended and the restart policy says leave it
    FAILED = "failed"  # gave up: restart limit reached or cannot start

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def settled(self) -> bool:
        """Nothing more will happen without a crash or a request: ready or terminal."""
        return self is InstanceState.RUNNING or self.terminal


# Named sets, in the manner of Supervisor/supervisor's states.py.
TERMINAL_STATES = frozenset({InstanceState.STOPPED, InstanceState.EXITED, InstanceState.FAILED})
# A process of the instance may exist: a stop must signal its group.
LIVE_STATES = frozenset({InstanceState.STARTING, InstanceState.RUNNING, InstanceState.STOPPING})
# Not yet (or no longer) spawned, not given up either: a stop needs no signal.
WAITING_STATES = frozenset({InstanceState.PENDING, InstanceState.BACKOFF})

# Every allowed edge. STOPPED is reachable from every non-terminal state: a stop request
# (PENDING, BACKOFF), a group that is gone (STOPPING), and the supervisor's exit or a
# `doit stop` without a supervisor (STARTING, RUNNING). A terminal instance goes back to
# PENDING only when `doit serve` asks for it again.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.PENDING: frozenset(
        {InstanceState.STARTING, InstanceState.STOPPED, InstanceState.FAILED}
    ),
    # Not EXITED: a start ends in EXITED only once a full stop is under way, and that stop
    # has moved every starting instance to STOPPING already.
    InstanceState.STARTING: frozenset(
        {
            InstanceState.RUNNING,
            InstanceState.BACKOFF,
            InstanceState.STOPPING,
            InstanceState.STOPPED,
            InstanceState.FAILED,
        }
    ),
    InstanceState.RUNNING: frozenset(
        {
            InstanceState.BACKOFF,
            InstanceState.STOPPING,
            InstanceState.STOPPED,
            InstanceState.EXITED,
            InstanceState.FAILED,
        }
    ),
    InstanceState.BACKOFF: frozenset(
        {InstanceState.STARTING, InstanceState.STOPPED, InstanceState.FAILED}
    ),
    InstanceState.STOPPING: frozenset({InstanceState.STOPPED}),
    InstanceState.STOPPED: frozenset({InstanceState.PENDING}),
    InstanceState.EXITED: frozenset({InstanceState.PENDING}),
    InstanceState.FAILED: frozenset({InstanceState.PENDING}),
}


class IllegalTransition(AssertionError):
    """An edge that :data:`TRANSITIONS` does not allow: a bug in the caller, never a user's
    doing (like supervisor's ``_assertInState``), so not a PipelineError."""


@dataclass
class InstanceRecord:
    """One instance (or the gateway) as the supervisor last wrote it."""

    name: str
    kind: str = "vllm"  # or "gateway"
    state: InstanceState = InstanceState.PENDING
    pid: int | None = None
    pgid: int | None = None
    proc_start: int | None = None
    host: str = ""
    port: int = 0
    base_url: str = ""
    health_url: str = ""
    gpu_ids: list[int] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)
    log_file: str = ""
    restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    last_exit: str | None = None
    reason: str | None = None
    stop_grace: float = 30.0


def enter(record: InstanceRecord, state: InstanceState, reason: str | None) -> InstanceState:
    """Move ``record`` to ``state`` with ``reason``; returns the state it left.

    Raises :class:`IllegalTransition` for an edge not in :data:`TRANSITIONS` (the record is
    then unchanged). Entering the state it is already in is such an edge too: callers decide
    first whether anything changes.
    """
    before = record.state
    if state not in TRANSITIONS[before]:
        raise IllegalTransition(f"instance {record.name}: {before} -> {state} is not allowed")
    record.state = state
    record.reason = reason
    return before


@dataclass
class SupervisorRecord:
    """The supervising process: who it is, what it runs, whether it is done."""

    pid: int
    proc_start: int | None
    session: str
    mode: str
    source: str
    started_at: float
    runtime: str = ""
    plan_digest: str = ""
    settled: bool = False
    exited: bool = False
    exit_code: int | None = None


@dataclass
class ServeState:
    """``state.json``. Plain dataclasses (not pydantic): `doit status` reads this file and
    must start fast; unknown keys are ignored so older and newer files still read."""

    supervisor: SupervisorRecord
    instances: dict[str, InstanceRecord]
    version: int = STATE_VERSION
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ServeState:
        """Parse ``state.json``; ValueError (or KeyError/TypeError) when it is not one."""
        data = json.loads(text)
        instances = {}
        for name, raw in data["instances"].items():
            rec = InstanceRecord(**_known(InstanceRecord, raw))
            rec.state = InstanceState(rec.state)
            instances[name] = rec
        return cls(
            supervisor=SupervisorRecord(**_known(SupervisorRecord, data["supervisor"])),
            instances=instances,
            version=int(data.get("version", STATE_VERSION)),
            updated_at=float(data.get("updated_at", 0.0)),
        )


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from ``/proc/<pid>/stat``."""
    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it does not exist."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int | None, proc_start: int | None) -> bool:
    """True when ``pid`` runs (not a zombie) and has the start time we recorded."""
    stat = _proc_stat(pid) if pid else None
    if stat is None or stat[0] == "Z":
        return False
    return proc_start is None or stat[1] == proc_start


class StateStore:
    """The serve state directory: ``state.json``, the supervisor lock, stop requests, log."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def requests_dir(self) -> Path:
        return self.root / "requests"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def ensure(self) -> None:
        try:
            self.requests_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServeError(
                f"serve state dir {self.root}: cannot create it ({exc.strerror}); "
                "set PIPELINE_STATE_DIR or AUTO_INFER_VLLM_STATE_DIR to a writable place"
            ) from None

    def read(self) -> ServeState | None:
        """The last state written, or None when nothing was ever served here."""
        try:
            raw = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServeError(f"{self.state_file}: cannot read serve state: {exc}") from None
        try:
            return ServeState.from_json(raw)
        except (ValueError, KeyError, TypeError):
            raise ServeError(
                f"{self.state_file}: unreadable serve state; stop the instances by hand and "
                "delete the file"
            ) from None

    def write(self, state: ServeState) -> None:
        """Atomically replace ``state.json`` (readers never see a half-written file)."""
        state.updated_at = time.time()
        atomic_write_text(self.state_file, state.to_json())

    @property
    def start_lock_file(self) -> Path:
        """Held by `doit serve` from its "is one running?" check until its supervisor has
        reported, so two at once run one after the other."""
        return self.root / "serve.lock"

    # --- requests: a file per instance and kind, picked up by the supervisor's loop --------
    def request_stop(self, names: list[str] | None) -> None:
        self.ensure()
        for name in names or ["*all*"]:
            (self.requests_dir / f"stop-{name}").touch()

    def request_start(self, names: list[str]) -> list[Path]:
        """Ask the supervisor to start ``names`` again; returns the request files, which it
        removes only after the state file shows what it did with them."""
        self.ensure()
        paths = [self.requests_dir / f"start-{name}" for name in names]
        for path in paths:
            path.touch()
        return paths

    def take_requests(self) -> Requests:
        """The pending requests; they stay on disk until :meth:`done` removes them."""
        stops: list[str] = []
        starts: list[str] = []
        paths: list[Path] = []
        try:
            entries = list(os.scandir(self.requests_dir))
        except FileNotFoundError:
            return Requests()
        for entry in entries:
            kind, _, name = entry.name.partition("-")
            if kind in ("stop", "start") and name:
                (stops if kind == "stop" else starts).append(name)
                paths.append(Path(entry.path))
        return Requests(tuple(sorted(stops)), tuple(sorted(starts)), tuple(paths))

    def done(self, requests: Requests) -> None:
        for path in requests.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def clear_requests(self) -> None:
        self.done(self.take_requests())


@dataclass(frozen=True)
class Requests:
    """Requests read from the requests dir: names to stop (``*all*``: all), names to start."""

    stop: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    paths: tuple[Path, ...] = ()


# Descriptors of the locks this process holds: a forked daemon closes its copies
# (:func:`close_inherited_locks`), or it would keep holding them after its parent let go.
_HELD_FDS: set[int] = set()


@contextlib.contextmanager
def held_lock(path: Path, *, wait: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when another process holds it.

    The lock dies with its holder, so a SIGKILLed supervisor never leaves it stale.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _HELD_FDS.add(fd)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
                continue
            yield True
            return
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)


def close_inherited_locks() -> None:
    """In a freshly forked child: drop the copies of the parent's lock descriptors (closing
    them, never unlocking: LOCK_UN would release the parent's lock too)."""
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


def supervisor_alive(state: ServeState | None) -> bool:
    return bool(
        state
        and not state.supervisor.exited
        and process_alive(state.supervisor.pid, state.supervisor.proc_start)
    )
