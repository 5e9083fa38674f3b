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

STATE_VERSION = 1


class InstanceState(StrEnum):
    """Every state an instance can be in; transitions live in supervisor.Supervisor."""

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
        return self in (InstanceState.STOPPED, InstanceState.EXITED, InstanceState.FAILED)

    @property
    def settled(self) -> bool:
        """Nothing more will happen without a crash or a request: ready or terminal."""
        return self is InstanceState.RUNNING or self.terminal


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
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
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

    # --- stop requests: a file per instance, picked up by the supervisor's loop ------------
    def request_stop(self, names: list[str] | None) -> None:
        self.ensure()
        for name in names or ["*all*"]:
            (self.requests_dir / f"stop-{name}").touch()

    def take_requests(self) -> list[str]:
        """Names asked to stop since the last call (``*all*`` for everything); removes them."""
        taken = []
        try:
            entries = list(os.scandir(self.requests_dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith("stop-"):
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.path).unlink()
                    taken.append(entry.name.removeprefix("stop-"))
        return sorted(taken)

    def clear_requests(self) -> None:
        self.take_requests()


@contextlib.contextmanager
def held_lock(path: Path, *, wait: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when another process holds it.

    The lock dies with its holder, so a SIGKILLed supervisor never leaves it stale.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        os.close(fd)


def supervisor_alive(state: ServeState | None) -> bool:
    return bool(
        state
        and not state.supervisor.exited
        and process_alive(state.supervisor.pid, state.supervisor.proc_start)
    )
