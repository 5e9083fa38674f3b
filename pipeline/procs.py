"""Child processes of the pipeline: one way to run them, logged and bounded, one way to ask a
tool a short question, one way to start a long-lived child, and one way to stop a process group.

Every child of a stage runs through :func:`run_logged`: its own session, its output appended
to a log file, a time limit; on a timeout or Ctrl-C its whole process group gets SIGTERM,
then SIGKILL after a grace (:func:`stop_group`, the one place that puts a group down), so
nothing it started outlives the stage. The last lines of its output are kept in memory too,
so a failure can say what the child said even when the log could not be written (a full
disk: the log usually lives on the filesystem the child just filled). A SIGKILLed stage cannot
clean up: its child then gets SIGKILL from the kernel (``PR_SET_PDEATHSIG``, Linux), so it
does not go on installing into a generation nobody will switch in.

A tool asked a question whose output is the answer (``nvidia-smi``, ``pixi --version``,
``ldd --version``) runs through :func:`query` instead: the same session and bounds, its small
output captured rather than logged. A child meant to outlive the call that starts it (a
server) starts through :func:`spawn_detached`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from pipeline import rattler_worker
from pipeline.errors import PipelineError
from pipeline.fsutil import os_error_text
from pipeline.rattler_worker import RattlerRequest
from pipeline.settings import package_pythonpath

KILL_GRACE = 5.0  # SIGTERM -> SIGKILL for a stage's child
KILL_WAIT = 10.0  # after SIGKILL: how long to wait for the group to vanish
DRAIN_GRACE = 2.0  # after the child exits: how long its output may still take to arrive
TAIL_BYTES = 16 * 1024  # the end of the output kept in memory
QUERY_TIMEOUT = 20.0  # a tool asked for its version or its devices
QUERY_LIMIT = 64 * 1024  # the output of a query kept, per stream
QUERY_KILL_GRACE = 1.0  # SIGTERM -> SIGKILL for a query that overran


# ---- process groups ---------------------------------------------------------------------------


def proc_stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:  # noqa: PTH123 (hot loop: no Path)
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(b")") + 2 :].split()


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` from ``/proc/<pid>/stat``, or None when it does not exist.

    ``R`` running, ``S``/``D`` sleeping (it will go on), ``T``/``t`` stopped (SIGSTOP, a
    debugger: it does nothing until continued), ``Z`` a zombie (it ended; its parent has not
    reaped it). For a waiter that must tell "slow" from "cannot make progress". Never raises.
    """
    fields = proc_stat_fields(pid)
    return fields[0].decode() if fields else None


def group_members(pgid: int) -> dict[int, str] | None:
    """pid -> state letter of every process in group ``pgid``, zombies included, from /proc.

    None when ``/proc`` is not this process's PID namespace (``unshare --pid`` without
    ``--mount-proc``): its pids would be another namespace's, so nothing can be told.
    """
    try:
        # Called every tick while a group is put down: plain os calls, no Path objects.
        if int(os.readlink("/proc/self")) != os.getpid():  # noqa: PTH115
            return None
        entries = os.listdir("/proc")  # noqa: PTH208
    except (OSError, ValueError):
        return None
    wanted = str(pgid).encode()
    members = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(entry)
        # Fields after the name: state, ppid, pgrp.
        if fields is not None and len(fields) > 2 and fields[2] == wanted:
            members[int(entry)] = fields[0].decode()
    return members


def group_alive(pgid: int | None) -> bool:
    """True while any process of the group ``pgid`` lives; zombies do not count.

    A zombie holds its group id until its parent reaps it, and a parent that never reaps
    (a shell or ``sleep`` as a container's PID 1) keeps it forever: counting zombies made a
    crashed instance wait in backoff for good and `doit stop` time out.
    """
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = group_members(pgid)
    if not members:
        # /proc cannot tell (another namespace's, or the group just went): trust the signal.
        return members is None
    return any(letter != "Z" for letter in members.values())


def signal_group(pgid: int | None, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is already gone."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_group(
    pgid: int,
    grace: float,
    *,
    leader: subprocess.Popen[bytes] | None = None,
    poll: float = 0.05,
    kill_wait: float = KILL_WAIT,
) -> bool:
    """SIGTERM the group ``pgid``, wait up to ``grace`` s for it to go, then SIGKILL it.

    Blocks until the group is gone, at most ``grace + kill_wait`` seconds. ``leader`` is the
    group's leader when it is this process's child: it is reaped on the way (its zombie would
    keep the group alive). Returns True when SIGKILL was needed. The supervisor's loop cannot
    block: it uses :func:`signal_group` and :func:`group_alive` tick by tick instead.
    """

    def gone() -> bool:
        # Zombies do not count as alive (group_alive), so a gone group may still hold the
        # leader's zombie: reap it then, which cannot block.
        if group_alive(pgid):
            return False
        _reap(leader, kill_wait)
        return True

    if not signal_group(pgid, signal.SIGTERM):
        _reap(leader, kill_wait)
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if gone():
            return False
        time.sleep(poll)
    if gone():
        return False
    with contextlib.suppress(PermissionError):
        signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait
    while not gone() and time.monotonic() < deadline:
        time.sleep(poll)
    _reap(leader, max(0.0, deadline - time.monotonic()))
    return True


