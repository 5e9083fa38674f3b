"""Replicas behind the gateway: instances with one served name share its requests.

Stand-ins (tests/standin_server.py), each in its own process group on a free loopback port,
behind one ``python -m pipeline.gateway``. Which replica answered is the stand-in's
``x-standin-port`` header; what each received is its log (``standin: got id ...``), which
outlives a SIGKILL. Load loops are bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STANDIN, free_port, wait_for
from test_gateway import healthy, request, start_gateway, stop, write_state

from pipeline.gateway.config import GatewayConfig, Upstream
from pipeline.gateway.proxy import Gateway
from pipeline.gateway.upstream import EJECT_SECONDS

KEY = "replica-gw-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_replica(port: int, names: list[str], log: Path, **standin: str) -> subprocess.Popen:
    """A stand-in in its own session (so its whole group can be killed); ``standin`` sets
    its ``STANDIN_*`` variables (``response_delay="0.3"``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    env.pop("VLLM_API_KEY", None)
    env.update({f"STANDIN_{k.upper()}": v for k, v in standin.items()})
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(STANDIN), "--port", str(port), "--served-model-name", *names],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for(lambda: healthy(port), timeout=10, what=f"stand-in on {port}")
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def ids_received(log: Path) -> list[str]:
    return re.findall(r"^standin: got id (\S+)$", log.read_text(), flags=re.MULTILINE)


