"""Runs a :class:`~pipeline.serve.plan.Plan`: spawn, watch, restart and stop vLLM instances.

The gateway, when the plan has one, is just one more process here: same states, same
readiness probe (its ``/health``), same restarts and stops. It waits for no instance (it
answers 503 for models whose instance is not ready yet) and follows their states by reading
the ``state.json`` this supervisor writes.

The supervisor owns every child: each instance runs in its own session (process group), its
output appended to its log file (never a pipe), and every wait is bounded. Every state change
goes through :meth:`Supervisor._enter`, which refuses an edge that
:data:`~pipeline.serve.record.TRANSITIONS` does not list; they all happen in
:meth:`Supervisor.tick`, driven by a loop that also reaps children and writes ``state.json``
again within a tick when someone deleted or replaced it. The supervisor makes itself a child
subreaper, so the children of an instance whose leader died are reparented to it and
reaped here, not left as zombies under a container's PID 1 that never reaps.

Seams for tests come through the constructor: ``spawner`` (start a process; what it returns
needs ``pid``, ``returncode``, ``poll()`` and ``wait()``), ``groups`` (is a process group alive,
signal it), ``probe`` (the ``/health`` check), ``clock`` and ``sleep``; their protocols and
the real implementations are in :mod:`pipeline.serve.seams`.

Liveness: once an instance is running, its ``/health`` is probed every ``health_interval``
seconds, each probe in a daemon thread of its own (a hung instance cannot stall the loop: a
probe not back by its deadline counts as timed out, and a new one starts only once the last
has ended). ``health_failures`` failed probes in a row restart it through :meth:`_failed`, as a
crash would; probes never run while it starts (readiness has its own probe and limit).

A multi-node instance (a plan with a ``member``) is a gang. Under a platform (LWS, Slurm,
SkyPilot) its member is planned with ``restart = no``: it never restarts on its own, and the
platform restarts the group. On bare nodes the supervisors keep the gang together through the
leader's control endpoint (:mod:`pipeline.serve.gang`; seams ``gang_server`` and ``gang_poll``):

- the leader's supervisor publishes the gang's view (its session, the generation: one per
  start of its member, and the member's state) and restarts the whole gang, with a new
  generation and the instance's restart policy and backoff, when its member exits, a
  follower reports its member down for this generation, or a follower that polled during this
  generation is silent for :data:`~pipeline.serve.gang.MISSING_AFTER` seconds;
- a follower's supervisor starts its member when the leader's member is starting or running
  a generation it has not run, marks it running when the leader's is, and stops it (it never
  restarts it alone) when it exits, when the generation changes, when the leader is not up,
  or when the leader has not answered for :data:`~pipeline.serve.gang.LEADER_GRACE` seconds;
- the first failure's last log lines are kept in ``<log>.first-failure`` (a crash loop
  would push them out of the rotated log).

The model pool (instances that are on-demand, have an ``idle_timeout`` or sit in a
``[pool.<group>]``: ``plan.managed``): an on-demand instance waits in ``unloaded`` for its
first request. The gateway asks for it over the control channel
(:mod:`pipeline.serve.control`; ``want``), tells the requests in flight and held per
instance (``activity``), and answers ``release`` questions. To start or wake an instance, the
supervisor first puts away the least recently used idle instance in its way (its pool's
``max_awake``, its GPUs' memory: :mod:`pipeline.serve.pool`), once the gateway has released it
(nothing in flight, nothing routed to it any more) and only once it is confirmed asleep or gone
(it counts as awake until then: no budget is ever exceeded). Put away means vLLM's sleep mode
(``sleeping`` -> ``asleep``; ``waking`` back) where the plan has it, else a stop (``unloading``
-> ``unloaded``; a cold start back). After every start or wake, one short request of its own
(``SleepCalls.canary``) must pass before ``running``; a failure is a failed start, with the
usual restarts. Sleep, wake and that request run in threads (:class:`_Call`) that wake the loop
when done.

Blocking: :meth:`Supervisor.run` blocks until every instance is terminal (stopped, exited,
failed) and returns the exit code. :meth:`Supervisor.tick` never blocks longer than one
readiness probe (``probe_timeout``); liveness probes run beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline import reporting
from pipeline.fsutil import Fingerprint
from pipeline.serve import gang
from pipeline.serve.control import ControlError, ControlServer
from pipeline.serve.logfiles import LOG_ROTATE_BYTES, tail
from pipeline.serve.plan import InstancePlan, Plan, control_socket
from pipeline.serve.pool import Slot, fits, make_room
from pipeline.serve.pool import conflicts as _conflict
from pipeline.serve.record import (
    WAITING_STATES,
    InstanceRecord,
    InstanceState,
    ServeState,
    SupervisorRecord,
    enter,
)
from pipeline.serve.seams import (
    GangPoll,
    GangServer,
    Groups,
    Probe,
    ProbeResult,
    ProcessGroups,
    SleepCalls,
    Spawner,
    as_result,
    become_subreaper,
    default_spawner,
    http_check,
)
from pipeline.serve.state import StateStore, proc_start_time

# An instance that stayed up this long starts a fresh count of consecutive restarts.
STABLE_AFTER = 300.0
PROBE_INTERVAL = 0.1
FAST_PROBE_PERIOD = 5.0
TICK = 0.05
IDLE_TICK = 0.5
# A liveness probe times out after health_interval seconds, within these bounds; the loop
# gives its thread this much longer before it counts the probe as timed out itself.
HEALTH_TIMEOUT = (1.0, 5.0)
HEALTH_SLACK = 1.0


class _HealthCall:
    """One liveness probe, run in a daemon thread so that the loop never waits for it.

    ``result`` is None until the probe returns; a probe that raises counts as failed. The
    thread ends by itself: the probe's own timeout bounds it."""

    __slots__ = ("deadline", "result", "thread", "timeout")

    def __init__(self, probe: Probe, name: str, url: str, timeout: float, deadline: float) -> None:
        self.timeout = timeout
        self.deadline = deadline  # on the supervisor's clock: counted as timed out after it
        self.result: ProbeResult | None = None
        self.thread = threading.Thread(
            target=self._run, args=(probe, url), name=f"health {name}", daemon=True
        )
        self.thread.start()

    def _run(self, probe: Probe, url: str) -> None:
        began = time.monotonic()
        try:
            value = probe(url, self.timeout)
        except Exception as exc:  # a broken probe is a failed probe, not a dead thread
            value = ProbeResult(False, error=f"the probe raised {type(exc).__name__}: {exc}")
        # One assignment: the loop sees either nothing or the whole result.
        self.result = as_result(value, time.monotonic() - began)


