"""Gang supervision of a multi-node instance, driven through the supervisor's seams.

Two supervisors, the leader's (rank 0) and a follower's (rank 1), planned from one TOML and
wired to the fakes of tests/test_supervisor_transitions.py: a fake spawner, process groups,
probe and clock. The follower's poll reaches the leader's :class:`GangBoard` directly (no
socket); one test runs the real control endpoint on loopback. The gang takes only edges of
:data:`~pipeline.serve.record.TRANSITIONS`; these tests pin why and when.
"""

from __future__ import annotations

import io
import signal
import socket
from pathlib import Path

import pytest
from test_supervisor_transitions import World

from pipeline.pixi.envs import Runtime
from pipeline.serve import gang
from pipeline.serve.commands.status import print_status
from pipeline.serve.config import parse_config
from pipeline.serve.plan import build_plan
from pipeline.serve.record import InstanceState
from pipeline.serve.state import StateStore
from pipeline.serve.supervisor import Supervisor

S = InstanceState
RUNTIME = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")
TOKEN = "gang-token-1"


def toml(log_dir: Path) -> str:
    return f"""
[instance.control]
gpu_ids = []
log_dir = "{log_dir}"
backoff_initial = 1
backoff_max = 4
stop_grace = 5
max_restarts = 3
[instance.server]
model = "/models/tiny"
[instance.big.server]
port = 18001
tensor_parallel_size = 2
[instance.big.cluster]
nodes = 2
leader = "192.0.2.1"
token_env = "GANG_TOKEN"
"""


class FakeServer:
    def __init__(self, host, port, board, tokens):
        self.where, self.tokens, self.closed = (host, port), dict(tokens), False

    def close(self):
        self.closed = True


class Gang:
    """A leader's and a follower's supervisor over one World; ``reachable`` cuts the link."""

    def __init__(self, tmp_path: Path, world: World, environ: dict[str, str]) -> None:
        self.world = world
        self.reachable = True
        self.servers: list[FakeServer] = []
        config = parse_config(toml(tmp_path / "logs"), source="serve.toml")
        self.lines: dict[int, list[str]] = {0: [], 1: []}
        self.sups: dict[int, Supervisor] = {}
        for rank in (0, 1):
            plan = build_plan(config, RUNTIME, environ, node_rank_arg=rank)
            store = StateStore(tmp_path / f"state{rank}")
            store.ensure()
            self.sups[rank] = world.supervisor(
                plan,
                store,
                self.lines[rank].append,
                gang_server=self._server,
                gang_poll=self._poll,
            )
        self.leader.start_gang_servers()

    def _server(self, host, port, board, tokens):
        server = FakeServer(host, port, board, tokens)
        self.servers.append(server)
        return server

    def _poll(self, url, instance, token, params, timeout):
        if not self.reachable or token != TOKEN or url != "http://192.0.2.1:29601":
            return None
        return self.leader.board.heartbeat(
            instance,
            int(params["rank"]),
            int(params["generation"]),
            str(params["session"]),
            str(params["state"]),
            str(params["reason"]),
        )

    @property
    def leader(self) -> Supervisor:
        return self.sups[0]

    @property
    def follower(self) -> Supervisor:
        return self.sups[1]

    def rec(self, rank: int):
        return self.sups[rank].procs["big"].record

    def state(self, rank: int) -> InstanceState:
        return self.rec(rank).state

    def popen(self, rank: int):
        pid = self.rec(rank).pid
        return next(p for p in self.world.spawned if p.pid == pid)

    def tick(self, seconds: float = 1.0, times: int = 1) -> None:
        for _ in range(times):
            self.leader.tick()
            self.follower.tick()
            self.world.now += seconds

    def ready(self) -> None:
        """Tick until both members run generation 1."""
        self.tick()
        assert self.state(0) is S.STARTING and self.state(1) is S.STARTING
        self.world.healthy.add(self.leader.procs["big"].plan.health_url)
        self.tick(times=3)  # the follower's heartbeat says so one poll later
        assert (self.state(0), self.state(1)) == (S.RUNNING, S.RUNNING)


@pytest.fixture
def pair(tmp_path, world) -> Gang:
    return Gang(tmp_path, world, {"GANG_TOKEN": TOKEN})


@pytest.fixture
def world() -> World:
    return World()


def test_the_leader_serves_the_control_endpoint_on_master_port_plus_100(pair):
    (server,) = pair.servers
    assert server.where == ("0.0.0.0", 29601) and server.tokens == {"big": TOKEN}
    pair.leader.close_gang_servers()
    assert server.closed


