"""The real vLLM bundle end to end: packed by `doit pack`, installed by `doit install` in a
network namespace with no interfaces, served by `doit serve` from the installed project, asked
by the OpenAI and Anthropic SDKs, stopped by `doit stop` with no process left.

The model travels too: the tiny model, laid out as the Hugging Face cache lays it out (snapshot
links into ``blobs/``), is packed by `doit pack-model` in parts, installed by the same
`doit install` (both kinds of variables) into a models dir, and served from there by path.

Slow (about two minutes): the pack reuses the cached build project and the warm pack cache of
``scripts/setup-vllm-bundle.sh`` (so nothing is downloaded, which the test checks), but writes
a fresh ~600 MB tar and installs it into a private dir. Loopback only, free ports, private
state; teardown stops every process group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anthropic
import openai
import pytest
from conftest import REPO, doit_env, free_port, kill_recorded_groups, run_doit
from model_factory import cache_model_from

from pipeline.demo import vllm_bundle
from pipeline.demo.cpu_vllm import tiny_overrides
from pipeline.install.frozen import installed_record
from pipeline.procs import group_alive
from pipeline.serve.state import StateStore
from pipeline.settings import load_settings

pytestmark = pytest.mark.slow

KEY = "bundle-key-123"
EXAMPLE = REPO / "model-configs" / "vllm-cpu-tiny.toml"


def test_the_packed_vllm_bundle_installs_offline_and_serves_both_sdks(
    tmp_path: Path, vllm_project: Path, tiny_model: Path
):
    settings = load_settings()
    cache = vllm_bundle.vllm_cache(settings, vllm_bundle.read_pip_settings())
    netns = vllm_bundle.network_namespace_prefix()
    if not netns:
        pytest.fail(
            "needs `unshare -n` (root): the install must run with no network; CI runs as root"
        )

    # build host: pack the cached project into a new tar; the pack cache is warm
    bundle = tmp_path / "bundles" / "vllm-cpu.tar"
    build = vllm_bundle.build_env(settings, cache.project, bundle, cache.build_dir / "build-state")
    packed = run_doit(["pack", "check-cache"], build, timeout=900)
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "0 downloaded" in packed.stderr or "0 downloaded" in packed.stdout
    sha = bundle.with_name(bundle.name + ".sha256").read_text().split()[0]
    assert sha == cache.sha256_file.read_text().split()[0], "same inputs, same bytes"

    # build host: the model, from a Hugging Face cache snapshot, in parts of 1 MiB
    snapshot = cache_model_from(tiny_model, tmp_path / "hf-cache", "tiny-org/tiny-chat")
    model_bundle = tmp_path / "bundles" / "tiny-chat.model.tar"
    model_env = {
        **build,
        "PIPELINE_MODEL_SOURCE": str(snapshot),
        "PIPELINE_MODEL_BUNDLE": str(model_bundle),
        "PIPELINE_PART_SIZE": "1M",
    }
    packed_model = run_doit(["pack-model"], model_env)
    assert packed_model.returncode == 0, packed_model.stderr[-2000:]
    parts = model_bundle.with_name(model_bundle.name + ".parts.json")
    assert len(json.loads(parts.read_text())["parts"]) == 2

    # container: install the environment and the model with no network at all
    project = tmp_path / "container" / "vllm-pixi-offline"
    models = tmp_path / "container" / "models"
    runtime = vllm_bundle.runtime_env(
        bundle, project, tmp_path / "container" / "state", tmp_path / "rattler"
    )
    runtime["AUTO_INFER_VLLM_MODEL_BUNDLES"] = str(parts)
    runtime["AUTO_INFER_VLLM_MODELS_DIR"] = str(models)
    installed = run_doit(["install"], runtime, timeout=900, prefix=netns)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "installed model tiny-chat" in installed.stderr
    served_model = models / "tiny-chat"
    assert (served_model / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()
    record = installed_record(project, "default")
    assert record is not None and record.pypi_packages > 100
    versions = dict(record.verify.versions)
    assert versions["vllm"] == "0.32.0" and versions["torch"].startswith("2.13.0")
    assert "imports: torch 2.13.0+cpu, vllm 0.32.0" in installed.stderr

    # serve from the installed project: no env_prefix, no side venv
    port = free_port()
    overrides = tiny_overrides(
        settings,
        model=served_model,
        log_dir=tmp_path / "logs",
        ports={"tiny-a": port},
        disabled=["tiny-b"],
        tmp_root=Path(os.environ.get("TMPDIR", "/tmp")) / f"vb-{os.getpid()}",
        project=project,
    )
    assert "env_prefix" not in overrides["master"]
    state = tmp_path / "serve-state"
    env = doit_env(
        state,
        AUTO_INFER_VLLM_CONFIG=str(EXAMPLE),
        AUTO_INFER_VLLM_OVERRIDES=json.dumps(overrides),
        VLLM_API_KEY_TINY=KEY,
    )
    store = StateStore(state / "serve")
    try:
        served = run_doit(["serve"], env, timeout=600)
        assert served.returncode == 0, served.stderr[-2000:] + served.stdout[-2000:]
        rec = store.read().instances["tiny-a"]
        argv0 = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert argv0.startswith(str(project / ".pixi" / "envs")), argv0

        base = f"http://127.0.0.1:{port}"
        oa = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, timeout=60)
        reply = oa.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.usage.completion_tokens > 0
        an = anthropic.Anthropic(base_url=base, auth_token=KEY, timeout=60)
        message = an.messages.create(
            model="tiny-a", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.usage.output_tokens > 0
    finally:
        stopped = run_doit(["stop"], env, timeout=120)
        after = store.read()
        kill_recorded_groups(store.root)
    assert stopped.returncode == 0, stopped.stderr
    assert after is not None
    assert not any(r.pgid and group_alive(r.pgid) for r in after.instances.values())
    sup = after.supervisor.pid
    assert not (sup and Path(f"/proc/{sup}").exists() and b"doit" in _cmdline(sup))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
