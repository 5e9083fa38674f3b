"""Run the project's ``verify`` task inside its locked environment, before anything is packed.

:func:`verify` runs the ``verify`` task of ``pixi.toml`` (``[tasks]``, with its ``depends-on``
chain) in the environment exactly as locked:

- **with pixi** (on PATH, in ``$PIXI_HOME/bin`` or ``~/.pixi/bin``): ``pixi run --manifest-path
  <dir>/pixi.toml --environment <env> --frozen verify``. ``--frozen`` installs what the lock
  says and never rewrites ``pixi.lock`` (the file the pack stage depends on);
- **without pixi**: installs the locked conda packages into ``<project>/.pixi/envs/<env>``
  (pixi's own layout, so a later ``pixi run`` finds it) with ``rattler.install`` in a child
  process (the rattler worker, :mod:`pipeline.rattler_worker`, as the container does:
  py-rattler can crash the interpreter at exit after async calls, so the child leaves with
  ``os._exit``; the package cache is ``<Settings.rattler_cache>/pkgs``, as pixi's), installs
  the locked wheels with uv exactly as the container does (:func:`pipeline.wheels.install_wheels`:
  ``--no-deps``, hashes required when the lock has them; from the lock's URLs here, from the
  bundle's files there), then runs each task's command with ``bash -c`` with
  the environment activated: ``PATH=<prefix>/bin:...``, ``CONDA_PREFIX``, the prefix's
  ``etc/conda/activate.d`` scripts sourced (:func:`pipeline.pixi.envs.prefix_runtime`), the task's
  ``env`` and ``cwd``, and pixi's ``PIXI_PROJECT_ROOT`` / ``PIXI_ENVIRONMENT_NAME``.

The environment is the one of this host's platform; verifying a bundle for another platform
is refused (skip verify for such packs, see :mod:`pipeline.tasks.build`).

Every child runs through :func:`pipeline.procs.run_logged`: its own session, its output in a
log file (the end of it kept in memory too), a bounded wait; a child that overruns is killed
as a group. Failures raise
:class:`~pipeline.errors.PipelineError` with one line: the command, the exit code, the last
line of output and the log path.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import LockError, PipelineError
from pipeline.pixi.envs import host_platform, pixi_env_prefix, prefix_runtime
from pipeline.pixi.manifest import MANIFEST_NAME, load_manifest
from pipeline.pixi.tasks import command_text, task_chain
from pipeline.procs import run_logged, run_rattler_worker
from pipeline.rattler_worker import RattlerRequest
from pipeline.settings import process_environ
from pipeline.wheels import WheelSource, install_wheels

LOCK_NAME = "pixi.lock"
VERIFY_TASK = "verify"
DEFAULT_TIMEOUT = 1800.0  # the verify command (importing vLLM and torch is slow)
INSTALL_TIMEOUT = 3600.0  # downloading a CUDA environment is slower still
_SKIP_HINT = "or set PIPELINE_SKIP_VERIFY=1 to pack without verifying"
_HINT = f"full output in the log, {_SKIP_HINT}"


@dataclass(frozen=True)
class VerifyResult:
    """A successful verify: how it ran (``pixi`` or ``prefix``), what, where, how long."""

    via: Literal["pixi", "prefix"]
    environment: str
    platform: str
    commands: tuple[str, ...]
    prefix: Path | None
    seconds: float
    log: Path
    lock_sha256: str

    def summary(self) -> str:
        where = "through pixi" if self.via == "pixi" else f"in {self.prefix}"
        return (
            f"verify passed for environment '{self.environment}' ({self.platform}) {where} "
            f"in {self.seconds:.1f} s; output in {self.log}"
        )


def verify(
    project_dir: Path,
    environment: str,
    *,
    pixi: Path | None,
    cache_dir: Path,
    log_path: Path,
    platform: str | None = None,
    skip_sdists: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    install_timeout: float = INSTALL_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> VerifyResult:
    """Run the ``verify`` task of ``project_dir/pixi.toml`` in ``environment`` (see module).

    ``platform`` is the platform being packed: it must be this host's. ``log_path`` receives
    all output (truncated first). Blocks for the install and the command, each bounded by its
    timeout. Idempotent: a second run reuses the installed environment.

    Raises LockError (manifest, lock, environment or platform problems) and PipelineError
    (no verify task, install or command failure, timeout).
    """
    project_dir = Path(project_dir).absolute()
    manifest_path = project_dir / MANIFEST_NAME
    lock_path = project_dir / LOCK_NAME
    host = host_platform()
    manifest = load_manifest(manifest_path)
    # ``platform`` names a manifest platform, or a lock platform (pixi >= 0.71's ``p1``): the
    # task comes from the manifest platform, the packages from the lock platform it stands for.
    wanted = platform if platform is not None else host
    lock_platform = wanted
    if wanted in manifest.platforms:
        manifest_platform = wanted
    elif platform is not None and lock_path.is_file():
        from pipeline.pixi.lockfile import read_environment

        locked = read_environment(lock_path, environment, platform)
        manifest_platform = manifest.platform_of_lock(
            environment, locked.lock_platform, locked.subdir, locked.virtual_packages
        )
        lock_platform = locked.lock_platform
    else:  # a subdir: the one manifest platform of that subdir, if only one
        same = [p for p in manifest.platforms if manifest.subdir(p) == wanted]
        manifest_platform = same[0] if len(same) == 1 else wanted
    subdir = manifest.subdir(manifest_platform)
    if subdir != host:
        raise PipelineError(
            f"cannot verify the {wanted} environment on this {host} host: verify runs the "
            f"environment here; verify on a {subdir} machine, {_SKIP_HINT}"
        )
    resolved = manifest.resolve(environment, manifest_platform)
    where = f"{manifest_path}: environment '{environment}'"
    chain = task_chain(resolved.tasks, VERIFY_TASK, where, hint=_SKIP_HINT)
    if not lock_path.is_file():
        raise LockError(f"{lock_path} does not exist: run `doit lock` first")
    lock_sha256 = hashlib.sha256(lock_path.read_bytes()).hexdigest()
    base_env = dict(process_environ() if environ is None else environ)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    started = time.monotonic()

    if pixi is not None:
        argv = [
            str(pixi),
            "run",
            "--manifest-path",
            str(manifest_path),
            "--environment",
            environment,
            "--frozen",
            VERIFY_TASK,
        ]
        _run(argv, cwd=project_dir, env=base_env, log_path=log_path, timeout=timeout)
        return VerifyResult(
            via="pixi",
            environment=environment,
            platform=host,
            commands=(shlex.join(argv),),
            prefix=None,
            seconds=time.monotonic() - started,
            log=log_path,
            lock_sha256=lock_sha256,
        )

    prefix = pixi_env_prefix(project_dir, environment)
    install_environment(
        lock_path,
        environment,
        lock_platform,
        prefix,
        cache_dir,
        log_path=log_path,
        skip_sdists=skip_sdists,
        timeout=install_timeout,
        environ=base_env,
    )
    runtime = prefix_runtime(prefix, base_env, f"prefix {prefix}")
    bash = shutil.which("bash", path=base_env.get("PATH")) or "/bin/bash"
    commands: list[str] = []
    for task in chain:
        text = command_text(task)
        if text is None:
            continue
        env = {
            **base_env,
            **runtime.env,
            "PIXI_PROJECT_ROOT": str(project_dir),
            "PIXI_PROJECT_MANIFEST": str(manifest_path),
            "PIXI_ENVIRONMENT_NAME": environment,
            **dict(task.env),
        }
        cwd = project_dir / task.cwd if task.cwd else project_dir
        argv = [*runtime.wrapper, bash, "-c", text]
        _append(log_path, f"$ {text}\n")
        _run(argv, cwd=cwd, env=env, log_path=log_path, timeout=timeout, label=f"`{text}`")
        commands.append(text)
    return VerifyResult(
        via="prefix",
        environment=environment,
        platform=host,
        commands=tuple(commands),
        prefix=prefix,
        seconds=time.monotonic() - started,
        log=log_path,
        lock_sha256=lock_sha256,
    )


def install_environment(
    lock_path: Path,
    environment: str,
    platform: str,
    prefix: Path,
    cache_dir: Path,
    *,
    log_path: Path,
    skip_sdists: bool = False,
    timeout: float = INSTALL_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Install the locked conda packages (the rattler worker, a child process) and wheels
    (uv, as the container does: :func:`pipeline.wheels.install_wheels`) into ``prefix``;
    return the number of conda packages.

    Downloads from the lock's URLs: conda packages into ``cache_dir`` (rattler's package
    cache), wheels through a private uv cache beside ``prefix``, deleted afterwards.
    Idempotent: rattler links only what differs from the prefix, uv keeps wheels installed
    from the same URLs. Raises LockError / PipelineError with one line; the children's
    output goes to ``log_path``.
    """
    from pipeline.build.pack import plan_bundle
    from pipeline.pixi.lockfile import read_environment

    locked = read_environment(lock_path, environment, platform)
    wheels = plan_bundle(locked, skip_sdists=skip_sdists).wheels
    base_env = dict(process_environ() if environ is None else environ)
    # channel_dir None: the lock's own URLs (downloads, on a build host).
    request = RattlerRequest(lock_path, environment, platform, prefix, cache_dir)
    _append(log_path, f"$ rattler install {len(locked.conda)} packages into {prefix}\n")
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        run_rattler_worker(
            request,
            Path(tmp) / "request.json",
            cwd=prefix.parent if prefix.parent.is_dir() else Path(tmp),
            env=base_env,
            log=log_path,
            timeout=timeout,
            label=f"installing environment '{environment}' into {prefix}",
            hint=_HINT,
        )
    if wheels:
        python = prefix / "bin" / "python"
        if not python.exists():
            raise PipelineError(
                f"environment '{environment}' in {lock_path} has PyPI packages but no "
                f"python in {prefix}; add python to the conda dependencies and re-lock"
            )
        _append(log_path, f"$ uv pip install {len(wheels)} wheels into {prefix}\n")
        # uv's cache beside the prefix (its file system: hardlinks, as in the container).
        with tempfile.TemporaryDirectory(prefix=".verify-wheels-", dir=prefix.parent) as tmp:
            install_wheels(
                python,
                [WheelSource(w.name, w.url, w.sha256) for w in wheels],
                scratch=Path(tmp),
                cwd=Path(tmp),
                env=base_env,
                log=log_path,
                timeout=timeout,
                label=f"installing {len(wheels)} wheels into {prefix}",
                hint=_HINT,
            )
    return len(locked.conda)


def log_tail(log_path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of ``log_path`` ('' when unreadable)."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---- running children ----------------------------------------------------------------------


def _append(log_path: Path, text: str) -> None:
    with log_path.open("a", encoding="utf-8") as log:
        log.write(text)


def _run(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    timeout: float,
    label: str | None = None,
) -> None:
    """:func:`pipeline.procs.run_logged`, with verify's hint for skipping it."""
    run_logged(
        argv,
        cwd=cwd,
        env=env,
        log=log_path,
        timeout=timeout,
        label=label or f"`{shlex.join(argv)}`",
        hint=_HINT,
    )
