"""``doit status``: the instances' state as a table or JSON; reads the state file only."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from pipeline import reporting
from pipeline.serve.commands.common import Say, read_state, warn_problems
from pipeline.serve.record import InstanceState, ServeState
from pipeline.serve.state import StateStore, process_alive, supervisor_alive
from pipeline.settings import Settings


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
        elif rec.state is InstanceState.UNLOADED:
            shown = "unloaded (stopped)" if rec.put_away == "stop" else "unloaded (not started)"
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
                "probe_at": rec.probe_at,
                "probe_ok": rec.probe_ok,
                "probe_latency": rec.probe_latency,
                "probe_error": rec.probe_error,
                "probe_misses": rec.probe_misses,
                "managed": rec.managed,
                "pool": rec.pool,
                "put_away": rec.put_away,
                "inflight": rec.inflight,
                "queued": rec.queued,
                "idle_s": _idle_seconds(rec.idle_since, rec.state),
                "wakes": rec.wakes,
            }
        )
    return rows


def _idle_seconds(since: float | None, state: InstanceState) -> float | None:
    """Seconds with no request in flight, while running (None: busy, or not running)."""
    if since is None or state is not InstanceState.RUNNING:
        return None
    return round(max(0.0, time.time() - since), 1)


def _ago(when: object) -> str:
    if not isinstance(when, int | float):
        return "?"
    return f"{max(time.time() - when, 0):.0f}s ago"


def _health_cell(row: Mapping[str, object]) -> str:
    """The HEALTH column: the last liveness probe since the instance became ready (``-``:
    none yet), ``ok 3ms 4s ago`` or ``failed 2s ago``."""
    ok, at = row.get("probe_ok"), row.get("probe_at")
    if ok is None or at is None:
        return "-"
    if ok:
        latency = row.get("probe_latency")
        ms = f" {latency * 1000:.0f}ms" if isinstance(latency, int | float) else ""
        return f"ok{ms} {_ago(at)}"
    return f"failed {_ago(at)}"


def _health_detail(row: Mapping[str, object]) -> str:
    """The line under the table for a running instance whose last probe failed: how many in
    a row, and why (a hung instance must not look healthy until its restart)."""
    if row.get("probe_ok") is not False or not str(row["state"]).startswith("running"):
        return ""
    misses = row.get("probe_misses") or 1
    return (
        f"health probe failed {misses} time(s) in a row, last {_ago(row.get('probe_at'))}: "
        f"{row.get('probe_error') or 'no reason recorded'}"
    )


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
    headers = ["NAME", "STATE", "PID", "PORT", "GPUS", "RESTARTS", "UP", "MODEL", "URL", "HEALTH"]
    rows = status_rows(state, alive)
    # The model pool's columns, when an instance may be put away and brought back.
    pooled = any(row["managed"] for row in rows)
    if pooled:
        headers += ["POOL", "IDLE", "QUEUED"]
    table = [headers]
    for row in rows:
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
                _health_cell(row),
            ]
        )
        if pooled:
            idle = row["idle_s"]
            managed = bool(row["managed"])
            table[-1] += [
                str(row["pool"] or "-") if managed else "-",
                f"{idle:.0f}s" if managed and isinstance(idle, float) else "-",
                str(row["queued"]) if managed else "-",
            ]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for r in table:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )
    for row in status_rows(state, alive):
        detail = _status_detail(row)
        if detail:
            out.write(f"{row['name']}: {detail}\n")
        health = _health_detail(row)
        if health:
            out.write(f"{row['name']}: {health}\n")
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
    warn_problems(store, state, say)
    if state is not None and node_rank is not None and state.supervisor.node_rank != node_rank:
        say(
            f"warning: {store.state_file} is node rank {state.supervisor.node_rank}'s, not "
            f"{node_rank}'s: give each node its own PIPELINE_STATE_DIR"
        )
    print_status(state, out, alive=alive)
    return 0
