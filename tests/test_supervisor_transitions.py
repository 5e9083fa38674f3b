"""Every edge of the supervisor's state table, driven through its seams.

A fake spawner (processes that exit when the test says), fake process groups, a fake health
probe and a fake clock: no real process, no sleep, the same outcome on every run. One
``test_transition_<from>_to_<to>`` per edge of :data:`~pipeline.serve.record.TRANSITIONS`
(a test checks that the names and the table agree), in the manner of Supervisor/supervisor's
``test_transition_*`` tests, plus the refusal of an edge the table does not list.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_python, standin_config, wait_for

from pipeline.serve.commands.common import load
from pipeline.serve.plan import Plan
from pipeline.serve.record import (
    TRANSITIONS,
    IllegalTransition,
    InstanceRecord,
    InstanceState,
    enter,
)
from pipeline.serve.seams import ProbeResult
from pipeline.serve.state import StateStore
from pipeline.serve.supervisor import Supervisor

S = InstanceState
FIRST_PID = 10_000_000  # above any pid_max: never a real process


@dataclass
class FakePopen:
    """What the supervisor uses of a Popen; ``returncode`` is set when the test ends it."""

    pid: int
    argv: tuple[str, ...]
    env: dict[str, str]
    code: int | None = None
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.code is not None:
            self.returncode = self.code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.code = -signal.SIGKILL if self.code is None else self.code
        return self.poll() or 0


@dataclass
class World:
    """The fakes, shared: spawned processes, live groups, signals sent, probe answers."""

    now: float = 1000.0
    next_pid: int = FIRST_PID
    spawned: list[FakePopen] = field(default_factory=list)
    live_groups: set[int] = field(default_factory=set)
    signals: list[tuple[int, str]] = field(default_factory=list)
    healthy: set[str] = field(default_factory=set)
    spawn_error: OSError | None = None

    # --- seams -------------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def spawner(self, argv, env, cwd, log) -> FakePopen:
        if self.spawn_error is not None:
            raise self.spawn_error
        popen = FakePopen(self.next_pid, tuple(argv), dict(env))
        self.next_pid += 1
        self.spawned.append(popen)
        self.live_groups.add(popen.pid)
        return popen

    def probe(self, url: str, timeout: float) -> bool:
        return url in self.healthy

    # the Groups protocol
    def alive(self, pgid: int | None) -> bool:
        return pgid in self.live_groups

    def signal(self, pgid: int | None, sig: int) -> bool:
        if pgid not in self.live_groups:
            return False
        self.signals.append((pgid, signal.Signals(sig).name))
        return True

    def supervisor(
        self, plan: Plan, store: StateStore, say: Callable[[str], None], **seams: Any
    ) -> Supervisor:
        """A Supervisor of ``plan`` wired to these fakes; ``seams`` add to them or replace them
        (the gang's server and poll, another ``base_env``)."""
        wired: dict[str, Any] = {
            "base_env": {"PATH": "/usr/bin"},
            "spawner": self.spawner,
            "groups": self,
            "probe": self.probe,
            "clock": self.clock,
            "sleep": self.sleep,
        }
        return Supervisor(plan, store, say=say, **(wired | seams))

    # --- what the test does to the processes -------------------------------------------
    def exit(self, popen: FakePopen, code: int, *, group_lives: bool = False) -> None:
        popen.code = code
        if not group_lives:
            self.live_groups.discard(popen.pid)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def make(settings, standin_prefix, tmp_path, world):
    """make(instances, control=...) -> a Supervisor wired to the fakes, and its say lines."""

    def build(
        instances: dict[str, dict] | None = None,
        server: dict[str, object] | None = None,
        extra: str = "",
        seams: dict[str, Any] | None = None,
        **control: object,
    ) -> tuple[Supervisor, list[str]]:
        text = standin_config(
            standin_prefix,
            tmp_path / "logs",
            instances or {"a": {"port": 18001}},
            control={"backoff_initial": 1, "backoff_max": 4, "stop_grace": 5, **control},
            server=server,
            extra=extra,
        )
        path = tmp_path / "serve.toml"
        path.write_text(text)
        _, plan = load(settings, str(path), os.environ, check=False)
        store = StateStore(settings.serve_state)
        store.ensure()
        lines: list[str] = []
        return world.supervisor(plan, store, lines.append, **(seams or {})), lines

    return build


def state_of(supervisor: Supervisor, name: str = "a") -> InstanceState:
    return supervisor.procs[name].record.state


def health(supervisor: Supervisor, name: str = "a") -> str:
    return supervisor.procs[name].plan.health_url


def start(world: World, supervisor: Supervisor, name: str = "a") -> FakePopen:
    """Tick until ``name`` is starting; its fake process."""
    supervisor.tick()
    assert state_of(supervisor, name) is S.STARTING
    return world.spawned[-1]


def run_to_ready(world: World, supervisor: Supervisor, name: str = "a") -> FakePopen:
    popen = start(world, supervisor, name)
    world.healthy.add(health(supervisor, name))
    supervisor.tick()
    assert state_of(supervisor, name) is S.RUNNING
    return popen


def all_ready(world: World, supervisor: Supervisor) -> None:
    supervisor.tick()
    world.healthy.update(health(supervisor, name) for name in supervisor.procs)
    supervisor.tick()
    assert all(state_of(supervisor, name) is S.RUNNING for name in supervisor.procs)


# ---- PENDING ------------------------------------------------------------------------------


def test_transition_pending_to_starting(world, make):
    supervisor, lines = make()
    assert state_of(supervisor) is S.PENDING
    supervisor.tick()
    assert state_of(supervisor) is S.STARTING
    popen = world.spawned[0]
    assert popen.argv[-14:-12] == ("-m", "vllm.entrypoints.openai.api_server")
    rec = supervisor.procs["a"].record
    assert rec.pid == rec.pgid == FIRST_PID
    assert lines == [f"serve: a: starting (pid {FIRST_PID}, log {rec.log_file})"]
    # Persisted: `doit status` sees the same.
    assert supervisor.store.read().instances["a"].state is S.STARTING


def test_transition_pending_to_stopped(world, make):
    # b shares a's GPU, so it waits in PENDING until a is ready; a stop finds it there.
    supervisor, _ = make(
        {
            "a": {"port": 18001, "control": {"gpu_ids": [0]}},
            "b": {"port": 18002, "control": {"gpu_ids": [0]}},
        },
        server={"gpu_memory_utilization": 0.4},
    )
    supervisor.tick()
    assert (state_of(supervisor, "a"), state_of(supervisor, "b")) == (S.STARTING, S.PENDING)
    supervisor.request_stop(["b"])
    assert state_of(supervisor, "b") is S.STOPPED
    assert supervisor.procs["b"].record.reason == "stopped on request"
    assert len(world.spawned) == 1, "b never spawned"
    assert world.signals == []


def test_transition_pending_to_failed(world, make):
    world.spawn_error = FileNotFoundError(2, "No such file or directory")
    supervisor, lines = make()
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.FAILED
    assert rec.reason.startswith("cannot start ") and rec.reason.endswith(
        ": No such file or directory"
    )
    assert lines[-1].startswith("serve: a: FAILED: cannot start ")
    assert supervisor.finished and supervisor.exit_code() == 1


# ---- STARTING -----------------------------------------------------------------------------


def test_transition_starting_to_running(world, make):
    supervisor, lines = make()
    start(world, supervisor)
    world.now += 2.5
    supervisor.tick()
    assert state_of(supervisor) is S.STARTING, "not healthy yet"
    world.healthy.add(health(supervisor))
    world.now += 0.5
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.RUNNING and rec.reason is None and rec.ready_at
    assert lines[-1] == f"serve: a: ready in 3.0s at {rec.base_url}"
    assert supervisor.settled and supervisor.store.read().supervisor.settled


def test_transition_starting_to_backoff(world, make):
    supervisor, lines = make()
    popen = start(world, supervisor)
    world.exit(popen, 1)
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.BACKOFF
    assert rec.reason == "exited during startup (exit code 1)"
    assert rec.restarts == 1 and rec.last_exit == "exit code 1"
    assert lines[-1].startswith("serve: a: exited during startup (exit code 1); restart 1/3 in 1s")


def test_transition_starting_to_stopping(world, make):
    supervisor, _ = make()
    popen = start(world, supervisor)
    supervisor.request_stop()
    assert state_of(supervisor) is S.STOPPING
    assert world.signals == [(popen.pid, "SIGTERM")]


def test_transition_starting_to_stopped(world, make):
    # Whatever ends the loop (here a probe that raises), run() leaves nothing running and
    # records the instance as stopped.
    supervisor, _ = make()

    def broken_probe(url: str, timeout: float) -> bool:
        raise RuntimeError("probe broke")

    supervisor.probe = broken_probe
    with pytest.raises(RuntimeError, match="probe broke"):
        supervisor.run()
    rec = supervisor.procs["a"].record
    assert rec.state is S.STOPPED and rec.reason == "supervisor exited"
    assert world.signals == [(FIRST_PID, "SIGKILL")]
    final = supervisor.store.read()
    assert final.supervisor.exited and final.instances["a"].state is S.STOPPED


def test_transition_starting_to_failed(world, make):
    supervisor, _ = make(ready_timeout=10, restart="no")
    popen = start(world, supervisor)
    world.now += 9.9
    supervisor.tick()
    assert state_of(supervisor) is S.STARTING
    world.now += 0.1
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.FAILED
    assert rec.reason == "not ready within 10s (ready_timeout); gave up after restart: no"
    # The hung start's group is put down before anything else may start.
    assert world.signals == [(popen.pid, "SIGTERM")]
    assert not supervisor.finished, "its group still lives"
    world.exit(popen, -15)
    supervisor.tick()
    assert supervisor.finished


# ---- RUNNING ------------------------------------------------------------------------------


def test_transition_running_to_backoff(world, make):
    supervisor, _ = make()
    popen = run_to_ready(world, supervisor)
    world.exit(popen, 3)
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.BACKOFF and rec.reason == "exited (exit code 3)"
    assert supervisor.procs["a"].deadline == world.now + 1


def test_transition_running_to_stopping(world, make):
    supervisor, lines = make()
    popen = run_to_ready(world, supervisor)
    supervisor.request_stop(["a"])
    rec = supervisor.procs["a"].record
    assert rec.state is S.STOPPING and rec.reason == "stopped on request"
    assert world.signals == [(popen.pid, "SIGTERM")]
    assert lines[-1] == f"serve: a: stopping (SIGTERM to process group {popen.pid})"


def test_transition_running_to_stopped(world, make):
    supervisor, _ = make()
    popen = run_to_ready(world, supervisor)
    supervisor._kill_all_now()
    rec = supervisor.procs["a"].record
    assert rec.state is S.STOPPED and rec.reason == "supervisor exited"
    assert rec.pid is None and rec.pgid is None
    assert world.signals == [(popen.pid, "SIGKILL")]


def test_transition_running_to_exited(world, make):
    supervisor, lines = make()
    popen = run_to_ready(world, supervisor)
    world.exit(popen, 0)
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.EXITED and rec.reason == "exited (exit code 0)"
    assert lines[-1] == "serve: a: exited (exit code 0); not restarted"
    assert supervisor.finished and supervisor.exit_code() == 0


def test_transition_running_to_failed(world, make):
    supervisor, _ = make(restart="no")
    popen = run_to_ready(world, supervisor)
    world.exit(popen, -9)
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.FAILED
    assert rec.reason == "exited (killed by SIGKILL); gave up after restart: no"


# ---- BACKOFF ------------------------------------------------------------------------------


def crash_into_backoff(world: World, supervisor: Supervisor) -> FakePopen:
    popen = run_to_ready(world, supervisor)
    world.exit(popen, 3)
    supervisor.tick()
    assert state_of(supervisor) is S.BACKOFF
    return popen


def test_transition_backoff_to_starting(world, make):
    supervisor, _ = make()
    crash_into_backoff(world, supervisor)
    world.now += 0.99
    supervisor.tick()
    assert state_of(supervisor) is S.BACKOFF, "the delay is 1 s"
    world.now += 0.01
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.STARTING and rec.pid == FIRST_PID + 1
    assert rec.reason == "exited (exit code 3)", "the cause stays shown while it retries"


def test_transition_backoff_to_stopped(world, make):
    supervisor, _ = make()
    crash_into_backoff(world, supervisor)
    supervisor.request_stop(["a"])
    assert state_of(supervisor) is S.STOPPED
    world.now += 60
    supervisor.tick()
    assert state_of(supervisor) is S.STOPPED and len(world.spawned) == 1


def test_transition_backoff_to_failed(world, make):
    supervisor, _ = make()
    crash_into_backoff(world, supervisor)
    world.spawn_error = PermissionError(13, "Permission denied")
    world.now += 1
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.FAILED and rec.reason.endswith(": Permission denied")


# ---- STOPPING -----------------------------------------------------------------------------


def test_transition_stopping_to_stopped(world, make):
    supervisor, lines = make(stop_grace=5)
    popen = run_to_ready(world, supervisor)
    supervisor.request_stop()
    # The leader ignores SIGTERM: SIGKILL once stop_grace has passed, then stopped.
    world.now += 5
    supervisor.tick()
    assert state_of(supervisor) is S.STOPPING
    assert world.signals == [(popen.pid, "SIGTERM"), (popen.pid, "SIGKILL")]
    world.exit(popen, -9)
    supervisor.tick()
    rec = supervisor.procs["a"].record
    assert rec.state is S.STOPPED and rec.reason == "stopped on request"
    assert rec.pgid is None and lines[-1] == "serve: a: stopped"
    assert supervisor.finished


def test_a_stop_waits_for_the_whole_group_not_only_the_leader(world, make):
    supervisor, _ = make()
    popen = run_to_ready(world, supervisor)
    supervisor.request_stop()
    world.exit(popen, 0, group_lives=True)  # a grandchild holds on
    supervisor.tick()
    assert state_of(supervisor) is S.STOPPING
    world.live_groups.discard(popen.pid)
    supervisor.tick()
    assert state_of(supervisor) is S.STOPPED


# ---- back from a terminal state (`doit serve` again) ----------------------------------------


def test_transition_stopped_to_pending(world, make):
    supervisor, lines = make({"a": {"port": 18001}, "b": {"port": 18002}})
    all_ready(world, supervisor)
    world.exit(world.spawned[0], 0)
    supervisor.request_stop(["a"])
    supervisor.tick()
    assert state_of(supervisor, "a") is S.STOPPED
    # As `doit serve` asks it: a request file, taken by the next tick, which goes on to
    # spawn it (pending, then starting, in one pass).
    supervisor.store.request_start(["a"])
    supervisor.tick()
    assert lines[-2:] == [
        "serve: a: start requested",
        f"serve: a: starting (pid {FIRST_PID + 2}, log {supervisor.procs['a'].plan.log_file})",
    ]
    assert state_of(supervisor, "a") is S.STARTING
    assert not list(supervisor.store.requests_dir.iterdir()), "the request is done"
    assert supervisor.store.read().instances["a"].state is S.STARTING
    assert state_of(supervisor, "b") is S.RUNNING


def test_transition_exited_to_pending(world, make):
    supervisor, lines = make({"a": {"port": 18001}, "b": {"port": 18002}})
    all_ready(world, supervisor)
    world.exit(world.spawned[0], 0)
    supervisor.tick()
    assert state_of(supervisor, "a") is S.EXITED
    supervisor.request_start(["a", "b"])
    assert state_of(supervisor, "a") is S.PENDING
    assert state_of(supervisor, "b") is S.RUNNING, "what runs is left alone"
    assert lines[-1] == "serve: a: start requested"


def test_transition_failed_to_pending(world, make):
    supervisor, _ = make({"a": {"port": 18001}, "b": {"port": 18002}}, max_restarts=1)
    all_ready(world, supervisor)
    popen = world.spawned[0]
    for _ in range(2):
        world.exit(popen, 3)
        supervisor.tick()
        world.now += 10
        supervisor.tick()
        popen = world.spawned[-1]
    assert state_of(supervisor, "a") is S.FAILED
    supervisor.request_start(["a"])
    assert state_of(supervisor, "a") is S.PENDING
    # A fresh count: it may fail max_restarts times again before it is given up.
    assert supervisor.procs["a"].streak == 0
    supervisor.tick()
    assert state_of(supervisor, "a") is S.STARTING


# ---- liveness of a running instance ---------------------------------------------------------


def probe_round(world: World, supervisor: Supervisor, seconds: float, name: str = "a") -> None:
    """Let ``seconds`` pass, tick (a liveness probe starts when due), wait for its thread (a
    fake probe returns at once; bounded anyway) and tick again to take its result."""
    world.now += seconds
    supervisor.tick()
    call = supervisor.procs[name].health
    if call is not None:
        call.thread.join(timeout=5)
        assert not call.thread.is_alive()
    supervisor.tick()


def test_a_running_instance_failing_health_failures_probes_in_a_row_is_restarted(world, make):
    supervisor, lines = make(health_interval=2, health_failures=3)
    popen = run_to_ready(world, supervisor)
    rec = supervisor.procs["a"].record
    probe_round(world, supervisor, 1.9)
    assert rec.probe_at is None, "the first probe comes one health_interval after ready"
    probe_round(world, supervisor, 0.1)
    assert (rec.probe_ok, rec.probe_misses, rec.probe_error) == (True, 0, None)
    world.healthy.clear()  # hung: /health no longer answers 200
    for misses in (1, 2):
        probe_round(world, supervisor, 2)
        assert rec.state is S.RUNNING and rec.probe_misses == misses
        assert lines[-1] == f"serve: a: health probe failed ({misses}/3): did not answer 200"
    assert supervisor.store.read().instances["a"].probe_misses == 2, "status sees the count"
    probe_round(world, supervisor, 2)
    assert rec.state is S.BACKOFF and rec.restarts == 1
    assert rec.reason == "health probe failed 3 times in a row (did not answer 200)"
    # The usual restart: its group is put down (continued, should it be stopped) first.
    assert world.signals == [(popen.pid, "SIGTERM"), (popen.pid, "SIGCONT")]
    world.exit(popen, -15)
    world.healthy.add(health(supervisor))
    world.now += 1
    supervisor.tick()
    supervisor.tick()
    assert rec.state is S.RUNNING and rec.pid == popen.pid + 1
    assert (rec.probe_at, rec.probe_misses) == (None, 0), "a fresh count once ready again"


def test_a_good_probe_ends_a_run_of_misses(world, make):
    supervisor, lines = make(health_interval=1, health_failures=2)
    run_to_ready(world, supervisor)
    rec = supervisor.procs["a"].record
    url = health(supervisor)
    for healthy in (False, True, False, True):
        (world.healthy.add if healthy else world.healthy.discard)(url)
        probe_round(world, supervisor, 1)
        assert rec.state is S.RUNNING and rec.probe_misses == (0 if healthy else 1)
    assert lines[-1] == "serve: a: health probe ok again (1 missed)"
    assert rec.restarts == 0


def test_no_liveness_probe_runs_or_counts_while_an_instance_starts(world, make):
    supervisor, _ = make(health_interval=0.5, health_failures=1, ready_timeout=60)
    start(world, supervisor)
    for _ in range(20):
        probe_round(world, supervisor, 1)
    proc = supervisor.procs["a"]
    assert proc.record.state is S.STARTING and proc.health is None
    assert proc.record.probe_at is None and proc.record.probe_misses == 0


def test_a_probe_that_never_returns_counts_as_timed_out_without_a_second_thread(world, make):
    supervisor, _ = make(health_interval=2, health_failures=2)
    run_to_ready(world, supervisor)
    release = threading.Event()
    calls: list[float] = []

    def hanging(url: str, timeout: float) -> bool:
        calls.append(timeout)
        release.wait(10)  # what a probe stuck past its own timeout looks like
        return False

    supervisor.probe = hanging
    rec = supervisor.procs["a"].record
    try:
        world.now += 2
        supervisor.tick()
        wait_for(lambda: calls, timeout=5, what="the probe's thread")
        assert calls == [2], "its timeout: health_interval, within 1 to 5 s"
        world.now += 2.9  # its deadline: the timeout (2 s) and a second of slack
        supervisor.tick()
        assert rec.state is S.RUNNING and rec.probe_misses == 0
        world.now += 0.1
        supervisor.tick()
        assert rec.probe_misses == 1 and rec.probe_error == "timed out after 2 s"
        world.now += 1.9
        supervisor.tick()
        assert rec.probe_misses == 1, "the next miss is counted one interval later"
        world.now += 0.1
        supervisor.tick()
        assert rec.state is S.BACKOFF
        assert rec.reason == (
            "health probe failed 2 times in a row "
            "(timed out after 2 s (the last probe still hangs))"
        )
        assert len(calls) == 1, "never two probes on one hung instance"
    finally:
        release.set()


def test_a_probe_that_raises_is_a_failed_probe(world, make):
    supervisor, _ = make(health_interval=1, health_failures=1, restart="no")
    run_to_ready(world, supervisor)

    def broken(url: str, timeout: float) -> bool:
        raise RuntimeError("probe broke")

    supervisor.probe = broken
    probe_round(world, supervisor, 1)
    rec = supervisor.procs["a"].record
    assert rec.state is S.FAILED
    assert rec.reason == (
        "health probe failed 1 time in a row (the probe raised RuntimeError: probe broke); "
        "gave up after restart: no"
    )


# ---- the model pool: UNLOADED, SLEEPING, ASLEEP, WAKING, UNLOADING -------------------------
# Two managed instances (a, b) in a pool of max_awake 1 behind the gateway. The gateway's side
# of the control channel is a fake (FakeControl: what it was told, what it says), and so are
# vLLM's sleep endpoints and the first request (FakeCalls; their threads are joined before the
# tick that reads them, so every run sees the same).


@dataclass
class FakeControl:
    connected: bool = True
    inbox: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def take(self) -> list[dict[str, Any]]:
        out, self.inbox = self.inbox, []
        return out

    changes: int = 0
    running: list[str] = field(default_factory=list)
    healthy: list[str] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> bool:
        if not self.connected:
            return False
        if message == {"op": "changed"}:
            self.changes += 1
        elif message["op"] == "running":
            self.running.append(message["instance"])
        elif message["op"] == "healthy":
            self.healthy.append(message["instance"])
        else:
            self.sent.append(message)
        return True

    def close(self) -> None:
        pass

    def released(self, ok: bool = True) -> list[str]:
        """Answer every release asked so far; the names answered."""
        names = [m["instance"] for m in self.sent if m["op"] == "release"]
        self.sent = [m for m in self.sent if m["op"] != "release"]
        self.inbox += [{"op": "released", "instance": n, "ok": ok} for n in names]
        return names


@dataclass
class FakeCalls:
    sleep_result: ProbeResult = field(default_factory=lambda: ProbeResult(True, 0.2))
    wake_result: ProbeResult = field(default_factory=lambda: ProbeResult(True, 0.3))
    canary_results: list[ProbeResult] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    # Each call waits for the test's next tick (Pool.tick): its outcome is read one tick after
    # it began, whatever the threads' timing.
    gate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def sleep(self, base_url: str, timeout: float) -> ProbeResult:
        self.gate.acquire(timeout=5)
        self.calls.append(("sleep", base_url))
        return self.sleep_result

    def wake(self, base_url: str, timeout: float) -> ProbeResult:
        self.gate.acquire(timeout=5)
        self.calls.append(("wake", base_url))
        return self.wake_result

    def canary(self, base_url: str, model: str, key: str | None, timeout: float) -> ProbeResult:
        if not self.calls or self.calls[-1][0] != "wake":
            self.gate.acquire(timeout=5)  # after a wake: the same call
        self.calls.append(("canary", model))
        return self.canary_results.pop(0) if self.canary_results else ProbeResult(True, 0.01)


@dataclass
class Pool:
    supervisor: Supervisor
    control: FakeControl
    calls: FakeCalls
    lines: list[str]
    world: World

    def state(self, name: str) -> InstanceState:
        return self.supervisor.procs[name].record.state

    def tick(self) -> None:
        """Let the calls begun in earlier ticks end, then tick."""
        for proc in self.supervisor.procs.values():
            if proc.call is not None and proc.call.result is None:
                self.calls.gate.release()
                proc.call.thread.join(5)
        self.supervisor.tick()

    def want(self, name: str) -> None:
        self.control.inbox.append({"op": "want", "instance": name})

    def activity(self, name: str, inflight: int, queued: int = 0) -> None:
        self.control.inbox.append(
            {"op": "activity", "instance": name, "inflight": inflight, "queued": queued}
        )

    def up(self, name: str) -> FakePopen:
        """Ask for ``name`` and bring it to RUNNING through its first request (the gateway is
        told at once)."""
        self.want(name)
        self.tick()
        assert self.state(name) is S.STARTING
        popen = self.supervisor.procs[name].popen
        self.world.healthy.add(self.supervisor.procs[name].plan.health_url)
        self.tick()  # /health answers: the first request goes out
        assert self.state(name) is S.STARTING
        assert self.control.healthy[-1] == name, "the gateway may open its connections"
        self.tick()
        assert self.state(name) is S.RUNNING
        assert self.control.running[-1] == name
        return popen

    def put_away(self, name: str, *, idle_for: float = 10) -> None:
        """Let ``name`` idle past its idle_timeout and confirm the release."""
        self.world.now += idle_for
        self.tick()
        assert self.control.released() == [name]
        self.tick()


@pytest.fixture
def pool(make, world):
    def build(*, sleep: bool = True, idle_timeout: float = 5, **control: object) -> Pool:
        fake_control, calls = FakeControl(), FakeCalls()
        gpu = {"gpu_ids": [0]} if sleep else {}
        instances = {
            name: {"port": port, "control": {"start": "on-demand", **gpu}}
            for name, port in (("a", 18001), ("b", 18002))
        }
        extra = (
            "[gateway]\nenable = true\nport = 18999\n"
            '[pool.p]\ninstances = ["a", "b"]\nmax_awake = 1\n'
        )
        supervisor, lines = make(
            instances,
            server={"gpu_memory_utilization": 0.4},
            extra=extra,
            seams={"control": fake_control, "pool_calls": calls},
            idle_timeout=idle_timeout,
            **control,
        )
        world.healthy.add(supervisor.procs["gateway"].plan.health_url)
        supervisor.tick()
        supervisor.tick()
        return Pool(supervisor, fake_control, calls, lines, world)

    return build


def asleep(p: Pool, name: str = "a") -> FakePopen:
    popen = p.up(name)
    p.put_away(name)
    assert p.state(name) is S.SLEEPING
    p.tick()
    assert p.state(name) is S.ASLEEP
    return popen


def test_transition_pending_to_unloaded(pool):
    p = pool()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.UNLOADED and rec.reason == "starts on the first request for it"
    assert rec.managed and rec.pool == "p"
    assert [popen.argv[-1] for popen in p.world.spawned] == ["pipeline.gateway"], (
        "only the gateway starts at boot"
    )
    assert p.supervisor.settled


def test_transition_unloaded_to_starting(pool):
    p = pool()
    p.want("a")
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.STARTING and rec.wakes == 1
    assert "--enable-sleep-mode" in p.supervisor.procs["a"].popen.argv
    assert p.supervisor.procs["a"].popen.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert p.state("b") is S.UNLOADED


def test_transition_unloaded_to_stopped(pool):
    p = pool()
    p.supervisor.request_stop(["a"])
    assert p.state("a") is S.STOPPED and p.world.signals == []


def test_transition_running_to_sleeping(pool):
    p = pool()
    p.up("a")
    p.world.now += 4.9
    p.tick()
    assert p.control.sent == [], "not idle long enough"
    p.world.now += 0.1
    p.tick()
    assert p.control.sent == [{"op": "release", "instance": "a"}]
    assert p.state("a") is S.RUNNING, "nothing happens before the gateway confirms"
    p.control.released()
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.SLEEPING and rec.reason == "idle for 5s (idle_timeout)"
    assert p.lines[-1] == "serve: a: putting to sleep (idle for 5s (idle_timeout))"


def test_transition_running_to_unloading(pool):
    p = pool(sleep=False)
    popen = p.up("a")
    assert "--enable-sleep-mode" not in popen.argv, "no GPU: the CPU build has no sleep mode"
    p.put_away("a")
    assert p.state("a") is S.UNLOADING
    assert p.world.signals[-1] == (popen.pid, "SIGTERM")


def test_transition_sleeping_to_asleep(pool):
    p = pool()
    p.up("a")
    p.put_away("a")
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.ASLEEP and rec.put_away == "sleep" and rec.pid is not None
    assert ("sleep", rec.base_url) in p.calls.calls
    assert p.lines[-1] == "serve: a: asleep in 0.2s"
    assert p.supervisor.settled


def test_transition_sleeping_to_unloading(pool):
    p = pool()
    p.calls.sleep_result = ProbeResult(False, 0.1, "/sleep answered 500")
    popen = p.up("a")
    p.put_away("a")
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.UNLOADING
    assert rec.reason == "sleeping failed (/sleep answered 500); stopped instead"
    assert p.world.signals[-1] == (popen.pid, "SIGTERM")


def test_transition_sleeping_to_unloaded(pool):
    p = pool()
    popen = p.up("a")
    p.put_away("a")
    p.world.exit(popen, -9)
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.UNLOADED and rec.put_away == "stop"
    assert rec.reason == "exited while sleeping (killed by SIGKILL)"


def test_transition_sleeping_to_stopping(pool):
    p = pool()
    popen = p.up("a")
    p.put_away("a")
    p.supervisor.request_stop(["a"])
    assert p.state("a") is S.STOPPING and p.world.signals[-1] == (popen.pid, "SIGTERM")


def test_transition_sleeping_to_stopped(pool):
    p = pool()
    p.up("a")
    p.put_away("a")
    p.supervisor._kill_all_now()
    assert p.state("a") is S.STOPPED


def test_transition_asleep_to_waking(pool):
    p = pool()
    asleep(p)
    p.want("a")
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.WAKING and rec.wakes == 2


def test_transition_asleep_to_unloaded(pool):
    p = pool()
    popen = asleep(p)
    p.world.exit(popen, 1)
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.UNLOADED and rec.reason == "exited while asleep (exit code 1)"


def test_transition_asleep_to_stopping(pool):
    p = pool()
    popen = asleep(p)
    p.supervisor.request_stop()
    assert p.state("a") is S.STOPPING and (popen.pid, "SIGTERM") in p.world.signals


def test_transition_asleep_to_stopped(pool):
    p = pool()
    asleep(p)
    p.supervisor._kill_all_now()
    assert p.state("a") is S.STOPPED


def test_transition_waking_to_running(pool):
    p = pool()
    asleep(p)
    p.want("a")
    p.tick()
    p.tick()
    assert p.state("a") is S.RUNNING
    # The wake, then the first request, before RUNNING.
    assert p.calls.calls[-2:] == [("wake", p.supervisor.procs["a"].plan.base_url), ("canary", "a")]


def test_transition_waking_to_backoff(pool):
    # A bad first answer after the wake is a failed wake: the restart rules apply.
    p = pool()
    popen = asleep(p)
    p.calls.canary_results.append(ProbeResult(False, 0.1, "the first request answered 500"))
    p.want("a")
    p.tick()
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.BACKOFF
    assert rec.reason == "waking failed: the first request after it: the first request answered 500"
    assert (popen.pid, "SIGTERM") in p.world.signals


def test_transition_waking_to_failed(pool):
    p = pool(restart="no")
    asleep(p)
    p.calls.wake_result = ProbeResult(False, 1.0, "/wake_up answered 500")
    p.want("a")
    p.tick()
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.FAILED
    assert rec.reason == "waking failed: /wake_up answered 500; gave up after restart: no"


def test_transition_waking_to_stopping(pool):
    p = pool()
    asleep(p)
    p.want("a")
    p.tick()
    p.supervisor.request_stop(["a"])
    assert p.state("a") is S.STOPPING


def test_transition_waking_to_stopped(pool):
    p = pool()
    asleep(p)
    p.want("a")
    p.tick()
    p.supervisor._kill_all_now()
    assert p.state("a") is S.STOPPED


def test_transition_unloading_to_unloaded(pool):
    p = pool(sleep=False)
    popen = p.up("a")
    p.put_away("a")
    p.world.exit(popen, 0)
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.UNLOADED and rec.put_away == "stop" and rec.pid is None
    assert p.lines[-1] == "serve: a: put away (stopped)"


def test_transition_unloading_to_stopping(pool):
    p = pool(sleep=False)
    p.up("a")
    p.put_away("a")
    p.supervisor.request_stop(["a"])
    assert p.state("a") is S.STOPPING


def test_transition_unloading_to_stopped(pool):
    p = pool(sleep=False)
    p.up("a")
    p.put_away("a")
    p.supervisor._kill_all_now()
    assert p.state("a") is S.STOPPED


# ---- the model pool: eviction, budgets, the first request -----------------------------------


def test_a_wanted_instance_waits_for_the_idle_one_to_sleep_first(pool):
    p = pool(idle_timeout=0)
    p.up("a")
    p.want("b")
    p.tick()
    assert p.state("b") is S.UNLOADED, "never two awake in a pool of one"
    assert p.control.released() == ["a"]
    p.tick()
    assert (p.state("a"), p.state("b")) == (S.SLEEPING, S.UNLOADED)
    p.tick()  # a confirmed asleep; b starts in the same tick
    assert (p.state("a"), p.state("b")) == (S.ASLEEP, S.STARTING)
    assert p.supervisor.procs["a"].record.reason == "to make room for b"


def test_a_busy_instance_is_never_put_away(pool):
    p = pool(idle_timeout=0)
    p.up("a")
    p.activity("a", inflight=2)
    p.want("b")
    p.tick()
    assert p.control.sent == [] and p.state("b") is S.UNLOADED, "b waits"
    p.world.now += 100
    p.tick()
    assert p.control.sent == [], "still busy"
    p.activity("a", inflight=0)
    p.tick()
    assert p.control.released() == ["a"]


def test_a_release_the_gateway_refuses_keeps_the_instance(pool):
    # A request reached the gateway between the supervisor's view and its question.
    p = pool()
    p.up("a")
    p.world.now += 10
    p.tick()
    p.control.released(ok=False)
    p.tick()
    assert p.state("a") is S.RUNNING


def test_no_release_without_the_gateway(pool):
    p = pool()
    p.up("a")
    p.control.connected = False
    p.world.now += 100
    p.tick()
    assert p.control.sent == [] and p.state("a") is S.RUNNING


def test_a_bad_first_answer_after_a_start_is_a_failed_start(pool):
    p = pool()
    p.calls.canary_results.append(
        ProbeResult(False, 0.1, "the first request's answer is malformed")
    )
    p.want("a")
    p.tick()
    p.world.healthy.add(p.supervisor.procs["a"].plan.health_url)
    p.tick()
    p.tick()
    rec = p.supervisor.procs["a"].record
    assert rec.state is S.BACKOFF
    assert rec.reason == (
        "the first request after the start failed: the first request's answer is malformed"
    )


def test_the_gateway_hears_of_every_state_change(pool):
    p = pool()
    before = p.control.changes
    p.tick()
    assert p.control.changes == before, "nothing changed"
    p.want("a")
    p.tick()
    assert p.control.changes == before + 1


# ---- refusals and the table itself --------------------------------------------------------


def test_an_edge_not_in_the_table_is_refused(world, make):
    rec = InstanceRecord(name="a", state=S.RUNNING, reason=None)
    with pytest.raises(IllegalTransition, match="instance a: running -> pending is not allowed"):
        enter(rec, S.PENDING, "nope")
    assert rec.state is S.RUNNING and rec.reason is None, "a refused edge changes nothing"
    supervisor, _ = make()
    with pytest.raises(IllegalTransition, match="pending -> running"):
        supervisor._enter(supervisor.procs["a"], S.RUNNING, None)
    # Not a user's error: it is not a PipelineError, so it is never shown as `error: ...`.
    from pipeline.errors import PipelineError

    assert not issubclass(IllegalTransition, PipelineError)


def test_a_start_request_leaves_a_live_instance_alone(world, make):
    supervisor, _ = make()
    run_to_ready(world, supervisor)
    supervisor.request_start(["a", "unknown"])
    assert state_of(supervisor) is S.RUNNING and len(world.spawned) == 1


def test_every_edge_of_the_table_has_its_transition_test():
    prefix = "test_transition_"
    tested = {name.removeprefix(prefix) for name in globals() if name.startswith(prefix)}
    edges = {f"{a.value}_to_{b.value}" for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == tested


def test_terminal_states_lead_back_only_to_pending():
    for state in S:
        if state.terminal:
            assert TRANSITIONS[state] == {S.PENDING}
        else:
            assert S.STOPPED in TRANSITIONS[state], f"{state} can always be stopped"


def test_the_gateway_reads_states_without_pydantic():
    code = (
        "import sys, pipeline.gateway.states as g, pipeline.serve.record as s; "
        "assert g.RUNNING is s.InstanceState.RUNNING; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'))"
    )
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_fake_pids_cannot_be_real_processes():
    # The fake pids are beyond any pid_max: had a signal left the fakes, it would have failed.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max < FIRST_PID


def test_a_replica_running_ends_the_other_replicas_wait(make, world):
    # Two on-demand replicas of one model in a pool of one: a held request asks for both;
    # once one runs, the other is no longer wanted (it would only push the first out).
    fake, calls = FakeControl(), FakeCalls()
    instances = {
        name: {"port": port, "served": "m", "control": {"start": "on-demand"}}
        for name, port in (("r1", 18001), ("r2", 18002))
    }
    supervisor, lines = make(
        instances,
        extra='[gateway]\nenable = true\nport = 18999\n[pool.p]\ninstances = ["r1", "r2"]\n',
        seams={"control": fake, "pool_calls": calls},
    )
    p = Pool(supervisor, fake, calls, lines, world)
    p.tick()
    p.want("r2")
    p.up("r1")
    assert supervisor.procs["r2"].wanted_at is None
    p.world.now += 60
    p.tick()
    assert fake.sent == [] and p.state("r2") is S.UNLOADED
