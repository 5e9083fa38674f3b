"""``doit install-model``: a model bundle into ``<models dir>/<name>/``, checked in the pass that
writes it, atomic, idempotent, offline.

:func:`install_model`, per bundle (a tar or its ``.parts.json``):

1. **Up to date?** Each installed model has a record, ``<models dir>/.infer-vllm/<name>.json``:
   the bundle files' fingerprints when it was installed, the index's sha256, every installed
   file's ``(size, mtime, inode, ctime)``. The same bundle files and intact model files: nothing
   is read ("already installed"). A bundle touched or copied again: its headers and index are
   read (a few KiB); the same index and intact files: nothing else is.
2. **Checked before anything is written**: the tar's headers (a truncated or corrupt tar is
   refused), every member is the index, its sha256, ``model/`` or a file or directory below it
   (no links, no ``..``, no absolute path, no duplicate), the index has its recorded sha256,
   its format and kind, and the members are exactly the files the index lists with their
   sizes. Free space for the model is checked (the shortfall is named).
3. **One pass**: a thread copies each file into a staging directory beside the target (in the
   kernel: ``copy_file_range``) while this one reads the bundle once, start to end, and hashes
   each file from the same bytes. The bytes come from disk once; the copy and the hash run on
   two cores. Every byte that is installed is then checked (the names and sizes against the
   index, the contents against its sha256s, the index against its own), so the tar's sha256
   would add nothing: it is computed only when a check fails, to name what was damaged: with
   the ``.sha256`` beside the tar, the tar; with the parts file, each damaged part by number
   and expected sha256, to send again. On any failure the staging directory is removed.
4. **Switch**: the staging directory and the installed one trade places in one
   ``renameat2(RENAME_EXCHANGE)``, then the old one is removed: a SIGKILL at any moment leaves
   either the old model or the new one at ``<models dir>/<name>``, never a mix or nothing.
   Where the file system cannot exchange, two renames are used and the next run puts a model
   caught between them back.

Errors are one line (:class:`~pipeline.errors.BundleError`). Runs offline: nothing here uses
the network.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import __version__, reporting
from pipeline.build.model import check_model_name
from pipeline.bundle import reader
from pipeline.bundle.format import INDEX_FILE, INDEX_SUM_FILE, MODEL_DIR, SIG_FILE
from pipeline.bundle.index import (
    BundleIndex,
    check_digests,
    check_listing,
    index_digest,
    read_index,
)
from pipeline.bundle.parts import BundleSource, is_parts_file, read_parts_file
from pipeline.bundle.signature import check_signed, signature_path
from pipeline.errors import BundleError
from pipeline.fsutil import (
    Fingerprint,
    atomic_write_text,
    fsync_dir,
    os_error_advice,
    os_error_text,
)
from pipeline.progress import Progress, human_bytes

STATE_DIR = ".infer-vllm"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Room needed beyond the model's bytes: each file's last block, and 1 MiB for the record and
# the directories.
_BLOCK = 4096
_SLACK = 1 << 20


class InstalledModel(BaseModel):
    """``<models dir>/.infer-vllm/<name>.json``: what was installed from which bundle."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    index_sha256: str
    bundle: str
    bundle_files: dict[str, tuple[int, int, int, int]]
    files: dict[str, tuple[int, int, int, int]]
    bytes: int
    tool_version: str
    installed_at: str


@dataclass(frozen=True)
class ModelInstallResult:
    bundle: Path
    name: str
    path: Path
    installed: bool
    reason: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.installed:
            return (
                f"model {self.name} at {self.path} is already installed from "
                f"{self.bundle.name}: {self.reason}"
            )
        rate = self.bytes / self.seconds / 1e9 if self.seconds else 0.0
        return (
            f"installed model {self.name} at {self.path} ({self.files} files, "
            f"{human_bytes(self.bytes)}, every file's sha256 checked) in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s)"
        )


# ---- the stage ------------------------------------------------------------------------------


def install_models(
    bundles: Sequence[Path],
    models_dir: Path,
    *,
    say: Callable[[str], None] | None = None,
    trusted_signers: Path | None = None,
) -> list[ModelInstallResult]:
    """Install each bundle in turn (:func:`install_model`); stops at the first failure."""
    return [install_model(b, models_dir, say=say, trusted_signers=trusted_signers) for b in bundles]


def models_are_current(bundles: Sequence[Path], models_dir: Path) -> bool:
    """True when every bundle is installed and unchanged (a few ``stat`` calls); never
    raises. The doit ``uptodate`` check of ``install-model``."""
    try:
        return all(_installed_from(b, models_dir) is not None for b in bundles)
    except (OSError, BundleError, ValueError):
        return False