class _Call:
    """One call to an instance that may take long (sleep, wake, the first request after a
    start or wake), in a daemon thread: ``result`` is None until it returns. Bounded by the
    call's own timeout; a call whose instance was stopped meanwhile is simply dropped."""

    __slots__ = ("done", "kind", "result", "thread")

    def __init__(
        self, kind: str, name: str, run: Callable[[], ProbeResult], done: Callable[[], None]
    ) -> None:
        self.kind = kind
        self.done = done  # wakes the supervisor's loop: the outcome is acted on at once
        self.result: ProbeResult | None = None
        self.thread = threading.Thread(
            target=self._run, args=(run,), name=f"{kind} {name}", daemon=True
        )
        self.thread.start()

    def _run(self, run: Callable[[], ProbeResult]) -> None:
        try:
            value = run()
        except Exception as exc:  # a broken call is a failed call, not a dead thread
            value = ProbeResult(False, error=f"{type(exc).__name__}: {exc}")
        self.result = value
        self.done()


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
    # A follower on bare nodes: the leader's last view, when it last answered, when to poll
    # next, and the (leader session, generation) its member runs or last ran.
    view: dict[str, object] | None = None
    view_ok: bool = False
    leader_ok_at: float = 0.0
    next_poll: float = 0.0
    ran: tuple[str, int] | None = None
    first_failure_kept: bool = False
    # Liveness while RUNNING: the probe in flight, when the next is due, and whether the one
    # in flight was already counted as timed out.
    health: _HealthCall | None = None
    next_health: float = 0.0
    health_counted: bool = False
    # The model pool: the sleep, wake or first-request call in flight; since when (monotonic)
    # a request waits for it to start or wake (None: none); why it is being released (the
    # gateway was asked whether it is idle) and when to ask again; when it last had no
    # request in flight (monotonic).
    call: _Call | None = None
    wanted_at: float | None = None
    releasing: str | None = None
    release_retry: float = 0.0
    last_active: float = 0.0

    @property
    def slot(self) -> Slot:
        plan = self.plan
        return Slot(plan.name, plan.pool, plan.max_awake, plan.gpu_ids, plan.gpu_share)

    @property
    def role(self) -> str | None:
        """``leader`` / ``follower`` of a gang on bare nodes; None: a one-node instance or a
        member under a platform (supervised like one, with restart = no)."""
        member = self.plan.member
        if member is None or member.platform is not None:
            return None
        return "leader" if member.is_leader else "follower"


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
        groups: Groups | None = None,
        probe: Probe = http_check,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        reap_all: bool = False,
        say: Callable[[str], None] | None = None,
        probe_timeout: float = 1.0,
        only: Collection[str] | None = None,
        gang_server: GangServer = gang.start_control_server,
        gang_poll: GangPoll = gang.http_poll,
        pool_calls: SleepCalls | None = None,
        control: ControlServer | None = None,
    ) -> None:
        """``reap_all``: reap every child, orphans included, and become a child subreaper
        (PID 1, the detached supervisor). ``only``: start these instances; the others begin
        as stopped (`doit serve NAME` with no supervisor running)."""
        self.plan = plan
        self.store = store
        self.base_env = dict(base_env)
        self.spawner = spawner
        self.groups = groups or ProcessGroups()
        self.probe = probe
        self.clock = clock
        self.sleep = sleep
        self.reap_all = reap_all
        self.say = say or reporting.say
        self.probe_timeout = probe_timeout
        self.gang_server = gang_server
        self.gang_poll = gang_poll
        self.pool_calls = pool_calls or SleepCalls()
        # The control channel with the gateway: served when an instance is managed (may be
        # put away and brought back); tests hand their own.
        self.managed = any(i.managed for i in plan.instances)
        self.control = control
        self._own_control = False
        self._changed = False
        self.board = gang.GangBoard(clock)
        self._servers: list[gang.Closable] = []
        self.procs: dict[str, _Proc] = {}
        self.stop_requested = False
        self.signals = 0
        self.last_signal = ""
        self.killing = False
        self.dirty = True
        # state.json as last written: (inode, mtime, size); another value means someone
        # deleted or replaced it, and the next tick writes it again.
        self._written: Fingerprint | None = None
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
                node_rank=inst.member.rank if inst.member is not None else None,
                nodes=inst.member.nodes if inst.member is not None else 1,
                pool=inst.pool,
                managed=inst.managed,
            )
            if only is not None and inst.name not in only:
                record.state = InstanceState.STOPPED
                record.reason = "not started (`doit serve` named others)"
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
                node_rank=plan.node_rank,
                started_at=time.time(),
            ),
            instances={name: p.record for name, p in self.procs.items()},
        )

    # ---- public API ----------------------------------------------------------------------
    def request_start(self, names: list[str]) -> None:
        """Start stopped, exited or failed instances again (a fresh restart count); others,
        and everything once a full stop is under way, are left as they are."""
        if self.stop_requested:
            return
        for name in names:
            proc = self.procs.get(name)
            if proc is None or not proc.record.state.terminal:
                continue
            proc.streak = 0
            self._enter(proc, InstanceState.PENDING, None, "start requested")

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
                self.groups.signal(proc.record.pgid, signal.SIGKILL)
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

    def run(self, reported: Callable[[], None] | None = None) -> int:
        """Supervise until every instance is terminal; returns 1 if any failed, else 0.

        ``reported`` is called once the first state is on disk (readers can see this
        supervisor from then on)."""
        self.store.ensure()
        self.store.clear_requests()
        if self.reap_all:
            become_subreaper()
        self.start_gang_servers()
        self.start_control()
        self._save()
        if reported is not None:
            reported()
        try:
            while not self.finished:
                self.tick()
                # Quick while anything is in motion; a calm loop when all is settled (a stop
                # request or a crash is then seen within IDLE_TICK; the gateway's messages
                # at once).
                self._wait(IDLE_TICK if self.settled and not self._cleaning else TICK)
        finally:
            # Whatever happened (an exception in the loop included), leave no child behind.
            self._kill_all_now()
            self.close_gang_servers()
            if self._own_control and self.control is not None:
                self.control.close()
            self.state.supervisor.exited = True
            self.state.supervisor.exit_code = self.exit_code()
            self._save(force=True)
        return self.exit_code()

    def start_gang_servers(self) -> None:
        """Serve the control endpoint of every gang led here (one server per port). A port
        that cannot be bound fails the gangs on it, with the reason. Idempotent."""
        if self._servers:
            return
        by_port: dict[tuple[str, int], dict[str, str]] = {}
        for proc in self.procs.values():
            member = proc.plan.member
            if proc.role != "leader" or member is None or member.token is None:
                continue
            self._publish(proc)
            host = member.host_ip or "0.0.0.0"
            by_port.setdefault((host, member.control_port), {})[proc.record.name] = (
                member.token.get_secret_value()
            )
        for (host, port), tokens in sorted(by_port.items()):
            try:
                self._servers.append(self.gang_server(host, port, self.board, tokens))
            except OSError as exc:
                for name in tokens:
                    proc = self.procs[name]
                    if proc.record.state is InstanceState.PENDING:
                        self._give_up(
                            proc,
                            f"cannot serve the gang's control endpoint on {host}:{port}: "
                            f"{exc.strerror or exc}",
                        )

    def start_control(self) -> None:
        """Serve the control channel with the gateway when an instance is managed. A socket
        that cannot be served leaves every managed instance unable to start on demand: they
        fail with the reason (the others run as usual)."""
        if not self.managed or self.control is not None:
            return
        server = ControlServer(control_socket(self.store.state_file))
        try:
            server.start()
        except ControlError as exc:
            for proc in self.procs.values():
                if proc.plan.managed and proc.record.state is InstanceState.PENDING:
                    self._give_up(proc, str(exc))
            return
        self.control = server
        self._own_control = True

    def _poke(self) -> None:
        """Wake the loop now (from another thread): a call to an instance has ended."""
        control = self.control
        if control is not None:
            control.arrived.set()

    def _wait(self, seconds: float) -> None:
        control = self.control
        if control is not None and self.sleep is time.sleep:
            control.arrived.wait(seconds)
        else:
            self.sleep(seconds)

    def close_gang_servers(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.close()
        self._servers = []

    # ---- the loop ------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass: reap, take requests, advance every instance, persist if changed."""
        now = self.clock()
        self._handle_signals()
        self._reap()
        requests = self.store.take_requests()
        if "*all*" in requests.stop:
            self.request_stop()
        elif requests.stop:
            self.request_stop(list(requests.stop))
        if requests.start:
            self.request_start(list(requests.start))
        if self.control is not None:
            self._take_messages(now)
            self._schedule(now)
        for proc in self.procs.values():
            role = proc.role
            if role == "follower":
                self._poll_leader(proc, now)
                self._advance_follower(proc, now)
            else:
                self._advance(proc, now)
                if role == "leader":
                    self._watch_followers(proc, now)
                    self._publish(proc)
        if self.settled != self.state.supervisor.settled:
            self.state.supervisor.settled = self.settled
            self.dirty = True
        if not self.dirty and self.store.signature() != self._written:
            # `doit status` must not lose sight of us (nor `doit stop` of the instances).
            self.say(f"serve: {self.store.state_file} was deleted or changed; writing it again")
            self.dirty = True
        self._save()
        if self._changed and self.control is not None:
            # The gateway re-reads the states now, not at its next housekeeping: a held
            # request goes out as soon as its instance is running.
            self._changed = False
            self.control.send({"op": "changed"})
        # Only now: whoever asked sees the request gone once the state file shows its effect.
        self.store.done(requests)

    def _enter(
        self, proc: _Proc, state: InstanceState, reason: str | None, line: str | None = None
    ) -> None:
        """The one place an instance changes state: checks the edge (IllegalTransition),
        marks the state for saving, and says ``line`` when given. Entering RUNNING starts
        liveness afresh: the first probe one ``health_interval`` later, no misses counted."""
        enter(proc.record, state, reason)
        self.dirty = True
        self._changed = True
        if state in (InstanceState.STARTING, InstanceState.WAKING, InstanceState.RUNNING):
            proc.wanted_at = None
        if state is not InstanceState.RUNNING:
            proc.releasing = None
        if state is InstanceState.RUNNING and proc.plan.managed:
            self._running_managed(proc)
        if state is InstanceState.RUNNING:
            rec = proc.record
            proc.health = None
            proc.health_counted = False
            proc.next_health = self.clock() + proc.plan.health_interval
            rec.probe_at = rec.probe_ok = rec.probe_latency = rec.probe_error = None
            rec.probe_misses = 0
        if line is not None:
            self.say(f"serve: {proc.record.name}: {line}")

    def _advance(self, proc: _Proc, now: float) -> None:
        rec, plan = proc.record, proc.plan
        self._clean_leftover(proc, now)
        state = rec.state
        if state is InstanceState.PENDING:
            if plan.on_demand:
                self._enter(proc, InstanceState.UNLOADED, "starts on the first request for it")
            elif self._may_start(proc, first=True):
                self._spawn(proc, now)
        elif state is InstanceState.UNLOADED:
            if proc.wanted_at is not None and self._may_start(proc, first=False):
                proc.record.wakes += 1
                self._spawn(proc, now)
        elif state is InstanceState.STARTING:
            code = self._exit_status(proc)
            if code is not None:
                self._failed(proc, now, f"exited during startup ({_describe_exit(code)})")
            elif now >= proc.deadline:
                self._failed(proc, now, f"not ready within {plan.ready_timeout:g}s (ready_timeout)")
            elif not plan.health_url:
                # A headless member under a platform: no HTTP port; the gang's health is the
                # leader's /health, which the platform probes.
                rec.ready_at = time.time()
                self._enter(proc, InstanceState.RUNNING, None, "running (headless member)")
            elif proc.call is not None:
                self._first_request_done(proc, now)
            elif now >= proc.next_probe:
                # Probe every tick at first (a fast start is seen at once), then every 0.1 s:
                # a refused connection costs next to nothing while vLLM loads, and each
                # interval is time to the first token (0.5 s lost 0.25 s per start on average).
                early = now - proc.started_mono < FAST_PROBE_PERIOD
                proc.next_probe = now + (TICK if early else PROBE_INTERVAL)
                if as_result(self.probe(plan.health_url, self.probe_timeout), 0.0).ok:
                    if plan.managed:
                        # No client's request before one of ours has been answered; the
                        # gateway may open its connections meanwhile.
                        self._first_request(proc, now)
                        self._tell_healthy(proc)
                        return
                    rec.ready_at = time.time()
                    took = self.clock() - proc.started_mono
                    self._enter(
                        proc,
                        InstanceState.RUNNING,
                        None,
                        f"ready in {took:.1f}s at {plan.base_url}",
                    )
        elif state is InstanceState.RUNNING:
            code = self._exit_status(proc)
            if code is not None:
                if now - proc.started_mono >= STABLE_AFTER:
                    proc.streak = 0
                # A gang's leader exits 0 when a follower dies under it (vLLM's API server
                # shuts down cleanly): on bare nodes that is a gang failure like any other.
                clean = code == 0 and proc.role != "leader"
                self._failed(proc, now, f"exited ({_describe_exit(code)})", clean=clean)
            elif plan.health_url:
                self._watch_health(proc, now)
        elif state is InstanceState.BACKOFF:
            if now >= proc.deadline and self._may_start(proc, first=False):
                self._spawn(proc, now)
        elif state in (InstanceState.SLEEPING, InstanceState.ASLEEP, InstanceState.WAKING):
            self._advance_sleeper(proc, now)
        elif state is InstanceState.UNLOADING:
            self._exit_status(proc)
            if not self.groups.alive(rec.pgid) and proc.popen is None:
                rec.pid = rec.pgid = None
                rec.put_away = "stop"
                self._enter(proc, InstanceState.UNLOADED, rec.reason, "put away (stopped)")
            elif now >= proc.deadline and not proc.killed:
                proc.killed = True
                self.groups.signal(rec.pgid, signal.SIGKILL)
        elif state is InstanceState.STOPPING:
            self._exit_status(proc)
            if not self.groups.alive(rec.pgid) and proc.popen is None:
                rec.pid = rec.pgid = None
                self._enter(proc, InstanceState.STOPPED, rec.reason, "stopped")
            elif now >= proc.deadline and not proc.killed:
                proc.killed = True
                self.groups.signal(rec.pgid, signal.SIGKILL)
                self.say(
                    f"serve: {rec.name}: still running {plan.stop_grace:g}s after SIGTERM "
                    "(stop_grace), sent SIGKILL"
                )

    def _watch_health(self, proc: _Proc, now: float) -> None:
        """A running instance's liveness: take the result of the probe in flight (or count it
        as timed out past its deadline), and start the next when due. Never blocks."""
        plan = proc.plan
        call = proc.health
        if call is not None:
            result = call.result
            if result is not None:
                proc.health = None
                if not proc.health_counted:
                    self._health_outcome(proc, now, result)
            elif not proc.health_counted and now >= call.deadline:
                proc.health_counted = True
                # If it hangs on, the next miss is counted one interval from now.
                proc.next_health = now + plan.health_interval
                error = f"timed out after {call.timeout:g} s"
                self._health_outcome(proc, now, ProbeResult(False, call.timeout, error))
        if proc.record.state is not InstanceState.RUNNING or now < proc.next_health:
            return
        call = proc.health
        if call is not None and not proc.health_counted:
            return  # still within its time (longer than the interval): the next follows it
        proc.next_health = now + plan.health_interval
        if call is not None:
            # Counted as timed out, and not even ended by itself since: another miss, and no
            # second thread on the same hung instance.
            error = f"timed out after {call.timeout:g} s (the last probe still hangs)"
            self._health_outcome(proc, now, ProbeResult(False, call.timeout, error))
            return
        timeout = min(max(plan.health_interval, HEALTH_TIMEOUT[0]), HEALTH_TIMEOUT[1])
        proc.health_counted = False
        proc.health = _HealthCall(
            self.probe, proc.record.name, plan.health_url, timeout, now + timeout + HEALTH_SLACK
        )

    def _health_outcome(self, proc: _Proc, now: float, result: ProbeResult) -> None:
        """Record one liveness probe; the ``health_failures``-th miss in a row restarts the
        instance by the usual rules (a hung instance is treated as a crashed one)."""
        rec, plan = proc.record, proc.plan
        was_failing = rec.probe_misses > 0
        rec.probe_at = time.time()
        rec.probe_ok = result.ok
        rec.probe_latency = round(result.latency, 4)
        rec.probe_error = result.error
        self.dirty = True
        if result.ok:
            if was_failing:
                self.say(f"serve: {rec.name}: health probe ok again ({rec.probe_misses} missed)")
            rec.probe_misses = 0
            return
        rec.probe_misses += 1
        misses, limit = rec.probe_misses, plan.health_failures
        if misses < limit:
            self.say(f"serve: {rec.name}: health probe failed ({misses}/{limit}): {result.error}")
            return
        times = "time" if misses == 1 else "times"
        why = f"health probe failed {misses} {times} in a row ({result.error})"
        if now - proc.started_mono >= STABLE_AFTER:
            proc.streak = 0
        self._failed(proc, now, why)
        proc.health = None
        if proc.leftover_pgid:
            # A stopped (SIGSTOP) process handles its SIGTERM only once continued.
            self.groups.signal(proc.leftover_pgid, signal.SIGCONT)

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
        return not plan.managed or self._fits_now(proc)

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
        rec.pid = rec.pgid = popen.pid
        if proc.role == "leader" or (plan.member is not None and plan.member.platform):
            rec.generation += 1
        rec.proc_start = proc_start_time(popen.pid)
        rec.started_at = time.time()
        rec.ready_at = None
        # The reason of a failed attempt stays visible while the next one starts.
        self._enter(
            proc,
            InstanceState.STARTING,
            rec.reason,
            f"starting (pid {popen.pid}, log {plan.log_file})",
        )

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
        # poll() also takes a child reaped by someone else as ended (returncode 0); a
        # reap_all pass that reaped it has already set its returncode.
        code = popen.returncode if popen.returncode is not None else popen.poll()
        if code is None:
            return None
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
        proc.call = None
        self._exit_status(proc)
        if plan.member is not None and not self.stop_requested:
            self._keep_first_failure(proc, why)
        if self.groups.alive(rec.pgid):
            # The leader is gone (or hung at startup) but its group lives on: a grandchild
            # may hold the port or the GPU. Kill it before any restart.
            self.groups.signal(rec.pgid, signal.SIGTERM)
            proc.leftover_pgid = rec.pgid
            proc.leftover_kill_at = now + plan.stop_grace
        rec.pid = rec.pgid = None
        self.dirty = True
        if clean or self.stop_requested:
            self._enter(proc, InstanceState.EXITED, why, f"{why}; not restarted")
            return
        if plan.restart == "on-failure" and proc.streak < plan.max_restarts:
            delay = min(plan.backoff_initial * (2**proc.streak), plan.backoff_max)
            proc.streak += 1
            rec.restarts += 1
            proc.deadline = now + delay
            self._enter(
                proc,
                InstanceState.BACKOFF,
                why,
                f"{why}; restart {proc.streak}/{plan.max_restarts} "
                f"in {delay:g}s (log {plan.log_file})",
            )
            return
        limit = "restart: no" if plan.restart == "no" else f"{plan.max_restarts} restarts"
        self._give_up(proc, f"{why}; gave up after {limit}")

    # ---- the model pool ----------------------------------------------------------------
    def _running_managed(self, proc: _Proc) -> None:
        """A managed instance became ready: idle from now (as far as we know), its replicas
        no longer wanted for its requests, and the gateway told at once (requests may be held
        for it), ahead of this tick's save of the state file."""
        proc.last_active = self.clock()
        if proc.record.inflight == 0:
            proc.record.idle_since = time.time()
        for other in self.procs.values():
            if other.plan.model_names == proc.plan.model_names:
                other.wanted_at = None
        if self.control is not None:
            self.control.send(
                {
                    "op": "running",
                    "instance": proc.record.name,
                    "ready_at": proc.record.ready_at,
                    "at": time.time(),
                }
            )

    def _take_messages(self, now: float) -> None:
        """What the gateway said since the last tick (see :mod:`pipeline.serve.control`)."""
        assert self.control is not None
        for message in self.control.take():
            op = message.get("op")
            if op == "disconnected":
                # No answer will come to a release in flight; none is asked until it is back.
                for proc in self.procs.values():
                    proc.releasing = None
                continue
            name = message.get("instance")
            proc = self.procs.get(name) if isinstance(name, str) else None
            if proc is None:
                continue
            rec = proc.record
            if op == "activity":
                inflight, queued = message.get("inflight"), message.get("queued")
                if isinstance(inflight, int) and isinstance(queued, int):
                    if inflight == 0 and rec.inflight > 0:
                        proc.last_active = now
                        rec.idle_since = time.time()
                    elif inflight > 0:
                        rec.idle_since = None
                    rec.inflight, rec.queued = max(0, inflight), max(0, queued)
                    self.dirty = True
            elif op == "want" and proc.plan.managed:
                if rec.state is InstanceState.RUNNING and proc.releasing is None:
                    continue  # running: the gateway routes to it once it has re-read states
                if proc.wanted_at is None and not rec.state.terminal:
                    proc.wanted_at = now
            elif op == "released" and proc.releasing is not None:
                why, proc.releasing = proc.releasing, None
                if message.get("ok") is True:
                    if rec.state is InstanceState.RUNNING and not self.stop_requested:
                        self._put_away(proc, now, why)
                else:
                    # A request came first: it stays; ask again later if still needed.
                    proc.wanted_at = None
                    proc.release_retry = now + TICK

    def _schedule(self, now: float) -> None:
        """Make room for the instances that wait to start or wake (first come, first
        served), then put away those idle past their ``idle_timeout``. Only idle instances
        (nothing in flight or held, as the gateway last told) are put away, and only once the
        gateway confirms it (``release``), so no request is ever cut; with everything busy,
        a waiter waits."""
        assert self.control is not None
        if not self.control.connected:
            return
        managed = [p for p in self.procs.values() if p.plan.managed]
        going = {
            p.plan.name
            for p in managed
            if p.releasing is not None
            or p.record.state in (InstanceState.SLEEPING, InstanceState.UNLOADING)
        }
        waiters = sorted(
            (since, p.plan.name) for p in managed if (since := self._waiting_since(p)) is not None
        )
        for _, name in waiters:
            proc = self.procs[name]
            awake = self._awake(proc)
            if fits(proc.slot, awake):
                continue  # it starts (or wakes) in _advance
            idle = [p.slot for p in self._idle(now) if p.plan.name not in going]
            remaining = [a for a in awake if a.name not in going]
            victims = make_room(proc.slot, remaining, idle)
            if victims is None:
                continue  # everything in its way is busy: it waits
            for victim in victims:
                self._release(self.procs[victim.name], f"to make room for {name}")
                going.add(victim.name)
        for proc in self._idle(now):
            timeout = proc.plan.idle_timeout
            if timeout > 0 and now - proc.last_active >= timeout:
                self._release(proc, f"idle for {timeout:g}s (idle_timeout)")

    def _waiting_since(self, proc: _Proc) -> float | None:
        """Since when a managed instance waits for room to start or wake (None: it does not)."""
        state = proc.record.state
        if state in (InstanceState.UNLOADED, InstanceState.ASLEEP):
            return proc.wanted_at
        if state is InstanceState.BACKOFF and self.clock() >= proc.deadline:
            return proc.deadline
        return None

    def _awake(self, exclude: _Proc) -> list[Slot]:
        """What holds memory and pool slots now: every awake instance (until it is confirmed
        asleep or gone), and every group of a failed attempt not yet gone."""
        return [
            p.slot
            for p in self.procs.values()
            if p is not exclude and (p.record.state.awake or p.leftover_pgid)
        ]

    def _fits_now(self, proc: _Proc) -> bool:
        """Whether a managed instance may start or wake now: within every budget, and no
        instance in its way has waited longer."""
        slot = proc.slot
        if not fits(slot, self._awake(proc)):
            return False
        mine = self._waiting_since(proc)
        if mine is None:
            return True
        for other in self.procs.values():
            if other is proc or not other.plan.managed:
                continue
            since = self._waiting_since(other)
            if since is not None and since < mine and _conflict(slot, other.slot):
                return False
        return True

    def _idle(self, now: float) -> list[_Proc]:
        """Running managed instances with nothing in flight or held, least recently used
        first: those that may be put away."""
        idle = [
            p
            for p in self.procs.values()
            if p.plan.managed
            and p.record.state is InstanceState.RUNNING
            and p.record.inflight == 0
            and p.record.queued == 0
            and p.releasing is None
            and p.wanted_at is None
            and now >= p.release_retry
        ]
        return sorted(idle, key=lambda p: p.last_active)

    def _release(self, proc: _Proc, why: str) -> None:
        """Ask the gateway whether ``proc`` is idle (it then routes nothing more to it)."""
        assert self.control is not None
        if self.control.send({"op": "release", "instance": proc.plan.name}):
            proc.releasing = why

    def _put_away(self, proc: _Proc, now: float, why: str) -> None:
        """Sleep (sleep mode) or stop an idle instance the gateway has released."""
        plan = proc.plan
        if plan.sleep:
            self._enter(proc, InstanceState.SLEEPING, why, f"putting to sleep ({why})")
            url, grace = plan.base_url, plan.stop_grace
            proc.call = _Call(
                "sleep", plan.name, lambda: self.pool_calls.sleep(url, grace), self._poke
            )
            return
        self._unload(proc, now, why, f"putting away: stopping ({why})")

    def _unload(self, proc: _Proc, now: float, why: str, line: str) -> None:
        proc.deadline = now + proc.plan.stop_grace
        proc.killed = False
        self._enter(proc, InstanceState.UNLOADING, why, line)
        self.groups.signal(proc.record.pgid, signal.SIGTERM)

    def _first_request(self, proc: _Proc, now: float) -> None:
        """After /health answers: one short request of ours, in a thread, before RUNNING."""
        plan = proc.plan
        key = plan.secret_env.get("VLLM_API_KEY")
        secret = key.get_secret_value() if key is not None else None
        timeout = max(1.0, proc.deadline - now)
        model = plan.model_names[0] if plan.model_names else ""

        def run() -> ProbeResult:
            return self.pool_calls.canary(plan.base_url, model, secret, timeout)

        proc.call = _Call("first request", plan.name, run, self._poke)

    def _tell_healthy(self, proc: _Proc) -> None:
        """The instance's server answers (its first request or its wake is under way): the
        gateway opens the connections its held requests will need."""
        if self.control is not None:
            self.control.send({"op": "healthy", "instance": proc.record.name})

    def _first_request_done(self, proc: _Proc, now: float) -> None:
        call = proc.call
        if call is None or call.result is None:
            return
        proc.call = None
        result = call.result
        if not result.ok:
            self._failed(proc, now, f"the first request after the start failed: {result.error}")
            return
        rec = proc.record
        rec.ready_at = time.time()
        took = self.clock() - proc.started_mono
        self._enter(
            proc, InstanceState.RUNNING, None, f"ready in {took:.1f}s at {proc.plan.base_url}"
        )

    def _advance_sleeper(self, proc: _Proc, now: float) -> None:
        """SLEEPING, ASLEEP and WAKING: the process must live on; the call decides."""
        rec, plan = proc.record, proc.plan
        state = rec.state
        code = self._exit_status(proc)
        if code is not None:
            if state is InstanceState.WAKING:
                self._failed(proc, now, f"exited while waking ({_describe_exit(code)})")
                return
            proc.call = None
            if self.groups.alive(rec.pgid):
                self.groups.signal(rec.pgid, signal.SIGTERM)
                proc.leftover_pgid = rec.pgid
                proc.leftover_kill_at = now + plan.stop_grace
            rec.pid = rec.pgid = None
            rec.put_away = "stop"
            why = f"exited while {state} ({_describe_exit(code)})"
            self._enter(proc, InstanceState.UNLOADED, why, f"{why}; starts again on demand")
            return
        if state is InstanceState.ASLEEP:
            if proc.wanted_at is not None and self._may_start(proc, first=False):
                rec.wakes += 1
                proc.started_mono = now
                self._enter(proc, InstanceState.WAKING, None, "waking")
                self._tell_healthy(proc)
                proc.call = _Call("wake", plan.name, lambda: self._wake_and_check(plan), self._poke)
            return
        call = proc.call
        if call is None or call.result is None:
            return
        proc.call = None
        result = call.result
        if state is InstanceState.SLEEPING:
            if result.ok:
                rec.put_away = "sleep"
                self._enter(
                    proc, InstanceState.ASLEEP, rec.reason, f"asleep in {result.latency:.1f}s"
                )
            else:
                why = f"sleeping failed ({result.error}); stopped instead"
                self._unload(proc, now, why, why)
        elif result.ok:
            rec.ready_at = time.time()
            took = self.clock() - proc.started_mono
            self._enter(proc, InstanceState.RUNNING, None, f"awake in {took:.1f}s")
        else:
            self._failed(proc, now, f"waking failed: {result.error}")

    def _wake_and_check(self, plan: InstancePlan) -> ProbeResult:
        """``/wake_up``, then the first request: both must pass."""
        woke = self.pool_calls.wake(plan.base_url, plan.ready_timeout)
        if not woke.ok:
            return woke
        key = plan.secret_env.get("VLLM_API_KEY")
        secret = key.get_secret_value() if key is not None else None
        model = plan.model_names[0] if plan.model_names else ""
        first = self.pool_calls.canary(plan.base_url, model, secret, plan.ready_timeout)
        if not first.ok:
            return ProbeResult(False, first.latency, f"the first request after it: {first.error}")
        return ProbeResult(True, woke.latency + first.latency)

    # ---- gangs on bare nodes ------------------------------------------------------------
    def _publish(self, proc: _Proc) -> None:
        rec = proc.record
        self.board.publish(
            rec.name,
            {
                "session": self.state.supervisor.session,
                "generation": rec.generation,
                "state": rec.state.value,
                "reason": rec.reason or "",
            },
        )

    def _watch_followers(self, proc: _Proc, now: float) -> None:
        """The leader: restart the gang when a follower's member is down for this generation
        or a follower that polled during it went silent; keep ``members`` for status."""
        rec = proc.record
        beats = self.board.beats(rec.name)
        members = [
            {
                "rank": hb.rank,
                "state": hb.state,
                "generation": hb.generation,
                "seen": round(hb.seen_wall, 1),
            }
            for _, hb in sorted(beats.items())
        ]
        shown = [(m["rank"], m["state"], m["generation"]) for m in members]
        if shown != [(m["rank"], m["state"], m["generation"]) for m in rec.members]:
            self.dirty = True
        rec.members = members
        if rec.state not in (InstanceState.STARTING, InstanceState.RUNNING):
            return
        for rank, hb in sorted(beats.items()):
            if hb.seen < proc.started_mono:
                continue  # not heard from during this generation: the start waits for it
            if hb.generation == rec.generation and hb.state not in gang.UP_STATES:
                why = f"the member on rank {rank} is down" + (
                    f" ({hb.reason})" if hb.reason else ""
                )
                self._failed(proc, now, why)
                return
            if now - hb.seen > gang.MISSING_AFTER:
                silent = now - hb.seen
                self._failed(proc, now, f"rank {rank} is missing (no heartbeat for {silent:.0f}s)")
                return

    def _poll_leader(self, proc: _Proc, now: float) -> None:
        """A follower: one poll of the leader's control endpoint when due (its heartbeat)."""
        member = proc.plan.member
        if member is None or member.token is None or now < proc.next_poll:
            return
        if proc.record.state.terminal:
            return
        proc.next_poll = now + gang.POLL_INTERVAL
        rec = proc.record
        params = {
            "rank": member.rank,
            "generation": rec.generation,
            "session": self.state.supervisor.session,
            "state": rec.state.value,
            "reason": (rec.reason or "")[:200],
        }
        view = self.gang_poll(
            member.control_url,
            rec.name,
            member.token.get_secret_value(),
            params,
            self.probe_timeout,
        )
        proc.view_ok = view is not None
        if view is not None:
            proc.view = view
            proc.leader_ok_at = now
        elif not proc.leader_ok_at:
            proc.leader_ok_at = now  # the grace runs from the first try

    def _advance_follower(self, proc: _Proc, now: float) -> None:
        rec = proc.record
        self._clean_leftover(proc, now)
        view = proc.view if proc.view_ok else None
        lead: tuple[str, int] | None = None
        lead_state = ""
        if view is not None:
            generation = view.get("generation")
            lead = (str(view.get("session", "")), generation if isinstance(generation, int) else 0)
            lead_state = str(view.get("state", ""))
        state = rec.state
        if state in (InstanceState.PENDING, InstanceState.BACKOFF):
            if lead_state == InstanceState.FAILED.value:
                reason = view.get("reason") if view else ""
                self._give_up(proc, f"the leader gave up: {reason}")
            elif (
                lead is not None
                and lead_state in gang.UP_STATES
                and lead != proc.ran
                and not self.stop_requested
                and not proc.leftover_pgid
            ):
                if proc.ran is not None:
                    rec.restarts += 1
                proc.ran = lead
                rec.generation = lead[1]
                self._spawn(proc, now)
                proc.deadline = float("inf")  # the leader's start is bounded, not ours
        elif state in (InstanceState.STARTING, InstanceState.RUNNING):
            code = self._exit_status(proc)
            if code is not None:
                self._member_down(proc, now, f"exited ({_describe_exit(code)})", failure=True)
            elif lead is not None and lead != proc.ran:
                self._member_down(proc, now, f"the leader moved to generation {lead[1]}")
            elif lead is not None and lead_state not in gang.UP_STATES:
                self._member_down(proc, now, f"the leader is {lead_state}")
            elif view is None and now - proc.leader_ok_at > gang.LEADER_GRACE:
                silent = now - proc.leader_ok_at
                self._member_down(proc, now, f"the leader has not answered for {silent:.0f}s")
            elif state is InstanceState.STARTING and lead_state == InstanceState.RUNNING.value:
                rec.ready_at = time.time()
                took = self.clock() - proc.started_mono
                self._enter(
                    proc,
                    InstanceState.RUNNING,
                    None,
                    f"gang ready in {took:.1f}s (generation {rec.generation})",
                )
        elif state is InstanceState.STOPPING:
            self._advance(proc, now)

    def _member_down(self, proc: _Proc, now: float, why: str, *, failure: bool = False) -> None:
        """A follower's member is not (or no longer) part of a live gang: stop what is left
        of it and wait for the leader's next generation. Never restarts it alone."""
        rec = proc.record
        self._exit_status(proc)
        if failure:
            self._keep_first_failure(proc, why)
        if self.groups.alive(rec.pgid):
            self.groups.signal(rec.pgid, signal.SIGTERM)
            proc.leftover_pgid = rec.pgid
            proc.leftover_kill_at = now + proc.plan.stop_grace
        rec.pid = rec.pgid = None
        proc.deadline = float("inf")
        self._enter(
            proc,
            InstanceState.BACKOFF,
            why,
            f"{why}; member stopped, waiting for the leader's next generation",
        )

    def _keep_first_failure(self, proc: _Proc, why: str) -> None:
        """The first failure of a gang member: its reason in the record, the log's last
        lines in ``<log>.first-failure`` (kept however often the gang restarts)."""
        if proc.first_failure_kept:
            return
        proc.first_failure_kept = True
        rec = proc.record
        rec.first_failure = f"generation {rec.generation}: {why}"
        path = Path(proc.plan.log_file + ".first-failure")
        with contextlib.suppress(OSError):
            lines = tail(proc.plan.log_file, 200)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            path.write_text(f"=== {stamp} {rec.first_failure}\n" + "\n".join(lines) + "\n")

    def _give_up(self, proc: _Proc, why: str) -> None:
        self._enter(proc, InstanceState.FAILED, why, f"FAILED: {why} (log {proc.plan.log_file})")

    def _begin_stop(self, proc: _Proc, now: float, reason: str) -> None:
        rec = proc.record
        if rec.state.terminal or rec.state is InstanceState.STOPPING:
            return
        proc.call = None  # a sleep, wake or first request in flight: its outcome is moot
        proc.wanted_at = None
        if rec.state in WAITING_STATES or rec.state is InstanceState.UNLOADED:
            self._enter(proc, InstanceState.STOPPED, reason)
            return
        proc.deadline = now + proc.plan.stop_grace
        proc.killed = False
        self._enter(
            proc,
            InstanceState.STOPPING,
            reason,
            f"stopping (SIGTERM to process group {rec.pgid})",
        )
        self.groups.signal(rec.pgid, signal.SIGTERM)

    def _clean_leftover(self, proc: _Proc, now: float) -> None:
        if proc.leftover_pgid is None:
            return
        self._exit_status(proc)
        if not self.groups.alive(proc.leftover_pgid) and proc.popen is None:
            proc.leftover_pgid = None
        elif now >= proc.leftover_kill_at:
            self.groups.signal(proc.leftover_pgid, signal.SIGKILL)

    def _kill_all_now(self) -> None:
        """Last resort on the way out: nothing we started may outlive the supervisor."""
        for proc in self.procs.values():
            for pgid in (proc.record.pgid, proc.leftover_pgid):
                if pgid and self.groups.alive(pgid):
                    self.groups.signal(pgid, signal.SIGKILL)
            if proc.popen is not None:
                with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
                proc.popen = None
            if not proc.record.state.terminal:
                self._enter(proc, InstanceState.STOPPED, proc.record.reason or "supervisor exited")
            proc.record.pid = proc.record.pgid = None

    def _save(self, force: bool = False) -> None:
        if self.dirty or force:
            # The fingerprint of what was written, not of the path a moment later: a file
            # deleted in between read as "nothing written", and was never written again.
            self._written = self.store.write(self.state)
            self.dirty = False
