"""Read a pixi.lock with py-rattler and select one environment + platform.

The pack stage gets plain, frozen data (:class:`LockedEnvironment`): every locked conda package
with its URL, hashes, size and the ``repodata.json`` entry pixi-pack writes for it, every PyPI
package with its URL and whether it is a wheel, and the names of source packages that cannot be
packed. The install stage gets py-rattler ``RepoDataRecord`` objects for ``rattler.install``
through :func:`rattler_records`, optionally pointed at a local channel directory.

Lock formats v5, v6 and v7 are read (py-rattler 0.28). Two py-rattler behaviours shape this
module (found on 0.28.0):

- ``Environment.packages(platform)`` must get a ``LockPlatform`` taken from the same lock object:
  a fresh ``LockPlatform("linux-64")`` raises ``pyo3_runtime.PanicException`` (a BaseException),
  and a platform object of *another* ``LockFile`` silently returns ``None``. So platforms are
  always looked up by name in ``env.platforms()`` of the environment being read.
- ``CondaLockedSourcePackage`` (v7 ``conda_source:``, v6 ``conda: <dir>``) has no
  ``repo_data_record``; touching it panics with ``must be binary``, and
  ``Environment.conda_repodata_records_for_platform`` silently drops these packages. Source
  packages are therefore listed by name in :attr:`LockedEnvironment.source_packages` and never
  turned into records.

Every user-caused problem raises :class:`pipeline.errors.LockError` with a one-line message.
Nothing here touches the network; reading is synchronous (no asyncio), so the interpreter-exit
crash py-rattler shows after async calls does not apply to this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from rattler import LockFile, RepoDataRecord
from rattler.exceptions import ParseCondaLockError
from rattler.lock import (
    CondaLockedBinaryPackage,
    CondaLockedSourcePackage,
    Environment,
    LockedPackage,
    LockPlatform,
    PypiLockedPackage,
)

from pipeline.errors import LockError
from pipeline.pixi.locktext import read_lock_version

__all__ = [
    "CondaPackage",
    "LockedEnvironment",
    "PypiPackage",
    "environments",
    "file_sha256",
    "rattler_records",
    "read_environment",
    "read_lock",
    "record_with_url",
    "select_platform",
]

_CHUNK = 1024 * 1024
# The newest lock format py-rattler 0.28 reads.
MAX_LOCK_VERSION = 7
# A location with a scheme ("https://", "file://"); anything else in a lock is a path.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# pixi writes "direct+<url>" for PyPI packages given by direct URL rather than from an index.
_DIRECT_PREFIX = "direct+"
_SDIST_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar")
# Keys of a RepoDataRecord's JSON that are not part of a repodata.json package entry.
_RECORD_ONLY_KEYS = frozenset({"fn", "url", "channel"})


@dataclass(frozen=True)
class CondaPackage:
    """One locked conda binary package.

    ``subdir`` is the channel subdir (``linux-64``, ``noarch``); ``filename`` the archive name
    (``foo-1.0-h123_0.conda``). ``url`` is where the lock says the archive is: an ``https://``
    URL, or a ``file://`` URL for packages locked by path (relative paths are resolved against
    the lock's directory). ``sha256``/``md5`` are lowercase hex, ``None`` when the lock does not
    record them (old locks may hold only md5). ``repodata`` is the entry pixi-pack writes for this
    file under ``packages.conda`` in ``channel/<subdir>/repodata.json``: py-rattler's
    serialisation of the lock's PackageRecord, top-level keys sorted, JSON-serialisable. Treat
    it as read-only; it takes no part in hashing.
    """

    name: str
    version: str
    build: str
    subdir: str
    url: str
    filename: str
    sha256: str | None
    md5: str | None
    size: int | None
    channel: str | None
    repodata: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class PypiPackage:
    """One locked PyPI distribution file.

    ``url`` is downloadable as is: pixi's ``direct+`` prefix is removed and paths become
    ``file://`` URLs resolved against the lock's directory. ``filename`` is the percent-decoded
    last URL segment. ``is_wheel`` is False for sdists, which pip would have to build.
    """

    name: str
    version: str
    url: str
    filename: str
    sha256: str | None
    is_wheel: bool


@dataclass(frozen=True)
class LockedEnvironment:
    """Everything locked for one environment on one platform.

    ``path`` is the absolute lock path; ``channels`` the environment's channel URLs in priority
    order. ``conda`` is sorted by ``(subdir, filename)`` and ``pypi`` by ``filename``.
    ``source_packages`` holds the sorted names of packages that are built from source (conda
    source packages, PyPI directories and git checkouts): they have no archive to pack, so a
    bundle of this environment would be incomplete. It is empty for normal locks.
    """

    path: Path
    environment: str
    platform: str
    channels: tuple[str, ...]
    conda: tuple[CondaPackage, ...]
    pypi: tuple[PypiPackage, ...]
    source_packages: tuple[str, ...]
    # The lock's own name of the platform (``p1``) and its conda subdir (``linux-64``);
    # ``platform`` above is what the caller asked for (a name or a subdir).
    lock_platform: str = ""
    subdir: str = ""
    # The lock platform's recorded virtual packages (``__cuda=12``; none in lock v6): with
    # the subdir, its identity, which finds the manifest platform it stands for.
    virtual_packages: tuple[str, ...] = ()


def read_lock(path: Path) -> LockFile:
    """Parse ``path`` as a pixi lock file (formats v5 to v7).

    Raises LockError naming the file when it is missing, a directory, unreadable, not YAML, or
    not a lock py-rattler understands. Reads the file once; no other side effect.
    """
    path = Path(path)
    if not path.exists():
        raise LockError(
            f"lock file {path} does not exist: run `pixi lock` (or `doit lock`) in the project "
            "to create it, or pass the right path"
        )
    if path.is_dir():
        raise LockError(f"lock file {path} is a directory: pass the path of the pixi.lock file")
    version = read_lock_version(path)
    if version is not None and version > MAX_LOCK_VERSION:
        raise LockError(
            f"cannot read lock file {path}: format version {version} is newer than the "
            f"{MAX_LOCK_VERSION} "
            "this pipeline's py-rattler reads; regenerate it with a pixi that writes version "
            f"{MAX_LOCK_VERSION} or older (`pixi lock`; pixi 0.68 to the last v7 release), or "
            "upgrade py-rattler in pyproject.toml"
        )
    try:
        return LockFile.from_path(path)
    except ParseCondaLockError as exc:
        raise LockError(
            f"cannot read lock file {path}: {exc}; it must be a pixi.lock in format v5 to v7, "
            "regenerate it with `pixi lock`"
        ) from exc


def environments(path: Path) -> dict[str, list[str]]:
    """Map each environment name in the lock at ``path`` to its sorted platform names.

    The mapping is sorted by environment name. Raises LockError as :func:`read_lock`.
    """
    lock = read_lock(path)
    return {
        name: sorted(platform.name for platform in env.platforms())
        for name, env in sorted(lock.environments(), key=lambda item: item[0])
    }


def read_environment(path: Path, environment: str, platform: str) -> LockedEnvironment:
    """Select ``environment`` on ``platform`` from the lock at ``path``.

    Raises LockError when the lock cannot be read, or when the environment or the platform is
    not in it (the message lists the available ones). Source packages are reported in
    ``source_packages``, not raised: the caller decides whether they are fatal.
    """
    path = Path(path).absolute()
    env, packages, chosen = _select_platform(path, environment, platform)
    lock_dir = path.parent
    conda: list[CondaPackage] = []
    pypi: list[PypiPackage] = []
    sources: set[str] = set()
    for pkg in packages:
        if isinstance(pkg, CondaLockedBinaryPackage):
            conda.append(_conda_package(pkg, lock_dir))
        elif isinstance(pkg, CondaLockedSourcePackage):
            sources.add(pkg.name)
        elif isinstance(pkg, PypiLockedPackage):
            url, filename, kind = _pypi_location(pkg.location, lock_dir)
            if kind == "source":
                sources.add(pkg.name)
            else:
                pypi.append(
                    PypiPackage(
                        name=pkg.name,
                        version=pkg.version,
                        url=url,
                        filename=filename,
                        sha256=_pypi_sha256(pkg),
                        is_wheel=kind == "wheel",
                    )
                )
    return LockedEnvironment(
        path=path,
        environment=environment,
        platform=platform,
        channels=tuple(str(channel) for channel in env.channels()),
        conda=tuple(sorted(conda, key=lambda p: (p.subdir, p.filename))),
        pypi=tuple(sorted(pypi, key=lambda p: p.filename)),
        source_packages=tuple(sorted(sources)),
        lock_platform=chosen.name,
        subdir=str(chosen.subdir),
        virtual_packages=tuple(str(v) for v in chosen.virtual_packages or ()),
    )


def rattler_records(
    locked: LockedEnvironment, channel_dir: Path | None = None
) -> list[RepoDataRecord]:
    """Return the ``RepoDataRecord`` of each package in ``locked.conda``, in the same order.

    The records come from reading ``locked.path`` again, so they carry everything the lock
    holds (timestamps, run_exports, purls...). With ``channel_dir``, each record's URL becomes
    the absolute ``file://`` URL of ``channel_dir/<subdir>/<filename>`` and its channel the
    ``file://`` URL of ``channel_dir`` (files need not exist yet). Hashes are kept: note that
    ``rattler.install`` does NOT check sha256/md5 for ``file://`` URLs, so verify the files
    first (:func:`file_sha256`).

    Raises LockError when the environment has source packages (an install would be
    incomplete), or when the lock no longer holds the same packages and hashes as ``locked``.
    """
    if locked.source_packages:
        raise LockError(
            f"environment '{locked.environment}' ({locked.platform}) in {locked.path} has source "
            f"packages that cannot be installed offline: {', '.join(locked.source_packages)}; "
            "publish them as conda packages or wheels and lock again"
        )
    _env, packages = _select(locked.path, locked.environment, locked.platform)
    lock_dir = locked.path.parent
    by_file: dict[tuple[str, str], RepoDataRecord] = {}
    for pkg in packages:
        if isinstance(pkg, CondaLockedBinaryPackage):
            record = _binary_record(pkg, lock_dir)
            by_file[(record.subdir, record.file_name)] = record
    if len(by_file) != len(locked.conda):
        raise _changed(locked, f"{len(by_file)} conda packages instead of {len(locked.conda)}")
    base = channel_dir.absolute() if channel_dir is not None else None
    records: list[RepoDataRecord] = []
    for want in locked.conda:
        record = by_file.get((want.subdir, want.filename))
        if record is None:
            raise _changed(locked, f"{want.subdir}/{want.filename} is gone")
        if (_hex(record.sha256), _hex(record.md5)) != (want.sha256, want.md5):
            raise _changed(locked, f"the hashes of {want.subdir}/{want.filename} differ")
        if base is not None:
            url = (base / want.subdir / want.filename).as_uri()
            record = record_with_url(record, url, channel=base.as_uri() + "/")
        records.append(record)
    return records


def record_with_url(
    record: RepoDataRecord, url: str, *, channel: str | None = None
) -> RepoDataRecord:
    """Return a copy of ``record`` whose URL is ``url`` (and channel ``channel`` when given).

    The file name, hashes and all metadata are kept; ``record`` itself is not modified.
    ``url`` must be absolute (``file:///...``, ``https://...``): py-rattler raises
    ``rattler.exceptions.InvalidUrlError`` otherwise, a programming error rather than a user one.
    """
    return RepoDataRecord(
        record,
        record.file_name,
        url,
        channel if channel is not None else record.channel,  # type: ignore[arg-type]
    )


def file_sha256(path: Path) -> str:
    """Return the lowercase hex sha256 of the file at ``path``, read in 1 MiB chunks.

    Memory use is constant whatever the file size. Raises OSError when it cannot be read.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- internals ------------------------------------------------------------------------------


def _select(path: Path, environment: str, platform: str) -> tuple[Environment, list[LockedPackage]]:
    """Read the lock and return the environment and its packages on ``platform``."""
    env, packages, _chosen = _select_platform(path, environment, platform)
    return env, packages


def _select_platform(
    path: Path, environment: str, platform: str
) -> tuple[Environment, list[LockedPackage], LockPlatform]:
    lock = read_lock(path)
    env = lock.environment(environment)
    if env is None:
        available = sorted(name for name, _env in lock.environments())
        raise LockError(
            f"environment '{environment}' is not in {path}; available: "
            f"{', '.join(available) or 'none'}; pick one of them or add it to pixi.toml and "
            "run `pixi lock`"
        )
    # The platform object must come from this very environment: see the module docstring.
    lock_platform = select_platform(
        env.platforms(), platform, f"environment '{environment}' in {path}"
    )
    # py-rattler returns None, not [], for a platform without packages.
    return env, env.packages(lock_platform) or [], lock_platform


def select_platform(platforms: Sequence[LockPlatform], wanted: str, where: str) -> LockPlatform:
    """The lock platform called ``wanted``, else the one whose conda subdir is ``wanted``.

    pixi >= 0.71 names a platform with virtual packages beyond the subdir defaults ``p1``,
    ``p2``... (``[system-requirements]`` become one), so ``linux-64`` must also find ``p1``
    with ``subdir: linux-64``. pixi-pack matches by subdir only and takes the first match in
    lock order; when several platforms share the subdir and none is called ``wanted``, that
    choice is arbitrary (a CUDA and a CPU variant), so this refuses, naming them. Raises
    LockError (one line, ``where`` says which environment of which file).
    """
    by_name = {p.name: p for p in platforms}
    if wanted in by_name:
        return by_name[wanted]
    same_subdir = [p for p in platforms if str(p.subdir) == wanted]
    if len(same_subdir) == 1:
        return same_subdir[0]
    if same_subdir:
        names = ", ".join(f"{p.name} ({_describe(p)})" for p in same_subdir)
        raise LockError(
            f"platform '{wanted}' is ambiguous for {where}: platforms {names} all have subdir "
            f"{wanted}; pick one of them by name"
        )
    available = ", ".join(
        p.name if p.name == str(p.subdir) else f"{p.name} (subdir {p.subdir})"
        for p in sorted(platforms, key=lambda p: p.name)
    )
    raise LockError(
        f"platform '{wanted}' is not locked for {where}; available: {available or 'none'}; "
        "pick one of them or add it to the workspace platforms in pixi.toml and run `pixi lock`"
    )


def _describe(platform: LockPlatform) -> str:
    vps = [vp for vp in platform.virtual_packages if not vp.startswith(("__unix=", "__archspec="))]
    return ", ".join(vps) if vps else "no virtual packages"


def _conda_package(pkg: CondaLockedBinaryPackage, lock_dir: Path) -> CondaPackage:
    record = _binary_record(pkg, lock_dir)
    # A RepoDataRecord serialises as its PackageRecord plus fn/url/channel; the PackageRecord
    # part is exactly what pixi-pack writes into repodata.json (both are rattler's serde form).
    entry = {
        key: value
        for key, value in json.loads(record.to_json()).items()
        if key not in _RECORD_ONLY_KEYS
    }
    return CondaPackage(
        name=record.name.normalized,
        version=str(record.version),
        build=str(record.build),
        subdir=record.subdir,
        url=record.url,
        filename=record.file_name,
        sha256=_hex(record.sha256),
        md5=_hex(record.md5),
        size=record.size,
        channel=record.channel,
        repodata=dict(sorted(entry.items())),
    )


def _binary_record(pkg: CondaLockedBinaryPackage, lock_dir: Path) -> RepoDataRecord:
    """The package's RepoDataRecord; relative-path locations resolved against ``lock_dir``."""
    location = pkg.location
    if _URL_RE.match(location) or Path(location).is_absolute():
        return pkg.repo_data_record()
    # py-rattler raises ConversionError("The path is not an absolute path") for a package
    # locked by relative path, so build the record from its metadata and the resolved path.
    record = pkg.package_record
    if record is None:  # pragma: no cover - binaries always carry their record
        raise LockError(f"conda package {pkg.name} in the lock has no metadata: run `pixi lock`")
    url = _path_url(location, lock_dir)
    return RepoDataRecord(record, _url_filename(url), url, None)  # type: ignore[arg-type]


def _pypi_location(location: str, lock_dir: Path) -> tuple[str, str, str]:
    """Return ``(url, filename, kind)`` with kind ``wheel``, ``sdist`` or ``source``."""
    if location.startswith(_DIRECT_PREFIX):
        location = location[len(_DIRECT_PREFIX) :]
    if location.startswith("git+"):
        return location, "", "source"
    url = location if _URL_RE.match(location) else _path_url(location, lock_dir)
    filename = _url_filename(url)
    lowered = filename.lower()
    if lowered.endswith(".whl"):
        return url, filename, "wheel"
    if lowered.endswith(_SDIST_SUFFIXES):
        return url, filename, "sdist"
    return url, filename, "source"  # a project directory (often editable)


def _pypi_sha256(pkg: PypiLockedPackage) -> str | None:
    hashes = pkg.hashes
    try:
        return _hex(hashes.sha256)
    except AttributeError:
        # py-rattler 0.28 wraps a missing hash as PackageHashes(None): reading .sha256 then
        # raises "'NoneType' object has no attribute 'sha256'" (direct URLs, local paths).
        return None


def _path_url(location: str, lock_dir: Path) -> str:
    """``file://`` URL of a lock path, relative paths taken from the lock's directory."""
    path = Path(location)
    if not path.is_absolute():
        path = lock_dir / path
    # normpath folds "../" without following symlinks or needing the file to exist.
    return Path(os.path.normpath(path)).as_uri()


def _url_filename(url: str) -> str:
    return unquote(PurePosixPath(urlsplit(url).path).name)


def _hex(digest: bytes | None) -> str | None:
    return digest.hex() if digest is not None else None


def _changed(locked: LockedEnvironment, what: str) -> LockError:
    return LockError(
        f"{locked.path} changed since it was read (environment '{locked.environment}', "
        f"{locked.platform}: {what}); run the step again"
    )