def chat(port: int, body: dict) -> tuple[int, str | None, bytes]:
    """(status, the replica's port that answered, body)."""
    status, head, raw = request(port, "POST", "/v1/chat/completions", body, AUTH)
    return status, head.get("x-standin-port"), raw


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``r1`` (slow: 0.5 s before each answer) and ``r2`` (fast) both serve ``m``; ``solo``
    serves ``other``. States come from a state file the tests write."""
    root = tmp_path_factory.mktemp("replicas")
    ports = {name: free_port() for name in ("r1", "r2", "solo", "gateway")}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_replica(ports["r1"], ["m"], root / "r1.log", response_delay="0.5"))
        procs.append(start_replica(ports["r2"], ["m"], root / "r2.log"))
        procs.append(start_replica(ports["solo"], ["other"], root / "solo.log"))
        state = root / "state.json"
        write_state(state, {n: ("running", None) for n in ("r1", "r2", "solo")})
        config = GatewayConfig(
            host="127.0.0.1",
            port=ports["gateway"],
            keys=(KEY,),
            instances=(
                Upstream("r1", "127.0.0.1", ports["r1"], None, ("m",)),
                Upstream("r2", "127.0.0.1", ports["r2"], None, ("m",)),
                Upstream("solo", "127.0.0.1", ports["solo"], None, ("other",)),
            ),
            state_file=str(state),
        )
        gateway = start_gateway(config, root / "gateway.log")
        yield {"ports": ports, "port": ports["gateway"], "state": state, "gateway": gateway}
    finally:
        if "gateway" in locals():
            stop(gateway)
        for proc in procs:
            kill_group(proc)


@pytest.fixture
def all_running(pair: dict) -> Iterator[dict]:
    write_state(pair["state"], {n: ("running", None) for n in ("r1", "r2", "solo")})
    yield pair
    write_state(pair["state"], {n: ("running", None) for n in ("r1", "r2", "solo")})


def test_one_request_at_a_time_alternates_between_the_replicas(all_running):
    ports, port = all_running["ports"], all_running["port"]
    answered = []
    for _ in range(6):
        status, by, _ = chat(port, {"model": "m"})
        assert status == 200
        answered.append(by)
    # Both idle at each request: a tie, taken in turn (config order first).
    assert answered == [str(ports["r1"]), str(ports["r2"])] * 3
    metrics = request(port, "GET", "/metrics")[2].decode()
    for name in ("r1", "r2"):
        line = f'gateway_requests_total{{model="m",instance="{name}",code="200"}} '
        assert line in metrics, "per-replica counters, labelled with the instance"


def test_under_concurrent_load_the_slow_replica_gets_fewer_requests(all_running):
    ports, port = all_running["ports"], all_running["port"]
    answered: list[str | None] = []
    failures: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 30

    def worker() -> None:
        for _ in range(6):
            if time.monotonic() > deadline:
                return
            status, by, _ = chat(port, {"model": "m"})
            with lock:
                answered.append(by) if status == 200 else failures.append(status)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    counts = Counter(answered)
    assert not failures and len(answered) == 24
    slow, fast = counts[str(ports["r1"])], counts[str(ports["r2"])]
    # Turn-taking alone would give each 12; fewest-in-flight keeps requests off the replica
    # that holds them 0.5 s.
    assert 1 <= slow <= 6 and fast >= 18, counts


def test_models_lists_a_replicated_name_once_and_follows_each_replicas_state(all_running):
    ports, port, state = all_running["ports"], all_running["port"], all_running["state"]

    def listed() -> list[str]:
        return [
            m["id"] for m in json.loads(request(port, "GET", "/v1/models", headers=AUTH)[2])["data"]
        ]

    assert listed() == ["m", "other"]
    status, _, raw = request(port, "GET", "/v1/models/m", headers=AUTH)
    assert status == 200 and json.loads(raw)["id"] == "m"

    write_state(
        state, {"r1": ("starting", None), "r2": ("running", None), "solo": ("running", None)}
    )
    assert listed() == ["m", "other"]
    assert {chat(port, {"model": "m"})[1] for _ in range(4)} == {str(ports["r2"])}, (
        "a replica that is not ready gets nothing"
    )

    write_state(
        state, {"r1": ("starting", None), "r2": ("backoff", "exited"), "solo": ("running", None)}
    )
    assert listed() == ["other"]
    status, head, raw = request(port, "POST", "/v1/chat/completions", {"model": "m"}, AUTH)
    message = json.loads(raw)["error"]["message"]
    assert status == 503 and head["retry-after"] == "5", "the soonest replica back"
    assert message == (
        "model 'm' is unavailable: instance 'r1' is starting (loading the model); "
        "instance 'r2' is restarting after a failure: exited"
    )

    write_state(state, {n: ("running", None) for n in ("r1", "r2", "solo")})
    assert {chat(port, {"model": "m"})[1] for _ in range(2)} == {str(ports["r1"]), str(ports["r2"])}


def test_pick_takes_the_fewest_in_flight_then_turns_and_passes_over_failed_replicas():
    """The choice itself, on a Gateway that never listens (no socket, no loop)."""
    ups = tuple(Upstream(n, "127.0.0.1", 1, None, ("m", "m-alias")) for n in ("a", "b", "c"))
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=1, instances=ups), say=lambda _: None)
    group = gateway.routes[b"m"]
    assert gateway.routes[b"m-alias"] is group, "one rotation for every name of the group"
    pools = {name: gateway.pools[name] for name in ("a", "b", "c")}

    def picks(count: int, **kwargs) -> list[str]:
        return [group.pick(gateway, **kwargs).upstream.name for _ in range(count)]

    assert picks(4) == ["a", "b", "c", "a"]
    gateway.inflight.update(a=2, b=0, c=1)
    assert picks(2) == ["b", "b"]
    gateway.inflight.update(a=1, b=1, c=1)
    pools["c"].down_until = time.monotonic() + EJECT_SECONDS
    assert set(picks(4)) == {"a", "b"}, "a replica that just failed is passed over"
    assert picks(1, exclude=(pools["a"], pools["b"])) == ["c"], "...unless it is the only one"
    assert group.pick(gateway, exclude=tuple(pools.values())) is None


# ---- a replica killed under load --------------------------------------------------------------


@pytest.fixture
def killable(tmp_path: Path) -> Iterator[dict]:
    """Two replicas of ``m`` that wait 0.4 s before answering; no state file (no supervisor
    tells the gateway anything: it finds out from the connections alone)."""
    ports = {name: free_port() for name in ("r1", "r2", "gateway")}
    logs = {name: tmp_path / f"{name}.log" for name in ("r1", "r2", "gateway")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("r1", "r2"):
            procs[name] = start_replica(ports[name], ["m"], logs[name], response_delay="0.4")
        config = GatewayConfig(
            host="127.0.0.1",
            port=ports["gateway"],
            keys=(KEY,),
            instances=tuple(Upstream(n, "127.0.0.1", ports[n], None, ("m",)) for n in ("r1", "r2")),
        )
        procs["gateway"] = start_gateway(config, logs["gateway"])
        yield {"ports": ports, "logs": logs, "procs": procs}
    finally:
        if "gateway" in procs:
            stop(procs["gateway"])
        for name in ("r1", "r2"):
            if name in procs:
                kill_group(procs[name])


class Outcome:
    __slots__ = ("by", "complete", "id", "status", "stream")

    def __init__(self, ident: str, stream: bool) -> None:
        self.id = ident
        self.stream = stream
        self.status: int | None = None
        self.by: str | None = None  # the replica whose response head reached the client
        self.complete = False


def send(port: int, outcome: Outcome) -> None:
    body: dict = {"model": "m", "standin_id": outcome.id}
    if outcome.stream:
        body.update(stream=True, standin_chunks=4, standin_delay=0.1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), AUTH)
        resp = conn.getresponse()
        outcome.status = resp.status
        outcome.by = resp.getheader("x-standin-port")
        data = resp.read()
        ending = b"data: [DONE]\n\n" if outcome.stream else b"}"
        outcome.complete = resp.status == 200 and data.endswith(ending)
    except (OSError, http.client.HTTPException):
        pass  # truncated: ``complete`` stays False
    finally:
        conn.close()


def test_a_replica_killed_mid_load_loses_no_request_that_had_not_started_streaming(killable):
    ports, logs, procs = killable["ports"], killable["logs"], killable["procs"]
    gateway_port, r1, r2 = ports["gateway"], str(ports["r1"]), str(ports["r2"])
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 40

    def worker(index: int) -> None:
        for turn in range(8):
            if time.monotonic() > deadline:
                return
            kind = "stream" if (index + turn) % 2 else "plain"
            outcome = Outcome(f"w{index}-{turn}-{kind}", stream=kind == "stream")
            with lock:
                outcomes.append(outcome)
            send(gateway_port, outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()

    def waiting_on_r1() -> list[str]:
        """Plain requests r1 has read and not answered: killed now, they must be resent."""
        with lock:
            done = {o.id for o in outcomes if o.status is not None}
        return [i for i in ids_received(logs["r1"]) if i.endswith("plain") and i not in done]

    wait_for(lambda: len(ids_received(logs["r1"])) >= 4 and waiting_on_r1(), timeout=20,
             interval=0.01, what="r1 to hold a plain request")  # fmt: skip
    os.killpg(procs["r1"].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    got = {name: Counter(ids_received(logs[name])) for name in ("r1", "r2")}
    assert all(n == 1 for c in got.values() for n in c.values()), "no replica got one twice"
    resent = set(got["r1"]) & set(got["r2"])
    assert resent, "some request was resent after r1 died"
    by_id = {o.id: o for o in outcomes}
    assert len(by_id) == 48
    for ident in resent:
        assert by_id[ident].complete and by_id[ident].by == r2, f"{ident} resent and answered"
    for outcome in outcomes:
        if outcome.by == r1:
            assert outcome.id not in got["r2"], f"{outcome.id}: bytes came from r1, never resent"
        if not outcome.complete:
            # The only losses: streams whose answer had begun on r1 when it died.
            assert outcome.by == r1 and outcome.id in got["r1"], vars_of(outcome)
    after = [o for o in outcomes if o.id not in got["r1"]]
    assert after and all(o.complete and o.by == r2 for o in after), [
        vars_of(o) for o in after if not (o.complete and o.by == r2)
    ]
    metrics = request(gateway_port, "GET", "/metrics")[2].decode()
    closed = 'gateway_retries_total{model="m",instance="r1",reason="upstream_closed"} '
    assert closed in metrics, "the held request was resent"
    assert "instance r1: upstream closed before answering; resent to r2" in (
        logs["gateway"].read_text()
    )
    assert time.monotonic() - killed_at < 60


def vars_of(outcome: Outcome) -> dict:
    return {name: getattr(outcome, name) for name in Outcome.__slots__}


def test_pick_passes_over_a_suspect_replica_until_it_is_cleared_or_restarted():
    """The choice itself, on a Gateway that never listens: a suspect replica (no response head
    within upstream_timeout) gets requests only when no other is ready."""
    from pipeline.gateway.states import InstanceStatus

    ups = tuple(Upstream(n, "127.0.0.1", 1, None, ("m",)) for n in ("a", "b"))
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=1, instances=ups), say=lambda _: None)
    group = gateway.routes[b"m"]
    pools = gateway.pools
    gateway.states.statuses["a"] = InstanceStatus("running", ready_at=100.0)
    pools["a"].mark_suspect(100.0)
    gateway.inflight.update(a=0, b=5)
    assert {group.pick(gateway).upstream.name for _ in range(4)} == {"b"}, "even when busier"
    pools["b"].down_until = time.monotonic() + EJECT_SECONDS
    assert group.pick(gateway).upstream.name == "b", "suspect ranks below just failed"
    assert group.pick(gateway, exclude=(pools["b"],)).upstream.name == "a", "...or when alone"
    gateway.states.statuses["a"] = InstanceStatus("running", ready_at=200.0)  # restarted
    assert not pools["a"].suspected(200.0)
    pools["b"].down_until = 0.0
    assert group.pick(gateway).upstream.name == "a", "no longer suspect: fewest in flight"


# ---- a hung replica ----------------------------------------------------------------------------


def write_runs(path: Path, runs: dict[str, tuple[str, float]]) -> None:
    """``state.json`` with each instance's state and ``ready_at`` (which run of it this is)."""
    from pipeline.serve.record import InstanceRecord, InstanceState, ServeState, SupervisorRecord
    from pipeline.serve.state import StateStore

    sup = SupervisorRecord(
        pid=os.getpid(), proc_start=None, session="t", mode="background", source="t", started_at=0
    )
    records = {
        name: InstanceRecord(name=name, state=InstanceState(state), ready_at=ready_at)
        for name, (state, ready_at) in runs.items()
    }
    StateStore(path.parent).write(ServeState(supervisor=sup, instances=records))
    time.sleep(0.05)  # the gateway looks at the file at most every 20 ms


