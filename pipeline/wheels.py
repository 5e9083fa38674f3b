"""Installing wheels into a conda environment: uv, one way, for both sides.

The container installs the bundle's wheels offline from their files; the build host's verify
installs the same locked wheels from their URLs before anything is packed. Both run
:func:`install_wheels`, so verify proves the container's path: the same uv (the pinned PyPI
``uv``, :func:`uv_binary`), ``--no-deps --no-index --no-config``, a private cache hardlinked
into site-packages and deleted afterwards, and no ``UV_*`` / ``PIP_*`` variable from the
host. Only the source differs: files with ``--offline`` in the container, the lock's URLs
(with their sha256, required when every wheel has one) on the build host.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.procs import find_uv, run_logged

UV_CACHE_PREFIX = "uv-cache."  # <scratch>/uv-cache.<random>: uv's cache during one install


@dataclass(frozen=True)
class WheelSource:
    """One wheel to install: a local file (``location`` a path; offline) or a URL with the
    lock's sha256 (downloaded by uv, on the build host)."""

    name: str
    location: str
    sha256: str | None = None

    @property
    def is_url(self) -> bool:
        return "://" in self.location


def uv_binary(error: type[PipelineError] = PipelineError) -> Path:
    """The ``uv`` executable installed with this package (PyPI ``uv``), else ``uv`` on PATH or
    beside this Python. Raises ``error`` (one line) when there is none."""
    found = find_uv()
    if found is None:
        raise error(
            "there are wheels to install but `uv` is not installed; install this package "
            "with its dependencies (pip install -e .) so that uv comes with it"
        )
    return found


def install_wheels(
    python: Path,
    wheels: Sequence[WheelSource],
    *,
    scratch: Path,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    label: str,
    hint: str = "see the log",
    error: type[PipelineError] = PipelineError,
    remove_cache: Callable[[Path], None] | None = None,
) -> None:
    """``uv pip install`` exactly ``wheels`` (no dependencies) into ``python``'s environment.

    Files are installed ``--offline``; when any is a URL, all go into a requirements file
    (``name @ location``) and are downloaded, each checked against its sha256
    (``--require-hashes`` when every wheel has one). uv unpacks each wheel
    once into a fresh, private cache in ``scratch`` (keep it on the environment's file
    system) and hardlinks the files into site-packages; the cache (and the requirements file
    of URLs) is deleted when uv is done, also on failure. That writes a 2.5 GB vLLM
    environment once, where ``--no-cache --link-mode copy`` wrote it twice, and leaves every
    installed file with one link: no cache shares inodes with the environment afterwards.
    Wheels already installed from the same file or URL are kept (idempotent). Blocks up to
    ``timeout``; raises ``error`` (one line, :func:`pipeline.procs.run_logged`).
    ``remove_cache`` disposes of the cache once uv has exited (default: removed before this
    returns); the container hands it to a :class:`~pipeline.fsutil.BackgroundRemoval`, so
    that the second of unlinking overlaps its next steps.
    """
    online = any(w.is_url for w in wheels)
    cache = scratch / f"{UV_CACHE_PREFIX}{uuid.uuid4().hex[:8]}"
    requirements = scratch / f"{UV_CACHE_PREFIX}{uuid.uuid4().hex[:8]}.requirements.txt"
    argv = [
        str(uv_binary(error)),
        "pip",
        "install",
        "--python",
        str(python),
        "--no-index",
        "--no-deps",
        "--no-config",
        "--cache-dir",
        str(cache),
        "--link-mode",
        "hardlink",
    ]
    if online:
        hashed = all(w.sha256 for w in wheels)
        requirements.write_text(
            "".join(
                f"{w.name} @ {w.location}"
                + (f" --hash=sha256:{w.sha256}" if w.sha256 else "")
                + "\n"
                for w in wheels
            ),
            encoding="utf-8",
        )
        argv += ["-r", str(requirements), *(["--require-hashes"] if hashed else [])]
    else:
        argv += ["--offline", *(w.location for w in wheels)]
    clean_env = {k: v for k, v in env.items() if not k.startswith(("UV_", "PIP_"))}
    try:
        run_logged(
            argv,
            error=error,
            cwd=cwd,
            env=clean_env,
            log=log,
            timeout=timeout,
            label=label,
            hint=hint,
        )
    finally:
        requirements.unlink(missing_ok=True)
        if remove_cache is None:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            remove_cache(cache)


__all__ = ["UV_CACHE_PREFIX", "WheelSource", "install_wheels", "uv_binary"]
