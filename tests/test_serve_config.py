"""Serve config: merge order, validation messages, cross-instance rules. Pure and fast."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.serve.config import (
    DEFAULT_INSTANCE,
    deep_merge,
    json_schema,
    load_config,
    parse_config,
)

BASE = """
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/m"
"""


def error_of(text: str, overrides: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="serve.toml", overrides=overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith(("serve.toml", "AUTO_INFER_VLLM_OVERRIDES"))
    return message


def test_no_named_instance_makes_the_defaults_one_instance():
    config = parse_config(BASE)
    assert [i.name for i in config.instances] == [DEFAULT_INSTANCE]
    inst = config.instances[0]
    assert inst.server.model == "/models/m"
    assert inst.server.port == 8000
    assert inst.server.host == "0.0.0.0"
    assert inst.control.gpu_ids == []


def test_the_users_example_merges_defaults_then_instance():
    text = """
[master]
enable = true
pixi_project_dir = "/hard/volume/workspace/vllm-pixi-offline"
pixi_environment = "default"

[instance.control]
log_dir = "/tmp/vllm-logs"
background = true
gpu_ids = [0]

[instance.server]
host = "0.0.0.0"
port = 8000
model = "/models/Qwen2-VL-7B-Instruct"
dtype = "bfloat16"
tensor_parallel_size = 1
max_model_len = 8192
api_key = "secret"
extra_args = ["--trust-remote-code"]

[instance.qwen.server]
port = 8001
[instance.qwen.control]
gpu_ids = [1]
"""
    config = parse_config(text)
    assert [i.name for i in config.instances] == ["qwen"]
    qwen = config.instance("qwen")
    assert qwen.server.port == 8001
    assert qwen.control.gpu_ids == [1]
    assert qwen.server.dtype == "bfloat16"
    assert qwen.server.extra_args == ["--trust-remote-code"]
    assert qwen.control.log_dir == Path("/tmp/vllm-logs")
    assert config.master.pixi_project_dir == Path("/hard/volume/workspace/vllm-pixi-offline")


def test_instances_are_sorted_by_name():
    text = BASE + "[instance.b.server]\nport = 2\nserved_model_name = 'b'\n"
    text += "[instance.a.server]\nport = 1\nserved_model_name = 'a'\n"
    assert [i.name for i in parse_config(text).instances] == ["a", "b"]


def test_env_tables_merge_key_by_key_and_lists_replace():
    text = """
