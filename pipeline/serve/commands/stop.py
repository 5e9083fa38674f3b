"""``doit stop``: stop instances through their supervisor, or what a dead one left running."""

from __future__ import annotations

import time

from pipeline import reporting
from pipeline.errors import ServeError
from pipeline.procs import stop_group
from pipeline.serve.commands.common import LOCK_HANDOVER, Say, left_group, read_state, warn_problems
from pipeline.serve.record import InstanceState, enter
from pipeline.serve.state import StateStore, held_lock, process_alive, supervisor_alive
from pipeline.settings import Settings


def stop_command(
    settings: Settings, names: list[str] | None = None, *, say: Say = reporting.say
) -> int:
    """Stop the named instances (all when empty) and wait until they are gone (bounded)."""
    store = StateStore(settings.serve_state)
    state, why = read_state(store)
    if state is None and why:
        if store.lock_owner() is not None:
            raise ServeError(f"stop: {why}")
        raise ServeError(
            f"stop: {why}; no supervisor runs, so the instances it recorded cannot be found "
            "from it: look for leftovers with `ps -eo pid,pgid,args | grep -e vllm`; "
            "`doit serve` replaces the file"
        )
    if state is None:
        say("stop: nothing is being served")
        return 0
    warn_problems(store, state, say)
    names = list(names or [])
    unknown = [n for n in names if n not in state.instances]
    if unknown:
        raise ServeError(
            f"stop: no instance named {unknown[0]!r} "
            f"(instances: {', '.join(sorted(state.instances))})"
        )
    targets = names or sorted(state.instances)
    grace = max((state.instances[n].stop_grace for n in targets), default=30.0)
    if supervisor_alive(state):
        store.request_stop(names or None)
        deadline = time.monotonic() + grace + 30.0
        while time.monotonic() < deadline:
            time.sleep(0.1)
            # Deleted or damaged meanwhile: the supervisor writes it again within a tick.
            state = read_state(store, wait=0)[0] or state
            if names and all(state.instances[n].state.terminal for n in names):
                break
            if not names and not process_alive(state.supervisor.pid, state.supervisor.proc_start):
                break
        else:
            raise ServeError(
                f"stop: the supervisor (pid {state.supervisor.pid}) did not stop "
                f"{', '.join(targets)} within {grace + 30:.0f}s; see {store.supervisor_log}"
            )
        for name in targets:
            say(f"stop: {name}: {state.instances[name].state}")
        return 0
    # No supervisor: stop what it left running, and record that under its lock.
    with held_lock(store.lock_file, wait=LOCK_HANDOVER) as ok:
        if not ok:
            raise ServeError(f"stop: a supervisor is starting ({store.lock_file}); try again")
        for name in targets:
            rec = state.instances[name]
            pgid = left_group(rec)
            if pgid:
                leader = process_alive(rec.pid, rec.proc_start)
                killed = stop_group(pgid, rec.stop_grace)
                what = f"pid {rec.pid}" if leader else f"process group {pgid} (leader gone)"
                say(f"stop: {name}: stopped {what}" + (" (SIGKILL)" if killed else ""))
            if not rec.state.terminal:
                enter(rec, InstanceState.STOPPED, "stopped on request")
            rec.pid = rec.pgid = None
        store.write(state)
    return 0
