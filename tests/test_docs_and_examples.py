"""The published contract matches the code: schema, reference tables, README variables, and
every example config loads, validates against the schema and plans."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import jsonschema
import pytest

from pipeline import docs
from pipeline.pixi.envs import resolve_runtime
from pipeline.serve.config import json_schema, load_config
from pipeline.serve.plan import build_plan
from pipeline.settings import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "model-configs").glob("*.toml"))


def test_generated_docs_are_current():
    stale = [
        str(path.relative_to(REPO_ROOT))
        for path, content in docs.expected().items()
        if path.read_text(encoding="utf-8") != content
    ]
    assert stale == [], "run: python -m pipeline.docs --write"


def test_there_are_examples_for_each_use():
    names = {p.name for p in EXAMPLES}
    assert {"vllm-qwen2-vl-7b.toml", "vllm-multi-instance.toml", "vllm-cpu-tiny.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_schema(path: Path):
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(document, json_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_plans(path: Path):
    config = load_config(path)
    runtime = resolve_runtime(
        launcher=config.master.launcher,
        env_prefix=config.master.env_prefix,
        project_dir=config.master.pixi_project_dir or Path("/nonexistent"),
        environment=config.master.pixi_environment,
        environ={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    environ = {"VLLM_API_KEY": "k", "VLLM_API_KEY_QWEN": "k"}
    if any(i.cluster is not None for i in config.instances):
        # A multi-node example plans as the leader of a LeaderWorkerSet group.
        environ |= {"LWS_LEADER_ADDRESS": "big-0.big", "LWS_WORKER_INDEX": "0"}
    plan = build_plan(config, runtime, environ)
    assert plan.instances, "an example starts at least one instance"
    for inst in plan.instances:
        # Members of a multi-node instance start through vLLM's CLI (`vllm serve`).
        entry = "vllm.entrypoints.cli.main" if inst.member else "vllm.entrypoints.openai.api_server"
        assert entry in inst.argv
        assert all("/" not in name for name in inst.model_names), "served names without /"


def test_the_schema_rejects_an_unknown_key():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"instance": {"a": {"server": {"prot": 1}}}}, json_schema())


def test_the_multi_instance_example_plans_parallel_and_tensor_parallel():
    config = load_config(REPO_ROOT / "model-configs" / "vllm-multi-instance.toml")
    runtime = resolve_runtime(
        launcher="path",
        env_prefix=None,
        project_dir=Path("/x"),
        environment="default",
        environ={"PATH": os.environ["PATH"]},
        check=False,
    )
    plan = build_plan(config, runtime, {"VLLM_API_KEY": "k"})
    by_name = {i.name: i for i in plan.instances}
    assert by_name["big"].env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert all(i.start_after is None for i in plan.instances), "disjoint GPUs start at once"
    assert "--enable-auto-tool-choice" in by_name["coder"].argv


def test_the_vllm_pixi_template_is_conda_forge_cuda_12_with_a_verify_task():
    from pipeline.pixi.manifest import load_manifest

    manifest = load_manifest(REPO_ROOT / "vllm-pixi" / "pixi.toml")
    env = manifest.resolve("default", "linux-64")
    assert env.channels == ("conda-forge",)
    assert manifest.platforms_for("default") == ("linux-64",)
    assert "python 3.12.*" in env.match_specs
    assert "cuda-version 12.9.*" in env.match_specs
    assert 'vllm[build="cuda*"]' in env.match_specs
    assert ("__cuda", "12") in {(v.name, v.version) for v in env.virtual_packages}
    assert not env.has_pypi_dependencies
    verify = env.task("verify")
    assert verify is not None and "import torch, vllm" in verify.cmd


def test_the_readme_documents_every_variable_doit_clients_writes_for_other_services():
    # The user asked to see AUTO_INFER_LITELLM_BACKEND_BASE documented; the README had none.
    from pipeline.serve import clients

    config = load_config(REPO_ROOT / "model-configs" / "vllm-gateway.toml")
    runtime = resolve_runtime(
        launcher=config.master.launcher,
        env_prefix=None,
        project_dir=Path("/nonexistent"),
        environment="default",
        environ={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    plan = build_plan(config, runtime, {"VLLM_API_KEY": "k", "GATEWAY_API_KEY": "g"})
    written = dict(
        line.split("=", 1) for line in clients.env_file(plan).splitlines() if "=" in line
    )
    readme = (REPO_ROOT / "README.md").read_text()
    for name, value in written.items():
        assert f"`{name}`" in readme, name
        assert f"{name}={value}" in readme, "the README's example is what the gateway gives"
