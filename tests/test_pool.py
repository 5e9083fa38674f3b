"""The model pool with stand-in instances under the real supervisor and gateway: on-demand
starts, a pool of one, sleep mode (the stand-in implements vLLM's sleep endpoints), the first
request after a wake, and the hostile cases: a dev path, a client that leaves while held, a
start that always fails, a full queue, a queue timeout, and `doit stop` while requests wait."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ProcessSampler, free_port, standin_config, wait_for

from pipeline.procs import group_alive
from pipeline.serve.commands.serve import serve_command
from pipeline.serve.commands.status import status_command
from pipeline.serve.commands.stop import stop_command
from pipeline.serve.record import InstanceState
from pipeline.serve.state import StateStore

S = InstanceState
KEY = "pool-gw-key"


def pool_config(
    prefix: Path,
    tmp_path: Path,
    *,
    a: dict | None = None,
    b: dict | None = None,
    control: dict | None = None,
    gateway: str = "",
) -> tuple[Path, dict[str, int]]:
    ports = {"a": free_port(), "b": free_port(), "gateway": free_port()}
    instances = {
        name: {"port": ports[name], **spec} for name, spec in (("a", a or {}), ("b", b or {}))
    }
    for spec in instances.values():
        spec["control"] = {"start": "on-demand", **spec.get("control", {})}
    text = standin_config(
        prefix,
        tmp_path / "logs",
        instances,
        control={"unload": "stop", **(control or {})},
        extra=(
            f'[gateway]\nenable = true\nhost = "127.0.0.1"\nport = {ports["gateway"]}\n'
            f'api_keys = ["{KEY}"]\n{gateway}\n'
            '[pool.one]\ninstances = ["a", "b"]\nmax_awake = 1\n'
        ),
    )
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path, ports


def ask(port: int, model: str, timeout: float = 30, path: str = "/v1/chat/completions"):
    """(status, headers, body) of one request through the gateway."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps({"model": model, "messages": []}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


def logs(tmp_path: Path) -> dict[str, Path]:
    return {name: tmp_path / "logs" / f"{name}.log" for name in ("a", "b")}


def with_gpus(tmp_path: Path) -> dict[str, str]:
    """This environment with an ``nvidia-smi`` that lists two GPUs, for the host check of a
    config with ``gpu_ids`` (the plan then takes the platform for one with sleep mode; the
    stand-ins use no GPU)."""
    bin_dir = tmp_path / "fake-driver"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\necho "GPU 0: Stand-in (UUID: GPU-0)"\necho "GPU 1: Stand-in (UUID: GPU-1)"\n'
    )
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def states(settings) -> dict[str, InstanceState]:
    state = StateStore(settings.serve_state).read()
    return {name: rec.state for name, rec in state.instances.items()}


def record(settings, name: str):
    return StateStore(settings.serve_state).read().instances[name]


def record_in(settings, name: str, state: InstanceState):
    """``name``'s record once the state file shows it in ``state``: the supervisor tells the
    gateway that an instance is running before it writes the file, so a held request can be
    answered a moment before the file says so."""
    wait_for(lambda: record(settings, name).state is state, timeout=10, what=f"{name} {state}")
    return record(settings, name)