def kill_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> bool:
    """:func:`stop_group` for ``proc``, a child started with ``start_new_session=True``."""
    with contextlib.suppress(PermissionError):
        return stop_group(proc.pid, grace, leader=proc)
    return False


def _reap(leader: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            leader.wait(timeout=timeout)


# ---- running a stage's child ------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()  # looked up once, here: the child after fork only calls it


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when ``parent`` (this process) dies,
    or None where the kernel cannot do that (not Linux).

    The death signal is armed in the child between fork and exec (it survives exec). Closing
    the race: when the parent died before it was armed, the child is already someone else's
    and kills itself at once. The signal follows the thread that forked, so the stages start
    their children from the main thread (doit runs actions there).
    """
    prctl = _PRCTL
    if prctl is None:
        return None

    def arm() -> None:  # runs in the child, between fork and exec: no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


class _Tee:
    """Copies a child's output from a pipe to the log file, keeping its end in memory.

    Why a pipe and not the log file alone (the rule elsewhere): on a full disk the log is
    empty, and the cause with it. The copy is bounded (:data:`TAIL_BYTES` of memory), the
    thread stops when the pipe closes or :meth:`close` is called, and a failed write to the
    log is remembered (:attr:`write_error`) while the output keeps being drained, so the
    child never blocks on a full pipe.
    """

    def __init__(self, read_fd: int, log: Path, out: int | None) -> None:
        self.read_fd = read_fd
        self.log = log
        self.out = out  # the log's descriptor; None when it could not be opened
        self.tail = bytearray()
        self.write_error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tee {log.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.read_fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.tail += chunk
            del self.tail[:-TAIL_BYTES]
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if self.out is None or self.write_error is not None:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.out, view) :]
        except OSError as exc:
            self.write_error = exc

    def close(self, wait: float) -> None:
        """Let the copy finish for up to ``wait`` s (a grandchild may hold the pipe), then
        stop it and close the pipe and the log. Idempotent."""
        self._thread.join(wait)
        self._stop.set()
        self._thread.join(1.0)
        with contextlib.suppress(OSError):
            os.close(self.read_fd)
        if self.out is not None:
            with contextlib.suppress(OSError):
                os.close(self.out)
            self.out = None

    def last_line(self) -> str:
        return last_line(self.tail.decode("utf-8", "replace"))

    def where(self) -> str:
        """The log for a message: its path, and why it is incomplete when it is."""
        if self.write_error is None:
            return str(self.log)
        return f"log incomplete: {os_error_text(self.write_error, self.log)}"


def run_logged(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    label: str,
    hint: str = "see the log",
    start_hint: str = "",
    error: type[PipelineError] = PipelineError,
) -> None:
    """Run ``argv`` with its output appended to ``log``; blocks up to ``timeout`` seconds.

    Raises ``error``, one line, on a non-zero exit or a timeout (``label``, the exit code or
    the limit, the child's last line of output, ``hint``, the log; the log's write error when
    it could not be written, such as ENOSPC) and on a command that cannot start (with
    ``start_hint``). Ctrl-C (or :class:`pipeline.reporting.Interrupted`: any exception) kills
    the group too and re-raises; a SIGKILL of this process kills the child
    (:func:`die_with_parent`).
    """
    try:
        out: int | None = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        out, open_error = None, exc
    else:
        open_error = None
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )
    except OSError as exc:
        for fd in (read_fd, write_fd, out):
            if fd is not None:
                os.close(fd)
        more = f"; {start_hint}" if start_hint else ""
        raise error(f"cannot run {label} ({os_error_text(exc, argv[0])}){more}") from None
    os.close(write_fd)
    tee = _Tee(read_fd, log, out)
    if open_error is not None:
        tee.write_error = open_error
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        tee.close(DRAIN_GRACE)
        raise error(
            f"{label} did not finish in {timeout:.0f} s and was stopped; last output: "
            f"{tee.last_line()}; {hint} ({tee.where()})"
        ) from None
    except BaseException:
        kill_group(proc)
        tee.close(DRAIN_GRACE)
        raise
    tee.close(DRAIN_GRACE)
    if code != 0:
        raise error(f"{label} failed (exit {code}): {tee.last_line()}; {hint} ({tee.where()})")


def query(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = QUERY_TIMEOUT,
    label: str | None = None,
    limit: int = QUERY_LIMIT,
    error: type[PipelineError] = PipelineError,
    stdin: Path | None = None,
) -> str:
    """The stdout of ``argv``, a short command whose output is the answer; blocks up to
    ``timeout`` seconds.

    The child gets its own session and stdin from /dev/null (or the file ``stdin``, for a
    tool that reads its question there); its stdout and stderr are
    captured, at most ``limit`` bytes of each kept (the rest is read and dropped, so a
    chatty child never blocks on a full pipe). ``env`` None inherits this process's.
    Raises ``error``, one line (``label``, default the command), when it cannot start, exits
    non-zero (with its last line of output) or overruns (its group is killed). A grandchild
    holding the pipes open does not make it wait: once the child has exited, what is
    already written is read and the rest dropped. Ctrl-C kills the group and re-raises.
    """
    label = label or f"`{' '.join(argv)}`"
    try:
        source = stdin.open("rb") if stdin is not None else None
    except OSError as exc:
        raise error(f"cannot run {label} ({os_error_text(exc, stdin)})") from None
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=source if source is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )
    except OSError as exc:
        raise error(f"cannot run {label} ({os_error_text(exc, argv[0])})") from None
    finally:
        if source is not None:
            source.close()
    assert proc.stdout is not None and proc.stderr is not None
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    out, err = kept[proc.stdout.fileno()], kept[proc.stderr.fileno()]
    open_fds = list(kept)
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(list(argv), timeout)
            ready, _, _ = select.select(open_fds, [], [], min(left, 0.1))
            if not ready and proc.poll() is not None:
                break  # exited, and nothing more is waiting: a grandchild may hold the pipes
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.remove(fd)
                    continue
                kept[fd] += chunk[: max(0, limit - len(kept[fd]))]
        code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_group(proc, QUERY_KILL_GRACE)
        raise error(f"{label} did not answer in {timeout:g} s and was stopped") from None
    except BaseException:
        kill_group(proc, QUERY_KILL_GRACE)
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    if code != 0:
        said = last_line(err.decode("utf-8", "replace") or out.decode("utf-8", "replace"))
        raise error(f"{label} failed (exit {code}): {said}")
    return out.decode("utf-8", "replace")


def spawn_detached(
    argv: Sequence[str], *, cwd: Path | str, env: Mapping[str, str], log: Path | IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session and return at once; the caller owns the child.

    stdin is /dev/null; stdout and stderr are appended to ``log`` (a path, opened and
    closed here, or an open binary file the caller keeps), never a pipe: a long-lived child
    must not block on a reader that went away. It is not tied to this process's life (no
    death signal): stop it with :func:`stop_group` on its pid, which leads its group.
    Raises OSError when the log cannot be opened or the command cannot start.
    """
    if isinstance(log, Path):
        with log.open("ab") as fh:
            return spawn_detached(argv, cwd=cwd, env=env, log=fh)
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, stripped; ``no output`` when there is none."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# ---- how the pipeline's own children start ----------------------------------------------------


def worker_env(base_env: Mapping[str, str]) -> dict[str, str]:
    """``base_env`` with this package importable by a child (:func:`package_pythonpath`)."""
    env = dict(base_env)
    env["PYTHONPATH"] = package_pythonpath(base_env.get("PYTHONPATH"))
    return env


def run_rattler_worker(
    request: RattlerRequest,
    request_file: Path,
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    label: str,
    hint: str = "see the log",
    error: type[PipelineError] = PipelineError,
) -> None:
    """Install ``request`` with the rattler worker (:mod:`pipeline.rattler_worker`) in a
    child: the request is written to ``request_file``, the worker runs through
    :func:`run_logged` (``env`` made able to import this package, :func:`worker_env`), and
    the file is removed afterwards, also on failure. Blocks up to ``timeout``; raises
    ``error`` as :func:`run_logged` does."""
    request_file.write_text(request.to_json(), encoding="utf-8")
    try:
        run_logged(
            rattler_worker.command(request_file),
            cwd=cwd,
            env=worker_env(env),
            log=log,
            timeout=timeout,
            label=label,
            hint=hint,
            error=error,
        )
    finally:
        request_file.unlink(missing_ok=True)


# ---- host tools --------------------------------------------------------------------------------


def find_uv() -> Path | None:
    """The ``uv`` executable installed with this package (PyPI ``uv``), else ``uv`` on PATH or
    beside this Python; None when there is none."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from uv import find_uv_bin

        return Path(find_uv_bin())
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def nvidia_smi(
    args: Sequence[str], environ: Mapping[str, str], timeout: float = 20.0
) -> str | None:
    """stdout of ``nvidia-smi ARGS`` (found on ``environ``'s PATH), or None when it is not
    there, fails, or takes longer than ``timeout`` s.

    A question whose output is the answer: :func:`query`.
    """
    smi = shutil.which("nvidia-smi", path=environ.get("PATH", ""))
    if smi is None:
        return None
    try:
        return query([smi, *args], timeout=timeout)
    except PipelineError:
        return None