@pytest.fixture
def hangable(tmp_path: Path) -> Iterator[dict]:
    """Two replicas of ``m`` behind a gateway with ``upstream_timeout`` 1 s; r1 can be stopped
    (SIGSTOP) and is continued in teardown."""
    ports = {name: free_port() for name in ("r1", "r2", "gateway")}
    logs = {name: tmp_path / f"{name}.log" for name in ("r1", "r2", "gateway")}
    state = tmp_path / "state.json"
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("r1", "r2"):
            procs[name] = start_replica(ports[name], ["m"], logs[name])
        write_runs(state, {"r1": ("running", 1000.0), "r2": ("running", 1000.0)})
        config = GatewayConfig(
            host="127.0.0.1",
            port=ports["gateway"],
            keys=(KEY,),
            instances=tuple(Upstream(n, "127.0.0.1", ports[n], None, ("m",)) for n in ("r1", "r2")),
            state_file=str(state),
            upstream_timeout=1.0,
        )
        procs["gateway"] = start_gateway(config, logs["gateway"])
        yield {"ports": ports, "logs": logs, "procs": procs, "state": state}
    finally:
        if "gateway" in procs:
            stop(procs["gateway"])
        for name in ("r1", "r2"):
            if name in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(procs[name].pid, signal.SIGCONT)
                kill_group(procs[name])


