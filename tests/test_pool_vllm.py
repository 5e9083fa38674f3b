"""Real vLLM (the CPU build) as on-demand models: two tiny models in a pool of one behind the
gateway, used with the OpenAI SDK. Slow: each switch is a cold start (the CPU build has no
sleep mode, so putting an instance away stops it).

Every process of each instance is sampled from /proc throughout (by its stdout: the instance's
log), not read from the state file: the two are never up together.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import ProcessSampler, wait_for
from vllm_runtime import serve_example_with_gateway

from pipeline.serve.record import InstanceState

pytestmark = pytest.mark.slow

INSTANCE_KEY = "pool-instance-key"
GATEWAY_KEY = "pool-gateway-key"
IDLE_TIMEOUT = 5


@pytest.fixture(scope="module")
def pooled(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vllm-pool")
    with serve_example_with_gateway(
        tiny_model,
        root,
        tmp_prefix="vp",
        instance_key=INSTANCE_KEY,
        gateway_key=GATEWAY_KEY,
        control={"start": "on-demand", "idle_timeout": IDLE_TIMEOUT},
        pools={"one": {"instances": ["tiny-a", "tiny-b"], "max_awake": 1}},
    ) as served:
        served["logs"] = {name: root / "logs" / f"{name}.log" for name in ("tiny-a", "tiny-b")}
        yield served


def client(served: dict) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{served['url']}/v1", api_key=GATEWAY_KEY, timeout=300, max_retries=0
    )


def ask(served: dict, model: str) -> str:
    reply = client(served).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=4,
        temperature=0,
    )
    assert reply.usage.completion_tokens > 0
    return reply.model


def states(served: dict) -> dict[str, InstanceState]:
    state = served["store"].read()
    return {name: rec.state for name, rec in state.instances.items()}


def test_both_models_are_listed_before_either_starts(pooled):
    models = [m.id for m in client(pooled).models.list()]
    assert models == ["tiny-a", "tiny-b"]


def test_alternating_requests_switch_models_and_an_idle_one_goes_on_its_own(pooled):
    with ProcessSampler(pooled["logs"]) as sampler:
        answered = [ask(pooled, model) for model in ("tiny-a", "tiny-b", "tiny-a")]
        assert answered == ["tiny-a", "tiny-b", "tiny-a"]
        # With no request for IDLE_TIMEOUT seconds, tiny-a is put away on its own...
        began = time.monotonic()
        wait_for(
            lambda: states(pooled)["tiny-a"] is InstanceState.UNLOADED,
            timeout=IDLE_TIMEOUT + 30,
            what="tiny-a put away after its idle timeout",
        )
        assert time.monotonic() - began >= IDLE_TIMEOUT - 0.5
        rec = pooled["store"].read().instances["tiny-a"]
        assert rec.put_away == "stop" and rec.pid is None
        assert rec.reason == f"idle for {IDLE_TIMEOUT}s (idle_timeout)"
        assert sampler.up() == set(), "no process of either is left"
        # ... and the next request brings it back.
        assert ask(pooled, "tiny-a") == "tiny-a"
    assert sampler.seen == {"tiny-a", "tiny-b"} and sampler.samples > 100
    assert sampler.both == 0, f"both up in {sampler.both} of {sampler.samples} samples"
    assert pooled["store"].read().instances["tiny-a"].wakes >= 3


def test_concurrent_requests_for_both_models_all_succeed(pooled):
    results: list[str] = []
    errors: list[BaseException] = []

    def one(model: str) -> None:
        try:
            results.append(ask(pooled, model))
        except BaseException as exc:  # collected: the test names every failure
            errors.append(exc)

    with ProcessSampler(pooled["logs"]) as sampler:
        threads = [threading.Thread(target=one, args=(m,)) for m in ("tiny-a", "tiny-b") * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    assert errors == []
    assert sorted(results) == ["tiny-a"] * 3 + ["tiny-b"] * 3
    assert sampler.both == 0
