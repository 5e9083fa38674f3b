"""Serve state on disk: what the supervisor runs, for ``doit status``, ``stop`` and ``logs``.

One JSON file (``state.json``) written atomically by the supervising process only; any shell
reads it. Process identity is (pid, start time from ``/proc``) so a recycled pid after a reboot
or a long uptime is never mistaken for one of ours.

Reading is total: :meth:`ServeState.from_json` checks every field of every record; a bad one
falls back to its default and is named in :attr:`ServeState.problems` (one line: which record,
which field), and the rest of the file stays usable. Only a file that is not a JSON object at
all raises (:class:`UnreadableState`). A running supervisor rewrites a file that was deleted
or damaged within a tick, and its pid stays findable through ``supervisor.lock`` meanwhile
(:meth:`StateStore.lock_owner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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


class UnreadableState(ServeError):
    """``state.json`` is not a JSON object at all (empty, truncated, overwritten)."""


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
    # A member of a multi-node instance: this node's rank (None: a one-node instance), the
    # gang's generation its member runs, what the leader last heard from each follower
    # ({"rank", "state", "generation", "seen"}), and the first failure of the gang.
    node_rank: int | None = None
    nodes: int = 1
    generation: int = 0
    members: list[dict] = field(default_factory=list)
    first_failure: str | None = None


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
    node_rank: int = 0


@dataclass
class ServeState:
    """``state.json``. Plain dataclasses (not pydantic): `doit status` reads this file and
    must start fast; unknown keys are ignored so older and newer files still read."""

    supervisor: SupervisorRecord
    instances: dict[str, InstanceRecord]
    version: int = STATE_VERSION
    updated_at: float = 0.0

    # What the reader had to repair (never written): one line per bad record or field.
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        del data["problems"]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ServeState:
        """Parse ``state.json``. Total for any JSON object: every field is checked, a bad one
        takes its default and is named in ``problems``, a bad record is left out or mended.
        Raises ValueError (naming why) only when ``text`` is not a JSON object."""
        if not text.strip():
            raise ValueError("the file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            raise ValueError(f"not JSON ({exc.msg}, {where})") from None
        except RecursionError:
            raise ValueError("not JSON (nested too deeply)") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {_type_name(data)}")
        problems: list[str] = []
        raw_sup = data.get("supervisor")
        if not isinstance(raw_sup, dict):
            problems.append(f"supervisor: not a record ({_type_name(raw_sup)}); pid unknown")
            raw_sup = {}
        sup_fields = _checked(SupervisorRecord, raw_sup, "supervisor", problems)
        if "pid" not in raw_sup and raw_sup:
            problems.append("supervisor: pid: missing; pid unknown")
        sup_fields.setdefault("pid", 0)
        for name, default in _SUPERVISOR_REQUIRED.items():
            sup_fields.setdefault(name, default)
        supervisor = SupervisorRecord(**sup_fields)
        raw_instances = data.get("instances", {})
        if not isinstance(raw_instances, dict):
            problems.append(f"instances: not a table ({_type_name(raw_instances)}); none read")
            raw_instances = {}
        instances = {}
        for name, raw in raw_instances.items():
            rec = parse_instance(name, raw, problems)
            if rec is not None:
                instances[name] = rec
        version, updated_at = data.get("version", STATE_VERSION), data.get("updated_at", 0.0)
        return cls(
            supervisor=supervisor,
            instances=instances,
            version=version if _is_int(version) else STATE_VERSION,
            updated_at=float(updated_at) if _is_number(updated_at) else 0.0,
            problems=problems,
        )


def _type_name(value: object) -> str:
    return {dict: "a table", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Above these a value cannot be what it names (PID_MAX_LIMIT; a TCP port).
_UPPER = {"pid": 1 << 22, "pgid": 1 << 22, "port": 65535}


_STATES = frozenset(s.value for s in InstanceState)
# Each field type of the records (as annotated) -> (is the value one, what it must be).
_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "int | None": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "float": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "float | None": (lambda v: v is None or _is_number(v), "a number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list[int]": (
        lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
        "a list of integers >= 0",
    ),
    "list[str]": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "a list of strings",
    ),
    "list[dict]": (
        lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        "a list of tables",
    ),
}
_SUPERVISOR_REQUIRED: dict[str, Any] = {
    "proc_start": None,
    "session": "",
    "mode": "unknown",
    "source": "unknown",
    "started_at": 0.0,
}


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(cls: type, raw: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """The fields of ``raw`` that ``cls`` knows and whose values are valid; a bad one is named
    in ``problems`` and left out (the dataclass default applies). Unknown keys are ignored, so
    older and newer files still read."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw or f.name == "problems":
            continue
        value = raw[f.name]
        check, expected = _CHECKS[str(f.type)]
        upper = _UPPER.get(f.name)
        if upper is not None:
            expected = f"{expected.removesuffix(' or null')} up to {upper}"
        if not check(value) or (upper is not None and value is not None and value > upper):
            problems.append(f"{where}: {f.name}: {_short(value)} is not {expected}; ignored")
            continue
        if str(f.type).startswith("float") and value is not None:
            value = float(value)
        out[f.name] = value
    return out


