"""Lock the PyPI part of a pixi environment with uv, and write it as pixi writes ``pypi:``.

:func:`resolve_pypi` runs ``uv pip compile --format pylock.toml`` (through
:func:`pipeline.procs.run_logged`) for one environment on one platform: the locked conda
Python's full version (``--python-version``), the platform's wheel tags (``--python-platform``:
``x86_64-manylinux_2_28`` for linux-64 with pixi's default ``__glibc=2.28``), and the
environment's ``[pypi-options]`` (index-url, extra-index-urls, find-links, dependency-overrides
as a uv overrides file, no-build, index-strategy, prerelease-mode). From uv's PEP 751 lock it
keeps one file per package, the best wheel for the platform's tags (an sdist only where no wheel
fits: pack refuses it unless ``PIPELINE_SKIP_SDISTS``), and reads each file's ``Requires-Dist``
and ``Requires-Python``: from the file itself when local, else from the index's PEP 658
``<url>.metadata``, else from the downloaded file (hash-checked).

:func:`write_pypi_into_lock` adds those packages to a lock py-rattler wrote: py-rattler 0.28's
``LockFile.add_pypi_package`` takes only a name, a version and a location, so it places the
entries (the environment's ``- pypi: LOCATION`` list, the sorted ``packages:`` list) and the
rest -- ``sha256``, ``requires_dist``, ``requires_python`` after ``version``, the environment's
``indexes:`` and ``find-links:`` after ``channels:`` -- is written into that text in pixi's form
(tests/data/pixi/projects/wheel-with-correct-tags/pixi.lock, pixi's examples/pypi-find-links) by
:func:`pipeline.pixi.locktext.annotate_lock_text`.

Whether locked PyPI packages still satisfy the manifest is
:func:`pipeline.build.lockstale.pypi_stale_reason`'s question.
"""

from __future__ import annotations

import email.parser
import hashlib
import io
import re
import shlex
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
from packaging import tags
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from pipeline.errors import LockError
from pipeline.pixi.locktext import annotate_lock_text
from pipeline.pixi.model import FindLinks, PypiOptions
from pipeline.pixi.platforms import VirtualPackage, platform_family
from pipeline.procs import find_uv, run_logged

DEFAULT_INDEX = "https://pypi.org/simple"
DEFAULT_TIMEOUT = 900.0
METADATA_WORKERS = 8
# uv's --python-platform names for manylinux, by glibc minor (uv 0.13.9's list).
_MANYLINUX_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_LINUX_ARCH = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
_OTHER_PLATFORMS = {
    "osx-64": "x86_64-apple-darwin",
    "osx-arm64": "aarch64-apple-darwin",
    "win-64": "x86_64-pc-windows-msvc",
    "win-arm64": "aarch64-pc-windows-msvc",
    "win-32": "i686-pc-windows-msvc",
}
_MACHINE = {
    "linux-64": "x86_64",
    "linux-aarch64": "aarch64",
    "linux-ppc64le": "ppc64le",
    "linux-s390x": "s390x",
    "osx-64": "x86_64",
    "osx-arm64": "arm64",
    "win-64": "AMD64",
    "win-arm64": "ARM64",
    "win-32": "x86",
}
# Variables that would make uv resolve against something the manifest does not say.
_UV_ENV_DROPPED = re.compile(
    r"^UV_(INDEX|INDEX_URL|DEFAULT_INDEX|EXTRA_INDEX_URL|FIND_LINKS|NO_INDEX|OVERRIDE|"
    r"CONSTRAINT|EXCLUDE|BUILD_CONSTRAINT|INDEX_STRATEGY|PRERELEASE|NO_BUILD|NO_BINARY|"
    r"EXCLUDE_NEWER|TORCH_BACKEND|CONFIG_FILE|PYTHON)$"
)
_SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz")


@dataclass(frozen=True)
class PypiLockJob:
    """One environment on one platform to resolve: what :func:`resolve_pypi` needs."""

    environment: str
    lock_platform: str
    subdir: str
    python_version: str  # the locked conda python's version (3.11.9)
    virtual_packages: tuple[VirtualPackage, ...]
    requirements: tuple[str, ...]  # PEP 508
    options: PypiOptions


