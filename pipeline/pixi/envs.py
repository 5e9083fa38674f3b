"""Which environment runs a command: a pixi project, a conda prefix or venv, or plain PATH;
and this host's conda platform (:func:`host_platform`).

:func:`resolve_runtime` looks at the file system once (does the prefix exist, is pixi on PATH)
and returns a :class:`Runtime`: a frozen description the planners use to build argv and
environment without touching anything themselves.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError

# Sourced before exec when a conda prefix has activation scripts (conda-forge's CUDA and
# compiler packages set variables there). `exec` keeps the process tree flat: the shell is
# replaced by the command, so signals reach it directly.
_ACTIVATE_AND_EXEC = (
    'for f in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do [ -r "$f" ] && . "$f"; done; exec "$@"'
)


@dataclass(frozen=True)
class Runtime:
    """How to run ``python`` (and so vLLM) in the chosen environment."""

    kind: Literal["pixi", "prefix", "path"]
    description: str
    python: str
    wrapper: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    prefix: Path | None = None

    def command(self, *args: str) -> tuple[str, ...]:
        """argv running ``python *args`` in this environment."""
        return (*self.wrapper, self.python, *args)


def host_platform() -> str:
    """This machine's conda platform (``linux-64``, ``linux-aarch64``...), as rattler names it.

    Both sides need it (verify on the build host, extract and the host checks in the
    container); py-rattler is imported on first use only.
    """
    from rattler import Subdir

    return str(Subdir.current())


def pixi_env_prefix(project_dir: Path, environment: str) -> Path:
    """Where pixi (and our frozen install) puts an environment: ``.pixi/envs/<env>``."""
    return project_dir / ".pixi" / "envs" / environment


def prefix_runtime(prefix: Path, environ: Mapping[str, str], description: str) -> Runtime:
    """Run from a conda prefix or venv, activated directly (PATH first, activation scripts)."""
    bin_dir = prefix / "bin"
    env = {"PATH": f"{bin_dir}:{environ.get('PATH', '/usr/bin:/bin')}"}
    if (prefix / "pyvenv.cfg").is_file() and not (prefix / "conda-meta").is_dir():
        env["VIRTUAL_ENV"] = str(prefix)
    else:
        env["CONDA_PREFIX"] = str(prefix)
        env["CONDA_DEFAULT_ENV"] = prefix.name
    wrapper: tuple[str, ...] = ()
    activate_d = prefix / "etc" / "conda" / "activate.d"
    if activate_d.is_dir() and any(activate_d.glob("*.sh")):
        env["CONDA_PREFIX"] = str(prefix)
        wrapper = ("/bin/bash", "-c", _ACTIVATE_AND_EXEC, "infer-vllm-activate")
    return Runtime(
        kind="prefix",
        description=description,
        python=str(bin_dir / "python"),
        wrapper=wrapper,
        env=env,
        prefix=prefix,
    )


def resolve_runtime(
    *,
    launcher: str,
    env_prefix: Path | None,
    project_dir: Path,
    environment: str,
    environ: Mapping[str, str],
    source: str = "<config>",
    check: bool = True,
) -> Runtime:
    """Pick the environment that runs vLLM, as ``master.launcher`` says.

    ``auto``: ``env_prefix`` when set; else the pixi project when its environment is installed
    (through ``pixi run`` when pixi is on PATH, else the prefix activated directly); else
    ``python`` from PATH. Raises ConfigError when the chosen environment does not exist,
    unless ``check`` is False (``doit plan`` on a machine that is not the target).
    """
    path = environ.get("PATH", "")
    pixi = shutil.which("pixi", path=path)
    manifest = project_dir / "pixi.toml"
    prefix = pixi_env_prefix(project_dir, environment)

    if launcher == "prefix" or (launcher == "auto" and env_prefix is not None):
        chosen = env_prefix or prefix
        key = "master.env_prefix" if env_prefix is not None else "master.pixi_project_dir"
        if check and not (chosen / "bin" / "python").exists():
            raise ConfigError(
                f"{source}: {key}: no environment at {chosen} (no bin/python); "
                "run `doit install` or point it at a conda prefix or venv"
            )
        return prefix_runtime(chosen, environ, f"prefix {chosen}")

    if launcher == "pixi" or (launcher == "auto" and manifest.is_file()):
        if pixi is not None and manifest.is_file():
            return Runtime(
                kind="pixi",
                description=f"pixi run --manifest-path {manifest} -e {environment}",
                python="python",
                wrapper=(
                    pixi,
                    "run",
                    "--manifest-path",
                    str(manifest),
                    "--environment",
                    environment,
                    "--frozen",
                ),
            )
        if (prefix / "bin" / "python").exists() or not check:
            return prefix_runtime(
                prefix, environ, f"pixi project {project_dir} (env {environment}) at {prefix}"
            )
        if launcher == "pixi" or manifest.is_file():
            raise ConfigError(
                f"{source}: master.pixi_project_dir: environment {environment!r} is not "
                f"installed at {prefix} and pixi is not on PATH; run `doit install`"
            )

    python = shutil.which("python3", path=path) or shutil.which("python", path=path)
    if python is None and not check:
        python = "python3"
    if python is None:
        raise ConfigError(
            f"{source}: master.launcher: no installed pixi environment at {prefix}, no "
            "master.env_prefix, and no python on PATH; run `doit install` or set env_prefix"
        )
    return Runtime(kind="path", description=f"python on PATH ({python})", python=python)
