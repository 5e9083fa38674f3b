"""The pure planner and the runtime resolver: argv, environment, secrets, start order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.pixi.envs import Runtime, resolve_runtime
from pipeline.serve.config import parse_config
from pipeline.serve.plan import MASK, OFFLINE_ENV, Plan, build_plan, start_order

PATH_RUNTIME = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")


def plan_of(text: str, environ: dict[str, str] | None = None, runtime: Runtime = PATH_RUNTIME):
    return build_plan(parse_config(text), runtime, environ or {})


GPU_BASE = """
[instance.server]
model = "/models/m"
gpu_memory_utilization = 0.3
"""


def named(name: str, port: int, gpus: list[int]) -> str:
    return (
        f'[instance.{name}.server]\nport = {port}\nserved_model_name = "{name}"\n'
        f"tensor_parallel_size = {max(1, len(gpus))}\n"
        f"[instance.{name}.control]\ngpu_ids = {gpus}\n"
    )


def test_argv_carries_the_typed_keys_then_extra_args():
    plan = plan_of(
        """
[instance.control]
gpu_ids = [0, 1]
[instance.server]
model = "/models/m"
host = "0.0.0.0"
port = 8001
served_model_name = "m"
dtype = "bfloat16"
tensor_parallel_size = 2
max_model_len = 8192
gpu_memory_utilization = 0.85
extra_args = ["--trust-remote-code"]
"""
    )
    (inst,) = plan.instances
    assert inst.argv == (
        "/usr/bin/python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/m",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
        "--served-model-name",
        "m",
        "--dtype",
        "bfloat16",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "8192",
        "--gpu-memory-utilization",
        "0.85",
        "--trust-remote-code",
    )
    assert inst.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert inst.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert inst.health_url == "http://127.0.0.1:8001/health"
    assert inst.base_url == "http://127.0.0.1:8001"
    assert inst.log_file == "/tmp/vllm-logs/default.log"
    assert inst.model_names == ("m",)


def test_cpu_instances_get_no_cuda_pinning():
    plan = plan_of("[instance.control]\ngpu_ids = []\n[instance.server]\nmodel = '/m'\n")
    assert "CUDA_VISIBLE_DEVICES" not in plan.instances[0].env


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000/health"),
        ("::", "http://[::1]:8000/health"),
        ("10.1.2.3", "http://10.1.2.3:8000/health"),
        ("fd00::5", "http://[fd00::5]:8000/health"),
    ],
)
def test_health_url_connects_where_the_server_listens(host, url):
    text = f"[instance.control]\ngpu_ids = []\n[instance.server]\nmodel = '/m'\nhost = '{host}'\n"
    assert plan_of(text).instances[0].health_url == url


def test_secrets_go_to_the_environment_and_are_masked_when_shown():
    text = """
[instance.control]
gpu_ids = []
env = { HF_TOKEN = "hf-secret", PLAIN = "visible" }
[instance.server]
model = "/m"
[instance.a.server]
port = 1
served_model_name = "a"
api_key = "key-a"
[instance.b.server]
port = 2
served_model_name = "b"
api_key_env = "KEY_B"
[instance.c.server]
port = 3
served_model_name = "c"
api_key_env = "KEY_C"
"""
    plan = plan_of(text, {"KEY_B": "key-b"})
    a, b, c = plan.instances
    assert all("key-" not in arg for inst in plan.instances for arg in inst.argv)
    assert a.child_env({})["VLLM_API_KEY"] == "key-a"
    assert b.child_env({})["VLLM_API_KEY"] == "key-b"
    assert "VLLM_API_KEY" not in c.child_env({"VLLM_API_KEY": "supervisor's own"})
    assert c.missing_secrets == {"VLLM_API_KEY": "KEY_C"}
    shown = json.dumps(plan.to_display())
    assert "key-a" not in shown and "key-b" not in shown and "hf-secret" not in shown
    assert a.display_env()["VLLM_API_KEY"] == MASK
    assert a.display_env()["HF_TOKEN"] == MASK
    assert a.display_env()["PLAIN"] == "visible"
    assert c.display_env()["VLLM_API_KEY"] == "<unset: $KEY_C>"


def test_regression_an_instance_inherits_no_other_key_variable():
    text = """