[instance.control]
gpu_ids = []
env = { A = "1", B = "2" }
[instance.server]
model = "/m"
extra_args = ["--x"]
[instance.one.control]
env = { B = "3", C = "4" }
[instance.one.server]
extra_args = ["--y"]
"""
    inst = parse_config(text).instance("one")
    assert inst.control.env == {"A": "1", "B": "3", "C": "4"}
    assert inst.server.extra_args == ["--y"]


def test_overrides_deep_merge_into_the_document():
    text = BASE + "[instance.a.server]\nport = 8001\nserved_model_name = 'a'\n"
    text += "[instance.b.server]\nport = 8002\nserved_model_name = 'b'\n"
    overrides = json.dumps(
        {"instance": {"a": {"server": {"port": 9001}}, "control": {"ready_timeout": 5}}}
    )
    config = parse_config(text, overrides=overrides)
    assert config.instance("a").server.port == 9001
    assert config.instance("b").server.port == 8002
    assert config.instance("b").control.ready_timeout == 5
    assert config.instance("a").server.model == "/models/m"


def test_overrides_can_add_an_instance_and_replace_lists():
    overrides = json.dumps(
        {"instance": {"extra": {"server": {"port": 9100, "extra_args": ["--seed", "1"]}}}}
    )
    config = parse_config(BASE, overrides=overrides)
    assert [i.name for i in config.instances] == ["extra"]
    assert config.instance("extra").server.extra_args == ["--seed", "1"]


def test_deep_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    patch = {"a": {"b": 2, "c": [2, 3]}}
    assert deep_merge(base, patch) == {"a": {"b": 2, "c": [2, 3]}}
    assert base == {"a": {"b": 1, "c": [1]}}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("{not json", "AUTO_INFER_VLLM_OVERRIDES: invalid JSON at line 1 column 2"),
        ("[1, 2]", "AUTO_INFER_VLLM_OVERRIDES: must be a JSON object"),
    ],
)
def test_malformed_overrides(overrides, expected):
    assert error_of(BASE, overrides).startswith(expected)


def test_an_override_error_says_the_override_set_it():
    message = error_of(BASE, json.dumps({"instance": {"server": {"port": "high"}}}))
    assert "instance.server.port" in message
    assert "set by AUTO_INFER_VLLM_OVERRIDES" in message
    assert "'high'" in message


def test_toml_syntax_error_has_line_and_column():
    message = error_of("[instance.server]\nmodel = \n")
    assert message.startswith("serve.toml: invalid TOML")
    assert "line 2" in message and "column" in message


def test_unknown_key_says_did_you_mean_and_lists_allowed():
    message = error_of(BASE + "[instance.a.server]\nprot = 8001\n")
    assert message.startswith("serve.toml: instance.a.server.prot: unknown key")
    assert "did you mean 'port'?" in message
    assert "allowed: model, host, port" in message


def test_unknown_top_level_table():
    assert "did you mean 'instance'" in error_of(BASE + "[instances.a]\nx = 1\n")


def test_unknown_control_key_in_defaults():
    message = error_of(BASE.replace("gpu_ids = []", "gpu_ids = []\nbackgrond = true"))
    assert "instance.control.backgrond: unknown key; did you mean 'background'?" in message


@pytest.mark.parametrize("reserved", ["control", "server"])
def test_control_and_server_cannot_name_instances(reserved):
    message = error_of(BASE + f"[instance.{reserved}.{reserved}]\nport = 1\n")
    assert f"{reserved!r} cannot be an instance name" in message


def test_bad_instance_name():
    message = error_of(BASE + '[instance."bad name".server]\nport = 1\n')
    assert "instance.bad name: instance names use letters" in message


def test_wrong_type_names_the_key_where_it_was_written_and_the_instance():
    message = error_of(
        BASE.replace('model = "/models/m"', 'model = "/models/m"\nport = "x"')
        + "[instance.a.server]\n"
    )
    assert message.startswith("serve.toml: instance.server.port (instance 'a'):")
    assert "valid integer" in message


def test_out_of_range_port():
    message = error_of(BASE + "[instance.a.server]\nport = 70000\n")
    assert message.startswith("serve.toml: instance.a.server.port:")
    assert "65535" in message and "70000" in message


def test_literal_values_are_listed():
    message = error_of(BASE + '[instance.a.server]\ndtype = "fp8"\n')
    assert "'bfloat16'" in message and "got 'fp8'" in message


def test_restart_policy_values():
    message = error_of(BASE + '[instance.a.control]\nrestart = "always"\n')
    assert "instance.a.control.restart" in message and "'on-failure'" in message


def test_missing_model():
    message = error_of("[instance.control]\ngpu_ids = []\n[instance.a.server]\nport = 1\n")
    assert "instance.a.server.model: required" in message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("gpu_memory_utilization = 1.5", "instance.a.server.gpu_memory_utilization"),
        ("gpu_memory_utilization = 0", "greater than 0"),
        ("tensor_parallel_size = 0", "greater than or equal to 1"),
        ("max_model_len = 3", "greater than or equal to 16"),
        ('api_key_env = "1BAD"', "should match pattern"),
        ("served_model_name = 3", "valid string"),
    ],
)
def test_server_ranges(bad, expected):
    assert expected in error_of(BASE + f"[instance.a.server]\n{bad}\n")


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("gpu_ids = [-1]", "GPU ids are indices >= 0"),
        ("gpu_ids = [1, 1]", "lists a GPU twice"),
        ("ready_timeout = 0", "greater than 0"),
        ("max_restarts = -1", "greater than or equal to 0"),
        ('env = { "1X" = "a" }', "not a valid environment variable name"),
        ('env = { VLLM_API_KEY = "a" }', "use server.api_key_env"),
        ('env = { CUDA_VISIBLE_DEVICES = "0" }', "use control.gpu_ids"),
        ("env = { A = 1 }", "valid string"),
    ],
)
def test_control_values(bad, expected):
    assert expected in error_of(BASE + f"[instance.a.control]\n{bad}\n")


def test_extra_args_may_not_repeat_managed_flags():
    message = error_of(BASE + '[instance.a.server]\nextra_args = ["--api-key", "x"]\n')
    assert "--api-key is set from server.api_key" in message
    message = error_of(BASE + '[instance.a.server]\nextra_args = ["--port=9"]\n')
    assert "--port is set from server.port" in message


def test_duplicate_ports():
    message = error_of(BASE + "[instance.a.server]\nport = 1\n[instance.b.server]\nport = 1\n")
    assert "instance.b.server.port: port 1 is also used by instance 'a'" in message


def test_inherited_duplicate_port_points_at_the_defaults_table():
    text = BASE.replace('model = "/models/m"', 'model = "/models/m"\nport = 8100')
    text += '[instance.a.server]\nserved_model_name = "a"\n'
    text += '[instance.b.server]\nserved_model_name = "b"\n'
    message = error_of(text)
    assert "instance.server.port (instance 'b'): port 8100 is also used by instance 'a'" in (
        message
    )


def test_duplicate_builtin_default_port_points_at_the_instance():
    text = BASE + '[instance.a.server]\nserved_model_name = "a"\n'
    text += '[instance.b.server]\nserved_model_name = "b"\n'
    assert "instance.b.server.port: port 8000 is also used by instance 'a'" in error_of(text)


def test_one_served_name_on_two_instances_makes_replicas():
    text = BASE + '[instance.a.server]\nport = 1\nserved_model_name = "x"\n'
    text += '[instance.b.server]\nport = 2\nserved_model_name = "x"\n'
    config = parse_config(text)
    assert [(i.name, i.server.model_names) for i in config.enabled] == [
        ("a", ("x",)),
        ("b", ("x",)),
    ]


def test_same_model_without_served_names_makes_replicas():
    text = BASE + "[instance.a.server]\nport = 1\n[instance.b.server]\nport = 2\n"
    config = parse_config(text)
    assert {i.server.model_names for i in config.enabled} == {("/models/m",)}


def test_one_served_name_for_two_different_models_is_refused():
    text = BASE + '[instance.a.server]\nport = 1\nserved_model_name = "x"\n'
    text += '[instance.b.server]\nport = 2\nserved_model_name = "x"\nmodel = "/models/n"\n'
    assert error_of(text) == (
        "serve.toml: instance.b.server.served_model_name: model name 'x' is also "
        "served by instance 'a' from model '/models/m', here from '/models/n'; replicas of a "
        "name serve the same model: set a distinct served_model_name or the same model"
    )


def test_replicas_still_need_ports_of_their_own():
    text = BASE + '[instance.a.server]\nport = 1\nserved_model_name = "x"\n'
    text += '[instance.b.server]\nport = 1\nserved_model_name = "x"\n'
    assert "instance.b.server.port: port 1 is also used by instance 'a'" in error_of(text)


def test_disabled_instances_do_not_collide():
    text = BASE + "[instance.a.server]\nport = 1\n[instance.b.server]\nport = 1\n"
    text += "[instance.b.control]\nenabled = false\n"
    config = parse_config(text)
    assert [i.name for i in config.enabled] == ["a"]


def test_tensor_parallel_must_match_gpu_count():
    text = BASE + "[instance.a.server]\ntensor_parallel_size = 2\n[instance.a.control]\n"
    text += "gpu_ids = [0]\n"
    assert "tensor_parallel_size: is 2 but gpu_ids [0] lists 1 GPU(s)" in error_of(text)


def test_no_tensor_parallel_check_without_gpus():
    text = BASE + "[instance.a.server]\ntensor_parallel_size = 2\n"
    assert parse_config(text).instance("a").server.tensor_parallel_size == 2


def test_shared_gpu_memory_must_fit():
    text = """
