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
                                         size/sha256/mtime/inode/ctime, the lock's source and sha256
    .infer-vllm/patch.stamp              patch stamp: bundle sha256 and project path
    .infer-vllm/install-<env>.log        output of the last install's children
    .infer-vllm/install-request-*.json   transient: the install worker's input; left over
                                         only by a SIGKILL, removed by the next install
    .infer-vllm/previous/                while a newer extraction is being installed: the names
                                         above (and their records) that the environment runs
                                         from; put back if that install fails, else deleted
    .infer-vllm/staging-*/ trash-*/      transient; left over only by a crash, removed next time

Why a symlink and generations: conda prefixes are not relocatable (packages embed the prefix
path in scripts and text files), so an environment cannot be built in a temp dir and renamed
into place. Each install goes into a new generation directory at its final path; once it is
complete and verified, ``.pixi/envs/<env>`` is switched to it with one ``rename(2)`` of a
symlink, which is atomic: readers see the old environment or the new one, never a mix. pixi
itself symlinks ``.pixi/envs`` (``detached-environments``) and follows the link.

The records the stages pass on (``extract.json`` and ``extract.sha256``, ``patch.stamp``,
``.installed-from.json``) are frozen dataclasses with one writer and one total reader each,
at the end of this module: :class:`ExtractRecord`, :class:`PatchStamp`, :class:`InstallRecord`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import InstallError
from pipeline.fsutil import Fingerprint, atomic_write_text, os_error_advice
from pipeline.pixi import pixi_env_prefix
from pipeline.timing import PhaseTime

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
    def previous(self) -> Path:
        """The rollback point: the project files the environment runs from, while a newer
        extraction is being installed (:mod:`pipeline.install.extract`). Laid out as a
        project dir itself (``ProjectPaths.of(paths.previous)`` reads its records)."""
        return self.state / "previous"

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


def read_stamp_line(path: Path) -> str | None:
    """The first line of a text stamp file, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
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
        advice = os_error_advice(exc, "make it a writable directory")
        raise InstallError(
            f"cannot create the install lock {paths.lock_file} ({exc.strerror}); {advice} "
            "(AUTO_INFER_VLLM_PIXI_PROJECT_DIR must name a writable directory)"
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


# ---- the records between the stages -----------------------------------------------------------
#
# extract writes ``extract.json`` then ``extract.sha256``; patch-channels reads them and writes
# ``patch.stamp``; frozen-install reads all three and writes ``.installed-from.json`` into the
# generation it installs. Each record is a frozen dataclass with one writer and one reader,
# here. The readers are total: a missing, unreadable, malformed or other-format record reads
# as None (the stage then runs again, or says what to run first), never a traceback.

EXTRACT_RECORD_FORMAT = 1  # extract.json
INSTALLED_FROM_FORMAT = 1  # .installed-from.json
TOOL_NAME = "infer-vllm-pipeline"


class _Malformed(ValueError):
    """A record field is missing or has the wrong type (caught by the readers)."""


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    # bool is an int to isinstance: a record never holds a bool where a number belongs.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _Malformed(key)
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    return None if doc.get(key) is None else _field(doc, key, kind)


def _strings(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(key)
    return tuple(value)


# How a plain field is read, by its annotation. A field of another type is the record's own
# code to read and write (``skip``); an annotation missing here is a KeyError, a bug that the
# readers do not hide behind None.
_READERS: dict[object, Callable[[Mapping[str, Any], str], Any]] = {
    str: lambda doc, key: _field(doc, key, str),
    int: lambda doc, key: _field(doc, key, int),
    float: lambda doc, key: float(_field(doc, key, (int, float))),
    str | None: lambda doc, key: _optional(doc, key, str),
    tuple[str, ...]: _strings,
}


@functools.cache
def _plain_fields(cls: type, skip: frozenset[str]) -> tuple[tuple[str, Any], ...]:
    """(name, reader) of each field of the dataclass ``cls`` but ``skip``, in order."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, _READERS[hints[f.name]]) for f in dataclasses.fields(cls) if f.name not in skip
    )