@dataclass(frozen=True)
class LockedPypi:
    """One PyPI file as pixi.lock records it.

    ``location`` is what follows ``- pypi:``: an ``https://`` URL, or a path (``./wheels/x.whl``
    inside the project, absolute outside it) for a local file.
    """

    name: str  # normalized
    version: str
    location: str
    sha256: str
    requires_dist: tuple[str, ...]
    requires_python: str | None
    is_wheel: bool


# ---- platforms (pure) ------------------------------------------------------------------------


def _glibc(subdir: str, vps: Sequence[VirtualPackage]) -> tuple[int, int]:
    for vp in vps:
        if vp.name == "__glibc":
            parts = [int(p) for p in re.findall(r"\d+", vp.version)[:2]]
            major, minor = [*parts, 0, 0][:2]
            return major, minor
    return 2, 28  # pixi's default for linux subdirs


def uv_python_platform(subdir: str, vps: Sequence[VirtualPackage]) -> str:
    """uv's ``--python-platform`` for conda ``subdir`` with these virtual packages.

    linux-64 and linux-aarch64: ``<arch>-manylinux_2_<N>`` for the highest N uv knows that the
    ``__glibc`` version (default 2.28) allows. Raises LockError for a platform uv cannot target.
    """
    if subdir in _LINUX_ARCH:
        major, minor = _glibc(subdir, vps)
        allowed = [m for m in _MANYLINUX_MINORS if major > 2 or m <= minor]
        if major < 2 or not allowed:
            raise LockError(
                f"cannot lock PyPI packages for {subdir} with glibc {major}.{minor}: uv targets "
                "manylinux 2.17 and newer; raise [system-requirements] libc"
            )
        return f"{_LINUX_ARCH[subdir]}-manylinux_2_{allowed[-1]}"
    if subdir in _OTHER_PLATFORMS:
        return _OTHER_PLATFORMS[subdir]
    raise LockError(
        f"cannot lock PyPI packages for platform {subdir} without pixi (uv has no target for "
        "it); lock it with pixi"
    )


def _platform_tags(subdir: str, vps: Sequence[VirtualPackage]) -> list[str]:
    family = platform_family(subdir)
    if family == "linux":
        arch = _MACHINE.get(subdir, subdir.split("-", 1)[1])
        _, minor = _glibc(subdir, vps)
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        out: list[str] = []
        for m in range(minor, 4, -1):
            out.append(f"manylinux_2_{m}_{arch}")
            if m == 17 or (m in legacy and arch in ("x86_64", "i686")):
                out.append(f"{legacy[m]}_{arch}")
        return [*dict.fromkeys(out), f"linux_{arch}"]
    if family == "osx":
        version = next((vp.version for vp in vps if vp.name == "__osx"), "13.0")
        major, minor = (int(p) for p in ([*re.findall(r"\d+", version), "0"])[:2])
        arch = "arm64" if subdir == "osx-arm64" else "x86_64"
        return list(tags.mac_platforms((major, minor), arch))
    return {"win-64": ["win_amd64"], "win-arm64": ["win_arm64"], "win-32": ["win32"]}.get(
        subdir, []
    )


def target_tags(
    subdir: str, python_version: str, vps: Sequence[VirtualPackage] = ()
) -> tuple[str, ...]:
    """The wheel tags a CPython ``python_version`` on ``subdir`` accepts, best first."""
    major, minor = (int(p) for p in python_version.split(".")[:2])
    platforms = _platform_tags(subdir, vps)
    interpreter = f"cp{major}{minor}"
    found = chain(
        tags.cpython_tags((major, minor), abis=[interpreter], platforms=platforms),
        tags.compatible_tags((major, minor), interpreter=interpreter, platforms=platforms),
    )
    return tuple(dict.fromkeys(str(t) for t in found))


