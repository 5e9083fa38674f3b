"""Child processes of the pipeline's stages: one way to run them, logged and bounded.

Every child runs in its own session with its output appended to a log file (never a pipe),
under a timeout; on a timeout or Ctrl-C its whole process group gets SIGTERM, then SIGKILL
after a grace, so nothing it started outlives the stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.settings import REPO_ROOT

KILL_GRACE = 5.0


def run_logged(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    label: str,
    hint: str = "see the log",
    error: type[PipelineError] = PipelineError,
) -> None:
    """Run ``argv`` with its output appended to ``log``; blocks up to ``timeout`` seconds.

    Raises ``error`` (one line: ``label``, the exit code, the log's last line, ``hint``) on
    a non-zero exit, a timeout, or a command that cannot start. Ctrl-C kills the group too.
    """
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise error(f"cannot start {label} ({exc.strerror}): {argv[0]}") from None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise error(
                f"{label} did not finish in {timeout:.0f} s and was stopped; output in {log}"
            ) from None
        except BaseException:
            kill_group(proc)
            raise
    if code != 0:
        raise error(f"{label} failed (exit {code}): {last_line(log)}; {hint} ({log})")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after :data:`KILL_GRACE`; reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=KILL_GRACE)


def last_line(log: Path) -> str:
    """The last non-blank line of ``log`` (reads at most its last 4 KiB)."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def rattler_install_command(request: Path) -> list[str]:
    """argv of :mod:`pipeline.install.worker` for ``request`` (see its docstring)."""
    # A module path, not an import: the build side (verify) spawns the install side's worker
    # this way; nothing under pipeline/build imports pipeline.install, nor the reverse.
    return [sys.executable, "-m", "pipeline.install.worker", str(request)]


def worker_env(base_env: Mapping[str, str]) -> dict[str, str]:
    """``base_env`` with this package importable by a child, from a plain checkout too."""
    env = dict(base_env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), base_env.get("PYTHONPATH")) if p
    )
    return env