def _read_fields(cls: type, doc: Any, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The plain fields of ``cls`` from the JSON object ``doc``, each checked for its type:
    raises _Malformed (naming the field) for one missing or mistyped."""
    if not isinstance(doc, dict):
        raise _Malformed(cls.__name__)
    return {name: read(doc, name) for name, read in _plain_fields(cls, skip)}


def _write_fields(record: Any, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The plain fields of ``record`` as JSON values (a tuple as a list)."""
    values = {name: getattr(record, name) for name, _ in _plain_fields(type(record), skip)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class FileFacts:
    """A file of the extraction: size and sha256, plus the stat that makes them trustworthy
    later: while the file's :class:`~pipeline.fsutil.Fingerprint` (size, mtime, inode,
    ctime; its docstring says why all four) is the recorded one, it holds the same content
    and is not hashed again. A record written before ctime was kept (4 fields) has
    ``ctime_ns`` None and never matches: its files are hashed again once.
    """

    size: int
    sha256: str
    mtime_ns: int
    ino: int
    ctime_ns: int | None = None

    def to_json(self) -> list[Any]:
        return [self.size, self.sha256, self.mtime_ns, self.ino, self.ctime_ns]

    @classmethod
    def of(cls, st: os.stat_result, sha256: str) -> FileFacts:
        found = Fingerprint.of(st)
        return cls(found.size, sha256, found.mtime_ns, found.ino, found.ctime_ns)

    @classmethod
    def from_json(cls, value: Any) -> FileFacts:
        """Raises _Malformed unless ``value`` is ``[size, sha256, mtime_ns, ino, ctime_ns]``
        (or the older ``[size, sha256, mtime_ns, ino]``)."""
        if not isinstance(value, list) or len(value) not in (4, 5):
            raise _Malformed("files")
        size, sha, mtime_ns, ino, *rest = value
        ctime_ns = rest[0] if rest else None
        if not (isinstance(sha, str) and all(_is_int(v) for v in (size, mtime_ns, ino))):
            raise _Malformed("files")
        if ctime_ns is not None and not _is_int(ctime_ns):
            raise _Malformed("files")
        return cls(size, sha, mtime_ns, ino, ctime_ns)

    @property
    def fingerprint(self) -> Fingerprint | None:
        """The recorded fingerprint; None for a record from before ctime was kept."""
        if self.ctime_ns is None:
            return None
        return Fingerprint(self.size, self.mtime_ns, self.ino, self.ctime_ns)

    def matches(self, st: os.stat_result) -> bool:
        """True when ``st`` is the file as recorded (same fingerprint)."""
        return self.fingerprint == Fingerprint.of(st)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BundleStat:
    """The bundle tar as it was when extracted: while its :class:`~pipeline.fsutil.Fingerprint`
    (size, mtime, inode, ctime) and device are the same, it is the same tar (no re-hash). A
    record written before ctime was kept reads as ``ctime_ns`` -1, which never matches: that
    tar is hashed once more (not extracted again when its content is the same)."""

    path: str
    size: int
    mtime_ns: int
    ino: int
    dev: int
    ctime_ns: int = -1

    @classmethod
    def of(cls, bundle: Path, st: os.stat_result) -> BundleStat:
        found = Fingerprint.of(st)
        return cls(str(bundle), found.size, found.mtime_ns, found.ino, st.st_dev, found.ctime_ns)

    def to_json(self) -> dict[str, Any]:
        return _write_fields(self)

    @classmethod
    def from_json(cls, value: Any) -> BundleStat:
        if not isinstance(value, dict):
            raise _Malformed("bundle")
        return cls(**_read_fields(cls, {"ctime_ns": -1, **value}))


@dataclass(frozen=True)
class ExtractRecord:
    """``extract.json``: what the last extraction put into the project dir.

    Written by :func:`pipeline.install.extract.extract_bundle`; read by every later stage
    through :func:`read_extract_record`. ``files`` maps each extracted package file (relative
    name) to its facts; ``source`` says where pixi.toml/pixi.lock came from (``extras``,
    ``template`` or ``channel``).
    """

    bundle: BundleStat
    sha256: str
    expected_from: str
    environment: str
    platform: str
    pixi_pack_version: str | None
    source: str
    lock_sha256: str
    skipped_sdists: tuple[str, ...]
    tool_version: str
    extracted_at: str
    files: Mapping[str, FileFacts]

    _NESTED: ClassVar[frozenset[str]] = frozenset({"bundle", "files"})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EXTRACT_RECORD_FORMAT,
            **_write_fields(self, skip=self._NESTED),
            "bundle": self.bundle.to_json(),
            "files": {name: facts.to_json() for name, facts in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ExtractRecord:
        """Raises _Malformed for a missing or mistyped field, or another format."""
        if doc.get("format") != EXTRACT_RECORD_FORMAT:
            raise _Malformed("format")
        table = _field(doc, "files", dict)
        return cls(
            bundle=BundleStat.from_json(doc.get("bundle")),
            files={str(name): FileFacts.from_json(value) for name, value in table.items()},
            **_read_fields(cls, doc, skip=cls._NESTED),
        )


def write_extract_record(paths: ProjectPaths, record: ExtractRecord) -> None:
    """Write ``extract.json`` (atomic). The extraction becomes current only when the stamp
    that names the same sha256 is written after it (:func:`write_extract_stamp`): a crash in
    between leaves no stamp, so the next run extracts again."""
    write_json(paths.extract_record, record.to_json())


def write_extract_stamp(paths: ProjectPaths, sha256: str) -> None:
    """Write ``extract.sha256``: the bundle's sha256 and a newline (atomic; doit's target)."""
    atomic_write_text(paths.extract_stamp, f"{sha256}\n")


def read_extract_stamp(paths: ProjectPaths) -> str | None:
    """The bundle sha256 in ``extract.sha256``, or None when there is none."""
    return read_stamp_line(paths.extract_stamp)


def read_extract_record(paths: ProjectPaths) -> ExtractRecord | None:
    """The extraction record when it is readable, of this format and belongs to the current
    stamp; else None. Never raises."""
    document = read_json(paths.extract_record)
    stamp = read_extract_stamp(paths)
    if document is None or stamp is None:
        return None
    try:
        record = ExtractRecord.from_json(document)
    except (_Malformed, TypeError, ValueError):
        return None
    return record if record.sha256 == stamp else None


@dataclass(frozen=True)
class PatchStamp:
    """``patch.stamp``: which extraction (bundle sha256) was patched, where, for which
    environment. Three lines of text on disk."""

    bundle_sha256: str
    project: str
    environment: str


def write_patch_stamp(paths: ProjectPaths, stamp: PatchStamp) -> None:
    atomic_write_text(
        paths.patch_stamp, f"{stamp.bundle_sha256}\n{stamp.project}\n{stamp.environment}\n"
    )


def read_patch_stamp(paths: ProjectPaths) -> PatchStamp | None:
    """The patch stamp, or None when it is missing, unreadable or not three lines."""
    try:
        lines = paths.patch_stamp.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) != 3:
        return None
    return PatchStamp(*lines)


@dataclass(frozen=True)
class InstalledHost:
    """The host facts an install was checked against."""

    glibc: str | None
    cuda: str | None
    cuda_source: str


@dataclass(frozen=True)
class InstallVerify:
    """The runtime verify of an install: the commands run, the last line they printed, and the
    versions the import check reported (``(("torch", "2.13.0+cpu"), ("vllm", "0.32.0"))``)."""

    commands: tuple[str, ...]
    output: str
    versions: tuple[tuple[str, str], ...] = ()


_VERSIONS = frozenset({"versions"})  # InstallVerify's: a JSON object on disk


@dataclass(frozen=True)
class InstallRecord:
    """``.installed-from.json`` in a generation: what was installed there, from what.

    Written by :func:`pipeline.install.frozen.frozen_install` before the switch; read through
    :func:`read_install_record`.
    """

    bundle: str | None
    bundle_sha256: str
    lock_sha256: str
    environment: str
    platform: str
    source: str
    tool_version: str
    conda_packages: int
    pypi_packages: int
    prefix: str
    installed_at: str
    seconds: float
    verify: InstallVerify | None
    host: InstalledHost
    warnings: tuple[str, ...] = ()
    # Where the install's time went, up to the verify (pipeline.timing); () in older records.
    phases: tuple[PhaseTime, ...] = ()

    _NESTED: ClassVar[frozenset[str]] = frozenset({"verify", "host", "phases"})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INSTALLED_FROM_FORMAT,
            "tool": TOOL_NAME,
            **_write_fields(self, skip=self._NESTED),
            "verify": (
                None
                if self.verify is None
                else {
                    **_write_fields(self.verify, skip=_VERSIONS),
                    "versions": dict(self.verify.versions),
                }
            ),
            "host": _write_fields(self.host),
            "phases": [p.to_json() for p in self.phases],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> InstallRecord:
        """Raises _Malformed for a missing or mistyped field, or another format."""
        if doc.get("format") != INSTALLED_FROM_FORMAT:
            raise _Malformed("format")
        verify = doc.get("verify")
        if verify is not None:
            if not isinstance(verify, dict):
                raise _Malformed("verify")
            versions = verify.get("versions", {})  # absent in records of older tool versions
            if not isinstance(versions, dict) or not all(
                isinstance(v, str) for v in versions.values()
            ):
                raise _Malformed("verify.versions")
            verify = InstallVerify(
                versions=tuple(sorted(versions.items())),
                **_read_fields(InstallVerify, verify, skip=_VERSIONS),
            )
        host = _field(doc, "host", dict)
        return cls(
            verify=verify,
            host=InstalledHost(**_read_fields(InstalledHost, host)),
            phases=_phases(doc.get("phases", [])),
            **_read_fields(cls, doc, skip=cls._NESTED),
        )


def _phases(value: Any) -> tuple[PhaseTime, ...]:
    """``[[name, wall, cpu, children], ...]`` (:meth:`PhaseTime.to_json`) as PhaseTimes."""
    if not isinstance(value, list):
        raise _Malformed("phases")
    phases = []
    for row in value:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or not isinstance(row[0], str)
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row[1:])
        ):
            raise _Malformed("phases")
        phases.append(PhaseTime(row[0], float(row[1]), float(row[2]), float(row[3])))
    return tuple(phases)


def write_install_record(generation: Path, record: InstallRecord) -> None:
    """Write ``.installed-from.json`` into ``generation`` (atomic)."""
    write_json(generation / INSTALLED_FROM, record.to_json())


def read_install_record(path: Path) -> InstallRecord | None:
    """The install record at ``path`` (``.installed-from.json``), or None when it is missing,
    unreadable, malformed or of another format. Never raises."""
    document = read_json(path)
    if document is None:
        return None
    try:
        return InstallRecord.from_json(document)
    except (_Malformed, TypeError, ValueError):
        return None
