"""The container side without a Docker engine: shell scripts, the boot hook in a temp root,
the docker flags run-merged.sh generates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from bundle_factory import Kit, make_bundle, shared_kit
from conftest import REPO, free_port, kill_recorded_groups, run_doit

from pipeline.demo.cpu_vllm import tiny_overrides
from pipeline.settings import load_settings

SCRIPTS = sorted(
    [
        *REPO.glob("container/*.sh"),
        *REPO.glob("container/vllm/*.sh"),
        *REPO.glob("scripts/*.sh"),
        REPO / ".ci" / "run",
    ]
)
HOOK = REPO / "container" / "infer-dev-entry.sh"
RUN_MERGED = REPO / "container" / "run-merged.sh"


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, (
        "shellcheck is not installed (.ci/run installs it: apt-get install shellcheck)"
    )
    assert len(SCRIPTS) >= 6
    result = subprocess.run(
        [shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout


# ---- run-merged.sh ---------------------------------------------------------------------------


def run_merged(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [str(RUN_MERGED), *args], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def flags(output: str) -> list[str]:
    return [line.strip().rstrip("\\").strip() for line in output.splitlines()]


def test_run_merged_prints_the_default_port_mapping_and_boot_variables():
    result = run_merged("infer-dev:latest")
    assert result.returncode == 0, result.stderr
    lines = flags(result.stdout)
    assert lines[0] == "docker run"
    # An init reaps orphans as PID 1 (the image's own command may be `sleep infinity`).
    assert "--init" in lines
    assert "-p 11981:8000" in lines
    assert "--gpus all" in lines
    assert "-v /hard/volume/workspace:/hard/volume/workspace" in lines
    assert "-e AUTO_INFER_VLLM_BUNDLE_ON_BOOT=1" in lines
    assert "-e AUTO_INFER_VLLM_CONFIG=/hard/volume/workspace/vllm.toml" in lines
    assert lines[-1] == "infer-dev:latest"


def test_run_merged_follows_the_environment_and_keeps_secrets_out_of_argv():
    result = run_merged(
        "img",
        "sleep",
        "infinity",
        HOST_PORT_VLLM="12000",
        RUN_PORTS="12000:8000 127.0.0.1:9000:9000",
        VLLM_API_KEY_QWEN="s3cret",
        PIPELINE_DEBUG="1",
        INFER_GPUS="none",
    )
    assert result.returncode == 0, result.stderr
    lines = flags(result.stdout)
    assert "-p 12000:8000" in lines and "-p 127.0.0.1:9000:9000" in lines
    assert "-e VLLM_API_KEY_QWEN" in lines and "-e PIPELINE_DEBUG" in lines
    assert "s3cret" not in result.stdout
    assert not any(line.startswith("--gpus") for line in lines)
    assert lines[-3:] == ["img", "sleep", "infinity"]


def test_run_merged_mounts_the_models_folder_read_only_where_the_examples_look():
    # The example configs load /models/...: without this mount they found nothing.
    default = flags(run_merged("img").stdout)
    assert "-v /hard/volume/models:/models:ro" in default
    moved = flags(run_merged("img", INFER_HOST_MODELS="/data/weights").stdout)
    assert "-v /data/weights:/models:ro" in moved
    assert "-v /hard/volume/models:/models:ro" not in moved
    off = flags(run_merged("img", INFER_HOST_MODELS="none").stdout)
    assert not any(line.endswith(":/models:ro") for line in off)
    example = (REPO / "model-configs" / "vllm-qwen2-vl-7b.toml").read_text()
    assert 'model = "/models/' in example


def test_run_merged_host_port_alone_moves_the_mapping():
    lines = flags(run_merged("img", HOST_PORT_VLLM="12345").stdout)
    assert "-p 12345:8000" in lines


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "no image given"),
        (("img",), {"RUN_PORTS": "8000"}, "is not host:container"),
        (("--bogus", "img"), {}, "unknown option --bogus"),
        (("--env-file", "/nonexistent.env", "img"), {}, "/nonexistent.env does not exist"),
    ],
)
def test_run_merged_rejects_bad_input(args, env, message):
    result = run_merged(*args, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- the boot hook in a temporary root ------------------------------------------------------


def hook_env(root: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AUTO_INFER_", "PIPELINE_", "INFER_"))
    }
    env.update(
        INFER_SOFT_APP_ROOT=str(root / "soft" / "app"),
        INFER_WORKSPACE_ROOT=str(root / "workspace"),
        # The doit of the venv running the tests (as the image's venv would provide).
        INFER_PIPELINE_DOIT=str(Path(sys.executable).parent / "doit"),
    )
    env.update(extra)
    return env


def run_hook(root: Path, *args: str, timeout: float = 120, **extra: str):
    return subprocess.run(
        [str(HOOK), *args],
        env=hook_env(root, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def boot_log(root: Path) -> str:
    return (root / "workspace" / "logs" / "auto-infer-vllm-boot.log").read_text()


def test_hook_with_both_flags_off_links_the_helpers_and_skips(tmp_path):
    result = run_hook(tmp_path)
    assert result.returncode == 0, result.stderr
    helpers = tmp_path / "soft" / "app" / "vllm"
    for name in ("install-vllm-offline.sh", "check-and-run-vllm.sh"):
        assert (helpers / name).resolve() == REPO / "container" / "vllm" / name
    log = boot_log(tmp_path)
    assert "install skipped (AUTO_INFER_VLLM_BUNDLE_ON_BOOT is off)" in log
    assert "serve skipped (AUTO_INFER_VLLM_ON_BOOT is off)" in log
    assert "boot hook finished" in log


def test_hook_runs_the_container_command_at_the_end(tmp_path):
    result = run_hook(tmp_path, "sh", "-c", "echo main-process $0", "ok")
    assert result.returncode == 0
    assert result.stdout.strip() == "main-process ok"


@pytest.mark.parametrize("name", ["AUTO_INFER_VLLM_BUNDLE_ON_BOOT", "AUTO_INFER_VLLM_ON_BOOT"])
def test_hook_rejects_a_bad_flag_value_with_a_message(tmp_path, name):
    result = run_hook(tmp_path, **{name: "maybe"})
    assert result.returncode == 0, "not strict: the container goes on"
    assert f"{name}='maybe' is not a flag: use 1/true or 0/false" in result.stderr
    assert "FAILED" in result.stderr
    strict = run_hook(tmp_path, **{name: "maybe", "AUTO_INFER_VLLM_STRICT": "1"})
    assert strict.returncode == 1
    assert "strict mode" in strict.stderr


def test_hook_reports_a_missing_bundle_and_config(tmp_path):
    result = run_hook(
        tmp_path,
        AUTO_INFER_VLLM_BUNDLE_ON_BOOT="true",
        AUTO_INFER_VLLM_BUNDLE_PATH=str(tmp_path / "nope.tar"),
        AUTO_INFER_VLLM_ON_BOOT="1",
        AUTO_INFER_VLLM_CONFIG=str(tmp_path / "nope.toml"),
    )
    assert result.returncode == 0
    assert f"bundle {tmp_path / 'nope.tar'} does not exist" in result.stderr
    assert f"serve config {tmp_path / 'nope.toml'} does not exist" in result.stderr
    assert "finished with 2 failure(s)" in result.stderr
    unset = run_hook(tmp_path, AUTO_INFER_VLLM_BUNDLE_ON_BOOT="1")
    assert "AUTO_INFER_VLLM_BUNDLE_PATH is not set" in unset.stderr


def test_hook_installs_the_model_bundles_before_serving(tmp_path):
    from model_factory import hf_cache_model

    from pipeline.build.model import pack_model

    files = {"config.json": b"{}", "model.safetensors": os.urandom(4096)}
    snapshot = hf_cache_model(tmp_path / "hub", "org/tiny", files)
    bundle = pack_model(snapshot, "tiny", tmp_path / "tiny.model.tar").bundle
    models = tmp_path / "models"
    result = run_hook(
        tmp_path,
        AUTO_INFER_VLLM_MODEL_BUNDLES=str(bundle),
        AUTO_INFER_VLLM_MODELS_DIR=str(models),
    )
    assert result.returncode == 0, result.stderr
    assert "models: done" in result.stderr
    assert (models / "tiny" / "model.safetensors").read_bytes() == files["model.safetensors"]
    log = boot_log(tmp_path)
    assert "installed model tiny" in log
    assert log.index("models: done") < log.index("serve skipped")
    broken = run_hook(
        tmp_path,
        AUTO_INFER_VLLM_MODEL_BUNDLES=str(tmp_path / "nope.model.tar"),
        AUTO_INFER_VLLM_MODELS_DIR=str(models),
    )
    assert "FAILED: installing the model bundles" in broken.stderr
    assert (models / "tiny" / "config.json").exists(), "the installed model is untouched"


def test_helpers_explain_their_usage(tmp_path):
    result = subprocess.run(
        [str(REPO / "container/vllm/install-vllm-offline.sh")],
        env=hook_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no bundle: pass its path, or set AUTO_INFER_VLLM_BUNDLE_PATH" in result.stderr
    result = subprocess.run(
        [str(REPO / "container/vllm/check-and-run-vllm.sh"), "--bogus"],
        env=hook_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "unknown option --bogus" in result.stderr


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


def test_hook_installs_a_bundle_offline_and_again_is_a_no_op(tmp_path, kit):
    bundle = make_bundle(tmp_path / "b", kit)
    env = {
        "AUTO_INFER_VLLM_BUNDLE_ON_BOOT": "1",
        "AUTO_INFER_VLLM_BUNDLE_PATH": str(bundle),
        "PIXI_CACHE_DIR": str(tmp_path / "rattler"),
        "PIPELINE_PROJECT": str(tmp_path / "no-template"),
    }
    result = run_hook(tmp_path, timeout=300, **env)
    assert result.returncode == 0, result.stderr
    assert "install: done" in result.stderr
    project = tmp_path / "workspace" / "vllm-pixi-offline"
    tool = project / ".pixi" / "envs" / "default" / "bin" / "tinytool"
    assert subprocess.run([str(tool)], capture_output=True, text=True).stdout.startswith(
        "tinytool 1.0"
    )
    again = run_hook(tmp_path, timeout=120, **env)
    assert again.returncode == 0 and "install: done" in again.stderr
    assert "up to date" in boot_log(tmp_path).split("install-vllm-offline.sh")[-1]


@pytest.mark.slow
def test_hook_installs_then_serves_the_cpu_tiny_model(tmp_path, kit, tiny_model):
    """The whole boot: install a bundle, serve one CPU tiny-model instance in the
    background, write the clients env file; then stop it."""
    bundle = make_bundle(tmp_path / "b", kit)
    port = free_port()
    overrides = tiny_overrides(
        load_settings(),
        model=tiny_model,
        log_dir=tmp_path / "vllm-logs",
        ports={"tiny-a": port},
        disabled=["tiny-b"],
    )
    env = {
        "AUTO_INFER_VLLM_BUNDLE_ON_BOOT": "1",
        "AUTO_INFER_VLLM_BUNDLE_PATH": str(bundle),
        "AUTO_INFER_VLLM_ON_BOOT": "true",
        "AUTO_INFER_VLLM_CONFIG": str(REPO / "model-configs" / "vllm-cpu-tiny.toml"),
        "AUTO_INFER_VLLM_OVERRIDES": json.dumps(overrides),
        "VLLM_API_KEY_TINY": "hook-key",
        "AUTO_INFER_VLLM_STRICT": "1",
        "PIXI_CACHE_DIR": str(tmp_path / "rattler"),
        "PIPELINE_PROJECT": str(tmp_path / "no-template"),
    }
    state = tmp_path / "workspace" / ".pipeline-state"
    try:
        result = run_hook(tmp_path, timeout=600, **env)
        assert result.returncode == 0, result.stderr + boot_log(tmp_path)
        assert "install: done" in result.stderr and "serve: done" in result.stderr
        clients = (tmp_path / "workspace" / ".auto-infer-vllm" / "clients.env").read_text()
        assert f"AUTO_INFER_LITELLM_BACKEND_BASE=http://127.0.0.1:{port}/v1" in clients
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer hook-key"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "tiny-a"
    finally:
        stopped = run_doit(["stop"], {**hook_env(tmp_path), "PIPELINE_STATE_DIR": str(state)})
        kill_recorded_groups(state / "serve")
    assert stopped.returncode == 0, stopped.stderr


def test_every_variable_of_the_container_scripts_is_documented():
    import re

    from pipeline.settings import VARIABLES

    documented = (REPO / "docs" / "container.md").read_text()
    known = {name for var in VARIABLES for name in var.names}
    files = [*SCRIPTS, REPO / "container" / "merged.env", REPO / "container" / "compose.yaml"]
    used: set[str] = set()
    pattern = re.compile(
        r"\b((?:AUTO_INFER|INFER|HOST_PORT|CONTAINER_PORT)_[A-Z0-9_]+|RUN_PORTS)\b"
    )
    for path in files:
        used |= set(pattern.findall(path.read_text()))
    # Written for other services, not read by us.
    used -= {"AUTO_INFER_LITELLM_BACKEND_BASE"}
    missing = sorted(v for v in used - known if f"`{v}`" not in documented)
    assert missing == []