def test_on_demand_models_take_turns_in_a_pool_of_one(settings, standin_prefix, tmp_path, capsys):
    config, ports = pool_config(standin_prefix, tmp_path)
    assert serve_command(settings, str(config), os.environ) == 0
    assert states(settings) == {"a": S.UNLOADED, "b": S.UNLOADED, "gateway": S.RUNNING}
    gw = ports["gateway"]
    # Listed although neither runs: a request for one starts it.
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{gw}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        ),
        timeout=10,
    ) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["a", "b"]
    with ProcessSampler(logs(tmp_path)) as sampler:
        for model in ("a", "b", "a", "b", "a"):
            status, _, body = ask(gw, model)
            assert (status, body["served_by"]) == (200, model)
    assert sampler.samples > 20 and sampler.both == 0, "never both up at once"
    assert sampler.seen == {"a", "b"}, "the sampler sees them"
    # Each request held for a start is in the gateway's metrics.
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{gw}/metrics", headers={"Authorization": f"Bearer {KEY}"}
        ),
        timeout=10,
    ) as resp:
        metrics = resp.read().decode()
    counts = {
        line.split("{")[0] + line.split('model="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(("gateway_held_seconds_count", "gateway_held_dispatch_seconds_count"))
    }
    assert counts == {
        "gateway_held_seconds_counta": 3.0,
        "gateway_held_seconds_countb": 2.0,
        "gateway_held_dispatch_seconds_count": 5.0,
    }
    record_in(settings, "a", S.RUNNING)
    assert states(settings)["b"] is S.UNLOADED
    rec = record(settings, "b")
    assert rec.put_away == "stop" and rec.wakes == 2 and rec.reason == "to make room for a"
    capsys.readouterr()
    status_command(settings)
    table = capsys.readouterr().out
    assert table.splitlines()[1].split()[-3:] == ["POOL", "IDLE", "QUEUED"]
    row = next(line for line in table.splitlines() if line.startswith("b "))
    assert "unloaded (stopped)" in row and row.split()[-3:] == ["one", "-", "0"]


def test_concurrent_requests_for_both_models_all_succeed(settings, standin_prefix, tmp_path):
    slow = {"env": {"STANDIN_RESPONSE_DELAY": "0.05"}}
    config, ports = pool_config(standin_prefix, tmp_path, a=slow, b=dict(slow))
    assert serve_command(settings, str(config), os.environ) == 0
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(model: str) -> None:
        for _ in range(4):
            status, _, body = ask(ports["gateway"], model, timeout=60)
            with lock:
                results.append((status, body.get("served_by", body.get("error", {}))))

    with ProcessSampler(logs(tmp_path)) as sampler:
        threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "b") * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results) == 24
    assert all(status == 200 for status, _ in results), results
    assert sorted({who for _, who in results}) == ["a", "b"]
    assert sampler.both == 0


def test_idle_timeout_puts_an_instance_away_and_a_request_brings_it_back(
    settings, standin_prefix, tmp_path
):
    config, ports = pool_config(standin_prefix, tmp_path, control={"idle_timeout": 1})
    assert serve_command(settings, str(config), os.environ) == 0
    assert ask(ports["gateway"], "a")[0] == 200
    wait_for(lambda: states(settings)["a"] is S.UNLOADED, timeout=10, what="a put away")
    assert record(settings, "a").reason == "idle for 1s (idle_timeout)"
    assert ask(ports["gateway"], "a")[0] == 200
    assert record_in(settings, "a", S.RUNNING).wakes == 2


def sleeping_a(
    settings,
    prefix: Path,
    tmp_path: Path,
    control: dict | None = None,
    a_env: dict | None = None,
) -> tuple[dict[str, int], int]:
    """Serve a and b with sleep mode (``gpu_ids``: the plan takes the platform for one with
    sleep mode; the stand-ins need no GPU), ask a then b: a is put to sleep for b. The ports
    and a's pid."""
    gpu = {"gpu_ids": [0]}
    config, ports = pool_config(
        prefix,
        tmp_path,
        control={"unload": "sleep", "gpu_ids": [0], **(control or {})},
        a={"control": gpu, **({"env": a_env} if a_env else {})},
        b={"control": gpu},
    )
    text = config.read_text().replace(
        "[instance.server]", "[instance.server]\ngpu_memory_utilization = 0.6"
    )
    config.write_text(text)
    assert serve_command(settings, str(config), with_gpus(tmp_path)) == 0
    assert ask(ports["gateway"], "a")[0] == 200
    pid_a = record(settings, "a").pid
    assert ask(ports["gateway"], "b")[0] == 200
    return ports, pid_a


def test_sleep_mode_is_used_where_the_platform_has_it(settings, standin_prefix, tmp_path):
    ports, pid_a = sleeping_a(settings, standin_prefix, tmp_path)
    gw = ports["gateway"]
    rec = record_in(settings, "a", S.ASLEEP)
    assert rec.put_away == "sleep" and rec.pid == pid_a
    assert ask(gw, "a")[0] == 200
    rec = record_in(settings, "a", S.RUNNING)
    assert rec.pid == pid_a, "woken, not restarted"
    assert record(settings, "b").state is S.ASLEEP
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['a']}/stats").read())
    assert (stats["sleeps"], stats["wakes"]) == (1, 1)