[instance.control]
gpu_ids = []
[instance.server]
model = "/m"
[instance.a.server]
port = 1
served_model_name = "a"
api_key_env = "KEY_A"
[instance.b.server]
port = 2
served_model_name = "b"
api_key_env = "KEY_B"
[instance.b.control]
env = { KEY_A = "b asked for this one by name" }
[instance.off.server]
port = 3
served_model_name = "off"
api_key_env = "KEY_OFF"
[instance.off.control]
enabled = false
[gateway]
enable = true
port = 9
api_keys_env = ["GW_KEYS"]
"""
    base = {
        "KEY_A": "a",
        "KEY_B": "b",
        "KEY_OFF": "off",
        "GW_KEYS": "gw",
        "AUTO_INFER_VLLM_OVERRIDES": "{}",
        "PIPELINE_GATEWAY_CONFIG": "{}",
        "PATH": "/bin",
    }
    plan = plan_of(text, base)
    a, b = plan.instances
    assert a.child_env(base) == {"PATH": "/bin", "VLLM_API_KEY": "a", **OFFLINE_ENV}
    assert b.child_env(base) == {
        "PATH": "/bin",
        "VLLM_API_KEY": "b",
        "KEY_A": "b asked for this one by name",
        **OFFLINE_ENV,
    }
    assert plan.gateway is not None
    gateway_env = plan.gateway.child_env(base)
    assert set(gateway_env) == {"PATH", "PYTHONPATH", "PIPELINE_GATEWAY_CONFIG"}
    assert gateway_env["PIPELINE_GATEWAY_CONFIG"] != "{}", "its own config, not the inherited one"
    # `doit plan` says what is kept back (names only).
    shown = plan.to_display()["instances"][0]["env_remove"]
    assert "KEY_B" in shown and "GW_KEYS" in shown and "KEY_OFF" in shown


def test_secret_plan_roundtrips_for_the_detached_supervisor():
    text = "[instance.control]\ngpu_ids = []\n[instance.server]\nmodel = '/m'\napi_key = 'k1'\n"
    plan = plan_of(text)
    again = Plan.model_validate_json(plan.to_secret_json())
    assert again.instances[0].child_env({})["VLLM_API_KEY"] == "k1"
    assert again == plan


def test_start_order_chains_instances_sharing_a_gpu():
    text = GPU_BASE + named("a", 1, [0, 1]) + named("b", 2, [1]) + named("c", 3, [0])
    text += named("d", 4, [2]) + named("e", 5, [1, 2])
    plan = plan_of(text)
    after = {i.name: i.start_after for i in plan.instances}
    assert after == {"a": None, "b": "a", "c": "a", "d": None, "e": "d"}
    assert [i.name for i in plan.instances] == ["a", "b", "c", "d", "e"]


def test_start_order_of_cpu_instances_is_parallel():
    config = parse_config(
        "[instance.control]\ngpu_ids = []\n[instance.server]\nmodel = '/m'\n"
        + "".join(named(n, p, []) for n, p in (("x", 1), ("y", 2)))
    )
    assert start_order(config.enabled) == {"x": None, "y": None}


def test_disabled_instances_are_listed_not_planned():
    text = GPU_BASE + named("a", 1, [0]) + named("b", 2, [1]) + "enabled = false\n"
    plan = plan_of(text)
    assert [i.name for i in plan.instances] == ["a"]
    assert plan.disabled == ("b",)


def test_master_enable_false_is_carried():
    text = (
        "[master]\nenable = false\n[instance.control]\ngpu_ids=[]\n[instance.server]\nmodel='/m'\n"
    )
    assert plan_of(text).enable is False


# ---- runtime resolution -------------------------------------------------------------------


def make_prefix(root: Path, *, venv: bool = False, activate: bool = False) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("#!/bin/sh\n")
    (root / "bin" / "python").chmod(0o755)
    if venv:
        (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    else:
        (root / "conda-meta").mkdir()
    if activate:
        (root / "etc" / "conda" / "activate.d").mkdir(parents=True)
        (root / "etc" / "conda" / "activate.d" / "cuda.sh").write_text("export CUDA_HOME=x\n")
    return root


def test_env_prefix_venv(tmp_path):
    prefix = make_prefix(tmp_path / "venv", venv=True)
    rt = resolve_runtime(
        launcher="auto",
        env_prefix=prefix,
        project_dir=tmp_path / "p",
        environment="default",
        environ={"PATH": "/usr/bin"},
    )
    assert rt.kind == "prefix"
    assert rt.command("-V") == (str(prefix / "bin" / "python"), "-V")
    assert rt.env["VIRTUAL_ENV"] == str(prefix)
    assert rt.env["PATH"] == f"{prefix}/bin:/usr/bin"


def test_conda_prefix_with_activation_scripts_runs_through_bash_exec(tmp_path):
    prefix = make_prefix(tmp_path / "env", activate=True)
    rt = resolve_runtime(
        launcher="prefix",
        env_prefix=prefix,
        project_dir=tmp_path / "p",
        environment="default",
        environ={"PATH": "/usr/bin"},
    )
    argv = rt.command("-m", "x")
    assert argv[:2] == ("/bin/bash", "-c")
    assert 'exec "$@"' in argv[2]
    assert argv[-3:] == (str(prefix / "bin" / "python"), "-m", "x")
    assert rt.env["CONDA_PREFIX"] == str(prefix)


def test_installed_pixi_project_without_pixi_uses_its_prefix(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pixi.toml").write_text("[workspace]\n")
    prefix = make_prefix(project / ".pixi" / "envs" / "gpu")
    rt = resolve_runtime(
        launcher="auto",
        env_prefix=None,
        project_dir=project,
        environment="gpu",
        environ={"PATH": str(tmp_path / "empty")},
    )
    assert rt.kind == "prefix" and rt.prefix == prefix


def standin_pixi(bindir: Path, version: str, marker: Path | None = None) -> Path:
    """A ``pixi`` that reports ``version``; any other call writes ``marker`` and fails."""
    bindir.mkdir(parents=True, exist_ok=True)
    touch = f'echo "$@" >> "{marker}"; ' if marker else ""
    script = bindir / "pixi"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "pixi {version}"; exit 0; fi\n'
        f"{touch}exit 1\n"
    )
    script.chmod(0o755)
    return script


def installed_project(root: Path, lock_version: int = 7, environment: str = "default") -> Path:
    root.mkdir()
    (root / "pixi.toml").write_text("[workspace]\n")
    (root / "pixi.lock").write_text(f"version: {lock_version}\nenvironments: {{}}\n")
    make_prefix(root / ".pixi" / "envs" / environment)
    return root


def test_auto_runs_the_installed_prefix_even_with_pixi_on_path(tmp_path):
    # Under auto, pixi on PATH used to run vLLM (`pixi run`): an old pixi cannot read lock v7,
    # and a first `pixi run` reinstalls every wheel. auto now never calls pixi.
    project = installed_project(tmp_path / "project")
    marker = tmp_path / "pixi-called"
    bindir = tmp_path / "bin"
    standin_pixi(bindir, "0.76.0", marker)
    rt = resolve_runtime(
        launcher="auto",
        env_prefix=None,
        project_dir=project,
        environment="default",
        environ={"PATH": str(bindir)},
        explicit_project=True,
    )
    assert rt.kind == "prefix"
    assert rt.command("-m", "vllm") == (
        str(project / ".pixi/envs/default/bin/python"),
        "-m",
        "vllm",
    )
    assert rt.env["CONDA_PREFIX"] == str(project / ".pixi/envs/default")
    assert not marker.exists(), "auto must not call pixi at all"


def test_launcher_pixi_runs_through_a_pixi_that_reads_the_lock(tmp_path):
    project = installed_project(tmp_path / "project")
    bindir = tmp_path / "bin"
    standin_pixi(bindir, "0.68.0")
    rt = resolve_runtime(
        launcher="pixi",
        env_prefix=None,
        project_dir=project,
        environment="default",
        environ={"PATH": str(bindir)},
    )
    assert rt.kind == "pixi"
    assert rt.command("-m", "vllm")[:8] == (
        str(bindir / "pixi"),
        "run",
        "--manifest-path",
        str(project / "pixi.toml"),
        "--environment",
        "default",
        "--frozen",
        "python",
    )


@pytest.mark.parametrize(
    ("lock_version", "pixi", "needed"), [(7, "0.67.2", "0.68.0"), (6, "0.38.0", "0.39.0")]
)
def test_launcher_pixi_refuses_a_pixi_too_old_for_the_lock(tmp_path, lock_version, pixi, needed):
    project = installed_project(tmp_path / "project", lock_version=lock_version)
    bindir = tmp_path / "bin"
    standin_pixi(bindir, pixi)
    with pytest.raises(ConfigError) as caught:
        resolve_runtime(
            launcher="pixi",
            env_prefix=None,
            project_dir=project,
            environment="default",
            environ={"PATH": str(bindir)},
            source="s.toml",
        )
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("s.toml: master.launcher = 'pixi': ")
    assert f"pixi {pixi}, which cannot read" in message
    assert f"lock version {lock_version} needs pixi >= {needed}" in message


def test_launcher_pixi_without_pixi_on_path_is_an_error(tmp_path):
    project = installed_project(tmp_path / "project")
    with pytest.raises(ConfigError, match=r"^s.toml: master.launcher = 'pixi' but pixi is not"):
        resolve_runtime(
            launcher="pixi",
            env_prefix=None,
            project_dir=project,
            environment="default",
            environ={"PATH": str(tmp_path / "empty")},
            source="s.toml",
        )


def test_an_explicit_project_dir_with_nothing_installed_is_an_error(tmp_path):
    # It used to fall back to `python` on PATH silently (doit plan --check, doit serve).
    empty = tmp_path / "nothing-here"
    with pytest.raises(ConfigError) as caught:
        resolve_runtime(
            launcher="auto",
            env_prefix=None,
            project_dir=empty,
            environment="default",
            environ={"PATH": "/usr/bin:/bin"},
            source="s.toml",
            explicit_project=True,
        )
    assert caught.value.message == (
        f"s.toml: master.pixi_project_dir: environment 'default' is not installed at "
        f"{empty}/.pixi/envs/default (no bin/python); run `doit install` first"
    )


def test_a_project_without_its_environment_is_an_error(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pixi.toml").write_text("[workspace]\n")
    with pytest.raises(ConfigError, match=r"is not installed .* `doit install`"):
        resolve_runtime(
            launcher="auto",
            env_prefix=None,
            project_dir=project,
            environment="default",
            environ={"PATH": str(tmp_path)},
            source="s.toml",
        )


def test_a_missing_env_prefix_is_an_error_unless_only_planning(tmp_path):
    kwargs = dict(
        launcher="auto",
        env_prefix=tmp_path / "nope",
        project_dir=tmp_path,
        environment="default",
        environ={"PATH": "/usr/bin"},
        source="s.toml",
    )
    with pytest.raises(ConfigError, match=r"s.toml: master.env_prefix: no environment at"):
        resolve_runtime(**kwargs)
    assert resolve_runtime(**kwargs, check=False).python == str(tmp_path / "nope/bin/python")


def test_nothing_installed_falls_back_to_python_on_path(tmp_path):
    rt = resolve_runtime(
        launcher="auto",
        env_prefix=None,
        project_dir=tmp_path / "none",
        environment="default",
        environ={"PATH": "/usr/bin:/bin"},
    )
    assert rt.kind == "path" and rt.python.endswith("python3")


def test_instances_are_offline_unless_their_config_says_otherwise():
    text = (
        "[instance.control]\ngpu_ids = []\n"
        "[instance.a.server]\nmodel = '/models/a'\n"
        "[instance.b.server]\nmodel = '/models/b'\nport = 8001\n"
        "[instance.b.control]\nenv = { HF_HUB_OFFLINE = '0' }\n"
    )
    a, b = plan_of(text).instances
    assert a.env["HF_HUB_OFFLINE"] == "1" and a.env["TRANSFORMERS_OFFLINE"] == "1"
    # the process environment does not switch it back: the plan's env wins over it
    assert a.child_env({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "1"
    assert b.env["HF_HUB_OFFLINE"] == "0" and b.env["TRANSFORMERS_OFFLINE"] == "1"
