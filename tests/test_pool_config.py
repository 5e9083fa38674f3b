"""The model pool's config rules (refused in one located line) and its budget (pure)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.serve.config import parse_config
from pipeline.serve.pool import Slot, conflicts, fits, make_room

# Three models on one GPU, each fitting alone and no two together: the README's example.
THREE = """
[instance.control]
gpu_ids = [0]
start = "on-demand"
idle_timeout = 600
[instance.server]
model = "/m"
[instance.qwen.server]
port = 8101
served_model_name = "qwen"
gpu_memory_utilization = 0.85
[instance.llama.server]
port = 8102
served_model_name = "llama"
gpu_memory_utilization = 0.6
[instance.mistral.server]
port = 8103
served_model_name = "mistral"
gpu_memory_utilization = 0.7
[gateway]
enable = true
[pool.gpu0]
instances = ["qwen", "llama", "mistral"]
max_awake = 1
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="serve.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("serve.toml: ")
    return message


def test_three_models_that_do_not_fit_together_are_legal_when_on_demand():
    config = parse_config(THREE)
    assert config.pools["gpu0"].instances == ["qwen", "llama", "mistral"]
    assert all(config.managed(i) and i.on_demand for i in config.instances)
    assert config.instance("qwen").control.unload == "sleep"


def test_boot_instances_keep_todays_refusal():
    text = THREE.replace('start = "on-demand"\n', "")
    message = error_of(text)
    assert "GPU 0 is shared" in message and "exceeds 1" in message


def test_on_demand_needs_the_gateway():
    message = error_of(THREE.replace("enable = true", "enable = false"))
    assert message == (
        "serve.toml: instance.control.start (instance 'llama'): start = \"on-demand\" needs "
        "the gateway, which counts each instance's requests and holds those that wait for a "
        "start: set [gateway] enable = true"
    )


def test_an_idle_timeout_alone_needs_the_gateway_too():
    text = """
[instance.control]
gpu_ids = []
idle_timeout = 60
[instance.server]
model = "/m"
"""
    assert "instance.control.idle_timeout (instance 'default'): an idle_timeout needs" in (
        error_of(text)
    )


def test_a_sleeping_instance_must_listen_on_loopback():
    text = THREE.replace('model = "/m"', 'model = "/m"\nhost = "10.0.0.5"')
    message = error_of(text)
    assert "instance.server.host (instance 'llama'): is 10.0.0.5" in message
    assert "vLLM's sleep endpoints, which take no key" in message
    # unload = "stop" has no sleep endpoints to guard.
    text = text.replace("idle_timeout = 600", 'idle_timeout = 600\nunload = "stop"')
    assert parse_config(text).instance("llama").server.host == "10.0.0.5"


def test_a_pool_names_known_instances_once():
    message = error_of(THREE.replace('"mistral"]', '"mistal"]'))
    assert message.startswith("serve.toml: pool.gpu0.instances: no instance named 'mistal'")
    assert "did you mean 'mistral'?" in message
    text = THREE + '[pool.other]\ninstances = ["qwen"]\n'
    assert "instance 'qwen' is also in pool 'gpu0'" in error_of(text)
    assert "pool.gpu0.instances: lists an instance twice" in error_of(
        THREE.replace('"mistral"]', '"mistral", "qwen"]')
    )
    assert "pool.gpu0.max_awake" in error_of(THREE.replace("max_awake = 1", "max_awake = 0"))
    assert "pool.gpu0.instances: required" in error_of(
        THREE.replace('instances = ["qwen", "llama", "mistral"]\n', "")
    )


def test_a_boot_instance_must_leave_room_for_the_on_demand_ones_on_its_gpu():
    text = THREE.replace(
        "[gateway]",
        '[instance.base.server]\nport = 8100\nserved_model_name = "base"\n'
        "gpu_memory_utilization = 0.3\n"
        '[instance.base.control]\nstart = "boot"\nidle_timeout = 0\n[gateway]',
    )
    message = error_of(text)
    assert message == (
        "serve.toml: instance.base.server.gpu_memory_utilization: boot instance(s) on GPU 0 "
        "(base=0.3) hold their memory for good and leave no room for 'qwen' (0.85), which "
        "shares it; lower gpu_memory_utilization, or let them be put away (an idle_timeout "
        "or a pool)"
    )
    assert parse_config(text.replace("0.85", "0.7")).instance("base").on_demand is False


def test_a_pool_cannot_boot_more_than_max_awake():
    text = THREE.replace('start = "on-demand"\n', "").replace(
        "gpu_memory_utilization = 0.85", "gpu_memory_utilization = 0.3"
    )
    text = text.replace("0.6", "0.3").replace("0.7", "0.3")
    message = error_of(text)
    assert message.startswith("serve.toml: pool.gpu0.max_awake: is 1, but 3 of its instances")


def test_start_and_unload_take_their_words_only():
    assert "instance.control.start" in error_of(THREE.replace('"on-demand"', '"lazy"'))
    assert "instance.control.idle_timeout" in error_of(
        THREE.replace("idle_timeout = 600", "idle_timeout = -1")
    )
    assert "gateway.max_queued" in error_of(
        THREE.replace("enable = true", "enable = true\nmax_queued = -1")
    )
    assert "gateway.queue_timeout" in error_of(
        THREE.replace("enable = true", "enable = true\nqueue_timeout = 0")
    )


# ---- the budget -----------------------------------------------------------------------------
def slot(name: str, pool: str | None = "p", gpus: tuple[int, ...] = (0,), share: float = 0.5):
    return Slot(name, pool, 1, gpus, share)


def test_a_pool_of_one_holds_one():
    a, b = slot("a"), slot("b")
    assert fits(a, [])
    assert not fits(a, [b])
    assert fits(a, [a]), "itself does not count"


def test_gpu_memory_adds_up_to_one_at_most():
    a = slot("a", pool=None, share=0.6)
    b = slot("b", pool=None, share=0.5)
    c = slot("c", pool=None, gpus=(1,), share=0.9)
    assert not fits(a, [b]) and fits(a, [c])
    assert fits(slot("d", pool=None, share=0.4), [a])


def test_make_room_puts_away_only_what_stands_in_the_way_least_recently_used_first():
    new = slot("new", pool=None, share=0.6)
    old = slot("old", pool=None, share=0.5)
    newer = slot("newer", pool=None, share=0.5)
    elsewhere = slot("elsewhere", pool=None, gpus=(1,), share=0.9)
    awake = [old, newer, elsewhere]
    # Idle, least recently used first: elsewhere is skipped (another GPU), old goes first.
    assert make_room(new, awake, [elsewhere, old, newer]) == [old, newer]
    assert make_room(slot("small", pool=None, share=0.1), awake, [old]) == [old]
    assert make_room(new, awake, []) is None, "everything busy: it waits"
    assert make_room(slot("x", pool=None, gpus=(2,)), awake, []) == []
    assert not conflicts(new, new) and conflicts(new, old) and not conflicts(new, elsewhere)
