"""``doit serve``: start the instances, in the foreground or under a detached supervisor.

Background: a double fork leaves a supervisor adopted by init, and this process follows its
``state.json`` until every instance is ready or failed. Foreground: this process is the
supervisor (PID 1 safe). With a supervisor of the same plan running, it asks that one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pipeline import reporting
from pipeline.errors import ServeError, error_line
from pipeline.procs import stop_group
from pipeline.serve.commands.common import (
    LOCK_HANDOVER,
    Say,
    left_group,
    load,
    read_state,
    warn_problems,
)
from pipeline.serve.commands.status import print_status
from pipeline.serve.logfiles import tail
from pipeline.serve.record import InstanceRecord, InstanceState, ServeState
from pipeline.serve.state import (
    StateStore,
    close_inherited_locks,
    held_lock,
    process_alive,
    supervisor_alive,
)
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.serve.plan import Plan


def serve_command(
    settings: Settings,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    names: list[str] | None = None,
    foreground: bool | None = None,
    say: Say = reporting.say,
    out: TextIO | None = None,
    node_rank: int | None = None,
) -> int:
    """Start every enabled instance (``names``: only those); see the module and README for
    the two modes.

    With a supervisor of this plan already running, starts only what is stopped, exited or
    failed (``names``: of those), through that supervisor; what runs is left alone.
    Background: returns once every instance is ready or failed, leaving a detached supervisor.
    Foreground: blocks until the instances end or a signal stops them (PID 1 safe).
    Two at once run one after the other: the second waits for the first to report, then has
    nothing to do. Raises ServeError when an instance failed, or when nothing could start.
    """
    out = out or sys.stdout
    from pipeline.serve.preflight import host_problems

    config, plan = load(settings, config_path, environ, check=True, node_rank=node_rank)
    if not plan.enable:
        say(f"serve: {config.source}: master.enable = false, nothing to start")
        return 0
    if not plan.instances:
        say(f"serve: {config.source}: every instance has control.enabled = false")
        return 0
    names = list(dict.fromkeys(names or []))
    for name in names:
        plan.instance(name)  # ConfigError naming the enabled ones
    store = StateStore(settings.serve_state)
    store.ensure()
    with contextlib.ExitStack() as held:
        # Held from the "is one running?" check until this serve's supervisor has reported:
        # otherwise two serves both see none, both start one, and one never hears back.
        wait = settle_bound(plan)
        if not held.enter_context(held_lock(store.start_lock_file, wait=wait)):
            raise ServeError(
                f"another `doit serve` has held {store.start_lock_file} for {wait:.0f}s; "
                "see `doit status`"
            )
        previous = _read_for_serve(store, say)
        if supervisor_alive(previous):
            assert previous is not None
            sup = previous.supervisor
            if sup.plan_digest != plan.digest():
                raise ServeError(
                    f"already serving {sup.source} with a different plan (supervisor pid "
                    f"{sup.pid}); `doit stop` first to apply the change, or `doit status`"
                )
            code = _start_under_running(plan, previous, store, names, say, out)
            if code is not None:
                return code
            # That supervisor ended before it took the request: start a new one.
            previous = _read_for_serve(store, say)
        _stop_orphans(previous, say)
        problems = host_problems(config, plan, environ, models_dir=settings.models_dir)
        if problems:
            for problem in problems[1:]:
                say(error_line(problem))
            raise ServeError(problems[0])
        for inst in plan.processes:
            Path(inst.log_file).parent.mkdir(parents=True, exist_ok=True)

        only = names or None
        background = plan.background if foreground is None else not foreground
        if background:
            return _serve_background(plan, store, environ, say, out, only)
        # Foreground: this process is the supervisor; let the next serve in once it reported.
        return _serve_foreground(plan, store, environ, say, only, reported=held.close)


def _read_for_serve(store: StateStore, say: Say) -> ServeState | None:
    """The previous state for `doit serve`: a damaged file with no supervisor behind it is
    moved aside (its instances cannot be found from it) so that serving can start afresh."""
    state, why = read_state(store)
    if state is None and why:
        if store.lock_owner() is not None:
            raise ServeError(why)
        aside = store.state_file.with_name(store.state_file.name + ".bad")
        with contextlib.suppress(OSError):
            store.state_file.replace(aside)
        say(f"warning: {why}; moved to {aside.name}, starting afresh")
    warn_problems(store, state, say)
    return state


def _start_under_running(
    plan: Plan, state: ServeState, store: StateStore, names: list[str], say: Say, out: TextIO
) -> int | None:
    """Ask the running supervisor to start what is not running (of ``names``, when given)
    and wait, bounded, until those are ready or failed. None: the supervisor ended first."""
    sup = state.supervisor
    wanted = names or sorted(state.instances)
    to_start = [n for n in wanted if n in state.instances and state.instances[n].state.terminal]
    if not to_start:
        # Boot scripts may run twice: the same plan already running is success.
        say(f"serve: already serving this plan (supervisor pid {sup.pid}); nothing to do")
        print_status(state, out, alive=True)
        return 0
    say(f"serve: starting {', '.join(to_start)} (supervisor pid {sup.pid})")
    requests = store.request_start(to_start)
    bound = settle_bound(plan)
    deadline = time.monotonic() + bound
    seen = {n: state.instances[n].state for n in to_start}
    current: ServeState | None = state
    while True:
        # The requests first, then the state: the supervisor writes the state and only then
        # removes the requests, so a state read after they are gone shows what it did. Read
        # the other way round, a state written just before the removal was taken for the
        # answer, and an instance still failed from before was reported as failed again.
        taken = not any(path.exists() for path in requests)
        current = store.read()
        if current is None or current.supervisor.session != sup.session:
            return None
        if not taken and not supervisor_alive(current):
            return None
        if taken:
            records = [current.instances[n] for n in to_start]
            _say_changes(records, seen, say)
            if all(r.state.settled for r in records):
                break
        if time.monotonic() > deadline:
            raise ServeError(
                f"{', '.join(to_start)} not settled after {bound:.0f}s; the supervisor keeps "
                "trying: `doit status`"
            )
        time.sleep(0.05)
    print_status(current, out, alive=supervisor_alive(current))
    return _report_failures(current, say, to_start)


def _say_changes(records: list[InstanceRecord], seen: dict[str, str], say: Say) -> None:
    for rec in records:
        if seen.get(rec.name) != rec.state:
            seen[rec.name] = rec.state
            shows_reason = rec.state in (InstanceState.BACKOFF, InstanceState.FAILED)
            detail = f": {rec.reason}" if rec.reason and shows_reason else ""
            say(f"serve: {rec.name}: {rec.state}{detail}")


def _stop_orphans(previous: ServeState | None, say: Say) -> None:
    """Instances left by a supervisor that died (SIGKILL, OOM): stop them before starting."""
    if previous is None:
        return
    for rec in previous.instances.values():
        pgid = left_group(rec)
        if pgid:
            say(f"serve: stopping {rec.name} (process group {pgid}) left by an earlier supervisor")
            stop_group(pgid, rec.stop_grace)


def _serve_foreground(
    plan: Plan,
    store: StateStore,
    environ: Mapping[str, str],
    say: Say,
    only: list[str] | None = None,
    *,
    reported: Callable[[], None] | None = None,
) -> int:
    from pipeline.serve.supervisor import Supervisor

    with held_lock(store.lock_file, wait=LOCK_HANDOVER) as ok:
        if not ok:
            raise ServeError(f"another supervisor holds {store.lock_file}; run `doit status`")
        store.set_lock_owner()
        supervisor = Supervisor(
            plan, store, base_env=environ, mode="foreground", reap_all=True, say=say, only=only
        )
        supervisor.install_signal_handlers()
        code = supervisor.run(reported=reported)
    records = [p.record for p in supervisor.procs.values()]
    failed = [r for r in records if r.state is InstanceState.FAILED]
    if code or failed:
        raise ServeError(
            "failed: " + "; ".join(f"{r.name}: {r.reason} (doit logs {r.name})" for r in failed)
        )
    # Stopped by a signal or `doit stop`: success. Instances that ended on their own (a clean
    # exit is not restarted) leave nothing served: a container's entrypoint must see that.
    ended = [r for r in records if r.state is InstanceState.EXITED]
    if ended and not supervisor.stop_requested:
        raise ServeError(
            "nothing is served any more: "
            + "; ".join(f"{r.name}: {r.reason} (doit logs {r.name})" for r in ended)
        )
    return 0


def settle_bound(plan: Plan) -> float:
    """Upper bound on how long a supervisor can take before every instance is settled."""
    total = 0.0
    for inst in plan.processes:
        attempts = inst.max_restarts + 1 if inst.restart == "on-failure" else 1
        total += attempts * (inst.ready_timeout + inst.stop_grace + inst.backoff_max)
    return total + 30.0


def _serve_background(
    plan: Plan,
    store: StateStore,
    environ: Mapping[str, str],
    say: Say,
    out: TextIO,
    only: list[str] | None = None,
) -> int:
    session = uuid.uuid4().hex
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process, checked by its effects
        _become_daemon(plan, store, environ, session, only)
    # The intermediate child exits as soon as it has forked the supervisor (double fork: the
    # supervisor is adopted by init, so no caller is left with a zombie to reap).
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise ServeError(f"could not start the supervisor; see {store.supervisor_log}")
    say(f"serve: supervisor started in the background (log {store.supervisor_log})")

    deadline = time.monotonic() + settle_bound(plan)
    seen: dict[str, str] = {}
    started = time.monotonic()
    state: ServeState | None = None
    while True:
        state = store.read()
        mine = state is not None and state.supervisor.session == session
        if mine:
            assert state is not None
            _say_changes(list(state.instances.values()), seen, say)
            if state.supervisor.settled or state.supervisor.exited:
                break
            if not process_alive(state.supervisor.pid, state.supervisor.proc_start):
                raise ServeError(
                    f"the supervisor (pid {state.supervisor.pid}) died before the instances "
                    f"were ready; see {store.supervisor_log}"
                )
        elif time.monotonic() - started > 30:
            raise ServeError(
                f"the supervisor did not report within 30s; see {store.supervisor_log}"
            )
        if time.monotonic() > deadline:
            raise ServeError(
                f"instances not settled after {settle_bound(plan):.0f}s; the supervisor keeps "
                "trying: `doit status`"
            )
        time.sleep(0.05)
    assert state is not None
    print_status(state, out, alive=not state.supervisor.exited)
    return _report_failures(state, say, only)


def _become_daemon(
    plan: Plan,
    store: StateStore,
    environ: Mapping[str, str],
    session: str,
    only: list[str] | None,
) -> None:  # pragma: no cover - runs in forked processes
    """In the first fork's child: detach, fork the supervisor, exit. Never returns.

    Forking the already-loaded process (rather than starting a new interpreter) makes the
    supervisor start at once and keeps the plan's secrets in memory: they never cross a pipe
    or touch the disk.
    """
    code = 70
    try:
        # The caller's start lock is its own to release: the supervisor must not keep it.
        close_inherited_locks()
        os.setsid()
        if os.fork() != 0:
            code = 0
            return
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(store.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        # The caller's Python-level streams may be captures (doit, pytest): use the log.
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        code = _run_supervisor(plan, store, environ, session, only)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_supervisor(
    plan: Plan,
    store: StateStore,
    environ: Mapping[str, str],
    session: str,
    only: list[str] | None,
) -> int:  # pragma: no cover - runs in the forked supervisor
    from pipeline.serve.supervisor import Supervisor

    def say(line: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)

    with held_lock(store.lock_file, wait=LOCK_HANDOVER) as ok:
        if not ok:
            say(f"another supervisor holds {store.lock_file}; exiting")
            return 3
        store.set_lock_owner()
        supervisor = Supervisor(
            plan,
            store,
            base_env=environ,
            mode="background",
            session=session,
            reap_all=True,
            say=say,
            only=only,
        )
        supervisor.install_signal_handlers()
        gateway = " and the gateway" if plan.gateway is not None else ""
        say(f"supervising {len(plan.instances)} instance(s){gateway} from {plan.source}")
        code = supervisor.run()
        say(f"all instances ended; exit code {code}")
        return code


def _report_failures(state: ServeState, say: Say, names: list[str] | None = None) -> int:
    """Raise ServeError naming the failed instances (of ``names``, when given), else 0."""
    failed = [
        r
        for r in state.instances.values()
        if r.state is InstanceState.FAILED and (names is None or r.name in names)
    ]
    if not failed:
        # Settled, none failed, yet not running: stopped (a `doit stop` meanwhile) or exited.
        ended = [
            r
            for r in state.instances.values()
            if r.state in (InstanceState.STOPPED, InstanceState.EXITED)
            and (names is None or r.name in names)
        ]
        if ended:
            raise ServeError(
                "not serving: "
                + ", ".join(
                    f"{r.name} ({r.state}: {r.reason or 'no reason recorded'})" for r in ended
                )
            )
        return 0
    for rec in failed:
        say(f"--- last lines of {rec.log_file} ---")
        for line in tail(rec.log_file):
            say(f"    {line}")
    names = ", ".join(f"{r.name} ({r.reason})" for r in failed)
    # A crash-looping instance caught while up is not "still running": it is named apart.
    running = [
        r.name
        for r in state.instances.values()
        if r.state is InstanceState.RUNNING and not r.restarts
    ]
    others = f"; still running: {', '.join(running)}" if running else ""
    looping = [
        f"{r.name} ({r.state} after {r.restarts} restart(s), last {r.last_exit})"
        for r in state.instances.values()
        if not r.state.terminal and r.restarts
    ]
    others += f"; restarting: {', '.join(looping)}" if looping else ""
    raise ServeError(f"failed to start: {names}{others}")
