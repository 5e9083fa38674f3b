"""The gateway under the supervisor, with stand-in instances: `doit serve` starts it with the
instances, `status` shows it, `stop gateway` and `logs gateway` work, it follows instance
states without a restart, answers 503 while they start, and is restarted when it crashes."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import doit_env, free_port, run_doit, standin_config, wait_for

from pipeline.procs import group_alive
from pipeline.serve.commands.common import load
from pipeline.serve.commands.logs import log_path
from pipeline.serve.commands.plan import plan_command
from pipeline.serve.commands.serve import serve_command
from pipeline.serve.commands.status import status_command
from pipeline.serve.commands.stop import stop_command
from pipeline.serve.record import InstanceState
from pipeline.serve.state import StateStore
from pipeline.serve.supervisor import Supervisor

GW_KEY = "gw-secret-key"
A_KEY = "a-instance-secret"


def gateway_config(standin_prefix: Path, tmp_path: Path, **extra: dict) -> tuple[Path, dict]:
    ports = {"a": free_port(), "b": free_port(), "gateway": free_port()}
    text = standin_config(
        standin_prefix,
        tmp_path / "logs",
        {
            "a": {"port": ports["a"], "api_key": A_KEY, **extra.get("a", {})},
            "b": {"port": ports["b"], **extra.get("b", {})},
        },
        server={"host": "0.0.0.0"},
    )
    text += (
        f'[gateway]\nenable = true\nhost = "127.0.0.1"\nport = {ports["gateway"]}\n'
        f'api_keys = ["{GW_KEY}"]\n[gateway.aliases]\na = ["a-alias"]\n'
    )
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path, ports


def call(port: int, model: str, key: str = GW_KEY) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"model": model, "messages": []}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, _lower(err.headers), json.loads(err.read() or b"{}")


def _lower(headers: object) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}  # type: ignore[attr-defined]


def read_state(settings):
    return StateStore(settings.serve_state).read()


def test_serve_runs_the_gateway_like_an_instance(settings, standin_prefix, tmp_path, capsys):
    config, ports = gateway_config(standin_prefix, tmp_path)
    assert serve_command(settings, str(config), os.environ) == 0
    state = read_state(settings)
    gw = state.instances["gateway"]
    assert (gw.kind, gw.state, gw.port) == ("gateway", InstanceState.RUNNING, ports["gateway"])
    assert state.instances["a"].kind == "vllm"
    # Instances were forced onto loopback although the config says 0.0.0.0.
    assert f"listening on 127.0.0.1:{ports['a']}" in (tmp_path / "logs" / "a.log").read_text()

    status, _, data = call(ports["gateway"], "a")
    assert status == 200 and data["served_by"] == "a"
    assert data["headers"]["authorization"] == f"Bearer {A_KEY}"
    assert call(ports["gateway"], "a-alias")[2]["served_by"] == "a"
    assert call(ports["gateway"], "b")[2]["served_by"] == "b"
    assert call(ports["gateway"], "a", key="wrong")[0] == 401

    capsys.readouterr()
    status_command(settings)
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("gateway"))
    assert row.split()[:2] == ["gateway", "running"]
    assert "(gateway: all models)" in row

    # Stop one instance: its models get 503 at once, the other still answers.
    stop_command(settings, ["a"])
    status, headers, data = call(ports["gateway"], "a-alias")
    assert status == 503
    assert "instance 'a' is stopped: stopped on request" in data["error"]["message"]
    assert "retry-after" not in headers
    assert call(ports["gateway"], "b")[0] == 200

    gateway_log = log_path(settings, "gateway", None, os.environ)
    assert gateway_log == tmp_path / "logs" / "gateway.log"
    log = gateway_log.read_text()
    assert "listening on 127.0.0.1" in log
    assert "instance a: running -> stopping" in log or "instance a: running -> stopped" in log
    assert GW_KEY not in log and A_KEY not in log

    # `doit stop gateway`: the gateway goes, the instance it fronted stays.
    pgid = read_state(settings).instances["gateway"].pgid
    stop_command(settings, ["gateway"])
    state = read_state(settings)
    assert state.instances["gateway"].state is InstanceState.STOPPED
    assert state.instances["b"].state is InstanceState.RUNNING
    assert not group_alive(pgid)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports['gateway']}/health", timeout=2)
    stop_command(settings)
    assert read_state(settings).supervisor.exited


def test_the_gateway_starts_at_once_and_answers_503_while_an_instance_loads(
    settings, standin_prefix, tmp_path
):
    config, ports = gateway_config(standin_prefix, tmp_path, b={"env": {"STANDIN_SLOW_START": "2"}})
    _, plan = load(settings, str(config), os.environ, check=True)
    assert plan.gateway is not None and plan.gateway.start_after is None
    store = StateStore(settings.serve_state)
    store.ensure()
    supervisor = Supervisor(plan, store, base_env=os.environ, say=lambda _: None)

    def tick_until(predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            supervisor.tick()
            time.sleep(0.05)
        assert predicate()

    recs = supervisor.state.instances
    try:
        tick_until(lambda: recs["gateway"].state is InstanceState.RUNNING, 15)
        assert recs["b"].state is InstanceState.STARTING
        status, headers, data = call(ports["gateway"], "b")
        assert status == 503
        assert headers["retry-after"] == "5"
        assert "instance 'b' is starting" in data["error"]["message"]
        tick_until(lambda: recs["b"].state is InstanceState.RUNNING, 15)
        time.sleep(0.05)
        assert call(ports["gateway"], "b")[0] == 200, "followed without a restart"
        assert recs["gateway"].restarts == 0
    finally:
        supervisor.request_stop()
        deadline = time.monotonic() + 15
        while not supervisor.finished and time.monotonic() < deadline:
            supervisor.tick()
            time.sleep(0.05)
        supervisor._kill_all_now()


def test_a_crashed_gateway_is_restarted(settings, standin_prefix, tmp_path):
    config, ports = gateway_config(standin_prefix, tmp_path)
    serve_command(settings, str(config), os.environ)
    first = read_state(settings).instances["gateway"]
    os.killpg(first.pgid, signal.SIGKILL)
    wait_for(
        lambda: (
            (rec := read_state(settings).instances["gateway"]).restarts == 1
            and rec.state is InstanceState.RUNNING
        ),
        timeout=20,
        what="the gateway to be restarted",
    )
    assert call(ports["gateway"], "b")[0] == 200
    stop_command(settings)


def test_doit_plan_shows_the_gateway_and_the_forced_hosts(state_dir, standin_prefix, tmp_path):
    config, ports = gateway_config(standin_prefix, tmp_path)
    result = run_doit(["plan", "--config", str(config)], doit_env(state_dir))
    assert result.returncode == 0, result.stderr
    assert GW_KEY not in result.stdout and A_KEY not in result.stdout
    plan = json.loads(result.stdout)
    gateway = plan["gateway"]
    assert gateway["port"] == ports["gateway"]
    assert gateway["routes"] == {"a": "a", "a-alias": "a", "b": "b"}
    assert gateway["env"]["PIPELINE_GATEWAY_CONFIG"] == "***"
    assert gateway["auth"].startswith("1 key(s)")
    a = plan["instances"][0]
    assert a["host"] == "127.0.0.1"
    assert a["notes"][0].startswith("host 0.0.0.0 -> 127.0.0.1: the gateway")


def test_plan_command_warns_when_the_gateway_port_is_taken(settings, standin_prefix, tmp_path):
    import io
    import socket

    config, ports = gateway_config(standin_prefix, tmp_path)
    holder = socket.socket()
    holder.bind(("127.0.0.1", ports["gateway"]))
    holder.listen()
    warnings: list[str] = []
    try:
        plan_command(settings, str(config), os.environ, out=io.StringIO(), say=warnings.append)
    finally:
        holder.close()
    assert any(f"gateway: port {ports['gateway']} is already in use" in w for w in warnings)


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_regression_keys_leak_across_instances_and_from_the_gateway(
    settings, standin_prefix, tmp_path
):
    """Each instance saw every other instance's key variable and the gateway's client keys
    (model code with trust_remote_code runs there): now only its own VLLM_API_KEY."""
    ports = {"a": free_port(), "b": free_port(), "gateway": free_port()}
    text = standin_config(
        standin_prefix,
        tmp_path / "logs",
        {
            "a": {"port": ports["a"], "api_key_env": "A_INSTANCE_KEY"},
            "b": {"port": ports["b"], "api_key_env": "B_INSTANCE_KEY"},
        },
    )
    text += (
        f'[gateway]\nenable = true\nhost = "127.0.0.1"\nport = {ports["gateway"]}\n'
        'api_keys_env = ["GW_CLIENT_KEY"]\n'
    )
    config = tmp_path / "serve.toml"
    config.write_text(text)
    environ = {
        **os.environ,
        "A_INSTANCE_KEY": "a-secret-value",
        "B_INSTANCE_KEY": "b-secret-value",
        "GW_CLIENT_KEY": "gw-client-secret",
        "AUTO_INFER_VLLM_OVERRIDES": '{"instance": {"server": {"dtype": "auto"}}}',
        "PLAIN_SETTING": "kept",
    }
    secrets = ("A_INSTANCE_KEY", "B_INSTANCE_KEY", "GW_CLIENT_KEY", "AUTO_INFER_VLLM_OVERRIDES")
    assert serve_command(settings, str(config), environ) == 0
    state = read_state(settings)
    seen = {name: _environ_of(rec.pid) for name, rec in state.instances.items()}
    for name, own in (("a", "a-secret-value"), ("b", "b-secret-value")):
        env = seen[name]
        assert [v for v in secrets if v in env] == [], name
        assert env["VLLM_API_KEY"] == own
        assert env["PLAIN_SETTING"] == "kept", "other variables are inherited as before"
        assert not any("secret" in value for key, value in env.items() if key != "VLLM_API_KEY")
    gateway = seen["gateway"]
    assert [v for v in (*secrets, "VLLM_API_KEY") if v in gateway] == []
    assert "PIPELINE_GATEWAY_CONFIG" in gateway, "its keys travel in its config"
    assert gateway["PLAIN_SETTING"] == "kept"
    # The gateway still has what it needs: the client key in, each instance's key out.
    status, _, data = call(ports["gateway"], "a", key="gw-client-secret")
    assert status == 200 and data["headers"]["authorization"] == "Bearer a-secret-value"
    assert call(ports["gateway"], "b", key="gw-client-secret")[2]["served_by"] == "b"
    assert call(ports["gateway"], "b", key="a-secret-value")[0] == 401
    stop_command(settings)