[instance.control]
gpu_ids = [0]
[instance.server]
model = "/m"
[instance.a.server]
port = 1
served_model_name = "a"
gpu_memory_utilization = 0.6
[instance.b.server]
port = 2
served_model_name = "b"
gpu_memory_utilization = 0.5
"""
    message = error_of(text)
    assert "GPU 0 is shared (a=0.6, b=0.5" in message and "sum 1.1 exceeds 1" in message
    assert parse_config(text.replace("0.5", "0.4")).instance("b").server.port == 2


def test_unset_utilization_counts_as_vllms_default():
    text = BASE.replace("gpu_ids = []", "gpu_ids = [0]")
    text += '[instance.a.server]\nport = 1\nserved_model_name = "a"\n'
    text += '[instance.b.server]\nport = 2\nserved_model_name = "b"\ngpu_memory_utilization = 0.2\n'
    assert "unset means 0.9" in error_of(text)


def test_api_key_and_api_key_env_are_exclusive():
    text = BASE + '[instance.a.server]\napi_key = "k"\napi_key_env = "K"\n'
    assert "either api_key or api_key_env" in error_of(text)


def test_background_must_agree():
    text = BASE + "[instance.a.server]\nport = 1\nserved_model_name = 'a'\n"
    text += "[instance.b.server]\nport = 2\nserved_model_name = 'b'\n"
    text += "[instance.b.control]\nbackground = false\n"
    assert "instance.b.control.background: all enabled instances must agree" in error_of(text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="serve config not found; pass --config"):
        load_config(tmp_path / "nope.toml")


def test_schema_rejects_what_the_models_reject():
    schema = json_schema()
    assert schema["$defs"]["Server"]["required"] == ["model"]
    assert "required" not in schema["$defs"]["ServerDefaults"]
    assert schema["$defs"]["Control"]["additionalProperties"] is False
    assert schema["properties"]["instance"]["additionalProperties"] == {"$ref": "#/$defs/Instance"}


# ---- settings (every environment variable) ---------------------------------------------------


def test_settings_defaults_derive_from_xdg_dirs(tmp_path):
    from pipeline.settings import Role, load_settings

    settings = load_settings({"XDG_CACHE_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": "/s"})
    assert settings.pack_cache == tmp_path / "c" / "pixi-pack"
    assert settings.state_dir == Path("/s/infer-vllm")
    assert settings.doit_db == Path("/s/infer-vllm/doit.sqlite3")
    assert settings.serve_state == Path("/s/infer-vllm/serve")
    assert settings.role is Role.ALL and settings.debug is False


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PIPELINE_DEBUG": "maybe"}, "PIPELINE_DEBUG='maybe': must be 1/true/yes/on or 0/f"),
        ({"PIPELINE_ROLE": "server"}, "PIPELINE_ROLE='server': must be one of all, build"),
        ({"AUTO_INFER_VLLM_BUNDLE_SHA256": "abc"}, "must be 64 hexadecimal characters"),
    ],
)
def test_settings_errors_name_the_variable(environ, message):
    from pipeline.errors import PipelineError
    from pipeline.settings import load_settings

    with pytest.raises(PipelineError, match="environment variable ") as info:
        load_settings(environ)
    assert message in str(info.value)


def test_settings_flags_empty_values_and_secrets():
    from pipeline.settings import load_settings

    settings = load_settings(
        {
            "PIPELINE_SKIP_VERIFY": "Yes",
            "PIPELINE_PROJECT": "",
            "RATTLER_CACHE_DIR": "/r",
            "PIPELINE_GATEWAY_CONFIG": '{"keys": ["secret-key"]}',
        }
    )
    assert settings.skip_verify is True
    assert settings.project.name == "vllm-pixi", "empty means unset"
    assert settings.rattler_cache == Path("/r")
    assert "secret-key" not in repr(settings)
    assert load_settings({"PIXI_CACHE_DIR": "/p", "RATTLER_CACHE_DIR": "/r"}).rattler_cache == (
        Path("/p")
    )


# --- strict types: TOML has real booleans, integers and strings ---------------------------


@pytest.mark.parametrize(
    ("toml", "key", "kind"),
    [
        ('[master]\nenable = "yes"\n', "serve.toml: master.enable:", "valid boolean"),
        ('[gateway]\nenable = "true"\n', "serve.toml: gateway.enable:", "valid boolean"),
        ("[instance.a.control]\nbackground = 1\n", "instance.a.control.background:", "boolean"),
        ('[instance.a.server]\nport = "8001"\n', "instance.a.server.port:", "valid integer"),
        ("[instance.a.server]\nport = 8001.0\n", "instance.a.server.port:", "valid integer"),
        ("[instance.a.control]\ngpu_ids = [true]\n", "instance.a.control.gpu_ids.0:", "integer"),
        ('[instance.a.control]\nready_timeout = "60"\n', "ready_timeout:", "valid number"),
        ("[instance.a.server]\nserved_model_name = 7\n", "served_model_name:", "valid string"),
        ("[instance.a.control]\nenv = { OMP_NUM_THREADS = 4 }\n", "env.OMP_NUM_THREADS:", "string"),
    ],
)
def test_enable_yes_and_other_loose_scalars_are_refused_with_one_located_line(toml, key, kind):
    message = error_of(BASE + toml)
    assert key in message
    assert kind in message


def test_integers_are_still_numbers_and_paths_and_choices_are_strings():
    config = parse_config(
        BASE
        + '[instance.a.control]\nready_timeout = 60\nlog_dir = "/var/log/v"\nrestart = "no"\n'
        + '[master]\nlauncher = "path"\n'
    )
    ctl = config.instance("a").control
    assert ctl.ready_timeout == 60.0 and isinstance(ctl.ready_timeout, float)
    assert ctl.log_dir == Path("/var/log/v")
    assert ctl.restart.value == "no"
    assert config.master.launcher.value == "path"


def test_overrides_are_json_typed_like_the_toml():
    # AUTO_INFER_VLLM_OVERRIDES is JSON: it has true/false and numbers, and a string stays one.
    config = parse_config(BASE, overrides=json.dumps({"instance": {"server": {"port": 8001}}}))
    assert config.instances[0].server.port == 8001
    message = error_of(BASE, json.dumps({"master": {"enable": "false"}}))
    assert message.startswith("serve.toml: master.enable (set by AUTO_INFER_VLLM_OVERRIDES):")
    assert "valid boolean" in message


# --- secrets never appear in errors ---------------------------------------------------------


def test_gateway_api_keys_as_a_string_does_not_print_the_secret():
    message = error_of(BASE + '[gateway]\napi_keys = "SECRET-gw-1234"\n')
    assert message.startswith("serve.toml: gateway.api_keys:")
    assert "valid list" in message
    assert "SECRET-gw-1234" not in message
    assert "the value is not shown" in message


def test_numeric_api_key_is_not_echoed():
    message = error_of(BASE.replace('model = "/models/m"', 'model = "/models/m"\napi_key = 987654'))
    assert "instance.server.api_key" in message and "valid string" in message
    assert "987654" not in message


def test_numeric_api_key_through_overrides_is_not_echoed():
    overrides = json.dumps({"instance": {"a": {"server": {"api_key": 987654}}}})
    message = error_of(BASE, overrides)
    assert "instance.a.server.api_key (set by AUTO_INFER_VLLM_OVERRIDES)" in message
    assert "987654" not in message


def test_a_token_in_control_env_is_not_echoed():
    message = error_of(BASE + "[instance.a.control]\nenv = { HF_TOKEN = 424242 }\n")
    assert "env.HF_TOKEN" in message
    assert "424242" not in message


@pytest.mark.parametrize("bad", ["abc\\r\\nX-Injected: 1", "abc\\ndef", "abc\\u0000", "a b"])
def test_api_key_with_crlf_is_refused_as_header_injection(bad):
    message = error_of(BASE + f'[instance.a.server]\napi_key = "{bad}"\n')
    assert message.startswith("serve.toml: instance.a.server.api_key:")
    assert "control characters" in message
    assert "Injected" not in message and "abc" not in message


def test_api_key_env_value_with_crlf_is_refused_before_serving():
    from pipeline.pixi.envs import Runtime
    from pipeline.serve.plan import build_plan
    from pipeline.serve.preflight import host_problems

    config = parse_config(
        BASE + '[instance.a.server]\napi_key_env = "A_KEY"\n', source="serve.toml"
    )
    environ = {"A_KEY": "good\r\nX-Injected: 1"}
    plan = build_plan(
        config, Runtime(kind="path", description="python on PATH", python="python"), environ
    )
    problems = host_problems(config, plan, environ, gpus=lambda _: None, in_use=lambda h, p: False)
    [problem] = [p for p in problems if "A_KEY" in p]
    assert problem.startswith("serve.toml: instance 'a': the key in A_KEY (server.api_key_env)")
    assert "Injected" not in problem and "good" not in problem


# --- relative paths are the config file's ---------------------------------------------------


def test_relative_log_dir_is_under_the_config_files_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "serve.toml").write_text(
        '[master]\nenv_prefix = "envs/vllm"\n'
        '[instance.control]\ngpu_ids = []\nlog_dir = "logs"\n'
        '[instance.server]\nmodel = "./models/m"\n'
        '[instance.hub.server]\nmodel = "org/name"\nport = 8001\n'
        "[instance.a.server]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../conf/serve.toml"))
    a = config.instance("a")
    assert a.control.log_dir == folder / "logs"
    assert a.server.model == str(folder / "models/m")
    assert config.master.env_prefix == folder / "envs/vllm"
    assert config.gateway.log_dir == folder / "logs"
    assert config.instance("hub").server.model == "org/name"


def test_the_plan_writes_logs_where_doit_logs_reads_them_whatever_the_cwd(tmp_path, monkeypatch):
    from pipeline.pixi.envs import Runtime
    from pipeline.serve.plan import build_plan

    (tmp_path / "serve.toml").write_text(
        BASE.replace("gpu_ids = []", 'gpu_ids = []\nlog_dir = "l"')
    )
    runtime = Runtime(kind="path", description="python on PATH", python="python")
    plans = []
    # `doit serve` run beside the file, and `doit logs` run from `/` (where the daemon lives).
    for cwd, path in ((tmp_path, Path("serve.toml")), (Path("/"), tmp_path / "serve.toml")):
        monkeypatch.chdir(cwd)
        config = load_config(path)
        plans.append(build_plan(config, runtime, {}).instances[0])
    assert {p.log_file for p in plans} == {str(tmp_path / "l" / "default.log")}
    assert {p.cwd for p in plans} == {str(tmp_path / "l")}


# ---- liveness keys ------------------------------------------------------------------------------


def test_health_keys_default_merge_per_instance_and_reach_the_plan():
    from pipeline.pixi.envs import Runtime
    from pipeline.serve.plan import build_plan

    text = (
        BASE.replace("gpu_ids = []", "gpu_ids = []\nhealth_interval = 5")
        + "[instance.a.server]\nport = 9001\n"
        + "[instance.b.server]\nport = 9002\n[instance.b.control]\nhealth_failures = 6\n"
        + "[instance.c.server]\nport = 9003\n[instance.c.control]\nhealth_interval = 0.5\n"
    )
    config = parse_config(text, source="serve.toml")
    got = {i.name: (i.control.health_interval, i.control.health_failures) for i in config.instances}
    assert got == {"a": (5.0, 3), "b": (5.0, 6), "c": (0.5, 3)}
    runtime = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")
    plan = build_plan(config, runtime, {})
    assert {i.name: (i.health_interval, i.health_failures) for i in plan.instances} == got
    defaults = parse_config(BASE, source="serve.toml").instances[0].control
    assert (defaults.health_interval, defaults.health_failures) == (10.0, 3)


@pytest.mark.parametrize(
    ("table", "bad", "expected"),
    [
        ("a.control", "health_interval = 0", "instance.a.control.health_interval: "),
        ("a.control", "health_interval = 0.05", "greater than or equal to 0.1"),
        ("a.control", "health_interval = 7200", "less than or equal to 3600"),
        ("a.control", 'health_interval = "10"', "valid number"),
        ("a.control", "health_failures = 0", "instance.a.control.health_failures: "),
        ("a.control", "health_failures = 101", "less than or equal to 100"),
        ("a.control", "health_failures = 2.5", "valid integer"),
        ("control", "health_failures = -1", "instance.control.health_failures (instance 'a'): "),
    ],
)
def test_health_keys_are_bounded_with_one_located_line(table, bad, expected):
    if table == "control":
        text = BASE.replace("gpu_ids = []", f"gpu_ids = []\n{bad}") + "[instance.a.server]\n"
    else:
        text = BASE + f"[instance.{table}]\n{bad}\n"
    assert expected in error_of(text)


# --- extra_args as vLLM reads them (issue 17): prefixes, `_` for `-`, aliases ----------------


def extra_args_error(args: list[str]) -> str:
    return error_of(BASE + f"[instance.a.server]\nextra_args = {json.dumps(args)}\n")


def test_regression_extra_args_prefix_of_host_is_refused():
    # vLLM took `--hos 0.0.0.0` as --host: an instance meant for 127.0.0.1 behind the gateway
    # listened on every interface.
    assert extra_args_error(["--hos", "0.0.0.0"]) == (
        "serve.toml: instance.a.server.extra_args: --hos is read by vLLM as --host (it takes _ "
        "for - and any unambiguous prefix), which is set from server.host; remove it here"
    )


def test_regression_extra_args_api_key_with_underscore_is_refused_without_the_key():
    # `--api_key=SECRET` is vLLM's --api-key: the key went to argv, unmasked in `doit plan`.
    message = extra_args_error(["--api_key=SECRET-4711"])
    assert message.startswith("serve.toml: instance.a.server.extra_args: --api_key is read by ")
    assert "as --api-key" in message and "set from server.api_key or server.api_key_env" in message
    assert "SECRET" not in message
    overrides = json.dumps({"instance": {"b": {"server": {"extra_args": ["--api-key.x", "K-1"]}}}})
    message = error_of(BASE, overrides)
    assert (
        "instance.b.server.extra_args (set by AUTO_INFER_VLLM_OVERRIDES): --api-key is" in message
    )
    assert "K-1" not in message


def test_regression_extra_args_prefix_of_port_is_refused():
    # `--por 9` made vLLM listen on 9 while the supervisor waited on server.port for ever.
    message = extra_args_error(["--por", "9"])
    assert "extra_args: --por is read by vLLM as --port" in message
    assert "set from server.port; remove it here" in message


def test_regression_extra_args_served_model_name_with_underscores_is_refused():
    message = extra_args_error(["--served_model_name", "x"])
    assert "extra_args: --served_model_name is read by vLLM as --served-model-name" in message
    assert "set from server.served_model_name" in message


@pytest.mark.parametrize(
    ("args", "flag", "option", "key"),
    [
        (["--model_impl", "x", "--mode", "m"], "--mode", "--model", "server.model"),
        (["--device-memory-utilization", "0.5"], "--device-memory-utilization", "", "server.gpu"),
        (["-t", "2"], "-t", "--tensor-parallel-size", "server.tensor_parallel_size"),
        (["-tp=2"], "-tp", "", "server.tensor_parallel_size"),
        (["--max_model_len=99"], "--max_model_len", "--max-model-len", "server.max_model_len"),
        (["--dt", "half"], "--dt", "--dtype", "server.dtype"),
        (["--host.x", "0.0.0.0"], "--host", "", "server.host"),
        (["--uds", "/tmp/s"], "--uds", "", "server.host and server.port"),
    ],
)
def test_extra_args_that_vllm_reads_as_a_managed_option_are_refused(args, flag, option, key):
    message = extra_args_error(args)
    assert f"extra_args: {flag} " in message and key in message
    assert option in message


def test_an_ambiguous_prefix_of_a_managed_option_is_refused_with_its_candidates():
    message = extra_args_error(["--mode", "x"])
    assert "--mode is an abbreviation of --model, --model-class-overrides, --model-impl" in message
    assert "vLLM refuses it as ambiguous" in message
    assert "--model is set from server.model: write the option you mean in full" in message


def test_other_options_pass_as_written_even_unknown_ones():
    args = [
        "--trust-remote-code",
        "--max_num_seqs",
        "4",
        "--enforce-eager",
        "--seed=1",
        "-O3",
        "--compilation-config.level",
        "3",
        "--no-such-option",
        "--model-impl",
        "vllm",
        "-pp",
        "1",
    ]
    config = parse_config(BASE + f"[instance.a.server]\nextra_args = {json.dumps(args)}\n")
    assert config.instance("a").server.extra_args == args


# --- control characters, overrides and files (issue 17) --------------------------------------


def test_regression_a_nul_in_control_env_is_one_located_line():
    # It passed `doit plan`; `doit serve` then died with "embedded null byte" in the log.
    message = error_of(BASE + '[instance.a.control]\nenv = { HF_TOKEN = "hf_abc\\u0000def" }\n')
    assert message == (
        "serve.toml: instance.a.control.env.HF_TOKEN: the value holds control characters (NUL, "
        "CR or LF), which no argument, environment variable or path of a served process may "
        "hold; remove them (the value is not shown)"
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            '[instance.a.server]\nextra_args = ["--seed", "1\\n2"]\n',
            "instance.a.server.extra_args.1",
        ),
        ('[instance.a.server]\nmodel = "/m\\r"\n', "instance.a.server.model"),
        (
            '[instance.a.server]\nserved_model_name = "a\\nb"\n',
            "instance.a.server.served_model_name",
        ),
        ('[instance.a.control]\nlog_dir = "/tmp/l\\u0000"\n', "instance.a.control.log_dir"),
        ('[instance.a.control]\nenv = { "A\\nB" = "x" }\n', "instance.a.control.env:"),
        ('[instance.a.cluster]\nnodes = 2\nleader = "h\\u0000"\n', "instance.a.cluster.leader"),
        ('[master]\npixi_environment = "d\\n"\n', "master.pixi_environment"),
        ('[gateway]\nhost = "0.0.0.0\\n"\n', "gateway.host"),
    ],
)
def test_a_nul_or_line_break_anywhere_is_one_located_line(toml, key):
    message = error_of(BASE + toml)
    assert f"serve.toml: {key}" in message and "holds control characters" in message


def test_a_nul_through_the_overrides_is_located_too():
    overrides = json.dumps({"instance": {"control": {"env": {"X": "a\u0000"}}}})
    message = error_of(BASE, overrides)
    assert message.startswith(
        "serve.toml: instance.control.env.X (instance 'default') (set by AUTO_INFER_VLLM_OVERRIDES)"
    )


@pytest.mark.parametrize("bracket", ["{", "["])
def test_regression_deeply_nested_overrides_are_one_line(bracket):
    # 20,000 levels crashed the JSON parser with RecursionError.
    close = "}" if bracket == "{" else "]"
    opener = '{"a":' if bracket == "{" else "["
    overrides = opener * 20_000 + "1" + close * 20_000
    message = error_of(BASE, overrides)
    assert message.startswith(
        "AUTO_INFER_VLLM_OVERRIDES: arrays or objects nested more than 32 levels deep"
    )


def test_overrides_are_bounded_in_size_and_never_echoed():
    overrides = json.dumps({"instance": {"server": {"api_key": "K" * (2 * 1024 * 1024)}}})
    message = error_of(BASE, overrides)
    assert message.startswith("AUTO_INFER_VLLM_OVERRIDES: ")
    assert "more than 1 MiB" in message and "KKK" not in message


def test_brackets_inside_override_strings_do_not_count_as_nesting():
    overrides = json.dumps({"instance": {"server": {"extra_args": ["--chat-template", "[" * 100]}}})
    assert parse_config(BASE, overrides=overrides).instances[0].server.extra_args[1] == "[" * 100


def test_deeply_nested_toml_is_one_line():
    message = error_of(BASE + "[gateway]\nx = " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert message.startswith("serve.toml: arrays or tables nested deeper than Python can read")
    message = error_of(BASE + "[gateway]\nx = " + "[" * 40 + "]" * 40 + "\n")
    assert message.startswith("serve.toml: arrays or tables nested more than 32 levels deep")


def load_within(path: Path, seconds: float) -> str:
    """load_config(path)'s error, or a failure when it has not returned within ``seconds``
    (then a writer is opened on the FIFO, so that the stuck reader returns)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_config(path)
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"load_config({path}) blocked for more than {seconds} s")
    [error] = outcome
    assert isinstance(error, ConfigError), error
    return str(error)


