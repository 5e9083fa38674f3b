"""Two replicas of the tiny model (real vLLM, the CPU build) behind the gateway, by `doit serve`.

Slow (about a minute here): ``model-configs/vllm-cpu-tiny.toml`` with both instances served as
``tiny`` and the gateway on, through ``AUTO_INFER_VLLM_OVERRIDES``. Free ports, private state,
log and TMPDIR; teardown stops every process group.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request
from pathlib import Path

import openai
import pytest
from vllm_runtime import serve_example_with_gateway

pytestmark = pytest.mark.slow

INSTANCE_KEY = "replica-instance-key"
GATEWAY_KEY = "replica-gateway-key"


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve_example_with_gateway(
        tiny_model,
        tmp_path_factory.mktemp("vllm-replicas"),
        tmp_prefix="vr",
        instance_key=INSTANCE_KEY,
        gateway_key=GATEWAY_KEY,
        served_model_name="tiny",
    ) as served:
        yield served


def client(served: dict) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{served['url']}/v1", api_key=GATEWAY_KEY, timeout=60, max_retries=0
    )


def ask(served: dict) -> str:
    reply = client(served).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.usage.completion_tokens > 0
    return reply.model


def served_by(served: dict) -> dict[str, int]:
    with urllib.request.urlopen(f"{served['url']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(
        r'^gateway_requests_total\{model="tiny",instance="([^"]+)",code="200"\} (\d+)$',
        text,
        flags=re.MULTILINE,
    )
    return {name: int(count) for name, count in found}


def test_two_replicas_of_the_tiny_model_share_openai_requests(served):
    assert [m.id for m in client(served).models.list()] == ["tiny"], "listed once"
    for _ in range(4):
        assert ask(served) == "tiny"
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(ask(served))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == ["tiny"] * 4
    counts = served_by(served)
    assert set(counts) == {"tiny-a", "tiny-b"} and sum(counts.values()) == 8, counts
    assert min(counts.values()) >= 2, counts


def test_zz_with_one_replica_killed_the_other_answers(served):
    """Runs last (name order): SIGKILLs tiny-b's group; requests keep succeeding on tiny-a."""
    record = served["store"].read().instances["tiny-b"]
    assert record.pgid
    os.killpg(record.pgid, signal.SIGKILL)
    before = served_by(served).get("tiny-a", 0)
    for _ in range(3):
        assert ask(served) == "tiny"
    assert served_by(served)["tiny-a"] == before + 3