def test_a_bad_first_answer_after_a_wake_fails_the_wake(settings, standin_prefix, tmp_path):
    ports, pid_a = sleeping_a(
        settings,
        standin_prefix,
        tmp_path,
        control={"backoff_initial": 0.5, "max_restarts": 2},
        a_env={"STANDIN_BAD_AFTER_WAKE": "1"},
    )
    gw = ports["gateway"]
    status, _, body = ask(gw, "a")
    assert status == 503
    assert (
        "waking failed: the first request after it: the first request's answer is malformed"
        in (body["error"]["message"])
    )
    # The restart rules: a cold start after the backoff, and then it answers.
    wait_for(lambda: ask(gw, "a")[0] == 200, timeout=30, what="a cold-started")
    assert record(settings, "a").pid != pid_a


def test_the_gateway_never_forwards_the_sleep_endpoints(settings, standin_prefix, tmp_path):
    config, ports = pool_config(
        standin_prefix,
        tmp_path,
        control={"unload": "sleep", "gpu_ids": [0]},
        a={"control": {"gpu_ids": [0]}},
        b={"control": {"gpu_ids": [1]}},
    )
    assert serve_command(settings, str(config), with_gpus(tmp_path)) == 0
    assert ask(ports["gateway"], "a")[0] == 200
    for path in ("/sleep?level=1", "/wake_up", "/is_sleeping", "/collective_rpc"):
        status, _, _ = ask(ports["gateway"], "a", path=path)
        assert status == 404, path
    record_in(settings, "a", S.RUNNING)
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['a']}/stats").read())
    assert stats["sleeps"] == 0