def test_regression_a_fifo_config_is_refused_at_once(tmp_path):
    # `doit plan --config FIFO` waited for a writer for ever.
    fifo = tmp_path / "serve.toml"
    os.mkfifo(fifo)
    assert load_within(fifo, 10) == (
        f"{fifo}: the serve config is a FIFO (named pipe), not a regular file; pass the TOML "
        "file itself with --config or AUTO_INFER_VLLM_CONFIG"
    )


def test_a_directory_or_a_device_is_not_a_config(tmp_path):
    assert "is a directory, not a regular file" in load_within(tmp_path, 10)
    assert "is a character device, not a regular file" in load_within(Path("/dev/null"), 10)


def test_a_config_path_with_a_nul_byte_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="a path cannot hold a NUL byte"):
        load_config(tmp_path / "a\0b.toml")


def test_a_symlink_to_a_config_file_is_read(tmp_path):
    (tmp_path / "real.toml").write_text(BASE)
    (tmp_path / "link.toml").symlink_to(tmp_path / "real.toml")
    assert load_config(tmp_path / "link.toml").instances[0].server.model == "/models/m"


# --- log_dir on the host (issue 17) -----------------------------------------------------------


def plan_check(settings, standin_prefix: Path, tmp_path: Path, log_dir: Path) -> list[str]:
    """`doit plan --check` of one stand-in instance logging to ``log_dir``, in process: its
    error (or "") and its warnings."""
    import io

    from conftest import free_port, standin_config

    from pipeline.errors import ServeError
    from pipeline.serve.commands.plan import plan_command

    config = tmp_path / "serve.toml"
    config.write_text(standin_config(standin_prefix, log_dir, {"a": {"port": free_port()}}))
    warnings: list[str] = []
    try:
        plan_command(
            settings, str(config), os.environ, check=True, out=io.StringIO(), say=warnings.append
        )
    except ServeError as exc:
        return [str(exc), *warnings]
    return ["", *warnings]


