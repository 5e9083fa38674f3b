"""Serve state on disk: what the supervisor runs, for ``doit status``, ``stop`` and ``logs``.

One JSON file (``state.json``) written atomically by the supervising process only; any shell
reads it. Process identity is (pid, start time from ``/proc``) so a recycled pid after a reboot
or a long uptime is never mistaken for one of ours.

The record itself (states, transitions, records, their JSON form) is pure and lives in
:mod:`pipeline.serve.record`; reading it is total there. Here only a file that is not a JSON
object at all raises (:class:`UnreadableState`). A running supervisor rewrites a file that was
deleted or damaged within a tick, and its pid stays findable through ``supervisor.lock``
meanwhile (:meth:`StateStore.lock_owner`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ServeError
from pipeline.fsutil import Fingerprint, atomic_write_text
from pipeline.procs import proc_stat_fields
from pipeline.serve.record import ServeState


class UnreadableState(ServeError):
    """``state.json`` is not a JSON object at all (empty, truncated, overwritten)."""


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

    def write(self, state: ServeState) -> Fingerprint:
        """Atomically replace ``state.json`` (readers never see a half-written file); returns
        the written file's fingerprint, to compare :meth:`signature` with later."""
        state.updated_at = time.time()
        return atomic_write_text(self.state_file, state.to_json())

    def signature(self) -> Fingerprint | None:
        """The :class:`~pipeline.fsutil.Fingerprint` of ``state.json``, None when it is
        missing: what a writer compares to see that someone deleted or replaced its file."""
        return Fingerprint.read(self.state_file)

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
