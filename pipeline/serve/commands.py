"""What ``doit plan | serve | status | stop | logs | clients | k8s`` do; the tasks call these.

Each function takes the settings and the process environment explicitly, prints its report,
and raises :class:`~pipeline.errors.PipelineError` subclasses for anything a user can fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pipeline import reporting
from pipeline.errors import ConfigError, ServeError
from pipeline.procs import group_alive, stop_group
from pipeline.serve.logfiles import follow as follow_log
from pipeline.serve.logfiles import tail
from pipeline.serve.state import (
    InstanceRecord,
    InstanceState,
    ServeState,
    StateStore,
    UnreadableState,
    close_inherited_locks,
    enter,
    held_lock,
    process_alive,
    supervisor_alive,
)
from pipeline.settings import Settings

if TYPE_CHECKING:
    # status, stop and logs must start fast: config, plan and supervisor load on demand.
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.k8s import K8sOptions
    from pipeline.serve.plan import Plan

Say = Callable[[str], None]


def interface_addresses(names: list[str]) -> dict[str, str]:
    """The IPv4 address of each named interface that has one (``SIOCGIFADDR``); the shell
    side of ``cluster.interface``, so the planner stays pure."""
    import fcntl
    import socket
    import struct

    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = struct.pack("256s", name.encode()[:15])
                answer = fcntl.ioctl(sock.fileno(), 0x8915, packed)  # SIOCGIFADDR
            except OSError:
                continue
            found[name] = socket.inet_ntoa(answer[20:24])
    return found


def load(
    settings: Settings,
    config_path: str | Path | None,
    environ: Mapping[str, str],
    *,
    check: bool,
    node_rank: int | None = None,
) -> tuple[ServeConfig, Plan]:
    """Config file -> validated config -> plan. ``check``: the environment must exist.
    ``node_rank``: ``--node-rank`` (multi-node instances; None: the platform's, else 0)."""
    from pipeline.pixi.envs import resolve_runtime
    from pipeline.serve.config import load_config
    from pipeline.serve.plan import build_plan

    path = Path(config_path) if config_path else settings.serve_config
    if path is None:
        raise ConfigError(
            "no serve config: pass --config FILE or set AUTO_INFER_VLLM_CONFIG "
            "(examples in model-configs/)"
        )
    config = load_config(path, settings.serve_overrides)
    master = config.master
    runtime = resolve_runtime(
        launcher=master.launcher,
        env_prefix=master.env_prefix,
        project_dir=master.pixi_project_dir or settings.pixi_project_dir,
        environment=master.pixi_environment,
        environ=environ,
        source=str(path),
        check=check,
        explicit_project=master.pixi_project_dir is not None,
    )
    state_file = StateStore(settings.serve_state).state_file
    interfaces = sorted(
        {i.cluster.interface for i in config.enabled if i.cluster and i.cluster.interface}
    )
    return config, build_plan(
        config,
        runtime,
        environ,
        state_file=state_file,
        node_rank_arg=node_rank,
        addresses=interface_addresses(interfaces) if interfaces else {},
    )


def plan_command(
    settings: Settings,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    check: bool = False,
    out: TextIO | None = None,
    say: Say = reporting.say,
    node_rank: int | None = None,
) -> Plan:
    """Print the resolved launch plan as JSON; host problems are warnings (errors: ``check``).
    ``node_rank``: plan that node (``doit plan --node-rank 1`` shows a follower's command)."""
    out = out or sys.stdout
    from pipeline.serve.preflight import host_problems

    config, plan = load(settings, config_path, environ, check=check, node_rank=node_rank)
    problems = host_problems(config, plan, environ)
    out.write(json.dumps(plan.to_display(), indent=2) + "\n")
    out.flush()
    for problem in problems:
        say(f"warning: {problem}")
    if check and problems:
        raise ServeError(problems[0] + (f" (and {len(problems) - 1} more)" if problems[1:] else ""))
    return plan


def clients_command(
    settings: Settings,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    litellm_config: str | None = None,
    env_file: str | None = None,
    out: TextIO | None = None,
    say: Say = reporting.say,
) -> None:
    """Print how clients reach each instance; optionally write a LiteLLM config and an env file."""
    from pipeline.fsutil import atomic_write_text
    from pipeline.serve import clients

    out = out or sys.stdout
    config, plan = load(settings, config_path, environ, check=False)
    out.write(clients.instructions(config, plan))
    out.flush()
    for target, text in ((litellm_config, clients.litellm_config), (env_file, clients.env_file)):
        if target:
            body = text(config, plan) if text is clients.litellm_config else text(plan)
            atomic_write_text(Path(target), body)
            say(f"clients: wrote {target}")


def k8s_command(
    settings: Settings,
    config_path: str | None,
    instance: str,
    options: K8sOptions,
    *,
    output: str | None = None,
    out: TextIO | None = None,
    say: Say = reporting.say,
) -> None:
    """Write the LeaderWorkerSet manifest of ``instance`` (JSON) to ``output`` or stdout, and
    say which Secret entries it reads. Nothing is applied; raises ConfigError/PipelineError."""
    from pipeline.fsutil import atomic_write_text
    from pipeline.serve import k8s

    path = Path(config_path) if config_path else settings.serve_config
    if path is None:
        raise ConfigError("no serve config: pass --config FILE or set AUTO_INFER_VLLM_CONFIG")
    if not instance:
        raise ConfigError("which instance? pass --instance NAME (one with a cluster table)")
    if settings.serve_overrides:
        raise ConfigError(
            "AUTO_INFER_VLLM_OVERRIDES is set, but the pods read only the TOML (a ConfigMap); "
            "write the change into the TOML, or unset the variable"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the serve config: {exc}") from None
    pod = k8s.pod_config(text, str(path), instance)
    document = k8s.manifest(pod, instance, options)
    body = k8s.to_json(document)
    if output:
        atomic_write_text(Path(output), body)
        say(f"k8s: wrote {output}; apply it with: kubectl apply -f {output}")
    else:
        (out or sys.stdout).write(body)
        (out or sys.stdout).flush()
    needed = k8s.secret_entries(pod.config, instance)
    if needed:
        secret = options.secret or f"{k8s.lws_name(options, instance)}-keys"
        literals = " ".join(f"--from-literal={n}=..." for n in needed)
        say(
            f"k8s: the pods read {', '.join(needed)} from Secret {secret}: "
            f"kubectl create secret generic {secret} {literals}"
        )


# ---- serve ------------------------------------------------------------------------------------


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
        problems = host_problems(config, plan, environ)
        if problems:
            for problem in problems[1:]:
                say(f"error: {problem}")
            raise ServeError(problems[0])
        for inst in plan.processes:
            Path(inst.log_file).parent.mkdir(parents=True, exist_ok=True)

        only = names or None
        background = plan.background if foreground is None else not foreground
        if background:
            return _serve_background(plan, store, environ, say, out, only)
        # Foreground: this process is the supervisor; let the next serve in once it reported.
        return _serve_foreground(plan, store, environ, say, only, reported=held.close)


# A running supervisor writes a deleted or damaged state file again within a tick (0.5 s).
REPAIR_WAIT = 3.0


def read_state(store: StateStore, *, wait: float = REPAIR_WAIT) -> tuple[ServeState | None, str]:
    """``state.json`` as a reader may use it, and a line saying what is wrong ("" if nothing).

    Never raises for a missing or damaged file. When one is missing or not JSON while a
    supervisor holds its lock, waits up to ``wait`` seconds for it to be written again.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            state = store.read()
            why = ""
        except UnreadableState as exc:
            state, why = None, exc.message
        if state is not None:
            return state, ""
        owner = store.lock_owner()
        if owner is None:
            return None, why
        if time.monotonic() >= deadline:
            gone = why or f"{store.state_file}: missing"
            return None, (
                f"{gone}, but a supervisor (pid {owner}) runs and has not written it again "
                f"within {wait:g}s; `kill -TERM {owner}` stops it and every instance it runs"
            )
        time.sleep(0.05)


def _warn_problems(store: StateStore, state: ServeState | None, say: Say) -> None:
    for problem in state.problems if state is not None else ():
        say(f"warning: {store.state_file}: {problem}")


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
    _warn_problems(store, state, say)
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
        current = store.read()
        if current is None or current.supervisor.session != sup.session:
            return None
        taken = not any(path.exists() for path in requests)
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


def _left_group(rec: InstanceRecord) -> int | None:
    """The process group an instance left running, or None.

    The whole recorded group, not only its leader: when the leader died (SIGKILL, a crash
    while no supervisor watched) its children, vLLM's EngineCore say, live on in the group
    and hold the port and the GPU. A process that ``setsid``s itself leaves the group and
    cannot be found this way. A leader pid that now belongs to another process (different
    start time) means the group is not ours.
    """
    if not rec.pgid:
        return None
    if process_alive(rec.pid, rec.proc_start):
        return rec.pgid
    if rec.pid == rec.pgid and process_alive(rec.pid, None):
        return None
    return rec.pgid if group_alive(rec.pgid) else None


def _stop_orphans(previous: ServeState | None, say: Say) -> None:
    """Instances left by a supervisor that died (SIGKILL, OOM): stop them before starting."""
    if previous is None:
        return
    for rec in previous.instances.values():
        pgid = _left_group(rec)
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

    with held_lock(store.lock_file, wait=2.0) as ok:
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

    with held_lock(store.lock_file, wait=5.0) as ok:
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


# ---- status / stop / logs -------------------------------------------------------------------


def _uptime(since: float | None) -> str:
    if not since:
        return "-"
    secs = int(time.time() - since)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"


def status_rows(state: ServeState, alive: bool) -> list[dict[str, object]]:
    rows = []
    for rec in sorted(state.instances.values(), key=lambda r: r.name):
        live = process_alive(rec.pid, rec.proc_start)
        shown = rec.state.value
        if not alive and live:
            shown = f"{shown} (unsupervised)"
        elif not live and rec.state in (InstanceState.RUNNING, InstanceState.STARTING):
            # Under a live supervisor it ended a moment ago: backoff, exited or failed next.
            shown = "crashed" if alive else "dead"
        elif rec.state is InstanceState.STARTING and rec.restarts:
            shown = "restarting"
        rows.append(
            {
                "name": rec.name,
                "kind": rec.kind,
                "state": shown,
                "pid": rec.pid if live else None,
                "port": rec.port,
                "gpus": rec.gpu_ids,
                "restarts": rec.restarts,
                "uptime": _uptime(rec.ready_at or rec.started_at) if live else "-",
                "models": rec.model_names,
                "url": rec.base_url,
                "log": rec.log_file,
                "reason": rec.reason,
                "last_exit": rec.last_exit,
                "node_rank": rec.node_rank,
                "nodes": rec.nodes,
                "generation": rec.generation,
                "members": rec.members,
                "first_failure": rec.first_failure,
            }
        )
    return rows


def _member_line(row: Mapping[str, object]) -> str:
    """The line under the table for a member of a multi-node instance: rank, generation,
    restarts, and on the leader what each follower said last."""
    line = (
        f"node rank {row['node_rank']} of {row['nodes']}, generation {row['generation']}, "
        f"restarts {row['restarts']}"
    )
    members = row.get("members")
    if isinstance(members, list) and members:
        now = time.time()
        heard = []
        for m in members:
            seen = m.get("seen") if isinstance(m, dict) else None
            ago = f", seen {max(now - seen, 0):.0f}s ago" if isinstance(seen, int | float) else ""
            if isinstance(m, dict):
                heard.append(
                    f"rank {m.get('rank')} {m.get('state')} (generation {m.get('generation')}{ago})"
                )
        line += "; members: " + "; ".join(heard)
    if row.get("first_failure"):
        line += f"; first failure: {row['first_failure']} (log {row['log']}.first-failure)"
    return line


def _status_detail(row: Mapping[str, object]) -> str:
    """The line under the table for one row: why it ended, or how often it restarted (a
    crash-looping instance caught while running or starting must not look healthy)."""
    state, reason, restarts = str(row["state"]), row["reason"], row["restarts"]
    looping = ""
    if restarts and not state.startswith(("failed", "stopped", "exited")):
        looping = f"restarted {restarts} time(s), last {row['last_exit'] or 'exit unknown'}"
        if state.startswith(("backoff", "restarting", "crashed")) and reason:
            return f"{looping}; {reason}"
        return looping
    if reason and state.startswith(("failed", "backoff", "exited")):
        return str(reason)
    return ""


def print_status(state: ServeState | None, out: TextIO, *, alive: bool) -> None:
    if state is None:
        out.write("nothing served yet: no serve state\n")
        return
    sup = state.supervisor
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sup.started_at))
    except (OverflowError, OSError, ValueError):
        when = "unknown"
    rank = f", node rank {sup.node_rank}" if sup.node_rank else ""
    if alive:
        out.write(
            f"supervisor: pid {sup.pid} ({sup.mode}{rank}) since {when}, config {sup.source}\n"
        )
    else:
        code = "" if sup.exit_code is None else f", exit code {sup.exit_code}"
        out.write(f"supervisor: not running (started {when}{code}), config {sup.source}\n")
    headers = ["NAME", "STATE", "PID", "PORT", "GPUS", "RESTARTS", "UP", "MODEL", "URL"]
    table = [headers]
    for row in status_rows(state, alive):
        gpus, models = row["gpus"], row["models"]
        if row["kind"] == "gateway":
            gpu_cell, model_cell = "-", "(gateway: all models)"
        else:
            gpu_cell = ",".join(str(g) for g in gpus) if isinstance(gpus, list) and gpus else "cpu"
            model_cell = ",".join(models) if isinstance(models, list) else ""
        table.append(
            [
                str(row["name"]),
                str(row["state"]),
                str(row["pid"] or "-"),
                str(row["port"]),
                gpu_cell,
                str(row["restarts"]),
                str(row["uptime"]),
                model_cell,
                str(row["url"]),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for r in table:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )
    for row in status_rows(state, alive):
        detail = _status_detail(row)
        if detail:
            out.write(f"{row['name']}: {detail}\n")
        if row["node_rank"] is not None:
            out.write(f"{row['name']}: {_member_line(row)}\n")
    out.flush()


def status_command(
    settings: Settings,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    say: Say = reporting.say,
    node_rank: int | None = None,
) -> int:
    """Print the instances' state (a table, or JSON). Reads the state file only: fast.

    ``node_rank`` (``doit status --node-rank N``): say so when the state shown is another
    node's (a state dir shared between nodes).

    Works whatever the file holds: bad fields are named on stderr (and in the JSON's
    ``problems``) and the rest is shown; a missing or unreadable file is said in one line,
    with the pid of a supervisor that still runs."""
    out = out or sys.stdout
    store = StateStore(settings.serve_state)
    state, why = read_state(store)
    alive = supervisor_alive(state)
    problems = [*(state.problems if state is not None else ()), *([why] if why else [])]
    if as_json:
        data: dict[str, object] = {"supervisor": None, "instances": [], "problems": problems}
        if state is not None:
            data["supervisor"] = {**dataclasses.asdict(state.supervisor), "alive": alive}
            data["instances"] = status_rows(state, alive)
        out.write(json.dumps(data, indent=2) + "\n")
        out.flush()
        return 0
    if why:
        alone = "" if store.lock_owner() else "; no supervisor runs (`doit serve` starts afresh)"
        out.write(f"serve state: {why}{alone}\n")
        out.flush()
        return 0
    _warn_problems(store, state, say)
    if state is not None and node_rank is not None and state.supervisor.node_rank != node_rank:
        say(
            f"warning: {store.state_file} is node rank {state.supervisor.node_rank}'s, not "
            f"{node_rank}'s: give each node its own PIPELINE_STATE_DIR"
        )
    print_status(state, out, alive=alive)
    return 0


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
    _warn_problems(store, state, say)
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
    with held_lock(store.lock_file, wait=5.0) as ok:
        if not ok:
            raise ServeError(f"stop: a supervisor is starting ({store.lock_file}); try again")
        for name in targets:
            rec = state.instances[name]
            pgid = _left_group(rec)
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


def log_path(
    settings: Settings, name: str | None, config_path: str | None, environ: Mapping[str, str]
) -> Path:
    store = StateStore(settings.serve_state)
    state = read_state(store)[0]
    if name in (None, "", "supervisor"):
        if name == "supervisor" or state is None or len(state.instances) != 1:
            if name != "supervisor" and state is not None:
                raise ServeError(
                    "logs: name an instance: "
                    + ", ".join(sorted(state.instances))
                    + " (or `supervisor`)"
                )
            return store.supervisor_log
        return Path(next(iter(state.instances.values())).log_file)
    if state is not None and name in state.instances:
        return Path(state.instances[name].log_file)
    if config_path or settings.serve_config:
        _, plan = load(settings, config_path, environ, check=False)
        return Path(plan.instance(name).log_file)
    known = ", ".join(sorted(state.instances)) if state else "none served yet"
    raise ServeError(f"logs: no instance named {name!r} (instances: {known})")


@dataclasses.dataclass(frozen=True)
class LogsArgs:
    name: str | None
    lines: int
    follow: bool
    config: str | None


def parse_logs_args(words: list[str], *, lines: int, follow: bool, config: str | None) -> LogsArgs:
    """`doit logs`'s positional words with the options doit left among them. Pure.

    doit takes options only before the first positional word (`doit logs -n 2 a`), and hands
    `doit logs a -n 2` over as three names; this reads ``-n N``, ``-nN``, ``--lines N``,
    ``--lines=N``, ``-f``/``--follow`` and ``-c``/``--config FILE`` wherever they stand.
    Raises ServeError (one line) for a bad count, a missing value or two names.
    """
    names: list[str] = []
    rest = iter(words)
    for word in rest:
        flag, eq, value = word.partition("=")
        if word in ("-f", "--follow"):
            follow = True
            continue
        if word in ("-n", "--lines", "-c", "--config") or (flag in ("--lines", "--config") and eq):
            if not eq:
                value = next(rest, "")
                if not value:
                    raise ServeError(f"logs: {word} needs a value (`doit logs -n 200 NAME`)")
            if flag in ("-c", "--config"):
                config = value
                continue
            word, flag = f"-n{value}", "-n"
        if word.startswith("-n") and len(word) > 2:
            try:
                lines = int(word[2:])
            except ValueError:
                lines = -1
            if lines < 0:
                raise ServeError(f"logs: -n/--lines takes a count >= 0, got {word[2:]!r}")
            continue
        if word.startswith("-") and word != "-":
            raise ServeError(
                f"logs: unknown option {word!r} (options: -n N, --lines N, -f, --config FILE)"
            )
        names.append(word)
    if len(names) > 1:
        raise ServeError(f"logs: one instance at a time, got {', '.join(names)}")
    return LogsArgs(names[0] if names else None, lines, follow, config)


def logs_command(
    settings: Settings,
    name: str | None,
    environ: Mapping[str, str],
    *,
    lines: int = 50,
    follow: bool = False,
    config_path: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the last ``lines`` of an instance's log; ``follow`` keeps printing until Ctrl-C."""
    out = out or sys.stdout
    path = log_path(settings, name, config_path, environ)
    if not path.exists():
        raise ServeError(f"logs: {path} does not exist yet (the instance never started)")
    for line in tail(path, lines):
        out.write(line + "\n")
    out.flush()
    if not follow:
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        follow_log(path, out)
    return 0