def test_regression_a_log_dir_that_is_a_file_fails_plan_check(settings, standin_prefix, tmp_path):
    # It passed `doit plan --check`; `doit serve` then failed making the folder.
    log_file = tmp_path / "logs"
    log_file.write_text("not a folder\n")
    error, *warnings = plan_check(settings, standin_prefix, tmp_path, log_file)
    assert error == (
        f"{tmp_path / 'serve.toml'}: instance 'a': control.log_dir {log_file} is a regular file; "
        "set log_dir to a directory"
    )
    assert warnings == [f"warning: {error}"]


def test_a_log_dir_under_a_file_fails_plan_check(settings, standin_prefix, tmp_path):
    (tmp_path / "file").write_text("")
    error, *_ = plan_check(settings, standin_prefix, tmp_path, tmp_path / "file" / "a" / "logs")
    assert error.endswith(
        f"control.log_dir {tmp_path / 'file' / 'a' / 'logs'} cannot be created: "
        f"{tmp_path / 'file'} is a regular file; set log_dir elsewhere"
    )


def test_a_missing_log_dir_is_made_and_an_existing_one_is_used(settings, standin_prefix, tmp_path):
    assert plan_check(settings, standin_prefix, tmp_path, tmp_path / "new" / "logs") == [""]
    assert not (tmp_path / "new").exists(), "planning makes nothing"
    assert plan_check(settings, standin_prefix, tmp_path, tmp_path) == [""]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_log_dir_in_a_read_only_folder_is_refused(tmp_path):
    from pipeline.serve.preflight import log_dir_problem

    tmp_path.chmod(0o555)
    try:
        assert "is not writable by this user" in (log_dir_problem(tmp_path / "logs") or "")
        assert "is not writable by this user" in (log_dir_problem(tmp_path) or "")
    finally:
        tmp_path.chmod(0o755)


