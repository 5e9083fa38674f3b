"""What several verbs share: the config-to-plan step, the state file as a reader may use it,
and the process group an instance left behind."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.procs import group_alive, process_state
from pipeline.serve.record import InstanceRecord, ServeState
from pipeline.serve.state import StateStore, UnreadableState, process_alive
from pipeline.settings import Settings

if TYPE_CHECKING:
    # status, stop and logs must start fast: config and plan load on demand.
    from pipeline.serve.config import ServeConfig
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


# A running supervisor writes a deleted or damaged state file again within a tick (0.5 s), but
# a loaded machine may keep it from running for seconds: readers wait for the file while the
# supervisor can run, this long at most. A stopped one (SIGSTOP, a debugger) is not waited for.
REPAIR_WAIT = 30.0


def read_state(store: StateStore, *, wait: float = REPAIR_WAIT) -> tuple[ServeState | None, str]:
    """``state.json`` as a reader may use it, and a line saying what is wrong ("" if nothing).

    Never raises for a missing or damaged file. When one is missing or not JSON while a
    supervisor holds its lock, waits for that supervisor to write it again: up to ``wait``
    seconds while it can run; not at all when it is stopped (state ``T``); when it ends
    meanwhile, says what is wrong with the file, as with no supervisor.
    """
    started = time.monotonic()
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
        gone = why or f"{store.state_file}: missing"
        if process_state(owner) in ("T", "t"):
            return None, (
                f"{gone}, but a supervisor (pid {owner}) runs, stopped (SIGSTOP or a debugger), "
                f"and cannot write it again until continued: `kill -CONT {owner}` resumes it, "
                f"then `kill -TERM {owner}` stops it and every instance it runs"
            )
        waited = time.monotonic() - started
        if waited >= wait:
            return None, (
                f"{gone}, but a supervisor (pid {owner}) runs and has not written it again "
                f"in {waited:.0f}s; `kill -TERM {owner}` stops it and every instance it runs"
            )
        time.sleep(0.05)


def warn_problems(store: StateStore, state: ServeState | None, say: Say) -> None:
    """Say each field of ``state.json`` that could not be read (the rest is still used)."""
    for problem in state.problems if state is not None else ():
        say(f"warning: {store.state_file}: {problem}")


def left_group(rec: InstanceRecord) -> int | None:
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


# How long a new supervisor, or a `doit stop` with none running, waits for `supervisor.lock`.
# Both checked that no supervisor is alive, so a holder can only be one on its way out (it
# wrote `exited` and is closing) or a `doit stop` that found none: both let go soon, and the
# wait ends the moment they do. A loaded machine can stretch "soon" past a second or two.
LOCK_HANDOVER = 30.0
