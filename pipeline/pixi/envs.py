"""Which environment runs a command: a pixi project, a conda prefix or venv, or plain PATH;
and this host's conda platform (:func:`host_platform`).

:func:`resolve_runtime` looks at the file system once (does the prefix exist, is pixi on PATH;
``launcher = "pixi"`` also asks ``pixi --version``) and returns a :class:`Runtime`: a frozen
description the planners use to build argv and environment without touching anything
themselves. ``launcher = "auto"`` never runs pixi (docs/serve-config.md says why).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError, PipelineError
from pipeline.pixi import pixi_env_prefix
from pipeline.pixi.locktext import read_lock_version
from pipeline.procs import query

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


# The oldest pixi that reads each lock-file version, from pixi's CHANGELOG.md (prefix-dev/pixi
# at 2b25fc76dd3b5cc50a235387d948474975c40d73): 0.39.0 "The lockfile format is changed"
# (v6), 0.68.0 "This release bump the lock file version to v7". Versions not listed (v5 and
# older) are read by every pixi that this project can meet.
PIXI_READS_LOCK_FROM: Mapping[int, tuple[int, int, int]] = {6: (0, 39, 0), 7: (0, 68, 0)}
_PIXI_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def pixi_version(pixi: str, timeout: float = 20.0) -> str | None:
    """``pixi --version``'s output (``pixi 0.67.2``), or None when it fails or hangs.

    A question whose output is the answer: :func:`pipeline.procs.query`.
    """
    try:
        return query([pixi, "--version"], timeout=timeout).strip()
    except PipelineError:
        return None


def check_pixi_reads_lock(
    pixi: str,
    lock: Path,
    *,
    source: str,
    version_of: Callable[[str], str | None] = pixi_version,
) -> None:
    """Refuse, in one line, a pixi too old to read ``lock`` (or one that cannot say its
    version). Runs ``pixi --version`` once; a lock without a known version passes."""
    version = read_lock_version(lock)
    needed = PIXI_READS_LOCK_FROM.get(version or 0)
    if needed is None:
        return
    wanted = ".".join(map(str, needed))
    reported = version_of(pixi)
    found = _PIXI_VERSION_RE.search(reported or "")
    if found is None:
        raise ConfigError(
            f"{source}: master.launcher = 'pixi': `{pixi} --version` failed or printed no "
            f"version ({reported!r}); {lock} is lock version {version}, which needs pixi >= "
            f"{wanted}: install it, or use launcher = 'auto'"
        )
    have = tuple(int(part) for part in found.groups())
    if have < needed:
        raise ConfigError(
            f"{source}: master.launcher = 'pixi': {pixi} is pixi {found.group(0)}, which cannot "
            f"read {lock} (lock version {version} needs pixi >= {wanted}); upgrade pixi, or use "
            "launcher = 'auto' (runs the installed environment without pixi)"
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
    explicit_project: bool = False,
    pixi_version_of: Callable[[str], str | None] = pixi_version,
) -> Runtime:
    """Pick the environment that runs vLLM, as ``master.launcher`` says.

    ``auto``: ``env_prefix`` when set; else the pixi project's installed environment
    (``.pixi/envs/<env>``, activated directly: never ``pixi run``, whatever pixi is on PATH,
    see docs/serve-config.md "Why auto never runs pixi"); else, when the project dir is the
    default one (``explicit_project`` False) and holds no project, ``python`` from PATH.
    ``pixi``: ``pixi run --frozen`` in the project, after checking that this pixi reads the
    project's lock version (runs ``pixi --version`` once). Raises ConfigError, one line naming
    the key, when the chosen environment does not exist or pixi cannot be used, unless
    ``check`` is False (``doit plan`` on a machine that is not the target).
    """
    path = environ.get("PATH", "")
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

    if launcher == "pixi":
        pixi = shutil.which("pixi", path=path)
        if check:
            if pixi is None:
                raise ConfigError(
                    f"{source}: master.launcher = 'pixi' but pixi is not on PATH; install "
                    "pixi, or use launcher = 'auto' (runs the installed environment directly)"
                )
            if not manifest.is_file():
                raise ConfigError(
                    f"{source}: master.pixi_project_dir: no pixi.toml in {project_dir}; run "
                    "`doit install` first"
                )
            check_pixi_reads_lock(
                pixi, project_dir / "pixi.lock", source=source, version_of=pixi_version_of
            )
        return Runtime(
            kind="pixi",
            description=f"pixi run --manifest-path {manifest} -e {environment}",
            python="python",
            wrapper=(
                pixi or "pixi",
                "run",
                "--manifest-path",
                str(manifest),
                "--environment",
                environment,
                "--frozen",
            ),
        )

    if launcher == "auto":
        installed = (prefix / "bin" / "python").exists()
        if installed or ((explicit_project or manifest.is_file()) and not check):
            return prefix_runtime(
                prefix, environ, f"pixi project {project_dir} (env {environment}) at {prefix}"
            )
        if explicit_project or manifest.is_file():
            raise ConfigError(
                f"{source}: master.pixi_project_dir: environment {environment!r} is not "
                f"installed at {prefix} (no bin/python); run `doit install` first"
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