def metric(port: int, sample: str) -> str | None:
    for line in request(port, "GET", "/metrics")[2].decode().splitlines():
        if line.startswith(sample + " "):
            return line.split()[-1]
    return None


def test_regression_a_hung_instance_gives_504_not_a_hang(hangable):
    """An instance that accepted a request and never answered (a deadlocked engine; here
    SIGSTOP) held its client for ever: the gateway waited without a limit for the first byte.
    Now the wait for the response head is bounded by upstream_timeout, and the client gets a
    504 in the gateway's usual error form."""
    procs, port = hangable["procs"], hangable["ports"]["gateway"]
    write_runs(hangable["state"], {"r1": ("running", 1000.0), "r2": ("stopped", 1000.0)})
    os.killpg(procs["r1"].pid, signal.SIGSTOP)
    began = time.monotonic()
    status, head, raw = request(port, "POST", "/v1/chat/completions", {"model": "m"}, AUTH)
    took = time.monotonic() - began
    assert status == 504 and 0.9 <= took < 15, (status, took)
    assert head["content-type"] == "application/json"
    assert json.loads(raw) == {
        "error": {
            "message": "instance 'r1' sent no response within 1 s (upstream_timeout); "
            "it may be hung",
            "type": "server_error",
            "param": None,
            "code": "gateway_timeout",
        }
    }
    assert metric(port, 'gateway_errors_total{model="m",instance="r1",reason="upstream_timeout"}')
    assert metric(port, 'gateway_instance_suspect{instance="r1"}') == "1"
    assert metric(port, 'gateway_instance_suspect{instance="r2"}') == "0"
    assert "instance r1: no response within 1s (upstream_timeout)" in (
        hangable["logs"]["gateway"].read_text()
    )
    # The connection stays usable: the next answer on it is the gateway's own.
    assert request(port, "GET", "/health")[0] == 200