def test_a_model_below_the_models_dir_that_is_missing_names_its_bundle(tmp_path):
    from pipeline.pixi.envs import Runtime
    from pipeline.serve.plan import build_plan
    from pipeline.serve.preflight import host_problems

    models = tmp_path / "models"
    (models / "here").mkdir(parents=True)
    text = (
        "[instance.control]\ngpu_ids = []\n"
        f'[instance.a.server]\nmodel = "{models}/qwen2-vl-7b"\n'
        f'[instance.b.server]\nmodel = "{models}/here"\nport = 8001\n'
        f'[instance.c.server]\nmodel = "{tmp_path}/elsewhere"\nport = 8002\n'
    )
    config = parse_config(text, source="serve.toml")
    plan = build_plan(config, Runtime(kind="path", description="python", python="python"), {})
    problems = host_problems(
        config, plan, {}, gpus=lambda _: None, in_use=lambda h, p: False, models_dir=models
    )
    [missing] = [p for p in problems if "qwen2-vl-7b" in p]
    assert missing.startswith("serve.toml: instance 'a': server.model ")
    assert "is not installed" in missing and "qwen2-vl-7b.model.tar" in missing
    assert "doit install-model" in missing and "AUTO_INFER_VLLM_MODEL_BUNDLES" in missing
    assert not [p for p in problems if "instance 'b'" in p]
    [other] = [p for p in problems if "elsewhere" in p]
    assert "does not exist on this host" in other
