"""Lock a pixi project: ``pixi lock`` when pixi is available, else a py-rattler solve.

:func:`lock` is what the doit ``lock`` task calls. With a pixi binary it runs
``pixi lock --manifest-path <dir>/pixi.toml`` and nothing else (pixi decides whether the lock
is current). Without one it:

1. parses ``pixi.toml`` (:mod:`pipeline.pixi.manifest`) and turns every (environment, platform)
   into a solve job: channel URLs, match specs, virtual packages (:mod:`pipeline.build.lockplan`);
2. keeps an existing ``pixi.lock`` that already satisfies the manifest
   (:func:`pipeline.build.lockstale.stale_reason` says why it does not) -- the file is not
   touched, not even its mtime;
3. refuses a manifest with source dependencies (conda or PyPI ``path``/``git``/``url``: only
   pixi can lock those);
4. solves in a child process (``python -m pipeline.build.lock --worker REQUEST.json``, run by
   :func:`pipeline.procs.run_logged`: a log file, its own process group, a time limit) that
   writes the lock with py-rattler's ``LockFile`` into a temporary file beside ``pixi.lock``
   and its reply (package counts, the locked ``python`` of each job) into a file;
5. resolves each job's ``[pypi-dependencies]`` with uv for that Python and platform
   (:mod:`pipeline.build.pypi`, also through ``run_logged``) and adds them to the temporary
   lock in pixi's form (the text edits: :mod:`pipeline.pixi.locktext`); then renames the lock
   into place (atomic on POSIX).

Why a child process: py-rattler 0.28.0 crashes at interpreter exit (``Fatal Python error:
PyGILState_Release`` / SIGABRT, sometimes SIGSEGV) in roughly a third of the processes that
called its async API -- seen here with ``solve`` and ``index_fs``. The worker flushes its output
and leaves with ``os._exit``; the calling (doit) process only uses rattler's synchronous API
(reading the lock, match specs, versions), which exits cleanly.

The written lock is in pixi's form (:func:`pipeline.build.lockplan.plan_lock`): format v6 when
every workspace platform is a plain subdir, which pixi >= 0.50 reads (py-rattler writes only v7;
:func:`~pipeline.pixi.locktext.downgrade_to_v6` drops its platform list, proven with py-rattler
0.15.0, pixi 0.50's rattler_lock), else v7 with pixi's platform names (``p1``...) and
virtual-package strings, which pixi >= 0.68 reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.build.lockplan import LockPlan, plan_lock
from pipeline.build.lockstale import stale_reason
from pipeline.build.pypi import (
    LockedPypi,
    PypiLockJob,
    index_urls,
    resolve_pypi,
    write_pypi_into_lock,
)
from pipeline.errors import LockError, PipelineError
from pipeline.fsutil import atomic_write_text, fsync_dir
from pipeline.pixi.locktext import downgrade_to_v6
from pipeline.pixi.manifest import MANIFEST_NAME, load_manifest
from pipeline.pixi.model import FindLinks
from pipeline.procs import run_logged, worker_env
from pipeline.settings import Settings, load_settings, process_environ

LOCK_NAME = "pixi.lock"
PIXI_HINT = (
    "install pixi (https://pixi.sh: `curl -fsSL https://pixi.sh/install.sh | sh`) so it is on "
    "PATH or in $PIXI_HOME/bin, or lock on a machine that has it and commit pixi.lock"
)
DEFAULT_TIMEOUT = 1800.0
# Where the children's output goes when the caller names no log (the tasks use the state dir).
DEFAULT_LOG = Path(".pixi") / "lock.log"

Outcome = Literal["solved", "up-to-date", "pixi"]


@dataclass(frozen=True)
class LockResult:
    """What :func:`lock` did.

    ``outcome``: ``solved`` (py-rattler wrote a new lock), ``up-to-date`` (the existing lock
    satisfies the manifest; the file was not touched) or ``pixi`` (``pixi lock`` ran).
    ``changed`` tells whether the bytes of ``pixi.lock`` changed. ``packages`` counts the conda
    packages per (environment, platform) of a solve, ``pypi_packages`` the PyPI ones.
    """

    lock_path: Path
    outcome: Outcome
    changed: bool
    reason: str
    packages: tuple[tuple[str, str, int], ...] = field(default=())
    pypi_packages: tuple[tuple[str, str, int], ...] = field(default=())

    @property
    def up_to_date(self) -> bool:
        return self.outcome == "up-to-date"

    def summary(self) -> str:
        """One line for the task output."""
        if self.outcome == "up-to-date":
            return f"{self.lock_path}: up to date ({self.reason})"
        if self.outcome == "pixi":
            what = "changed" if self.changed else "unchanged"
            return f"{self.lock_path}: {what} by `pixi lock`"
        count = sum(n for _, _, n in self.packages)
        pypi = sum(n for _, _, n in self.pypi_packages)
        return (
            f"{self.lock_path}: solved with py-rattler{' and uv' if pypi else ''} because "
            f"{self.reason} ({len(self.packages)} environment/platform pairs, {count} conda "
            f"packages{f', {pypi} PyPI packages' if pypi else ''})"
        )


# ---- finding pixi ----------------------------------------------------------------------------


def find_pixi(
    settings: Settings, *, path: str | None = None, home: Path | None = None
) -> Path | None:
    """The pixi binary to use, or ``None``: ``PATH``, then ``$PIXI_HOME/bin/pixi``, then
    ``~/.pixi/bin/pixi``.

    ``path`` is a ``PATH``-style string (default: this process's ``PATH``); ``home`` replaces
    the home directory (for tests). Only executable files count.
    """
    if path is None:
        path = process_environ().get("PATH", os.defpath)
    found = shutil.which("pixi", path=path)
    if found:
        return Path(found)
    candidates = []
    if settings.pixi_home is not None:
        candidates.append(settings.pixi_home / "bin" / "pixi")
    candidates.append((home or Path.home()) / ".pixi" / "bin" / "pixi")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# ---- locking ---------------------------------------------------------------------------------


def lock(
    project_dir: Path,
    *,
    pixi: Path | None,
    cache_dir: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    log: Path | None = None,
) -> LockResult:
    """Make ``project_dir/pixi.lock`` satisfy ``project_dir/pixi.toml``.

    With ``pixi``: runs ``pixi lock --manifest-path <dir>/pixi.toml`` (blocks up to
    ``timeout`` seconds). Without: solves with py-rattler in a child process, unless the lock
    is already current (then nothing is written). ``cache_dir`` is the repodata cache of the
    solve (default: rattler's). Never deletes the lock; a failed solve leaves it as it was.
    Either child runs through :func:`pipeline.procs.run_logged`; its output goes to ``log``
    (rewritten each time; default :data:`DEFAULT_LOG` under the project dir).

    PyPI dependencies are resolved with uv (:mod:`pipeline.build.pypi`) for the Python the
    conda solve locked; its output goes to the same log.

    Raises :class:`LockError`: no manifest; a malformed manifest; source dependencies and no
    pixi; an unsolvable environment (named, with its platform); PyPI requirements uv cannot
    resolve (the package and uv's reason); pixi failing.
    """
    project_dir = project_dir.resolve()
    manifest_path = project_dir / MANIFEST_NAME
    lock_path = project_dir / LOCK_NAME
    if not manifest_path.is_file():
        raise LockError(
            f"{manifest_path}: no pixi manifest there; point PIPELINE_PROJECT at a pixi project"
        )
    log = log or project_dir / DEFAULT_LOG
    if pixi is not None:
        return _pixi_lock(pixi, manifest_path, lock_path, timeout, log)

    manifest = load_manifest(manifest_path)
    reason = stale_reason(manifest, lock_path, project_dir)
    if reason is None:
        return LockResult(
            lock_path, "up-to-date", changed=False, reason="satisfies pixi.toml; not rewritten"
        )
    for resolved in manifest.resolve_all():
        if resolved.source_dependencies or resolved.pypi_sources:
            kind = "source (path/git/url)" if resolved.source_dependencies else "PyPI source"
            names = resolved.source_dependencies or resolved.pypi_sources
            raise LockError(
                f"{manifest_path}: environment {resolved.environment!r} has {kind} "
                f"dependencies ({', '.join(names)}), which only pixi can lock; {PIXI_HINT}"
            )
    plan = plan_lock(manifest, project_dir)
    pypi_counts: list[tuple[str, str, int]] = []

    def add_pypi(tmp: Path, pythons: Mapping[tuple[str, str], str | None]) -> None:
        pypi_counts.extend(_lock_pypi(plan, tmp, pythons, project_dir, manifest_path, timeout, log))

    counts = _solve_in_child(plan, manifest_path, lock_path, cache_dir, timeout, log, add_pypi)
    return LockResult(
        lock_path,
        "solved",
        changed=True,
        reason=reason,
        packages=counts,
        pypi_packages=tuple(pypi_counts),
    )


def _lock_pypi(
    plan: LockPlan,
    tmp: Path,
    pythons: Mapping[tuple[str, str], str | None],
    project_dir: Path,
    manifest_path: Path,
    timeout: float,
    log: Path,
) -> list[tuple[str, str, int]]:
    """Resolve every job's PyPI requirements with uv and add them to the lock at ``tmp``."""
    resolved: list[tuple[str, str, Sequence[LockedPypi]]] = []
    indexes: dict[str, tuple[tuple[str, ...], tuple[FindLinks, ...]]] = {}
    for job in plan.jobs:
        if not job.pypi_requirements:
            continue
        python = pythons.get((job.environment, job.lock_platform))
        if python is None:
            raise LockError(
                f"{manifest_path}: environment {job.environment!r} on {job.platform} has PyPI "
                "dependencies but no python among its conda packages; add python to "
                "[dependencies]"
            )
        pypi_job = PypiLockJob(
            environment=job.environment,
            lock_platform=job.lock_platform,
            subdir=job.platform,
            python_version=python,
            virtual_packages=job.virtual_packages,
            requirements=job.pypi_requirements,
            options=job.pypi_options,
        )
        try:
            packages = resolve_pypi(
                pypi_job,
                project_dir=project_dir,
                environ=process_environ(),
                log=log,
                timeout=timeout,
            )
        except LockError as exc:
            raise LockError(f"{manifest_path}: {exc.message}") from None
        resolved.append((job.environment, job.lock_platform, packages))
        indexes[job.environment] = (index_urls(job.pypi_options), job.pypi_options.find_links)
    if resolved:
        write_pypi_into_lock(tmp, plan.platforms, resolved, indexes)
    return [(env, platform, len(pkgs)) for env, platform, pkgs in resolved]


def _fresh_log(log: Path) -> None:
    # A failure here (a full disk, a read-only dir) is reported by run_logged, in one line.
    with contextlib.suppress(OSError):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")


def _pixi_lock(
    pixi: Path, manifest_path: Path, lock_path: Path, timeout: float, log: Path
) -> LockResult:
    before = lock_path.read_bytes() if lock_path.is_file() else None
    cmd = [str(pixi), "lock", "--manifest-path", str(manifest_path)]
    _fresh_log(log)
    run_logged(
        cmd,
        cwd=manifest_path.parent,
        env=process_environ(),
        log=log,
        timeout=timeout,
        label="`pixi lock`",
        hint=f"run `{shlex.join(cmd)}` to see it all",
        start_hint=PIXI_HINT,
        error=LockError,
    )
    if not lock_path.is_file():
        raise LockError(f"`pixi lock` wrote no {lock_path}; run `{shlex.join(cmd)}` by hand")
    changed = before != lock_path.read_bytes()
    return LockResult(lock_path, "pixi", changed=changed, reason=f"{pixi} lock")


def _solve_in_child(
    plan: LockPlan,
    manifest_path: Path,
    lock_path: Path,
    cache_dir: Path | None,
    timeout: float,
    log: Path,
    finish: Callable[[Path, Mapping[tuple[str, str], str | None]], None] | None = None,
) -> tuple[tuple[str, str, int], ...]:
    """Solve the conda part in the worker; ``finish(tmp_lock, pythons)`` may add to the lock
    before it is put in place (``pythons``: (environment, lock platform) -> the locked
    python's version, or None); then write format v6 if the plan says so."""
    # Request, reply and the new lock live in one private folder beside pixi.lock, so the
    # final rename stays on one filesystem and a failure leaves nothing behind.
    work = Path(tempfile.mkdtemp(prefix=f".{LOCK_NAME}.", suffix=".d", dir=lock_path.parent))
    try:
        tmp, request_path, reply_path = work / LOCK_NAME, work / "request.json", work / "reply.json"
        request = {
            "output": str(tmp),
            "reply": str(reply_path),
            "cache_dir": str(cache_dir) if cache_dir else None,
            "plan": asdict(plan),
        }
        request_path.write_text(json.dumps(request), encoding="utf-8")
        _fresh_log(log)
        try:
            run_logged(
                [sys.executable, "-m", "pipeline.build.lock", "--worker", str(request_path)],
                cwd=lock_path.parent,
                env=worker_env(process_environ()),
                log=log,
                timeout=timeout,
                label=f"the py-rattler solve of {manifest_path}",
                hint="check the channels and the network",
                error=LockError,
            )
        except LockError:
            reply = _read_reply(reply_path)
            if reply is not None and reply.get("error"):
                raise LockError(f"{manifest_path}: {reply['error']}") from None
            raise
        reply = _read_reply(reply_path)
        if reply is None or not reply.get("ok"):
            why = reply.get("error") if reply else None
            raise LockError(
                f"{manifest_path}: the py-rattler solve "
                f"{why or 'exited without a reply'}; see the log ({log})"
            )
        pythons = {(e, p): v for e, p, v in reply.get("pythons", [])}
        if finish is not None:
            finish(tmp, pythons)
        if plan.lock_version == 6:
            tmp.write_text(downgrade_to_v6(tmp.read_text(encoding="utf-8")), encoding="utf-8")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(lock_path)
        fsync_dir(lock_path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tuple((e, p, int(n)) for e, p, n in reply["packages"])


def _read_reply(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---- the worker (child process) ---------------------------------------------------------------


async def _solve_and_write(
    request: Mapping[str, Any],
) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, str | None]]]:
    """Solve every job of the plan concurrently and write the lock (v7) to
    ``request['output']``. Returns the package counts and each job's python version."""
    from rattler import (
        BuildString,
        Channel,
        ChannelPriority,
        Gateway,
        GenericVirtualPackage,
        LockChannel,
        LockFile,
        LockPlatform,
        PackageName,
        Platform,
        Version,
        solve,
    )

    plan = request["plan"]
    cache_dir = request.get("cache_dir")
    gateway = Gateway(cache_dir=Path(cache_dir) if cache_dir else None)

    async def one(job: Mapping[str, Any]) -> list[Any]:
        try:
            return await solve(
                [Channel(url) for url in job["channels"]],
                job["specs"],
                gateway=gateway,
                platforms=[job["platform"], "noarch"],
                virtual_packages=[
                    GenericVirtualPackage(
                        PackageName(vp["name"]),
                        Version(vp["version"]),
                        # rattler's own detection uses "0" where pixi writes no build.
                        BuildString(vp["build"] or "0"),
                    )
                    for vp in job["virtual_packages"]
                ],
                channel_priority=ChannelPriority.Strict
                if job["channel_priority"] == "strict"
                else ChannelPriority.Disabled,
            )
        except Exception as exc:
            where = f"environment {job['environment']!r} on {job['platform']}"
            kind = type(exc).__name__
            text = " ".join(str(exc).split()).rstrip(".")
            if kind == "SolverError":
                raise PipelineError(
                    f"cannot solve {where}: {text}; adjust its dependencies or "
                    "[system-requirements]"
                ) from None
            raise PipelineError(
                f"cannot solve {where} ({kind}: {text}); check the channels and the network"
            ) from None

    jobs = [job for job in plan["jobs"] if job["specs"]]
    solved = await asyncio.gather(*(one(job) for job in jobs))

    lock_file = LockFile(
        [
            LockPlatform(
                name,
                subdir=None if name == subdir else Platform(subdir),
                virtual_packages=list(vps),
            )
            for name, subdir, vps in plan["platforms"]
        ]
    )
    platforms = {p.name: p for p in lock_file.platforms()}
    for name, urls in plan["environments"]:
        lock_file.set_channels(name, [LockChannel(url) for url in urls])
    counts: list[tuple[str, str, int]] = []
    pythons: list[tuple[str, str, str | None]] = []
    for job, records in zip(jobs, solved, strict=True):
        python: str | None = None
        for record in sorted(records, key=lambda r: r.name.normalized):
            lock_file.add_conda_package(job["environment"], platforms[job["lock_platform"]], record)
            if record.name.normalized == "python":
                python = str(record.version)
        counts.append((job["environment"], job["lock_platform"], len(records)))
        pythons.append((job["environment"], job["lock_platform"], python))
    lock_file.to_path(Path(request["output"]))
    return counts, pythons


def _worker(request_path: Path) -> int:
    """Entry of ``python -m pipeline.build.lock --worker REQUEST.json``.

    The request names the lock to write (``output``) and the reply file (``reply``): JSON
    ``{"ok": true, "packages": [...]}`` or ``{"ok": false, "error": "<one line>"}``, also
    printed as the last line of output (the log). Exit 0 when the lock was written.
    """
    reply_path: Path | None = None
    try:
        request = json.loads(request_path.read_text(encoding="utf-8"))
        reply_path = Path(request["reply"])
        counts, pythons = asyncio.run(_solve_and_write(request))
        reply: dict[str, Any] = {"ok": True, "packages": counts, "pythons": pythons}
    except PipelineError as exc:
        reply = {"ok": False, "error": exc.message}
    except Exception as exc:
        reply = {"ok": False, "error": f"solver process error ({type(exc).__name__}: {exc})"}
    text = json.dumps(reply)
    if reply_path is not None:
        atomic_write_text(reply_path, text)
    print(reply["error"] if not reply["ok"] else text)
    return 0 if reply["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.build.lock [PROJECT_DIR] [--no-pixi]``: lock and print one line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.build.lock", description=__doc__)
    parser.add_argument("project", nargs="?", type=Path, help="pixi project directory")
    parser.add_argument("--no-pixi", action="store_true", help="solve with py-rattler")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    try:
        settings = load_settings()
        pixi = None if args.no_pixi else find_pixi(settings)
        result = lock(args.project or settings.project, pixi=pixi)
    except PipelineError as exc:
        from pipeline.reporting import print_error  # here: the --worker child skips doit

        print_error(exc.message)
        return exc.exit_code
    print(result.summary())
    return 0


if __name__ == "__main__":
    code = main()
    # py-rattler's async runtime can crash the interpreter at exit: flush, then leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
