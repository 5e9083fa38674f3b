"""The ``state.json`` record: the states an instance can be in, the edges between them, and
the records the supervisor writes, with their JSON form. Pure: no file, lock or process here
(:mod:`pipeline.serve.state` keeps the store), so the gateway can read states without them.

Reading is total: :meth:`ServeState.from_json` checks every field of every record; a bad one
falls back to its default and is named in :attr:`ServeState.problems` (one line: which record,
which field), and the rest of the file stays usable. Only a text that is not a JSON object at
all raises (ValueError, naming why).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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
    # The model pool: an instance that may be put away and brought back on demand.
    UNLOADED = "unloaded"  # no process; starts on the next request for its model
    SLEEPING = "sleeping"  # asked to sleep (vLLM's sleep mode, level 1), not yet confirmed
    ASLEEP = "asleep"  # its process lives, its GPU memory is released; woken on demand
    WAKING = "waking"  # woken up; the first request after the wake not yet answered
    UNLOADING = "unloading"  # being stopped to be put away (SIGTERM sent to its group)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def settled(self) -> bool:
        """Nothing more will happen without a crash or a request: ready, put away, or
        terminal."""
        return self in SETTLED_STATES or self.terminal

    @property
    def awake(self) -> bool:
        """It holds (or may be taking) its memory and pool slot: everything between a spawn
        and the confirmation that it sleeps or is gone."""
        return self in AWAKE_STATES


# Named sets, in the manner of Supervisor/supervisor's states.py.
TERMINAL_STATES = frozenset({InstanceState.STOPPED, InstanceState.EXITED, InstanceState.FAILED})
# A process of the instance may exist: a stop must signal its group.
LIVE_STATES = frozenset(
    {
        InstanceState.STARTING,
        InstanceState.RUNNING,
        InstanceState.STOPPING,
        InstanceState.SLEEPING,
        InstanceState.ASLEEP,
        InstanceState.WAKING,
        InstanceState.UNLOADING,
    }
)
# Put away: nothing happens until a request comes for it.
PUT_AWAY_STATES = frozenset({InstanceState.UNLOADED, InstanceState.ASLEEP})
SETTLED_STATES = frozenset({InstanceState.RUNNING, *PUT_AWAY_STATES})
# Holding memory and a pool slot (for the budget: never exceeded, not even for a moment).
AWAKE_STATES = frozenset(
    {
        InstanceState.STARTING,
        InstanceState.RUNNING,
        InstanceState.SLEEPING,
        InstanceState.WAKING,
        InstanceState.UNLOADING,
        InstanceState.STOPPING,
    }
)
# Not yet (or no longer) spawned, not given up either: a stop needs no signal.
WAITING_STATES = frozenset({InstanceState.PENDING, InstanceState.BACKOFF})

# Every allowed edge. STOPPED is reachable from every non-terminal state: a stop request
# (PENDING, BACKOFF), a group that is gone (STOPPING), and the supervisor's exit or a
# `doit stop` without a supervisor (STARTING, RUNNING). A terminal instance goes back to
# PENDING only when `doit serve` asks for it again.
#
# The model pool adds: PENDING -> UNLOADED (an on-demand instance waits for its first
# request); RUNNING -> SLEEPING -> ASLEEP -> WAKING -> RUNNING (sleep mode); RUNNING ->
# UNLOADING -> UNLOADED -> STARTING (stop and cold start); SLEEPING -> UNLOADING (sleeping
# failed: stopped instead); SLEEPING/ASLEEP -> UNLOADED (the process ended while put away);
# WAKING -> BACKOFF/FAILED (a failed wake counts as a failed start).
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.PENDING: frozenset(
        {
            InstanceState.STARTING,
            InstanceState.STOPPED,
            InstanceState.FAILED,
            InstanceState.UNLOADED,
        }
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
            InstanceState.SLEEPING,
            InstanceState.UNLOADING,
        }
    ),
    InstanceState.BACKOFF: frozenset(
        {InstanceState.STARTING, InstanceState.STOPPED, InstanceState.FAILED}
    ),
    InstanceState.STOPPING: frozenset({InstanceState.STOPPED}),
    InstanceState.STOPPED: frozenset({InstanceState.PENDING}),
    InstanceState.EXITED: frozenset({InstanceState.PENDING}),
    InstanceState.FAILED: frozenset({InstanceState.PENDING}),
    InstanceState.UNLOADED: frozenset({InstanceState.STARTING, InstanceState.STOPPED}),
    InstanceState.SLEEPING: frozenset(
        {
            InstanceState.ASLEEP,
            InstanceState.UNLOADING,
            InstanceState.UNLOADED,
            InstanceState.STOPPING,
            InstanceState.STOPPED,
        }
    ),
    InstanceState.ASLEEP: frozenset(
        {
            InstanceState.WAKING,
            InstanceState.UNLOADED,
            InstanceState.STOPPING,
            InstanceState.STOPPED,
        }
    ),
    InstanceState.WAKING: frozenset(
        {
            InstanceState.RUNNING,
            InstanceState.BACKOFF,
            InstanceState.FAILED,
            InstanceState.STOPPING,
            InstanceState.STOPPED,
        }
    ),
    InstanceState.UNLOADING: frozenset(
        {InstanceState.UNLOADED, InstanceState.STOPPING, InstanceState.STOPPED}
    ),
}


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
    # The last liveness probe of a ready instance (None: none since it became ready): when
    # (Unix time), whether /health answered 200, how long it took (seconds), why it failed,
    # and how many failed in a row.
    probe_at: float | None = None
    probe_ok: bool | None = None
    probe_latency: float | None = None
    probe_error: str | None = None
    probe_misses: int = 0
    # The model pool: its pool, how it was last put away ("sleep": asleep, its process
    # lives; "stop": its process ended), the requests in flight and held for it (as the
    # gateway last told), since when it has had none in flight (Unix time), and how many
    # times it was started or woken on demand.
    pool: str | None = None
    managed: bool = False
    put_away: str | None = None
    inflight: int = 0
    queued: int = 0
    idle_since: float | None = None
    wakes: int = 0


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
    "bool | None": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
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
