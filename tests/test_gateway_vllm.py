"""Real vLLM (the CPU build) behind the gateway, started by `doit serve`, used by real SDKs.

Slow (under a minute here): the example config's two instances, with the gateway switched on
through ``AUTO_INFER_VLLM_OVERRIDES`` (its own key, an alias for ``tiny-a``). Clients only talk
to the gateway's port; the instances sit on loopback with their own key. Everything runs on
free ports with private state and log dirs; teardown stops every process group.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest
from conftest import run_doit
from vllm_runtime import serve_example_with_gateway

from pipeline.procs import group_alive

pytestmark = pytest.mark.slow

INSTANCE_KEY = "instance-key-123"
GATEWAY_KEY = "gateway-key-456"


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`doit serve` of the example with the gateway on; stopped (and checked) at the end."""
    with serve_example_with_gateway(
        tiny_model,
        tmp_path_factory.mktemp("vllm-gateway"),
        tmp_prefix="vg",
        instance_key=INSTANCE_KEY,
        gateway_key=GATEWAY_KEY,
        gateway={"aliases": {"tiny-a": ["tiny-a-alias"]}, "access_log": True},
    ) as served:
        yield served


def openai_client(served: dict, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=key, timeout=60, max_retries=0)


def test_serve_starts_the_gateway_with_the_instances(served):
    data = json.loads(run_doit(["status", "--json"], served["env"]).stdout)
    rows = {i["name"]: i for i in data["instances"]}
    assert {name: row["state"] for name, row in rows.items()} == {
        "gateway": "running",
        "tiny-a": "running",
        "tiny-b": "running",
    }
    assert rows["gateway"]["kind"] == "gateway"
    assert rows["tiny-a"]["models"] == ["tiny-a", "tiny-a-alias"]
    # The instances listen on loopback only.
    assert rows["tiny-a"]["url"].startswith("http://127.0.0.1:")


def test_openai_sdk_reaches_each_instance_by_model_name(served):
    client = openai_client(served)
    assert [m.id for m in client.models.list()] == ["tiny-a", "tiny-a-alias", "tiny-b"]
    for asked, answered in (("tiny-a", "tiny-a"), ("tiny-b", "tiny-b"), ("tiny-a-alias", "tiny-a")):
        reply = client.chat.completions.create(
            model=asked,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        # vLLM reports its first served name: the instance that answered.
        assert reply.model == answered
        assert reply.usage.completion_tokens > 0


STREAM_TOKENS = 1024


def test_streaming_arrives_incrementally(served):
    # Regressions: a fixed wall-clock spread (`> 0.05 s`) failed on a quiet machine, where the
    # tiny model made 32 tokens in 40 ms; then "one event per token" failed on a loaded CI
    # machine, where vLLM merged 256 tokens into 111 events (its output collector coalesces
    # deltas a busy API server has not yet sent). Neither the event count nor the speed is the
    # gateway's to promise. What is: a relaying gateway hands over the first token while the
    # instance is still decoding the rest, so it arrives early in the stream's life; a
    # buffering one hands everything over at the end. 1,024 greedy tokens take the tiny model
    # about a second, so only a stall longer than that could make a relay look like a buffer.
    client = openai_client(served)
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="tiny-b",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=STREAM_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    arrivals = [time.monotonic() for c in stream if c.choices and c.choices[0].delta.content]
    assert len(arrivals) >= 8, len(arrivals)
    first, last = arrivals[0] - started, arrivals[-1] - started
    assert first < 0.5 * last, (first, last)


def test_anthropic_sdk_with_either_header(served):
    for client in (
        anthropic.Anthropic(base_url=served["url"], api_key=GATEWAY_KEY, timeout=60),
        anthropic.Anthropic(base_url=served["url"], auth_token=GATEWAY_KEY, timeout=60),
    ):
        message = client.messages.create(
            model="tiny-b",
            max_tokens=8,
            messages=[{"role": "user", "content": "Hello"}],
        )
        assert message.type == "message" and message.model == "tiny-b"


def test_a_claude_code_like_stream_passes_through(served):
    client = anthropic.Anthropic(base_url=served["url"], api_key=GATEWAY_KEY, timeout=120)
    tools = [
        {
            "name": "read_file",
            "description": "Reads a file.",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        }
    ]
    with client.messages.stream(
        model="tiny-b",
        max_tokens=32000,
        tools=tools,
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "Read README.md please."}],
    ) as stream:
        events = [event.type for event in stream]
    assert events[0] == "message_start" and "message_stop" in events


def test_bad_keys_get_401_and_unknown_models_404(served):
    with pytest.raises(openai.AuthenticationError):
        openai_client(served, key=INSTANCE_KEY).models.list()
    bad = anthropic.Anthropic(base_url=served["url"], api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(
            model="tiny-b", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError) as info:
        openai_client(served).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    assert "known models: tiny-a, tiny-a-alias, tiny-b" in str(info.value)


def test_zz_a_stopped_instance_gives_503_while_the_other_answers(served):
    """Runs late (name order): stops tiny-a for good."""
    result = run_doit(["stop", "tiny-a"], served["env"], timeout=120)
    assert result.returncode == 0, result.stderr
    client = openai_client(served)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="tiny-a-alias", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    assert info.value.status_code == 503
    assert "instance 'tiny-a' is stopped" in str(info.value)
    reply = client.chat.completions.create(
        model="tiny-b", messages=[{"role": "user", "content": "x"}], max_tokens=4
    )
    assert reply.model == "tiny-b"
    assert [m.id for m in client.models.list()] == ["tiny-b"]
    with urllib.request.urlopen(f"{served['url']}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert {i["name"]: i["state"] for i in health["instances"]} == {
        "tiny-a": "stopped",
        "tiny-b": "running",
    }


def test_zzz_the_gateway_log_has_requests_and_no_key_then_stop_leaves_nothing(served):
    result = run_doit(["logs", "-n", "200", "gateway"], served["env"])
    assert result.returncode == 0, result.stderr
    assert "listening on 127.0.0.1" in result.stdout
    assert "model=tiny-a-alias instance=tiny-a 200" in result.stdout
    assert GATEWAY_KEY not in result.stdout and INSTANCE_KEY not in result.stdout
    state = served["store"].read()
    pgids = [r.pgid for r in state.instances.values() if r.pgid]
    assert run_doit(["stop"], served["env"], timeout=120).returncode == 0
    assert not any(group_alive(p) for p in pgids)
    final = json.loads(run_doit(["status", "--json"], served["env"]).stdout)
    assert {i["state"] for i in final["instances"]} == {"stopped"}