def raw_request(port: int, model: str) -> socket.socket:
    body = json.dumps({"model": model, "messages": []}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        + f"authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_answer(sock: socket.socket) -> str:
    """One whole HTTP answer from ``sock`` (its head, then Content-Length bytes of body)."""
    sock.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_client_that_leaves_while_held_leaves_the_queue(settings, standin_prefix, tmp_path):
    config, ports = pool_config(standin_prefix, tmp_path, a={"env": {"STANDIN_SLOW_START": "1.5"}})
    assert serve_command(settings, str(config), os.environ) == 0
    sock = raw_request(ports["gateway"], "a")
    wait_for(lambda: record(settings, "a").queued == 1, timeout=10, what="a request held")
    sock.close()
    wait_for(lambda: record(settings, "a").queued == 0, timeout=10, what="the queue emptied")
    # The start it asked for goes on, and the next request is served.
    assert ask(ports["gateway"], "a")[0] == 200


def test_a_start_that_always_fails_answers_the_held_requests(settings, standin_prefix, tmp_path):
    config, ports = pool_config(
        standin_prefix,
        tmp_path,
        a={"env": {"STANDIN_FAIL": "1"}},
        control={"max_restarts": 0},
    )
    assert serve_command(settings, str(config), os.environ) == 0
    began = time.monotonic()
    status, _, body = ask(ports["gateway"], "a")
    assert status == 503 and time.monotonic() - began < 10
    assert "exited during startup (exit code 1)" in body["error"]["message"]
    assert states(settings)["a"] is S.FAILED
    # Given up: the next request is refused at once, not held.
    status, _, body = ask(ports["gateway"], "a")
    assert status == 503 and "failed" in body["error"]["message"]


def test_a_full_queue_and_a_queue_timeout_get_503_with_retry_after(
    settings, standin_prefix, tmp_path
):
    config, ports = pool_config(
        standin_prefix,
        tmp_path,
        a={"env": {"STANDIN_SLOW_START": "30"}},
        gateway="max_queued = 2\nqueue_timeout = 4",
    )
    assert serve_command(settings, str(config), os.environ) == 0
    held = [raw_request(ports["gateway"], "a") for _ in range(2)]
    wait_for(lambda: record(settings, "a").queued == 2, timeout=10, what="two held")
    status, headers, body = ask(ports["gateway"], "a")
    assert status == 503 and headers["retry-after"] == "10"
    assert "2 requests already wait for it (max_queued 2)" in body["error"]["message"]
    for sock in held:
        answer = read_answer(sock)
        assert answer.startswith("HTTP/1.1 503"), answer
        assert "retry-after: 10" in answer.lower()
        assert "did not become ready within 4s (queue_timeout)" in answer
        sock.close()


def test_doit_stop_while_requests_are_held_answers_them_all(settings, standin_prefix, tmp_path):
    config, ports = pool_config(standin_prefix, tmp_path, a={"env": {"STANDIN_SLOW_START": "30"}})
    assert serve_command(settings, str(config), os.environ) == 0
    held = [raw_request(ports["gateway"], "a") for _ in range(3)]
    wait_for(lambda: record(settings, "a").queued == 3, timeout=10, what="three held")
    state = StateStore(settings.serve_state).read()
    groups = [rec.pgid for rec in state.instances.values() if rec.pgid]
    assert stop_command(settings, []) == 0
    for sock in held:
        answer = read_answer(sock)
        assert answer.startswith("HTTP/1.1 503"), answer
        sock.close()
    assert not any(group_alive(pgid) for pgid in groups)
    assert all(s in (S.STOPPED,) for s in states(settings).values())


@pytest.mark.parametrize("unload", ["sleep", "stop"])
def test_plan_says_how_an_instance_is_put_away(settings, standin_prefix, tmp_path, unload, capsys):
    from pipeline.serve.commands.plan import plan_command

    config, _ = pool_config(standin_prefix, tmp_path, control={"unload": unload})
    plan_command(settings, str(config), os.environ)
    plan = json.loads(capsys.readouterr().out)
    a = next(i for i in plan["instances"] if i["name"] == "a")
    assert a["managed"] and a["on_demand"] and a["pool"] == "one" and not a["sleep"]
    if unload == "sleep":
        assert "no GPU (the CPU build has no sleep mode): put away means stopped" in a["notes"]


def test_the_sleep_standin_follows_vllms_rules(tmp_path):
    """The stand-in's sleep endpoints, as vLLM 0.32's source defines them: dev mode only,
    sleep mode required, level 1 keeps the weights (a wake restores them), level 2 drops them
    (a weights-only wake leaves garbage until reload_weights, then the KV cache)."""
    import subprocess
    import sys

    from conftest import STANDIN

    def post(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def sleeping(port: int) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/is_sleeping", timeout=10) as r:
            return json.loads(r.read())["is_sleeping"]

    def serve(*flags: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(STANDIN), "--port", str(port), "--served-model-name", "m", *flags],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _healthy(port), timeout=10, what="the stand-in")
        return proc, port

    completion = {"model": "m", "prompt": "x", "max_tokens": 1}
    plain, port = serve()
    dev, dev_port = serve(VLLM_SERVER_DEV_MODE="1")
    full, full_port = serve("--enable-sleep-mode", VLLM_SERVER_DEV_MODE="1")
    try:
        assert post(port, "/sleep?level=1")[0] == 404, "no dev mode: no such route"
        assert post(dev_port, "/sleep?level=1")[0] == 500, "dev mode without sleep mode"
        assert post(full_port, "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
        assert sleeping(full_port) and post(full_port, "/v1/completions", completion)[0] == 500
        assert post(full_port, "/wake_up")[0] == 200 and not sleeping(full_port)
        assert post(full_port, "/v1/completions", completion)[1]["choices"][0]["text"] == "hi"
        # Level 2: the wake order of vLLM's RL recipes.
        post(full_port, "/sleep?level=2")
        assert post(full_port, "/wake_up?tags=weights")[1]["status"] == "sleeping"
        post(full_port, "/collective_rpc", {"method": "reload_weights"})
        assert sleeping(full_port), "the KV cache is still dropped"
        assert post(full_port, "/wake_up?tags=kv_cache")[1]["status"] == "awake"
        assert post(full_port, "/v1/completions", completion)[0] == 200
        # Woken from level 2 without reloading: garbage weights, wrong answers.
        post(full_port, "/sleep?level=2")
        post(full_port, "/wake_up")
        assert not sleeping(full_port) and post(full_port, "/v1/completions", completion)[0] == 500
    finally:
        for proc in (plain, dev, full):
            proc.terminate()
            proc.wait(10)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False