def test_the_follower_joins_the_leaders_generation_and_is_ready_with_it(pair):
    pair.tick()
    assert pair.state(0) is S.STARTING and pair.rec(0).generation == 1
    assert pair.state(1) is S.STARTING and pair.rec(1).generation == 1
    assert "--headless" in pair.popen(1).argv and "--headless" not in pair.popen(0).argv
    pair.tick()
    assert pair.state(1) is S.STARTING, "ready only when the leader's /health is"
    pair.world.healthy.add(pair.leader.procs["big"].plan.health_url)
    pair.tick(times=2)
    assert (pair.state(0), pair.state(1)) == (S.RUNNING, S.RUNNING)
    assert any("gang ready" in line for line in pair.lines[1])
    pair.tick()  # the follower says so in its next heartbeat
    assert pair.rec(0).members[0]["rank"] == 1
    assert pair.rec(0).members[0]["state"] == "running"


def test_a_follower_member_exit_restarts_the_whole_gang_with_a_new_generation(pair):
    pair.ready()
    leader_pid, follower = pair.rec(0).pid, pair.popen(1)
    pair.world.exit(follower, -signal.SIGKILL)
    pair.tick(0.1)
    # The follower never restarts its member alone: it waits for the leader's next generation.
    assert pair.state(1) is S.BACKOFF and "exited (killed by SIGKILL)" in pair.rec(1).reason
    pair.tick(1.0, times=3)  # heard in the follower's next heartbeat (one a second)
    assert pair.state(0) is S.BACKOFF
    assert pair.rec(0).reason.startswith("the member on rank 1 is down")
    assert (leader_pid, "SIGTERM") in pair.world.signals
    pair.world.exit(next(p for p in pair.world.spawned if p.pid == leader_pid), -15)
    pair.tick(1.0, times=3)
    assert pair.rec(0).generation == 2 and pair.rec(1).generation == 2
    assert pair.state(0) is S.RUNNING and pair.state(1) is S.RUNNING
    assert pair.rec(0).restarts == 1 and pair.rec(1).restarts == 1
    assert len(pair.world.spawned) == 4


def test_a_silent_follower_is_missing_and_restarts_the_gang(pair):
    pair.ready()
    pair.reachable = False  # the follower's node is cut off: no more heartbeats
    for _ in range(int(gang.MISSING_AFTER) + 2):
        pair.leader.tick()
        pair.world.now += 1.0
    assert pair.state(0) is S.BACKOFF
    assert pair.rec(0).reason.startswith("rank 1 is missing (no heartbeat for ")


def test_a_leader_member_exit_stops_the_followers_member_and_the_gang_comes_back(pair):
    pair.ready()
    follower_pid = pair.rec(1).pid
    pair.world.exit(pair.popen(0), -signal.SIGKILL)
    pair.tick(0.1)
    assert pair.state(0) is S.BACKOFF
    pair.tick(0.1)
    assert pair.state(1) is S.BACKOFF and pair.rec(1).reason == "the leader is backoff"
    assert (follower_pid, "SIGTERM") in pair.world.signals
    pair.world.exit(next(p for p in pair.world.spawned if p.pid == follower_pid), -15)
    pair.tick(1.0, times=3)
    assert (pair.state(0), pair.state(1)) == (S.RUNNING, S.RUNNING)
    assert pair.rec(1).generation == 2


def test_the_follower_stops_its_member_when_the_leader_is_gone_past_the_grace(pair):
    pair.ready()
    follower = pair.popen(1)
    pair.reachable = False
    for _ in range(int(gang.LEADER_GRACE) - 2):
        pair.follower.tick()
        pair.world.now += 1.0
    assert pair.state(1) is S.RUNNING, "a short outage is ridden out"
    for _ in range(4):
        pair.follower.tick()
        pair.world.now += 1.0
    assert pair.state(1) is S.BACKOFF
    assert pair.rec(1).reason.startswith("the leader has not answered for ")
    assert (follower.pid, "SIGTERM") in pair.world.signals
    pair.world.exit(follower, -signal.SIGTERM)
    # The leader back with a new generation: the follower rejoins it.
    pair.reachable = True
    pair.world.exit(pair.popen(0), -signal.SIGKILL)
    pair.tick(1.0, times=4)
    assert (pair.state(0), pair.state(1)) == (S.RUNNING, S.RUNNING)


def test_the_follower_gives_up_when_the_leader_gave_up(pair):
    pair.ready()
    pair.leader.procs["big"].streak = 3  # max_restarts used up
    pair.world.exit(pair.popen(0), 1)
    pair.tick(0.1, times=2)
    assert pair.state(0) is S.FAILED
    assert pair.state(1) is S.FAILED and pair.rec(1).reason.startswith("the leader gave up: ")


