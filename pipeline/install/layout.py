"""The offline project directory of the container: its layout, its records and its lock.

``doit install`` (extract -> patch-channels -> frozen-install) owns a few names inside
``AUTO_INFER_VLLM_PIXI_PROJECT_DIR`` and never touches anything else there::

    pixi-pack.json  environment.yml  channel/  pypi/  infer-vllm-bundle.json   from the bundle
    pixi.toml  pixi.lock                 extras, template or generated; then patched
    activate-<env>.sh                    source it to use the environment from a shell
    .pixi/envs/<env>                     a symlink to the current generation, below
    .pixi/envs/.<env>.<sha12>.<rand>/    one installed environment (a conda prefix) with its
                                         .installed-from.json
    .infer-vllm/install.lock             flock: one install at a time per project dir
    .infer-vllm/extract.sha256           extract stamp: the bundle's sha256 and a newline
    .infer-vllm/extract.json             what was extracted: the tar's stat, every file's
                                         size/sha256/mtime/inode, the lock's source and sha256
    .infer-vllm/patch.stamp              patch stamp: bundle sha256 and project path
    .infer-vllm/install-<env>.log        output of the last install's children
    .infer-vllm/staging-*/ trash-*/      transient; left over only by a crash, removed next time

Why a symlink and generations: conda prefixes are not relocatable (packages embed the prefix
path in scripts and text files), so an environment cannot be built in a temp dir and renamed
into place. Each install goes into a new generation directory at its final path; once it is
complete and verified, ``.pixi/envs/<env>`` is switched to it with one ``rename(2)`` of a
symlink, which is atomic: readers see the old environment or the new one, never a mix. pixi
itself symlinks ``.pixi/envs`` (``detached-environments``) and follows the link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InstallError
from pipeline.fsutil import atomic_write_text
from pipeline.pixi.envs import pixi_env_prefix

STATE_DIR = ".infer-vllm"
INSTALLED_FROM = ".installed-from.json"
LOCK_WAIT_TIMEOUT = 3600.0  # a first install of a CUDA environment can take many minutes
_LOCK_POLL = 0.2


@dataclass(frozen=True)
class ProjectPaths:
    """Every path ``doit install`` uses inside one project directory (no I/O)."""

    root: Path

    @classmethod
    def of(cls, project_dir: Path) -> ProjectPaths:
        """The layout of ``project_dir`` (made absolute, symlinks not resolved)."""
        return cls(Path(project_dir).absolute())

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def lock_file(self) -> Path:
        return self.state / "install.lock"

    @property
    def extract_stamp(self) -> Path:
        return self.state / "extract.sha256"

    @property
    def extract_record(self) -> Path:
        return self.state / "extract.json"

    @property
    def patch_stamp(self) -> Path:
        return self.state / "patch.stamp"

    @property
    def manifest(self) -> Path:
        return self.root / "pixi.toml"

    @property
    def lock(self) -> Path:
        return self.root / "pixi.lock"

    @property
    def channel(self) -> Path:
        return self.root / "channel"

    @property
    def pypi(self) -> Path:
        return self.root / "pypi"

    @property
    def envs(self) -> Path:
        return self.env_link("default").parent

    def env_link(self, environment: str) -> Path:
        """``.pixi/envs/<env>``: where pixi and ``doit serve`` look (a symlink we switch)."""
        return pixi_env_prefix(self.root, environment)

    def installed_from(self, environment: str) -> Path:
        """The install record, read through the symlink: it changes with the switch."""
        return self.env_link(environment) / INSTALLED_FROM

    def generation_prefix(self, environment: str) -> str:
        """Name prefix of the generation dirs of ``environment`` (pixi's environment names
        never contain a dot, so ``.<env>.`` cannot match another environment's)."""
        return f".{environment}."

    def activation_script(self, environment: str) -> Path:
        return self.root / f"activate-{environment}.sh"

    def install_log(self, environment: str) -> Path:
        return self.state / f"install-{environment}.log"


# ---- small JSON records ---------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as pretty JSON, atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_stamp(path: Path) -> str | None:
    """The first line of a stamp file, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    first = text.splitlines()[0].strip() if text.strip() else ""
    return first or None


# ---- the install lock -----------------------------------------------------------------------


@contextlib.contextmanager
def install_lock(
    paths: ProjectPaths,
    *,
    timeout: float = LOCK_WAIT_TIMEOUT,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Hold the project's install lock (``flock`` on ``.infer-vllm/install.lock``) while the
    block runs.

    Blocks while another process holds it (two containers booting on one volume), polling and
    saying once who holds it; raises InstallError after ``timeout`` seconds. Re-entrant in
    one process is NOT supported (each stage takes it once). The lock dies with its process,
    so a SIGKILLed install never leaves it stuck. Creates the project and state dirs.
    """
    try:
        paths.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InstallError(
            f"cannot create the install lock {paths.lock_file} ({exc.strerror}); make "
            "AUTO_INFER_VLLM_PIXI_PROJECT_DIR a writable directory"
        ) from None
    try:
        deadline = clock() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if not told and say is not None:
                holder = _lock_holder(fd)
                say(
                    f"waiting for another install{holder} to finish with "
                    f"{paths.root} (lock {paths.lock_file})"
                )
                told = True
            if clock() >= deadline:
                raise InstallError(
                    f"another install has held {paths.lock_file} for over {timeout:.0f} s; "
                    "wait for it, or stop it if it is stuck"
                )
            time.sleep(_LOCK_POLL)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""
