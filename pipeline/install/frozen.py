"""Install exactly the locked environment from the extracted bundle: the ``frozen-install`` stage.

:func:`frozen_install` works on a project that ``extract`` and ``patch-channels`` prepared
(:mod:`pipeline.install.extract`, :mod:`pipeline.install.patch`) and never touches the network:

1. **Up to date?** ``.pixi/envs/<env>/.installed-from.json`` names the bundle sha256, lock
   sha256, environment and platform of the installed generation: when they are the current
   extraction's, there is nothing to do (a few small reads).
2. **Preflight** (:mod:`pipeline.install.host`): the virtual packages the locked packages
   depend on (``__glibc``, ``__cuda``, ``__linux``...) against this host; a clear error, or a
   warning when a CUDA environment is installed on a host without a GPU driver.
3. **Hashes**: every package file and wheel against the lock's sha256 (rattler does not check
   ``file://`` packages). A file whose :class:`~pipeline.fsutil.Fingerprint` (size, mtime,
   inode, ctime) is still what the extraction recorded keeps the sha256 computed from the
   verified tar; any other file is hashed again.
4. **Install** into a NEW generation dir ``.pixi/envs/.<env>.<sha12>.<random>``: the locked
   records, pointed at the local channel, with ``rattler.install`` in a child process
   (:mod:`pipeline.rattler_worker`: py-rattler can crash the interpreter at exit after its
   async calls, so the child leaves with ``os._exit``); the package cache is
   ``<rattler cache>/pkgs`` (pixi's); then the locked wheels with ``uv pip install --offline
   --no-index --no-deps`` (exactly those files; hardlinked from a private uv cache that is
   deleted right after: :func:`pipeline.wheels.install_wheels`, which the build host's verify
   runs too), each then marked ``INSTALLER`` = ``uv-pixi``
   as pixi's own installer writes it, so that a later ``pixi run`` or ``pixi install`` there
   keeps them instead of reinstalling them (:func:`mark_wheels_as_pixis` cites pixi's source).
4b. **Policy** (:mod:`pipeline.install.policy`): a ``.pth`` startup hook that runs code
   (``import`` lines) is refused unless its package is allowed (``AUTO_INFER_VLLM_ALLOW_PTH``,
   plus a reviewed default list); conda packages with link scripts are reported (never run).
   Before the verify: nothing has run Python in the generation yet.
5. **Activation script** ``<project>/activate-<env>.sh`` (source it: PATH, CONDA_PREFIX and the
   packages' ``etc/conda/activate.d`` scripts); it names the stable ``.pixi/envs/<env>`` path.
6. **Runtime verify** inside the new generation (:mod:`pipeline.install.verify`):
   ``AUTO_INFER_VLLM_VERIFY`` when set (``none`` skips it), else the project's ``verify`` task
   with its ``depends-on`` chain, else nothing; then the built-in import check of ``torch``
   and ``vllm`` when the lock holds them, whose versions go into ``.installed-from.json``
   and the summary line (skipped when the verify task imported them already).
7. **Switch**: ``.installed-from.json`` is written into the generation, then the symlink
   ``.pixi/envs/<env>`` is pointed at it by one atomic ``rename(2)``. The generation it
   replaced is kept until the next install (a server still running from it keeps its files;
   a rollback is one ``ln -sfn``); older ones and crash leftovers are removed.

A failure or a SIGKILL at any step before the switch leaves ``.pixi/envs/<env>`` as it was
(the half-built generation is removed by the next run); a failure (a SIGKILL cannot) also puts
back the project files that environment was installed from (``pixi.toml``, ``pixi.lock``,
``channel/``: :func:`pipeline.install.extract.previous_extraction_guard`). Nothing after the
switch can leave the environment unusable. The whole stage holds the project's install
lock, so two installs at once run one after the other. Errors are
:class:`~pipeline.errors.InstallError` (or BundleError for bundle content), one line each; the
children's output is in ``.infer-vllm/install-<env>.log``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shlex
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline import __version__, reporting
from pipeline.bundle.contents import check_lock_against_channel, read_repodata
from pipeline.errors import InstallError, LockError
from pipeline.fsutil import (
    BackgroundRemoval,
    atomic_write_text,
    fsync_dir,
    os_errors_as,
    sha256_file,
)
from pipeline.install.extract import previous_extraction_guard
from pipeline.install.host import HostFacts, check_virtual_packages, detect_host
from pipeline.install.layout import (
    INSTALLED_FROM,
    ExtractRecord,
    InstalledHost,
    InstallRecord,
    ProjectPaths,
    install_lock,
    read_extract_record,
    read_install_record,
    write_install_record,
)
from pipeline.install.patch import patch_is_current
from pipeline.install.policy import check_startup_hooks, link_scripts
from pipeline.install.verify import PROBE_PREFIX, VERIFY_TIMEOUT, runtime_verify
from pipeline.pixi.lockfile import LockedEnvironment
from pipeline.procs import run_rattler_worker
from pipeline.rattler_worker import RattlerRequest
from pipeline.settings import process_environ
from pipeline.timing import PhaseClock, PhaseTime
from pipeline.timing import table as timing_table
from pipeline.wheels import UV_CACHE_PREFIX, WheelSource, install_wheels

INSTALL_TIMEOUT = 3600.0  # linking a CUDA environment of several GB
REQUEST_PREFIX = "install-request-"  # .infer-vllm/install-request-*.json: the worker's input


@dataclass(frozen=True)
class InstallResult:
    """What :func:`frozen_install` did (``installed`` False: the environment was current)."""

    environment: str
    prefix: Path
    generation: Path | None
    installed: bool
    reason: str
    conda_packages: int = 0
    pypi_packages: int = 0
    rehashed: int = 0
    seconds: float = 0.0
    verify_output: str | None = None
    versions: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = field(default=())
    phases: tuple[PhaseTime, ...] = ()

    def summary(self) -> str:
        if not self.installed:
            return f"environment '{self.environment}' at {self.prefix} is current ({self.reason})"
        checked = f"; verify: {self.verify_output}" if self.verify_output else ""
        if self.versions:
            checked += "; imports: " + ", ".join(f"{m} {v}" for m, v in self.versions)
        return (
            f"installed environment '{self.environment}' ({self.conda_packages} conda "
            f"packages, {self.pypi_packages} wheels) at {self.prefix} -> "
            f"{self.generation.name if self.generation else '?'} in {self.seconds:.1f} s"
            f"{checked}"
        )


# ---- is it current? ---------------------------------------------------------------------------


def installed_record(project_dir: Path, environment: str) -> InstallRecord | None:
    """The ``.installed-from.json`` of the environment's current generation, or None."""
    return read_install_record(ProjectPaths.of(project_dir).installed_from(environment))