def test_doit_stop_on_the_leader_stops_the_followers_member(pair):
    pair.ready()
    follower_pid = pair.rec(1).pid
    pair.leader.request_stop()
    pair.tick(0.1)
    assert pair.state(0) is S.STOPPING
    assert pair.state(1) is S.BACKOFF and pair.rec(1).reason == "the leader is stopping"
    assert (follower_pid, "SIGTERM") in pair.world.signals


def test_doit_stop_on_the_follower_stops_its_member_for_good(pair):
    pair.ready()
    pair.follower.request_stop()
    assert pair.state(1) is S.STOPPING
    pair.world.exit(pair.popen(1), -15)
    pair.follower.tick()
    assert pair.state(1) is S.STOPPED and pair.follower.finished


def test_the_first_failure_is_kept_however_often_the_gang_restarts(pair, tmp_path):
    pair.ready()
    log = Path(pair.leader.procs["big"].plan.log_file)
    log.write_text("loading\nRuntimeError: gloo connect failed\n")
    pair.world.exit(pair.popen(0), 1)
    pair.tick(0.1)
    kept = Path(str(log) + ".first-failure")
    assert "RuntimeError: gloo connect failed" in kept.read_text()
    assert pair.rec(0).first_failure == "generation 1: exited (exit code 1)"
    log.write_text("a later failure\n")
    pair.world.live_groups.clear()
    pair.tick(1.0, times=4)
    pair.world.exit(pair.popen(0), 2)
    pair.tick(0.1)
    assert "gloo connect failed" in kept.read_text()
    assert pair.rec(0).first_failure.startswith("generation 1: ")


def test_status_shows_each_member_with_rank_generation_and_restarts(pair):
    pair.ready()
    out = io.StringIO()
    print_status(pair.leader.state, out, alive=True)
    text = out.getvalue()
    assert "big: node rank 0 of 2, generation 1, restarts 0; members: rank 1 running" in text
    out = io.StringIO()
    print_status(pair.follower.state, out, alive=True)
    assert "node rank 1" in out.getvalue()
    assert "big: node rank 1 of 2, generation 1, restarts 0" in out.getvalue()


def test_under_a_platform_a_member_never_restarts_on_its_own(tmp_path, world):
    environ = {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "192.0.2.1", "LWS_GROUP_SIZE": "2"}
    config = parse_config(toml(tmp_path / "logs"), source="serve.toml")
    plan = build_plan(config, RUNTIME, environ)
    store = StateStore(tmp_path / "state")
    store.ensure()
    polls: list[str] = []
    sup = world.supervisor(
        plan,
        store,
        lambda line: None,
        base_env={},
        gang_server=lambda *a: pytest.fail("no control endpoint under a platform"),
        gang_poll=lambda *a: polls.append("poll") or None,
    )
    sup.start_gang_servers()
    sup.tick()
    sup.tick()
    rec = sup.procs["big"].record
    assert rec.state is S.RUNNING, "a headless member has no /health: running once started"
    world.exit(world.spawned[-1], -signal.SIGKILL)
    sup.tick()
    assert rec.state is S.FAILED and "restart: no" in rec.reason
    assert polls == [] and sup.exit_code() == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_real_control_endpoint_wants_the_token_and_records_heartbeats():
    board = gang.GangBoard()
    board.publish("big", {"session": "s", "generation": 3, "state": "running"})
    port = _free_port()
    server = gang.ControlServer("127.0.0.1", port, board, {"big": TOKEN})
    try:
        url = f"http://127.0.0.1:{port}"
        params = {"rank": 1, "generation": 3, "session": "f", "state": "running", "reason": ""}
        assert gang.http_poll(url, "big", "wrong", params, 2.0) is None
        assert board.beats("big") == {}
        assert gang.http_poll(url, "other", TOKEN, params, 2.0) is None
        view = gang.http_poll(url, "big", TOKEN, params, 2.0)
        assert view == {"session": "s", "generation": 3, "state": "running"}
        beat = board.beats("big")[1]
        assert (beat.generation, beat.state) == (3, "running")
    finally:
        server.close()
    assert gang.http_poll(f"http://127.0.0.1:{port}", "big", TOKEN, params, 1.0) is None


def test_a_leader_that_exits_0_after_its_follower_died_restarts_the_gang(pair):
    # Measured: SIGKILL of the follower's member makes the leader's API server exit with
    # code 0; a one-node instance's clean exit is not restarted, a gang leader's must be.
    pair.ready()
    pair.world.exit(pair.popen(0), 0)
    pair.tick(0.1)
    assert pair.state(0) is S.BACKOFF and pair.rec(0).reason == "exited (exit code 0)"