def marker_environment(subdir: str, python_version: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython ``python_version`` on conda ``subdir``."""
    family = platform_family(subdir)
    return {
        "implementation_name": "cpython",
        "implementation_version": python_version,
        "platform_python_implementation": "CPython",
        "python_version": ".".join(python_version.split(".")[:2]),
        "python_full_version": python_version,
        "os_name": "nt" if family == "win" else "posix",
        "sys_platform": {"linux": "linux", "osx": "darwin", "win": "win32"}.get(family, family),
        "platform_system": {"linux": "Linux", "osx": "Darwin", "win": "Windows"}.get(
            family, family
        ),
        "platform_machine": _MACHINE.get(subdir, ""),
        "platform_release": "",
        "platform_version": "",
    }


# ---- the uv command (pure) -------------------------------------------------------------------


def index_urls(options: PypiOptions) -> tuple[str, ...]:
    """The indexes pixi records for ``options``: the primary (PyPI by default), then extras."""
    return (options.index_url or DEFAULT_INDEX, *options.extra_index_urls)


def uv_compile_command(
    uv: Path, job: PypiLockJob, project_dir: Path, work: Path
) -> tuple[list[str], dict[str, str]]:
    """argv of ``uv pip compile`` for ``job`` and the files it reads (name -> content).

    Reads ``work/requirements.in`` (and ``work/overrides.txt``), writes ``work/pylock.toml``.
    ``--no-config`` and the environment filter keep the host's uv settings out: the manifest
    alone says where packages come from.
    """
    files = {"requirements.in": "".join(f"{r}\n" for r in job.requirements)}
    argv = [
        str(uv),
        "pip",
        "compile",
        str(work / "requirements.in"),
        "--output-file",
        str(work / "pylock.toml"),
        "--format",
        "pylock.toml",
        "--python-version",
        job.python_version,
        "--python-platform",
        uv_python_platform(job.subdir, job.virtual_packages),
        "--python",
        sys.executable,
        "--no-config",
        "--no-header",
        "--no-annotate",
        "--no-progress",
        "--color",
        "never",
        "--index-url",
        job.options.index_url or DEFAULT_INDEX,
    ]
    for url in job.options.extra_index_urls:
        argv += ["--extra-index-url", url]
    for link in job.options.find_links:
        argv += ["--find-links", find_links_location(link, project_dir)]
    if job.options.dependency_overrides:
        files["overrides.txt"] = "".join(f"{r}\n" for _, r in job.options.dependency_overrides)
        argv += ["--overrides", str(work / "overrides.txt")]
    if job.options.no_build:
        argv.append("--no-build")
    if job.options.index_strategy:
        argv += ["--index-strategy", job.options.index_strategy]
    if job.options.prerelease_mode:
        argv += ["--prerelease", job.options.prerelease_mode]
    return argv, files


def find_links_location(link: FindLinks, project_dir: Path) -> str:
    """A ``find-links`` entry as uv takes it: a URL as is, a path made absolute."""
    if link.kind == "url":
        return link.location
    return str((project_dir / link.location).resolve())


def uv_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the ``UV_*`` variables that would change the resolution."""
    return {k: v for k, v in environ.items() if not _UV_ENV_DROPPED.match(k)}


def uv_failure(output: str) -> str | None:
    """uv's reason for a failed resolution, in one line, or None when there is none.

    uv prints ``× No solution found ...`` then ``╰─▶ Because X was not found ...`` (wrapped
    over lines), or ``error: ...``. The package uv could not satisfy leads the line when the
    reason names it (``you require X``, ``X was not found``).
    """
    lines = [line.rstrip() for line in output.splitlines()]
    reason: list[str] = []
    for index, line in enumerate(lines):
        text = line.strip()
        if "Because" in text or text.startswith("╰─▶"):
            for follow in lines[index:]:
                part = follow.strip().lstrip("╰─▶").strip().removeprefix("cause:").strip()
                if not part or part.startswith(("hint:", "help:")):
                    if reason:
                        break
                    continue
                reason.append(part)
            break
    if not reason:
        errors = [ln.strip() for ln in lines if ln.strip().startswith(("error:", "×"))]
        if not errors:
            return None
        tail = errors[-1].removeprefix("error:").lstrip("× ").strip()
        causes = [
            ln.strip().split(":", 1)[1].strip()
            for ln in lines
            if ln.strip().startswith(("cause:", "Caused by:"))
        ]
        if not causes:
            return tail
        picked = list(dict.fromkeys([causes[0], causes[-1]]))
        return f"{tail} ({'; '.join(picked)})"
    text = " ".join(" ".join(reason).split()).rstrip(".")
    hints = [ln.strip().removeprefix("hint:").strip() for ln in lines if ln.startswith("hint:")]
    if hints:
        text += f" (uv's hint: {hints[0].split('. ')[0].rstrip('.')})"
    match = re.search(
        r"Because (?:there is no version of |there are no versions of )?"
        r"([A-Za-z0-9][A-Za-z0-9._\-\[\]]*)",
        text,
    )
    package = match.group(1) if match else None
    if package and package.lower() in ("only", "all", "you", "the", "no"):
        found = re.search(r"you require ([A-Za-z0-9][A-Za-z0-9._\-]*)", text)
        package = found.group(1) if found else None
    return f"{package}: {text}" if package else text


# ---- uv's pylock.toml -> one file per package ------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    name: str
    version: str
    url: str  # https://, file://
    sha256: str
    filename: str
    is_wheel: bool


def choose_files(
    pylock: Mapping[str, Any], base: Path, wanted_tags: Sequence[str]
) -> list[_Candidate]:
    """One file per package of uv's ``pylock`` (parsed TOML; paths relative to ``base``):
    the wheel whose best tag ranks highest in ``wanted_tags``, else the sdist.

    Raises LockError naming a package with neither a fitting wheel nor an sdist.
    """
    rank = {t: i for i, t in enumerate(wanted_tags)}
    chosen: list[_Candidate] = []
    for pkg in pylock.get("packages", []):
        name, version = canonicalize_name(pkg["name"]), str(pkg.get("version", ""))
        best: tuple[int, _Candidate] | None = None
        for wheel in pkg.get("wheels", []):
            url = _file_url(wheel, base)
            filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
            try:
                wheel_tags = parse_wheel_filename(filename)[3]
            except InvalidWheelFilename:
                continue
            score = min((rank[str(t)] for t in wheel_tags if str(t) in rank), default=None)
            if score is None:
                continue
            candidate = _Candidate(name, version, url, _sha256(wheel, name), filename, True)
            if best is None or score < best[0]:
                best = (score, candidate)
        if best is not None:
            chosen.append(best[1])
            continue
        sdist = pkg.get("sdist")
        if sdist is None:
            raise LockError(
                f"PyPI package {name} {version} has no wheel for this platform's tags "
                f"({wanted_tags[0]}...) and no sdist; pin another version or platform"
            )
        url = _file_url(sdist, base)
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        chosen.append(_Candidate(name, version, url, _sha256(sdist, name), filename, False))
    return chosen


def _file_url(entry: Mapping[str, Any], base: Path) -> str:
    if "url" in entry:
        return str(entry["url"])
    if "path" in entry:
        return (base / str(entry["path"])).resolve().as_uri()
    raise LockError(f"uv wrote a pylock.toml file entry without url or path ({entry}); report it")


def _sha256(entry: Mapping[str, Any], name: str) -> str:
    digest = (entry.get("hashes") or {}).get("sha256")
    if not isinstance(digest, str):
        raise LockError(
            f"PyPI package {name}: the index gives no sha256 for {entry.get('url', entry)}; "
            "use an index that serves hashes"
        )
    return digest.lower()


# ---- metadata --------------------------------------------------------------------------------


def parse_metadata(text: str) -> tuple[tuple[str, ...], str | None]:
    """``Requires-Dist`` (in pixi's spelling) and ``Requires-Python`` of a METADATA/PKG-INFO."""
    message = email.parser.Parser().parsestr(text, headersonly=True)
    requires = tuple(pixi_requirement(r) for r in message.get_all("Requires-Dist") or [])
    python = message.get("Requires-Python")
    return requires, (python.strip() or None) if python else None


def pixi_requirement(text: str) -> str:
    """A ``Requires-Dist`` value as pixi writes it: ``name[extras]specifier ; marker`` with
    single-quoted marker values (``cffi>=1.14 ; platform_python_implementation != 'PyPy'``)."""
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return " ".join(text.split())
    out = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
    out += f" @ {req.url}" if req.url else str(req.specifier)
    if req.marker is not None:
        out += " ; " + str(req.marker).replace('"', "'")
    return out


def _metadata_from_archive(data: bytes | Path, filename: str) -> str:
    source: Any = data if isinstance(data, Path) else io.BytesIO(data)
    if filename.endswith(".whl") or filename.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            names = zf.namelist()
            wanted = [
                n
                for n in names
                if n.count("/") == 1
                and (n.endswith(".dist-info/METADATA") or n.endswith("/PKG-INFO"))
            ]
            if not wanted:
                raise LockError(f"{filename} has no METADATA or PKG-INFO; it is not a wheel")
            return zf.read(wanted[0]).decode("utf-8", errors="replace")
    with tarfile.open(
        **({"name": source} if isinstance(source, Path) else {"fileobj": source})
    ) as tf:
        for member in tf:
            if member.name.count("/") == 1 and member.name.endswith("/PKG-INFO"):
                stream = tf.extractfile(member)
                if stream is not None:
                    return stream.read().decode("utf-8", errors="replace")
    raise LockError(f"{filename} has no PKG-INFO; cannot read its dependencies")


def read_metadata(candidate: _Candidate, session: requests.Session) -> str:
    """The METADATA (PKG-INFO for an sdist) of ``candidate``: read from a local file, from the
    index's PEP 658 ``<url>.metadata``, or from the downloaded file after checking its sha256.
    Raises LockError naming the package and the URL."""
    parts = urlsplit(candidate.url)
    where = f"PyPI package {candidate.name} {candidate.version} ({candidate.url})"
    try:
        if parts.scheme == "file":
            return _metadata_from_archive(Path(url2pathname(parts.path)), candidate.filename)
        if candidate.is_wheel:
            reply = session.get(candidate.url + ".metadata", timeout=(15, 60))
            if reply.status_code == 200:
                return reply.text
        reply = session.get(candidate.url, timeout=(15, 300))
        reply.raise_for_status()
        actual = hashlib.sha256(reply.content).hexdigest()
        if actual != candidate.sha256:
            raise LockError(
                f"{where}: downloaded sha256 {actual} differs from the index's "
                f"{candidate.sha256}; check the index"
            )
        return _metadata_from_archive(reply.content, candidate.filename)
    except (OSError, requests.RequestException, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise LockError(
            f"{where}: cannot read its metadata ({' '.join(str(exc).split())}); check the "
            "index and the network"
        ) from None


def lock_location(url: str, project_dir: Path) -> str:
    """What pixi.lock says after ``- pypi:`` for a file at ``url``: remote URLs as they are,
    local files as ``./relative`` paths inside the project, absolute paths outside it."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return url
    path = Path(url2pathname(parts.path))
    try:
        return "./" + path.relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


# ---- resolving -------------------------------------------------------------------------------


def resolve_pypi(
    job: PypiLockJob,
    *,
    project_dir: Path,
    environ: Mapping[str, str],
    log: Path,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[LockedPypi, ...]:
    """Resolve ``job`` with uv and return its packages sorted by name. Blocks (uv, then the
    metadata reads on a small thread pool). Appends uv's output to ``log``.

    Raises LockError in one line: uv missing; a requirement uv cannot satisfy (the package and
    uv's reason); a platform uv cannot target; metadata that cannot be read.
    """
    uv = find_uv()
    if uv is None:
        raise LockError(
            "cannot lock PyPI dependencies: `uv` is not installed; install this package with "
            "its dependencies (pip install -e .), which bring uv"
        )
    where = f"the PyPI dependencies of environment {job.environment!r} on {job.subdir}"
    with tempfile.TemporaryDirectory(prefix="pypi-lock.") as tmp:
        work = Path(tmp)
        argv, files = uv_compile_command(uv, job, project_dir, work)
        for name, content in files.items():
            (work / name).write_text(content, encoding="utf-8")
        start = log.stat().st_size if log.is_file() else 0
        try:
            run_logged(
                argv,
                cwd=project_dir,
                env=uv_environment(environ),
                log=log,
                timeout=timeout,
                label=f"`uv pip compile` of {where}",
                hint=f"run `{shlex.join(argv[:4])} ...` to see it all",
                error=LockError,
            )
        except LockError as exc:
            reason = _log_tail_reason(log, start)
            if reason is None:
                raise
            raise LockError(
                f"cannot resolve {where}: {reason}; fix [pypi-dependencies] or "
                "[pypi-options], or check the indexes and the network"
            ) from exc
        pylock = tomllib.loads((work / "pylock.toml").read_text(encoding="utf-8"))
    candidates = choose_files(
        pylock, work, target_tags(job.subdir, job.python_version, job.virtual_packages)
    )
    with requests.Session() as session, ThreadPoolExecutor(METADATA_WORKERS) as pool:
        texts = list(pool.map(lambda c: read_metadata(c, session), candidates))
    out = []
    for candidate, text in zip(candidates, texts, strict=True):
        requires, python = parse_metadata(text)
        out.append(
            LockedPypi(
                name=candidate.name,
                version=candidate.version,
                location=lock_location(candidate.url, project_dir),
                sha256=candidate.sha256,
                requires_dist=requires,
                requires_python=python,
                is_wheel=candidate.is_wheel,
            )
        )
    return tuple(sorted(out, key=lambda p: p.name))


def _log_tail_reason(log: Path, start: int) -> str | None:
    try:
        with log.open("rb") as fh:
            fh.seek(start)
            return uv_failure(fh.read().decode("utf-8", errors="replace"))
    except OSError:
        return None


# ---- writing into pixi.lock (py-rattler, then pipeline.pixi.locktext) -------------------------


def write_pypi_into_lock(
    lock_path: Path,
    platforms: Sequence[tuple[str, str, Sequence[str]]],
    packages: Iterable[tuple[str, str, Sequence[LockedPypi]]],
    indexes: Mapping[str, tuple[tuple[str, ...], tuple[FindLinks, ...]]],
) -> None:
    """Rewrite the v7 lock at ``lock_path`` (one py-rattler wrote) with ``packages``
    ((environment, lock platform, packages)) added, with every field pixi writes, and each
    environment's ``indexes:`` and ``find-links:`` (``indexes``: environment -> (index URLs,
    find-links)). ``platforms`` are the lock's (name, subdir, virtual packages).

    py-rattler refuses to modify a lock read from disk, so the lock is built again from its
    channels and conda records (synchronous API only), then its text is annotated
    (:func:`pipeline.pixi.locktext.annotate_lock_text`).
    """
    from rattler import LockFile, LockPlatform, Subdir

    old = LockFile.from_path(lock_path)
    new = LockFile(
        [
            LockPlatform(
                name,
                subdir=None if name == subdir else Subdir(subdir),
                virtual_packages=list(vps),
            )
            for name, subdir, vps in platforms
        ]
    )
    new_platforms = {p.name: p for p in new.platforms()}
    for env_name, env in old.environments():
        new.set_channels(env_name, list(env.channels()))
        for platform in env.platforms():
            for record in env.conda_repodata_records_for_platform(platform) or []:
                new.add_conda_package(env_name, new_platforms[platform.name], record)
    by_location: dict[str, LockedPypi] = {}
    for environment, lock_platform, pkgs in packages:
        for pkg in pkgs:
            new.add_pypi_package(
                environment, new_platforms[lock_platform], pkg.name, pkg.version, pkg.location
            )
            by_location[pkg.location] = pkg
    new.to_path(lock_path)
    text = lock_path.read_text(encoding="utf-8")
    lock_path.write_text(annotate_lock_text(text, by_location, indexes), encoding="utf-8")


__all__ = [
    "DEFAULT_INDEX",
    "LockedPypi",
    "PypiLockJob",
    "index_urls",
    "marker_environment",
    "pixi_requirement",
    "resolve_pypi",
    "target_tags",
    "uv_compile_command",
    "uv_failure",
    "uv_python_platform",
    "write_pypi_into_lock",
]