def install_is_current(project_dir: Path, environment: str) -> bool:
    """True when ``.pixi/envs/<env>`` is a complete install of the current extraction (same
    bundle sha256, lock sha256, environment and platform). Small reads only; never raises.
    The doit ``uptodate`` check of ``frozen-install``."""
    paths = ProjectPaths.of(project_dir)
    record = read_extract_record(paths)
    return record is not None and _current_reason(paths, environment, record) is None


def _current_reason(paths: ProjectPaths, environment: str, record: ExtractRecord) -> str | None:
    installed = read_install_record(paths.installed_from(environment))
    if installed is None:
        return "not installed yet"
    want = {
        "bundle_sha256": (installed.bundle_sha256, record.sha256),
        "lock_sha256": (installed.lock_sha256, record.lock_sha256),
        "environment": (installed.environment, environment),
        "platform": (installed.platform, record.platform),
    }
    for key, (have, wanted) in want.items():
        if have != wanted:
            return f"{key.replace('_', ' ')} changed"
    if not (paths.env_link(environment) / "conda-meta").is_dir():
        return "the installed environment is damaged"
    return None


# ---- the stage ----------------------------------------------------------------------------------


def frozen_install(
    project_dir: Path,
    environment: str,
    *,
    cache_dir: Path,
    verify_command: str | None = None,
    override_cuda: str | None = None,
    override_glibc: str | None = None,
    facts: HostFacts | None = None,
    environ: Mapping[str, str] | None = None,
    say: Callable[[str], None] | None = None,
    timeout: float = INSTALL_TIMEOUT,
    verify_timeout: float = VERIFY_TIMEOUT,
    clock: PhaseClock | None = None,
    allow_pth: Iterable[str] = (),
) -> InstallResult:
    """Install ``environment`` of the extracted, patched project (see the module docstring).
    ``allow_pth``: packages whose ``.pth`` startup hooks are allowed beyond the reviewed
    defaults (:mod:`pipeline.install.policy`).

    ``cache_dir`` is rattler's package cache (``<rattler cache>/pkgs``); ``verify_command`` is
    ``AUTO_INFER_VLLM_VERIFY``; ``override_cuda`` / ``override_glibc`` are the
    ``CONDA_OVERRIDE_*`` settings, and ``facts`` replaces host detection altogether (tests).
    ``clock`` gets each step's wall and CPU time, after the phases of the stages before it in
    this run (extract, patch-channels); all of them go into the install record, and a table
    into the install log. Idempotent: the same extraction and environment again returns at
    once. Blocks on the
    install lock, then on the children (each bounded by ``timeout`` / ``verify_timeout``).
    Raises InstallError or BundleError; the previous environment is then untouched.
    """
    say = say or reporting.say
    clock = clock or PhaseClock()
    paths = ProjectPaths.of(project_dir)
    base_env = dict(process_environ() if environ is None else environ)
    started = time.monotonic()
    warnings: list[str] = []
    with (
        install_lock(paths, say=say),
        previous_extraction_guard(paths, environment, say=say),
        os_errors_as(InstallError, f"cannot install environment '{environment}' in {paths.root}"),
    ):
        record = read_extract_record(paths)
        if record is None:
            raise InstallError(
                f"{paths.root} holds no finished extraction; run `doit install` (extract and "
                "patch-channels come first)"
            )
        if not patch_is_current(paths.root, environment):
            raise InstallError(
                f"{paths.root}: pixi.toml/pixi.lock are not patched for this extraction and "
                f"environment '{environment}'; run `doit install` (patch-channels comes first)"
            )
        link = paths.env_link(environment)
        _remove_crash_leftovers(paths, environment, keep=_link_target(link))
        # 1. up to date?
        reason = _current_reason(paths, environment, record)
        if reason is None:
            return InstallResult(environment, link, _link_target(link), False, "nothing changed")
        clock.begin()
        platform = record.platform
        locked = _locked(paths, environment, platform)

        # 2. preflight: what the host must offer
        host = facts or detect_host(
            override_cuda=override_cuda, override_glibc=override_glibc, environ=base_env
        )
        needs = [
            (pkg.name, dep)
            for pkg in locked.conda
            for dep in pkg.repodata.get("depends", [])
            if isinstance(dep, str) and dep.startswith("__")
        ]
        preflight = check_virtual_packages(needs, host, where=f"environment '{environment}'")
        for message in preflight.warnings:
            warnings.append(message)
            say(f"warning: {message}")
        if preflight.errors:
            raise InstallError(
                f"environment '{environment}' cannot run on this host: "
                f"{'; '.join(preflight.errors)}"
            )

        clock.lap("preflight")
        # 3. hashes: every file against the lock
        files = record.files
        rehashed: list[str] = []

        def file_sha256(rel: str) -> str | None:
            path = paths.root / rel
            try:
                st = path.lstat()
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            facts_ = files.get(rel)
            if facts_ is not None and facts_.matches(st):
                return facts_.sha256
            rehashed.append(rel)
            return sha256_file(path)

        check_lock_against_channel(
            paths.lock,
            environment,
            platform,
            read_repodata(paths.channel),
            file_sha256,
            lock_label=str(paths.lock),
            skipped_sdists=record.skipped_sdists,
        )
        if rehashed:
            say(f"re-hashed {len(rehashed)} files changed since the extraction; all match")
        clock.lap("package hashes")

        # 4. install into a new generation, built at its final path
        _remove_generations(paths, environment, keep=(_link_target(link),))
        generation = paths.envs / (
            f"{paths.generation_prefix(environment)}{record.sha256[:12]}.{uuid.uuid4().hex[:6]}"
        )
        log = paths.install_log(environment)
        log.write_bytes(b"")
        # uv's cache (hard links to the installed files) is removed on a thread while the
        # marking, the verify and the switch go on; the block waits for it before it ends.
        with BackgroundRemoval() as garbage:
            try:
                say(f"installing {len(locked.conda)} conda packages into {generation}")
                _install_conda(paths, locked, generation, cache_dir, log, base_env, timeout)
                clock.lap("conda link")
                wheels = [w for w in locked.pypi if w.is_wheel]
                if wheels:
                    say(f"installing {len(wheels)} wheels")
                    _install_wheels(
                        paths, environment, wheels, generation, log, base_env, timeout, garbage
                    )
                    clock.lap("wheel install")
                    files = [paths.pypi / w.filename for w in wheels]
                    marked = mark_wheels_as_pixis(generation, files)
                    clock.lap("wheel marking")
                    if len(marked) != len(wheels):
                        say(
                            f"warning: {len(wheels) - len(marked)} of {len(wheels)} wheels have no "
                            f"direct_url.json naming their file under {paths.pypi}; a `pixi run` "
                            "there would reinstall them"
                        )
                # 4b. the install policy, before anything runs Python in the generation
                check_startup_hooks(generation, allow_pth)
                scripts = link_scripts(generation)
                if scripts:
                    say(
                        f"note: {len(scripts)} conda package scripts were not run (this install "
                        "never runs pre-link, post-link or pre-unlink scripts): "
                        + ", ".join(f"{name} ({kind})" for name, kind in scripts)
                    )
                clock.lap("policy")
                # 5. the activation script; 6. the runtime verify, inside the new generation
                write_activation_script(paths, environment)
                verify = runtime_verify(
                    paths,
                    locked,
                    generation,
                    configured=verify_command,
                    log=log,
                    base_env=base_env,
                    timeout=verify_timeout,
                    say=say,
                )
                clock.lap("verify")
                # 7. the switch, first half: the record goes into the generation
                write_install_record(
                    generation,
                    InstallRecord(
                        bundle=record.bundle.path,
                        bundle_sha256=record.sha256,
                        lock_sha256=record.lock_sha256,
                        environment=environment,
                        platform=platform,
                        source=record.source,
                        tool_version=__version__,
                        conda_packages=len(locked.conda),
                        pypi_packages=len(wheels),
                        prefix=str(generation),
                        installed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        seconds=round(time.monotonic() - started, 2),
                        verify=verify,
                        host=InstalledHost(
                            glibc=host.glibc, cuda=host.cuda, cuda_source=host.cuda_source
                        ),
                        warnings=tuple(warnings),
                        # Up to the verify: the record is written before the switch it precedes.
                        phases=clock.phases,
                    ),
                )
                fsync_dir(generation)
            except BaseException:
                shutil.rmtree(generation, ignore_errors=True)
                raise

            # 7. the switch, second half: one rename, then the garbage. The generation the link
            # pointed at until now is kept until the next install: a server started from it keeps
            # its files.
            previous = _link_target(link)
            switch_link(link, generation)
            _remove_generations(paths, environment, keep=(generation, previous))
            clock.lap("record + switch")
        clock.lap("cache removal wait")
        _log_phases(log, clock.phases)
        return InstallResult(
            environment=environment,
            prefix=link,
            generation=generation,
            installed=True,
            reason=reason,
            conda_packages=len(locked.conda),
            pypi_packages=len(wheels),
            rehashed=len(rehashed),
            seconds=time.monotonic() - started,
            verify_output=verify.output if verify and verify.commands else None,
            versions=verify.versions if verify else (),
            warnings=tuple(warnings),
            phases=clock.phases,
        )


