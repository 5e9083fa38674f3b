"""Runs a :class:`~pipeline.serve.plan.Plan`: spawn, watch, restart and stop vLLM instances.

The gateway, when the plan has one, is just one more process here: same states, same
readiness probe (its ``/health``), same restarts and stops. It waits for no instance (it
answers 503 for models whose instance is not ready yet) and follows their states by reading
the ``state.json`` this supervisor writes.

The supervisor owns every child: each instance runs in its own session (process group), its
output appended to its log file (never a pipe), and every wait is bounded. All state transitions
happen in :meth:`Supervisor.tick`, one place, driven by a loop that also reaps children, so a
supervisor running as PID 1 leaves no zombie behind.

Seams for tests come through the constructor: ``spawner`` (start a process), ``probe`` (the
``/health`` check), ``clock`` and ``sleep``.

Blocking: :meth:`Supervisor.run` blocks until every instance is terminal (stopped, exited,
failed) and returns the exit code. :meth:`Supervisor.tick` never blocks longer than one health
probe (``probe_timeout``).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

from pipeline import reporting
from pipeline.procs import group_alive, signal_group
from pipeline.serve.logfiles import LOG_ROTATE_BYTES
from pipeline.serve.plan import InstancePlan, Plan
from pipeline.serve.state import (
    InstanceRecord,
    InstanceState,
    ServeState,
    StateStore,
    SupervisorRecord,
    proc_start_time,
)

# An instance that stayed up this long starts a fresh count of consecutive restarts.
STABLE_AFTER = 300.0
PROBE_INTERVAL = 0.5
FAST_PROBE_PERIOD = 5.0
TICK = 0.05
IDLE_TICK = 0.5


class Spawner(Protocol):
    def __call__(
        self, argv: tuple[str, ...], env: Mapping[str, str], cwd: str, log: IO[bytes]
    ) -> subprocess.Popen[bytes]: ...


def default_spawner(
    argv: tuple[str, ...], env: Mapping[str, str], cwd: str, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with output appended to ``log``. Raises OSError."""
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def http_probe(url: str, timeout: float = 1.0) -> bool:
    """True when GET ``url`` answers 200 within ``timeout``. Never raises."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        # Read the (tiny) body so the close is orderly, not a reset the server logs.
        response.read(65536)
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class _Proc:
    """Runtime bookkeeping of one instance (the persisted part lives in ``record``)."""

    plan: InstancePlan
    record: InstanceRecord
    popen: subprocess.Popen[bytes] | None = None
    deadline: float = 0.0  # STARTING: ready by; STOPPING: SIGKILL at; BACKOFF: retry at
    next_probe: float = 0.0
    started_mono: float = 0.0
    streak: int = 0  # consecutive failed attempts, for max_restarts
    killed: bool = False
    # A group left behind by a failed attempt (a grandchild that outlived the leader):
    # it is killed, and a restart waits for it to be gone.
    leftover_pgid: int | None = None
    leftover_kill_at: float = 0.0
    log_handles: list[IO[bytes]] = field(default_factory=list)


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class Supervisor:
    """Executes a plan. One instance per :class:`_Proc`; state persisted after each change."""

    def __init__(
        self,
        plan: Plan,
        store: StateStore,
        *,
        base_env: Mapping[str, str],
        mode: str = "foreground",
        session: str | None = None,
        spawner: Spawner = default_spawner,
        probe: Callable[[str, float], bool] = http_probe,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        reap_all: bool = False,
        say: Callable[[str], None] | None = None,
        probe_timeout: float = 1.0,
    ) -> None:
        self.plan = plan
        self.store = store
        self.base_env = dict(base_env)
        self.spawner = spawner
        self.probe = probe
        self.clock = clock
        self.sleep = sleep
        self.reap_all = reap_all
        self.say = say or reporting.say
        self.probe_timeout = probe_timeout
        self.procs: dict[str, _Proc] = {}
        self.stop_requested = False
        self.signals = 0
        self.last_signal = ""
        self.killing = False
        self.dirty = True
        # The gateway (if any) is one more process in the same state machine.
        for inst in plan.processes:
            record = InstanceRecord(
                name=inst.name,
                kind=inst.kind,
                host=inst.host,
                port=inst.port,
                base_url=inst.base_url,
                health_url=inst.health_url,
                gpu_ids=list(inst.gpu_ids),
                model_names=list(inst.model_names),
                log_file=inst.log_file,
                stop_grace=inst.stop_grace,
            )
            self.procs[inst.name] = _Proc(plan=inst, record=record)
        self.state = ServeState(
            supervisor=SupervisorRecord(
                pid=os.getpid(),
                proc_start=proc_start_time(os.getpid()),
                session=session or uuid.uuid4().hex,
                mode=mode,
                source=plan.source,
                runtime=plan.runtime,
                plan_digest=plan.digest(),
                started_at=time.time(),
            ),
            instances={name: p.record for name, p in self.procs.items()},
        )

    # ---- public API ----------------------------------------------------------------------
    def request_stop(self, names: list[str] | None = None) -> None:
        """Ask instances (all when ``names`` is None) to stop; the loop carries it out."""
        if names is None:
            self.stop_requested = True
            targets = list(self.procs)
        else:
            targets = [n for n in names if n in self.procs]
        now = self.clock()
        for name in targets:
            self._begin_stop(self.procs[name], now, reason="stopped on request")

    def handle_signal(self, signum: int, _frame: object = None) -> None:
        """SIGTERM/SIGINT/SIGHUP: stop everything; a second signal kills at once.

        Only records the signal: the loop acts on it at the start of the next tick, so a
        signal landing in the middle of a spawn cannot leave a half-updated instance.
        """
        self.signals += 1
        self.last_signal = signal.Signals(signum).name

    def _handle_signals(self) -> None:
        if self.signals and not self.stop_requested:
            self.say(f"serve: {self.last_signal} received, stopping all instances")
            self.request_stop()
        if self.signals >= 2 and not self.killing:
            self.killing = True
            self.say("serve: second signal, killing all instances now")
            for proc in self.procs.values():
                signal_group(proc.record.pgid, signal.SIGKILL)
                proc.killed = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.handle_signal)

    @property
    def settled(self) -> bool:
        return all(p.record.state.settled for p in self.procs.values())

    @property
    def _cleaning(self) -> bool:
        """A failed attempt's leftover group is still being put down."""
        return any(p.leftover_pgid for p in self.procs.values())

    @property
    def finished(self) -> bool:
        return all(p.record.state.terminal for p in self.procs.values()) and not self._cleaning

    def exit_code(self) -> int:
        failed = any(p.record.state is InstanceState.FAILED for p in self.procs.values())
        return 1 if failed else 0

    def run(self) -> int:
        """Supervise until every instance is terminal; returns 1 if any failed, else 0."""
        self.store.ensure()
        self.store.clear_requests()
        self._save()
        try:
            while not self.finished:
                self.tick()
                # Quick while anything is in motion; a calm loop when all is settled (a stop
                # request or a crash is then seen within IDLE_TICK).
                self.sleep(IDLE_TICK if self.settled and not self._cleaning else TICK)
        finally:
            # Whatever happened (an exception in the loop included), leave no child behind.
            self._kill_all_now()
            self.state.supervisor.exited = True
            self.state.supervisor.exit_code = self.exit_code()
            self._save(force=True)
        return self.exit_code()

    # ---- the loop ------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass: reap, take requests, advance every instance, persist if changed."""
        now = self.clock()
        self._handle_signals()
        self._reap()
        requested = self.store.take_requests()
        if "*all*" in requested:
            self.request_stop()
        elif requested:
            self.request_stop(requested)
        for proc in self.procs.values():
            self._advance(proc, now)
        if self.settled != self.state.supervisor.settled:
            self.state.supervisor.settled = self.settled
            self.dirty = True
        self._save()

    def _advance(self, proc: _Proc, now: float) -> None:
        rec, plan = proc.record, proc.plan
        self._clean_leftover(proc, now)
        state = rec.state
        if state is InstanceState.PENDING:
            if self._may_start(proc, first=True):
                self._spawn(proc, now)
        elif state is InstanceState.STARTING:
            code = self._exit_status(proc)
            if code is not None:
                self._failed(proc, now, f"exited during startup ({_describe_exit(code)})")
            elif now >= proc.deadline:
                self._failed(proc, now, f"not ready within {plan.ready_timeout:g}s (ready_timeout)")
            elif now >= proc.next_probe:
                # Probe often at first (a fast start is seen at once), then every 0.5 s:
                # a refused connection costs next to nothing while vLLM loads.
                early = now - proc.started_mono < FAST_PROBE_PERIOD
                proc.next_probe = now + (TICK if early else PROBE_INTERVAL)
                if self.probe(plan.health_url, self.probe_timeout):
                    rec.state = InstanceState.RUNNING
                    rec.ready_at = time.time()
                    rec.reason = None
                    self.dirty = True
                    took = self.clock() - proc.started_mono
                    self.say(f"serve: {rec.name}: ready in {took:.1f}s at {plan.base_url}")
        elif state is InstanceState.RUNNING:
            code = self._exit_status(proc)
            if code is not None:
                if now - proc.started_mono >= STABLE_AFTER:
                    proc.streak = 0
                self._failed(proc, now, f"exited ({_describe_exit(code)})", clean=code == 0)
        elif state is InstanceState.BACKOFF:
            if now >= proc.deadline and self._may_start(proc, first=False):
                self._spawn(proc, now)
        elif state is InstanceState.STOPPING:
            self._exit_status(proc)
            if not group_alive(rec.pgid) and proc.popen is None:
                rec.state = InstanceState.STOPPED
                rec.pid = rec.pgid = None
                self.dirty = True
                self.say(f"serve: {rec.name}: stopped")
            elif now >= proc.deadline and not proc.killed:
                proc.killed = True
                signal_group(rec.pgid, signal.SIGKILL)
                self.say(
                    f"serve: {rec.name}: still running {plan.stop_grace:g}s after SIGTERM "
                    "(stop_grace), sent SIGKILL"
                )

    def _may_start(self, proc: _Proc, *, first: bool) -> bool:
        if self.stop_requested or proc.leftover_pgid:
            return False
        plan = proc.plan
        if first and plan.start_after:
            before = self.procs[plan.start_after].record.state
            if not before.settled:
                return False
        # Two instances loading on one GPU at once both profile its memory: never overlap.
        for other in self.procs.values():
            if other is proc or other.record.state is not InstanceState.STARTING:
                continue
            if set(other.plan.gpu_ids) & set(plan.gpu_ids):
                return False
        return True

    def _spawn(self, proc: _Proc, now: float) -> None:
        rec, plan = proc.record, proc.plan
        attempt = rec.restarts + 1
        try:
            log = self._open_log(plan)
        except OSError as exc:
            self._give_up(proc, f"cannot open log {plan.log_file}: {exc.strerror}")
            return
        try:
            # `plan.argv` carries no secret: the key travels in the environment.
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"\n=== {stamp} supervisor: start {rec.name} (attempt {attempt}): "
            log.write((header + " ".join(plan.argv) + "\n").encode())
            log.flush()
            popen = self.spawner(plan.argv, plan.child_env(self.base_env), plan.cwd, log)
        except OSError as exc:
            log.close()
            self._give_up(proc, f"cannot start {plan.argv[0]}: {exc.strerror or exc}")
            return
        log.close()  # the child holds its own copy of the descriptor
        proc.popen = popen
        proc.killed = False
        proc.started_mono = now
        proc.deadline = now + plan.ready_timeout
        proc.next_probe = now
        rec.state = InstanceState.STARTING
        rec.pid = rec.pgid = popen.pid
        rec.proc_start = proc_start_time(popen.pid)
        rec.started_at = time.time()
        rec.ready_at = None
        self.dirty = True
        self.say(f"serve: {rec.name}: starting (pid {popen.pid}, log {plan.log_file})")

    def _open_log(self, plan: InstancePlan) -> IO[bytes]:
        path = Path(plan.log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > LOG_ROTATE_BYTES:
                path.replace(path.with_name(path.name + ".1"))
        return path.open("ab")

    def _exit_status(self, proc: _Proc) -> int | None:
        """Reap the leader if it exited: its return code (-N: signal N), else None."""
        popen = proc.popen
        if popen is None:
            return None
        if popen.returncode is None:
            try:
                pid, status = os.waitpid(popen.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by someone else (a reap_all pass already recorded it).
                pid, status = popen.pid, 0
            if pid == 0:
                return None
            popen.returncode = os.waitstatus_to_exitcode(status)
        code = popen.returncode
        proc.popen = None
        proc.record.last_exit = _describe_exit(code)
        self.dirty = True
        return code

    def _reap(self) -> None:
        """As PID 1 (or the detached supervisor), reap every child, orphans included."""
        if not self.reap_all:
            return
        ours = {p.popen.pid: p for p in self.procs.values() if p.popen is not None}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = ours.get(pid)
            if proc is not None and proc.popen is not None:
                proc.popen.returncode = os.waitstatus_to_exitcode(status)

    def _failed(self, proc: _Proc, now: float, why: str, *, clean: bool = False) -> None:
        """The attempt ended: clean up its group, then back off, exit or give up."""
        rec, plan = proc.record, proc.plan
        self._exit_status(proc)
        if group_alive(rec.pgid):
            # The leader is gone (or hung at startup) but its group lives on: a grandchild
            # may hold the port or the GPU. Kill it before any restart.
            signal_group(rec.pgid, signal.SIGTERM)
            proc.leftover_pgid = rec.pgid
            proc.leftover_kill_at = now + plan.stop_grace
        rec.pid = rec.pgid = None
        self.dirty = True
        if clean or self.stop_requested:
            rec.state = InstanceState.EXITED
            rec.reason = why
            self.say(f"serve: {rec.name}: {why}; not restarted")
            return
        if plan.restart == "on-failure" and proc.streak < plan.max_restarts:
            delay = min(plan.backoff_initial * (2**proc.streak), plan.backoff_max)
            proc.streak += 1
            rec.restarts += 1
            rec.state = InstanceState.BACKOFF
            rec.reason = why
            proc.deadline = now + delay
            self.say(
                f"serve: {rec.name}: {why}; restart {proc.streak}/{plan.max_restarts} "
                f"in {delay:g}s (log {plan.log_file})"
            )
            return
        limit = "restart: no" if plan.restart == "no" else f"{plan.max_restarts} restarts"
        self._give_up(proc, f"{why}; gave up after {limit}")

    def _give_up(self, proc: _Proc, why: str) -> None:
        proc.record.state = InstanceState.FAILED
        proc.record.reason = why
        self.dirty = True
        self.say(f"serve: {proc.record.name}: FAILED: {why} (log {proc.plan.log_file})")

    def _begin_stop(self, proc: _Proc, now: float, reason: str) -> None:
        rec = proc.record
        if rec.state.terminal or rec.state is InstanceState.STOPPING:
            return
        if rec.state in (InstanceState.PENDING, InstanceState.BACKOFF):
            rec.state = InstanceState.STOPPED
            rec.reason = reason
            self.dirty = True
            return
        rec.state = InstanceState.STOPPING
        rec.reason = reason
        proc.deadline = now + proc.plan.stop_grace
        proc.killed = False
        self.dirty = True
        signal_group(rec.pgid, signal.SIGTERM)
        self.say(f"serve: {rec.name}: stopping (SIGTERM to process group {rec.pgid})")

    def _clean_leftover(self, proc: _Proc, now: float) -> None:
        if proc.leftover_pgid is None:
            return
        self._exit_status(proc)
        if not group_alive(proc.leftover_pgid) and proc.popen is None:
            proc.leftover_pgid = None
        elif now >= proc.leftover_kill_at:
            signal_group(proc.leftover_pgid, signal.SIGKILL)

    def _kill_all_now(self) -> None:
        """Last resort on the way out: nothing we started may outlive the supervisor."""
        for proc in self.procs.values():
            for pgid in (proc.record.pgid, proc.leftover_pgid):
                if pgid and group_alive(pgid):
                    signal_group(pgid, signal.SIGKILL)
            if proc.popen is not None:
                with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
                proc.popen = None
            if not proc.record.state.terminal:
                proc.record.state = InstanceState.STOPPED
                proc.record.reason = proc.record.reason or "supervisor exited"
            proc.record.pid = proc.record.pgid = None

    def _save(self, force: bool = False) -> None:
        if self.dirty or force:
            self.store.write(self.state)
            self.dirty = False