def parse_instance(name: str, raw: object, problems: list[str]) -> InstanceRecord | None:
    """One instance record of ``state.json``, checked field by field (see :func:`_checked`);
    None (and a line in ``problems``) when it is not a record at all. Pure.

    A bad ``state`` cannot simply take a default: it becomes ``starting`` when a pid is
    recorded (``status`` then tells by the process whether it lives, ``stop`` signals its
    group), else ``exited``.
    """
    where = f"instance {name!r}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: not a record ({_type_name(raw)}); left out")
        return None
    state = raw.get("state", InstanceState.PENDING.value)
    rest = {k: v for k, v in raw.items() if k != "state"}
    fields = _checked(InstanceRecord, rest, where, problems)
    fields["name"] = name  # the table's key is the name the supervisor uses
    if state in _STATES:
        fields["state"] = InstanceState(state)
    else:
        fields["state"] = InstanceState.STARTING if fields.get("pid") else InstanceState.EXITED
        problems.append(
            f"{where}: state: {_short(state)} is not a state; taken as {fields['state']}"
        )
    return InstanceRecord(**fields)


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
        """The last state written (bad fields mended and named in its ``problems``), or None
        when there is no file. Raises :class:`UnreadableState` when the file is not a JSON
        object, ServeError when it cannot be read at all."""
        try:
            raw = self.state_file.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServeError(
                f"{self.state_file}: cannot read serve state ({exc.strerror or exc})"
            ) from None
        try:
            return ServeState.from_json(raw)
        except ValueError as exc:
            raise UnreadableState(f"{self.state_file}: unreadable serve state: {exc}") from None

    def write(self, state: ServeState) -> None:
        """Atomically replace ``state.json`` (readers never see a half-written file)."""
        state.updated_at = time.time()
        atomic_write_text(self.state_file, state.to_json())

    def signature(self) -> tuple[int, int, int] | None:
        """(inode, mtime, size) of ``state.json``, None when it is missing: what a writer
        compares to see that someone deleted or replaced its file."""
        try:
            st = self.state_file.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def set_lock_owner(self) -> None:
        """Write this process's pid and start time into ``supervisor.lock`` (called by the
        supervisor once it holds the lock): the supervisor stays findable while its state
        file is missing or damaged."""
        pid = os.getpid()
        with contextlib.suppress(OSError):
            self.lock_file.write_text(f"{pid} {proc_start_time(pid) or 0}\n", encoding="ascii")

    def lock_owner(self) -> int | None:
        """The pid of the live supervisor holding ``supervisor.lock``, else None. Never
        raises; takes the lock for an instant when it is free (and creates no file)."""
        import fcntl

        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                return None  # nobody holds it
            parts = os.pread(fd, 64, 0).split()
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            pid, start = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            return None
        # A `doit stop` or `doit serve` holding the lock for a moment is no supervisor.
        return pid if process_alive(pid, start or None) else None

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