def test_a_suspect_replica_is_passed_over_until_it_answers_in_time(hangable):
    ports, procs, port = hangable["ports"], hangable["procs"], hangable["ports"]["gateway"]
    r1, r2 = str(ports["r1"]), str(ports["r2"])
    os.killpg(procs["r1"].pid, signal.SIGSTOP)
    status, _, _ = chat(port, {"model": "m"})  # both idle: r1's turn first
    assert status == 504
    answers = [chat(port, {"model": "m"})[:2] for _ in range(4)]
    assert answers == [(200, r2)] * 4, "the suspect replica gets nothing while r2 is ready"
    os.killpg(procs["r1"].pid, signal.SIGCONT)
    assert {chat(port, {"model": "m"})[1] for _ in range(2)} == {r2}, "suspect until it answers"
    # r2 restarting (r1's run unchanged): r1 is the only one, and answers in time.
    write_runs(hangable["state"], {"r1": ("running", 1000.0), "r2": ("starting", 1000.0)})
    assert chat(port, {"model": "m"})[:2] == (200, r1)
    assert metric(port, 'gateway_instance_suspect{instance="r1"}') == "0"
    write_runs(hangable["state"], {"r1": ("running", 1000.0), "r2": ("running", 2000.0)})
    assert {chat(port, {"model": "m"})[1] for _ in range(4)} == {r1, r2}, "both in turn again"


def test_a_stream_longer_than_upstream_timeout_is_not_cut(hangable):
    """Only the wait for the response head is bounded: a stream may run far longer."""
    port = hangable["ports"]["gateway"]
    body = {"model": "m", "stream": True, "standin_chunks": 5, "standin_delay": 0.5}
    began = time.monotonic()
    status, _, raw = request(port, "POST", "/v1/chat/completions", body, AUTH)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b"data: {") == 5 and time.monotonic() - began >= 2.0
    assert metric(port, 'gateway_instance_suspect{instance="r1"}') == "0"