def install_model(
    bundle: Path,
    models_dir: Path,
    *,
    say: Callable[[str], None] | None = None,
    trusted_signers: Path | None = None,
) -> ModelInstallResult:
    """Install one model bundle (see the module docstring for every step). With
    ``trusted_signers`` (an ``allowed_signers`` file) the index must be signed by a key it
    lists (:mod:`pipeline.bundle.signature`), checked before anything is written."""
    say = say or reporting.say
    bundle = Path(bundle).absolute()
    models_dir = Path(models_dir).absolute()
    started = time.monotonic()
    with _models_lock(models_dir, say):
        _recover(models_dir, say)
        current = _installed_from(bundle, models_dir)
        if current is not None:
            return ModelInstallResult(
                bundle, current.name, models_dir / current.name, False, "nothing read"
            )
        source, _from = reader.open_bundle(bundle, None)
        with source:
            members = reader.scan_checked(source)
            with _blame_the_transfer(source):
                index_member = _top_file(members, INDEX_FILE, bundle)
                index_bytes = reader.read_member(source, index_member, bundle)
                index = read_index(index_bytes, bundle)
                if index.kind != "model":
                    raise BundleError(
                        f"bundle {bundle} is an {index.kind} bundle, not a model bundle; "
                        "install it with `doit install` (AUTO_INFER_VLLM_BUNDLE_PATH)"
                    )
                sum_member = _top_file(members, INDEX_SUM_FILE, bundle)
                _check_index_sum(
                    reader.read_member(source, sum_member, bundle), index_bytes, bundle
                )
            sig = next(
                (m for m in members if reader.normalize_name(m.name, bundle) == SIG_FILE), None
            )
            signer = check_signed(
                index_bytes,
                reader.read_member(source, sig, bundle) if sig is not None else None,
                signature_path(source.tar_path),
                f"bundle {bundle}",
                trusted_signers,
            )
            if signer is None:
                say(
                    f"warning: {bundle.name} was not checked for a signature "
                    "(AUTO_INFER_VLLM_TRUSTED_SIGNERS is not set)"
                )
            else:
                say(f"{bundle.name}: signed by {signer} ({trusted_signers})")
            files, dirs = _check_members(members, bundle)
            files.pop(INDEX_FILE)
            files.pop(INDEX_SUM_FILE)
            files.pop(SIG_FILE, None)
            name = check_model_name(index.name, f"the index of {bundle} names the model")
            with _blame_the_transfer(source):
                check_listing(index, {n: m.size for n, m in files.items()}, dirs, bundle)
            target = models_dir / name
            digest = index_digest(index_bytes)
            record = _read_record(models_dir, name)
            if record is not None and record.index_sha256 == digest and _intact(target, record):
                _write_record(models_dir, _restamped(record, bundle, source))
                return ModelInstallResult(
                    bundle, name, target, False, "same content (bundle stat refreshed)"
                )
            _check_space(models_dir, index, bundle)
            staging = models_dir / f".{name}.staging-{uuid.uuid4().hex[:12]}"
            try:
                facts = _extract(source, index, files, staging, bundle, say)
                _switch(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            fsync_dir(models_dir)
            _write_record(
                models_dir,
                InstalledModel(
                    name=name,
                    index_sha256=digest,
                    bundle=str(bundle),
                    bundle_files=_bundle_facts(bundle, source),
                    files=facts,
                    bytes=index.total_bytes,
                    tool_version=__version__,
                    installed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                ),
            )
        return ModelInstallResult(
            bundle,
            name,
            target,
            True,
            "installed",
            files=len(index.files),
            bytes=index.total_bytes,
            seconds=time.monotonic() - started,
        )


# ---- checks ---------------------------------------------------------------------------------


def _check_members(
    members: Sequence[reader.BundleMember], bundle: Path
) -> tuple[dict[str, reader.BundleMember], list[str]]:
    """The model bundle's member rules; returns its files (by normalized name) and its
    directories. Pure."""
    files: dict[str, reader.BundleMember] = {}
    dirs: list[str] = []
    seen: set[str] = set()
    for raw in members:
        name = reader.normalize_name(raw.name, bundle)
        if not name:
            continue
        if name in seen:
            raise BundleError(
                f"bundle {bundle} holds {name!r} twice: the bundle is unsafe, refusing it"
            )
        seen.add(name)
        if raw.kind not in ("file", "dir"):
            raise BundleError(
                f"bundle member {name!r} is a {raw.kind}; a model bundle holds only files and "
                "directories: the bundle is unsafe, refusing it"
            )
        inside = name == MODEL_DIR or name.startswith(f"{MODEL_DIR}/")
        if raw.kind == "dir" and inside:
            dirs.append(name)
        elif raw.kind == "file" and (
            name in (INDEX_FILE, INDEX_SUM_FILE, SIG_FILE) or (inside and name != MODEL_DIR)
        ):
            files[name] = reader.BundleMember(name, "file", raw.size, raw.offset, raw.mode)
        else:
            raise BundleError(
                f"bundle member {name!r} is not part of a model bundle ({INDEX_FILE}, "
                f"{INDEX_SUM_FILE} and {MODEL_DIR}/ only): the bundle is unsafe, refusing it"
            )
    return files, dirs


def _top_file(
    members: Sequence[reader.BundleMember], name: str, bundle: Path
) -> reader.BundleMember:
    for member in members:
        if member.kind == "file" and reader.normalize_name(member.name, bundle) == name:
            return reader.BundleMember(name, "file", member.size, member.offset, member.mode)
    raise BundleError(
        f"bundle {bundle} has no {name}: it is not a model bundle (or one packed by another "
        "version); pack it with `doit pack-model`"
    )


def _check_index_sum(text: bytes, index_bytes: bytes, bundle: Path) -> None:
    """The index must have the sha256 the member after it records."""
    recorded = text.decode("ascii", "replace").split(" ", 1)[0].strip()
    if recorded != index_digest(index_bytes):
        raise BundleError(
            f"bundle {bundle}: {INDEX_FILE} does not have the sha256 recorded in "
            f"{INDEX_SUM_FILE}: the index is damaged; copy the bundle again"
        )


@contextlib.contextmanager
def _blame_the_transfer(source: BundleSource) -> Iterator[None]:
    """Turn an integrity refusal into the more useful one when the bundle's own sha256 (its
    ``.sha256``, or its parts') shows what was damaged: the part to send again. Those hashes
    are computed only here, on the failure path: when every file matches its index entry,
    every byte that is installed has been checked."""
    try:
        yield
    except BundleError:
        source.verify_segments()
        raise


def _check_space(models_dir: Path, index: BundleIndex, bundle: Path) -> None:
    st = os.statvfs(models_dir)
    free = st.f_bavail * st.f_frsize
    need = index.total_bytes + _BLOCK * len(index.files) + _SLACK
    if free < need:
        raise BundleError(
            f"not enough space in {models_dir} for model {index.name} from {bundle.name}: it "
            f"needs {human_bytes(need)}, {human_bytes(free)} is free; free "
            f"{human_bytes(need - free)} more there (or set AUTO_INFER_VLLM_MODELS_DIR to a "
            "bigger disk); nothing was written"
        )


# ---- the one pass ---------------------------------------------------------------------------


def _extract(
    source: BundleSource,
    index: BundleIndex,
    files: dict[str, reader.BundleMember],
    staging: Path,
    bundle: Path,
    say: Callable[[str], None],
) -> dict[str, tuple[int, int, int, int]]:
    """Copy the files under ``staging`` on a thread while this one hashes the bundle; check
    every hash. Returns the staged files' facts (by path below the model dir)."""
    ordered = sorted(files.values(), key=lambda m: m.offset)
    copy_error: list[BaseException] = []
    stop = threading.Event()
    facts: dict[str, tuple[int, int, int, int]] = {}
    where = staging

    def copy_all() -> None:
        nonlocal where
        try:
            for member in ordered:
                if stop.is_set():
                    return
                rel = member.name[len(MODEL_DIR) + 1 :]
                where = staging / rel
                where.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                out = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                try:
                    source.copy_to(out, member.offset, member.size)
                    st = os.fstat(out)
                finally:
                    os.close(out)
                facts[rel] = _facts(st)
        except BaseException as exc:
            copy_error.append(exc)

    staging.mkdir(mode=0o755)
    say(
        f"installing model {index.name} from {bundle.name} ({len(ordered)} files, "
        f"{human_bytes(index.total_bytes)}) into {staging.parent}"
    )
    progress = Progress(f"install {index.name}", source.size)
    copier = threading.Thread(target=copy_all, name="model-copy", daemon=True)

    def tick(count: int) -> None:
        progress.update(count)
        if copy_error:
            raise _CopyFailed

    copier.start()
    try:
        _digests, by_offset = reader.hash_pass(source, list(ordered), segments=False, progress=tick)
    except _CopyFailed:
        by_offset = {}
    except BaseException:
        stop.set()
        copier.join()
        progress.done(None)
        raise
    finally:
        copier.join()
    if copy_error:
        progress.done(None)
        exc = copy_error[0]
        if isinstance(exc, OSError):
            raise BundleError(
                f"cannot install model {index.name} into {staging.parent} "
                f"({os_error_text(exc, where)}); {os_error_advice(exc)}; nothing was changed"
            ) from None
        raise exc
    try:
        with _blame_the_transfer(source):
            check_digests(index, {m.name: by_offset[m.offset] for m in ordered}, bundle)
        source.check_unchanged()
    finally:
        progress.done(None)
    return facts


class _CopyFailed(Exception):
    """The copy thread failed: stop the hash pass (its error is reported instead)."""


# ---- switching, records, recovery -----------------------------------------------------------


def _switch(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``: an atomic exchange when ``target`` exists, a rename
    otherwise. The old model ends up at ``staging`` (removed by the caller)."""
    if not target.exists():
        staging.rename(target)
        return
    if _exchange(staging, target):
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    target.rename(old)  # a crash here: _recover puts it back
    staging.rename(target)
    old.rename(staging)


def _exchange(a: Path, b: Path) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _recover(models_dir: Path, say: Callable[[str], None]) -> None:
    """Clean what an interrupted install left: staging directories are removed; a model
    caught between the two renames of the fallback switch is put back."""
    for entry in models_dir.glob(".*.old-*"):
        name = entry.name[1:].rsplit(".old-", 1)[0]
        target = models_dir / name
        if not target.exists():
            entry.rename(target)
            say(f"model {name}: put back the copy an interrupted install had moved aside")
        else:
            shutil.rmtree(entry, ignore_errors=True)
    for entry in models_dir.glob(".*.staging-*"):
        shutil.rmtree(entry, ignore_errors=True)


def _facts(st: os.stat_result) -> tuple[int, int, int, int]:
    found = Fingerprint.of(st)
    return (found.size, found.mtime_ns, found.ino, found.ctime_ns)


def _bundle_facts(
    bundle: Path, source: BundleSource | None
) -> dict[str, tuple[int, int, int, int]]:
    """The fingerprints of the bundle's files: the tar, or the parts file and every part."""
    paths = [bundle]
    if source is not None and source.parts is not None:
        paths += [s.path for s in source.segments]
    elif source is None and is_parts_file(bundle):
        parts = read_parts_file(bundle)
        paths += [bundle.parent / p.name for p in parts.parts]
    return {str(p): _facts(p.stat()) for p in paths}


def _record_path(models_dir: Path, name: str) -> Path:
    return models_dir / STATE_DIR / f"{name}.json"


def _read_record(models_dir: Path, name: str) -> InstalledModel | None:
    try:
        return InstalledModel.model_validate_json(_record_path(models_dir, name).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def _write_record(models_dir: Path, record: InstalledModel) -> None:
    atomic_write_text(
        _record_path(models_dir, record.name), record.model_dump_json(indent=2) + "\n"
    )


def _restamped(record: InstalledModel, bundle: Path, source: BundleSource) -> InstalledModel:
    return record.model_copy(
        update={"bundle": str(bundle), "bundle_files": _bundle_facts(bundle, source)}
    )


def _intact(target: Path, record: InstalledModel) -> bool:
    for rel, facts in record.files.items():
        try:
            if _facts((target / rel).lstat()) != tuple(facts):
                return False
        except OSError:
            return False
    return True


def _installed_from(bundle: Path, models_dir: Path) -> InstalledModel | None:
    """The record of a model installed from exactly these bundle files, with its files
    intact; None otherwise. Metadata only."""
    state = models_dir / STATE_DIR
    if not state.is_dir():
        return None
    try:
        now = _bundle_facts(bundle.absolute(), None)
    except (OSError, BundleError):
        return None
    for path in sorted(state.glob("*.json")):
        record = _read_record(models_dir, path.stem)
        if record is None or record.bundle != str(bundle.absolute()):
            continue
        if {k: tuple(v) for k, v in record.bundle_files.items()} == now and _intact(
            models_dir / record.name, record
        ):
            return record
    return None


@contextlib.contextmanager
def _models_lock(models_dir: Path, say: Callable[[str], None]) -> Iterator[None]:
    """``flock`` on ``<models dir>/.infer-vllm/lock``: one install at a time per models dir."""
    try:
        (models_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(models_dir / STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BundleError(
            f"cannot use the models dir {models_dir} ({os_error_text(exc)}); "
            f"{os_error_advice(exc, 'make it a writable directory')} "
            "(AUTO_INFER_VLLM_MODELS_DIR)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another model install in {models_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = [
    "InstalledModel",
    "ModelInstallResult",
    "install_model",
    "install_models",
    "models_are_current",
]