def _log_phases(log: Path, phases: Sequence[PhaseTime]) -> None:
    """Append the run's phase table to the install log (a log that cannot be written is
    not worth failing an install that is switched in already)."""
    try:
        with log.open("a", encoding="utf-8") as fh:
            fh.write("\n# phases of this `doit install` run\n" + timing_table(phases))
    except OSError:
        pass


def switch_link(link: Path, generation: Path) -> None:
    """Point ``link`` (``.pixi/envs/<env>``) at ``generation`` (a sibling dir) atomically.

    A relative symlink is created beside it and renamed over it (``rename(2)`` replaces a
    symlink atomically). A real directory there (an environment pixi made, or an older
    layout) is first renamed aside as a generation, to be removed afterwards: that one step is
    not atomic, but the new environment is complete by then.
    """
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    tmp.symlink_to(generation.name)
    try:
        if link.is_dir() and not link.is_symlink():
            link.rename(link.with_name(f".{link.name}.replaced-{uuid.uuid4().hex[:6]}"))
        tmp.replace(link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def write_activation_script(paths: ProjectPaths, environment: str) -> Path:
    """Write ``<project>/activate-<env>.sh`` (atomic) and return its path. Its content names
    only the stable ``.pixi/envs/<env>`` path, so it stays valid across installs."""
    prefix = paths.env_link(environment)
    q = shlex.quote
    text = "\n".join(
        [
            f"# Activate environment '{environment}' of {paths.root} (written by `doit install`).",
            f"# Use it with: . {q(str(paths.activation_script(environment)))}",
            f"export CONDA_PREFIX={q(str(prefix))}",
            f"export CONDA_DEFAULT_ENV={q(environment)}",
            f"export PIXI_PROJECT_ROOT={q(str(paths.root))}",
            f"export PIXI_PROJECT_MANIFEST={q(str(paths.manifest))}",
            f"export PIXI_ENVIRONMENT_NAME={q(environment)}",
            'export PATH="$CONDA_PREFIX/bin${PATH:+:$PATH}"',
            'for __infer_vllm_f in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do',
            '    [ -r "$__infer_vllm_f" ] && . "$__infer_vllm_f"',
            "done",
            "unset __infer_vllm_f",
            "",
        ]
    )
    path = paths.activation_script(environment)
    atomic_write_text(path, text)
    return path


# ---- steps --------------------------------------------------------------------------------------


def _locked(paths: ProjectPaths, environment: str, platform: str) -> LockedEnvironment:
    from pipeline.pixi.lockfile import read_environment

    try:
        return read_environment(paths.lock, environment, platform)
    except LockError as exc:
        raise InstallError(f"cannot install from {paths.lock}: {exc.message}") from None


def _link_target(link: Path) -> Path | None:
    try:
        target = link.readlink()
    except OSError:
        return link if link.is_dir() else None
    return target if target.is_absolute() else link.parent / target


def _remove_generations(
    paths: ProjectPaths, environment: str, *, keep: tuple[Path | None, ...]
) -> None:
    """Remove every generation of ``environment`` but those in ``keep`` (and temp links)."""
    if not paths.envs.is_dir():
        return
    prefix = paths.generation_prefix(environment)
    keep_names = {k.name for k in keep if k is not None}
    for entry in paths.envs.iterdir():
        if not entry.name.startswith(prefix) or entry.name in keep_names:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    link_prefix = f".{environment}.link-"
    for entry in paths.envs.glob(f"{link_prefix}*"):
        entry.unlink(missing_ok=True)


def _remove_crash_leftovers(paths: ProjectPaths, environment: str, *, keep: Path | None) -> None:
    """What a SIGKILLed install (it cannot clean up) left: worker request files, uv caches and
    generations never finished (no ``.installed-from.json``: it is written last, before the
    switch). We hold the install lock, so no other install is using them. Finished
    generations stay: the one replaced last is kept for servers still running from it."""
    if paths.state.is_dir():
        for request in paths.state.glob(f"{REQUEST_PREFIX}*.json"):
            request.unlink(missing_ok=True)
        for leftover in (
            *paths.state.glob(f"{UV_CACHE_PREFIX}*"),
            *paths.state.glob(f"{PROBE_PREFIX}*"),
        ):
            shutil.rmtree(leftover, ignore_errors=True)
    if not paths.envs.is_dir():
        return
    # Only the names frozen_install gives its generations: a pixi-made environment renamed
    # aside by switch_link (``.<env>.replaced-*``) may still be serving.
    built = re.compile(
        rf"{re.escape(paths.generation_prefix(environment))}[0-9a-f]{{12}}\.[0-9a-f]{{6}}"
    )
    for entry in paths.envs.iterdir():
        if not built.fullmatch(entry.name) or (keep is not None and entry.name == keep.name):
            continue
        if entry.is_dir() and not entry.is_symlink() and not (entry / INSTALLED_FROM).exists():
            shutil.rmtree(entry, ignore_errors=True)


def _install_conda(
    paths: ProjectPaths,
    locked: LockedEnvironment,
    generation: Path,
    cache_dir: Path,
    log: Path,
    base_env: Mapping[str, str],
    timeout: float,
) -> None:
    request = RattlerRequest(
        lock=paths.lock,
        environment=locked.environment,
        platform=locked.platform,
        prefix=generation,
        cache_dir=cache_dir,
        channel_dir=paths.channel,
    )
    run_rattler_worker(
        request,
        paths.state / f"{REQUEST_PREFIX}{uuid.uuid4().hex[:8]}.json",
        error=InstallError,
        cwd=paths.state,
        env=base_env,
        log=log,
        timeout=timeout,
        label=f"installing {len(locked.conda)} conda packages into {generation}",
    )


def _install_wheels(
    paths: ProjectPaths,
    environment: str,
    wheels: Sequence[Any],
    generation: Path,
    log: Path,
    base_env: Mapping[str, str],
    timeout: float,
    garbage: BackgroundRemoval,
) -> None:
    """The locked wheel files (and nothing else) into ``generation``, offline
    (:func:`pipeline.wheels.install_wheels`; uv's private cache in ``<project>/.infer-vllm``,
    the environment's file system, handed to ``garbage`` once uv is done). Blocks up to
    ``timeout``; InstallError on failure."""
    python = generation / "bin" / "python"
    if not python.exists():
        raise InstallError(
            f"environment '{environment}' has PyPI packages but no python in {generation}; add "
            "python to the conda dependencies and lock again"
        )
    install_wheels(
        python,
        [WheelSource(w.name, str(paths.pypi / w.filename)) for w in wheels],
        scratch=paths.state,
        error=InstallError,
        cwd=paths.root,
        env=base_env,
        log=log,
        timeout=timeout,
        label=f"installing {len(wheels)} wheels into {generation}",
        remove_cache=garbage.remove,
    )


# What pixi's own uv installer writes into a wheel's ``INSTALLER`` (and the only value for
# which it keeps an installed wheel). prefix-dev/pixi at 2b25fc76dd3b5cc50a235387d948474975c40d73:
# crates/pixi_consts/src/consts.rs `PIXI_UV_INSTALLER = "uv-pixi"`, given to uv by
# crates/pixi_install_pypi/src/lib.rs `.with_installer_name(Some(PIXI_UV_INSTALLER))`, so uv
# writes it exactly as it writes its own "uv": the bare name, no newline (that same lib.rs
# compares the file's length with the constant's), with its RECORD line.
PIXI_UV_INSTALLER = "uv-pixi"


def mark_wheels_as_pixis(prefix: Path, wheel_files: Sequence[Path]) -> list[str]:
    """Mark the wheels installed from ``wheel_files`` in ``prefix`` as pixi's own: their
    ``INSTALLER`` becomes ``uv-pixi`` and its RECORD line is rewritten to match. Returns the
    ``.dist-info`` names changed. Idempotent; touches only dists whose ``direct_url.json``
    names one of ``wheel_files`` (what ``uv pip install <file>`` records).

    Why: without ``conda-meta/pixi`` (a lock hash tied to pixi's version, which we do not
    forge), a ``pixi run`` or ``pixi install`` in this project updates the prefix first. Its
    planner (crates/pixi_install_pypi/src/plan/planner.rs, same commit) reinstalls every locked
    wheel whose installer is not ``uv-pixi``; for ``uv-pixi`` ones it asks ``need_reinstall``
    (plan/validation.rs): an archive install is kept when its direct_url.json URL equals the
    lock's location (patch-channels writes the same absolute ``pypi/<wheel>`` path that uv was
    given) and the wheel file is not newer than the installed METADATA (utils.rs
    ``check_url_freshness``). Conda packages pixi keeps by their sha256 against the lock.
    """
    wanted = {_file_url_key(p) for p in wheel_files}
    marked: list[str] = []
    for direct_url in sorted(prefix.glob("lib/python*/site-packages/*.dist-info/direct_url.json")):
        try:
            url = json.loads(direct_url.read_text(encoding="utf-8")).get("url", "")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(url, str) or unquote(url) not in wanted:
            continue
        dist_info = direct_url.parent
        data = PIXI_UV_INSTALLER.encode("ascii")
        try:
            (dist_info / "INSTALLER").write_bytes(data)
            _rewrite_record_line(dist_info, "INSTALLER", data)
        except OSError as exc:
            raise InstallError(
                f"cannot mark {dist_info} as installed by pixi ({exc.strerror}); fix the "
                "permissions there and run `doit install` again"
            ) from None
        marked.append(dist_info.name)
    return marked


def _file_url_key(path: Path) -> str:
    return unquote(path.absolute().as_uri())


def _rewrite_record_line(dist_info: Path, name: str, data: bytes) -> None:
    """Give ``<dist-info>/name`` its new hash and size in RECORD (PEP 376/627 rows:
    path, ``sha256=<urlsafe b64, no padding>``, size). Other rows are kept as written."""
    record = dist_info / "RECORD"
    if not record.is_file():
        return
    member = f"{dist_info.name}/{name}"
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rows = list(csv.reader(io.StringIO(record.read_text(encoding="utf-8"))))
    for row in rows:
        if row and row[0] == member:
            row[1:] = [f"sha256={digest}", str(len(data))]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    atomic_write_text(record, out.getvalue())


__all__ = [
    "InstallResult",
    "frozen_install",
    "install_is_current",
    "installed_record",
    "switch_link",
    "write_activation_script",
]
