"""Extract a bundle into the offline project directory: verified first, safe, atomic, idempotent.

:func:`extract_bundle` is the ``extract`` stage of ``doit install``. In order:

1. **Up to date?** The stamp (``.infer-vllm/extract.sha256``) and the record
   (``extract.json``) say which bundle was extracted last, with the tar's ``(size, mtime_ns,
   inode, device)`` at that time and every extracted file's ``(size, mtime_ns, inode,
   ctime_ns)`` (ctime: a file rewritten in place with its size and mtime put back differs). When
   the tar, the expected sha256 and the files all still match, nothing is read: a reboot with a
   multi-GB bundle costs a few ``stat`` calls, never a re-hash (doit's own ``file_dep`` check
   would re-hash the tar with md5 on a fresh doit database or a touched file). A replaced or
   touched tar is hashed again; a damaged extraction is extracted again.
2. **Read-only checks, before anything is written**: the tar's headers are parsed (an
   uncompressed tar only; a truncated or corrupt one is refused), then ONE sequential pass over
   the file computes the bundle's sha256 and, from the same bytes, the sha256 of every member.
   The bundle's sha256 must equal ``AUTO_INFER_VLLM_BUNDLE_SHA256``, else the one in
   ``<tar>.sha256`` beside it (when neither exists the sha256 is recorded, with a warning).
   Every member must be safe: no absolute path, no ``..``, no link pointing outside its own
   top-level directory (``channel/``, ``pypi/``), also when followed through the other link
   members as the file system will, no path through a link, no device, FIFO or sparse file,
   no duplicate; names outside the bundle layout are skipped. ``pixi-pack.json``
   must say version ``1`` and this host's platform.
3. **Staging**: members are copied (``copy_file_range`` from the verified tar, no second hash)
   into ``.infer-vllm/staging-*`` inside the project dir, with ``pixi.toml`` and ``pixi.lock``
   taken from the bundle's extras (``infer-vllm-bundle.json``), else from the ``vllm-pixi/``
   template when its lock matches the bundle's channel, else generated from the channel's
   ``repodata.json`` for bundles written by pixi-pack itself (what pixi-unpack installs: every
   package of the channel, plus every wheel of ``pypi/``). The lock is then checked against the
   channel (:mod:`pipeline.install.contents`): the environment is in it, its packages are
   exactly the channel's, and every package file has the lock's sha256 (a swapped archive is
   refused).
4. **Switch**: the stamps are removed, the previous bundle's names are moved to a trash dir and
   the staged ones renamed into place, the record and then the stamp are written. A crash
   before the stamp leaves no stamp, so the next run extracts again; the installed environment
   (``.pixi/envs``) is never touched by this stage.

The other two outputs of pixi-pack are refused in one line before anything is read
(:func:`refuse_other_layouts`): a ``--directory-only`` folder (the message gives the ``tar``
command that makes a bundle of it) and a ``--create-executable`` script (its payload is
base64, not a tar at an offset; the message gives the command that decodes it).

Every problem raises :class:`~pipeline.errors.BundleError` with one line: what, which file or
member, what to do. Serialized with the other stages by the project's install lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import queue
import re
import shutil
import stat
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from pipeline import __version__, reporting
from pipeline.bundle.format import (
    CHANNEL_DIR,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    PYPI_DIR,
    REPODATA_FILE,
    checksum_path,
)
from pipeline.bundle.metadata import BundleExtras, PixiPackMetadata
from pipeline.errors import BundleError
from pipeline.fsutil import CHUNK, fsync_dir, os_error_advice, os_error_text, os_errors_as
from pipeline.install.contents import (
    LOCK_NAME,
    MANIFEST_NAME,
    check_lock_against_channel,
    read_repodata,
    synthesize_project,
)
from pipeline.install.layout import (
    BundleStat,
    ExtractRecord,
    FileFacts,
    ProjectPaths,
    install_lock,
    read_extract_record,
    read_extract_stamp,
    write_extract_record,
    write_extract_stamp,
)
from pipeline.pixi.envs import host_platform
from pipeline.pixi.lockfile import LockedEnvironment

# Top-level names a bundle may hold; anything else is skipped (never written).
BUNDLE_NAMES = (METADATA_FILE, ENVIRONMENT_FILE, EXTRAS_FILE, CHANNEL_DIR, PYPI_DIR)
# What an extraction owns in the project dir (replaced as a whole by the next one).
MANAGED_NAMES = (*BUNDLE_NAMES, MANIFEST_NAME, LOCK_NAME)
_HASH_CHUNK = 4 * CHUNK
_COPY_CHUNK = 64 * CHUNK
_MAX_SMALL = {METADATA_FILE: 1 << 20, ENVIRONMENT_FILE: 64 << 20, EXTRAS_FILE: 512 << 20}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_LINK_HOPS = 40  # Linux's limit for one path lookup (ELOOP)
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}

Source = Literal["extras", "template", "channel"]


# ---- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleMember:
    """One tar member as the extraction sees it.

    ``name`` is normalized (no leading ``./``, no empty or ``.`` parts). ``offset`` is where its
    data starts in the tar; ``target`` is a link's target (symlink: as written; hardlink: the
    normalized name of the member it repeats).
    """

    name: str
    kind: Literal["file", "dir", "symlink", "hardlink"]
    size: int
    offset: int
    mode: int
    target: str = ""

    @property
    def top(self) -> str:
        return self.name.split("/", 1)[0]


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_bundle` did (``extracted`` False: it was up to date)."""

    bundle: Path
    sha256: str
    extracted: bool
    reason: str
    source: str = ""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        if not self.extracted:
            return f"{self.bundle.name} ({self.sha256[:12]}) already extracted: {self.reason}"
        return (
            f"extracted {self.bundle.name} ({self.sha256[:12]}, {self.files} files, "
            f"{self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s; pixi.toml/pixi.lock from "
            f"{self.source}"
        )


# ---- the expected sha256 --------------------------------------------------------------------


def expected_sha256(bundle: Path, configured: str | None) -> tuple[str | None, str]:
    """The sha256 the bundle must have, and where it comes from.

    ``configured`` (``AUTO_INFER_VLLM_BUNDLE_SHA256``, already validated) wins; else the first
    word of ``<tar>.sha256`` when that file exists; else ``(None, "none")``. Raises BundleError
    when the ``.sha256`` file is unreadable or malformed.
    """
    if configured:
        return configured.lower(), "AUTO_INFER_VLLM_BUNDLE_SHA256"
    path = checksum_path(bundle)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "none"
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {path} ({exc}); fix or remove it") from None
    words = text.split()
    digest = words[0].lower() if words else ""
    if not _HEX64.match(digest):
        raise BundleError(
            f"{path} does not start with a sha256 (64 hex digits); write it as "
            f"`sha256sum {bundle.name} > {path.name}` or remove it"
        )
    return digest, str(path)


# ---- other things pixi-pack writes ----------------------------------------------------------

# pixi-pack --create-executable (Quantco/pixi-pack at c45671612fb7c8725ce3044de0b7fd0ba597defb,
# src/pack.rs `create_self_extracting_executable`, src/header.sh) writes src/header.sh (ending
# in a line `@@END_HEADER@@`), a newline, the tar BASE64-encoded on one line, a newline, a line
# `@@END_ARCHIVE@@`, then the pixi-unpack binary, base64 too. The payload is not a tar at an
# offset: it would have to be decoded to a second multi-GB file before our checks could read
# it, so such a script is refused with the command that decodes it.
SFX_HEADER_END = b"\n@@END_HEADER@@\n"
_SFX_PROBE = 64 * 1024


def refuse_other_layouts(bundle: Path, st: os.stat_result) -> None:
    """Refuse, in one line, the two other outputs of pixi-pack: a ``--directory-only`` folder
    and a ``--create-executable`` script. Reads at most 64 KiB."""
    if stat.S_ISDIR(st.st_mode):
        if not (bundle / METADATA_FILE).is_file():
            raise BundleError(
                f"bundle {bundle} is a directory; set AUTO_INFER_VLLM_BUNDLE_PATH to the bundle tar"
            )
        raise BundleError(
            f"bundle {bundle} is a pixi-pack --directory-only folder, not a bundle tar; make the "
            f"tar from it (`tar -cf {bundle.name}.tar -C {bundle} .`) and set "
            "AUTO_INFER_VLLM_BUNDLE_PATH to that, or pack without --directory-only"
        )
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(
            f"bundle {bundle} is not a regular file; set AUTO_INFER_VLLM_BUNDLE_PATH to the "
            "bundle tar"
        )
    try:
        with bundle.open("rb") as fh:
            head = fh.read(_SFX_PROBE)
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bundle} ({os_error_text(exc, bundle)})") from None
    if head.startswith(b"#!") and SFX_HEADER_END in head:
        raise BundleError(
            f"bundle {bundle} is a pixi-pack --create-executable script (base64 payload after "
            "@@END_HEADER@@), not a bundle tar; decode its tar with `sed -n "
            f"'/^@@END_HEADER@@$/,/^@@END_ARCHIVE@@$/p' {bundle.name} | sed '1,2d;$d' | "
            "base64 -d > bundle.tar` and install that, or pack without --create-executable"
        )


# ---- reading the tar ------------------------------------------------------------------------


def scan_members(bundle: Path, size: int) -> list[BundleMember]:
    """Parse the tar's headers (no data is read) and return its members in tar order.

    Raises BundleError for a file that is not an uncompressed tar, a truncated one (a member's
    data or the end-of-archive blocks past the end of the file) or a corrupt header.
    """
    members: list[BundleMember] = []
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                members.append(_member(info))
                if info.offset_data + info.size > size:
                    raise BundleError(
                        f"bundle {bundle} is truncated: member {info.name!r} needs "
                        f"{info.offset_data + info.size} bytes, the file has {size}; copy the "
                        "bundle again (and check it with its .sha256)"
                    )
            end = tar.offset
    except tarfile.TarError as exc:
        raise BundleError(
            f"bundle {bundle} is not a readable uncompressed tar ({exc}); it may be truncated "
            "or compressed: copy it again, or decompress it first"
        ) from None
    with bundle.open("rb") as fh:
        fh.seek(end)
        marker = fh.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise BundleError(
            f"bundle {bundle} is truncated or corrupt after {len(members)} members (no "
            "end-of-archive blocks where they belong); copy the bundle again"
        )
    return members


def _member(info: tarfile.TarInfo) -> BundleMember:
    if info.isdir():
        kind: Literal["file", "dir", "symlink", "hardlink"] = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.isreg() and not info.issparse():
        kind = "file"
    else:
        what = (
            "a device"
            if info.isdev() and not info.isfifo()
            else "a FIFO"
            if info.isfifo()
            else "a sparse file"
            if info.issparse()
            else f"of tar type {info.type!r}"
        )
        raise BundleError(
            f"bundle member {info.name!r} is {what}; bundles hold only files, directories and "
            "links: the bundle is unsafe, refusing it"
        )
    return BundleMember(
        name=info.name,
        kind=kind,
        size=info.size if kind == "file" else 0,
        offset=info.offset_data,
        mode=info.mode,
        target=info.linkname,
    )


def check_members(
    members: Iterable[BundleMember], bundle: Path
) -> tuple[list[BundleMember], list[str]]:
    """Normalize and check every member; return the members to extract and the names skipped.

    Refuses (BundleError, naming the member): absolute paths, ``..``, NUL or backslash in a
    name, duplicates, symlinks whose target is absolute or leaves the link's top-level
    directory, hardlinks to anything but an earlier regular file, members below a symlink.
    Members outside :data:`BUNDLE_NAMES` are skipped (never written). Pure.

    Symlinks are checked twice: lexically, one by one, then as the file system will follow
    them once everything is extracted (:func:`_check_link_tree`): a link whose target goes
    through another link member is resolved through that link, whichever comes first in the
    tar, so a chain of links that are each harmless alone cannot climb out.
    """
    kept: list[BundleMember] = []
    skipped: list[str] = []
    seen: dict[str, BundleMember] = {}
    links: dict[str, str] = {}  # symlink member -> its target, as written
    for raw in members:
        name = _normalize(raw.name, bundle)
        if name == "":
            continue  # the "./" entry of the root
        member = BundleMember(name, raw.kind, raw.size, raw.offset, raw.mode, raw.target)
        if name in seen:
            raise BundleError(
                f"bundle {bundle} holds {name!r} twice; a bundle must not overwrite its own "
                "members: the bundle is unsafe, refusing it"
            )
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise BundleError(
                    f"bundle member {name!r} lies below the symbolic link "
                    f"{'/'.join(parts[:depth])!r}: the bundle is unsafe, refusing it"
                )
        if member.kind == "symlink":
            target = member.target
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            # A link must stay inside its own top-level directory (channel/, pypi/): never
            # out of the bundle, nor into the project's other files (.pixi/, pixi.lock...).
            top = name.split("/", 1)[0]
            if not target or target.startswith("/") or not resolved.startswith(f"{top}/"):
                raise BundleError(
                    f"bundle member {name!r} is a symbolic link to {target!r}, outside the "
                    f"bundle's {top}/: the bundle is unsafe, refusing it"
                )
            links[name] = target
        elif member.kind == "hardlink":
            target = _normalize(member.target, bundle)
            original = seen.get(target)
            if original is None or original.kind != "file":
                raise BundleError(
                    f"bundle member {name!r} is a hard link to {member.target!r}, which is not "
                    "an earlier file of the bundle: the bundle is unsafe, refusing it"
                )
            member = BundleMember(
                name, "hardlink", original.size, original.offset, original.mode, target
            )
        seen[name] = member
        if member.top not in BUNDLE_NAMES:
            skipped.append(name)
            continue
        kept.append(member)
    _check_link_tree(seen, links, bundle)
    return kept, skipped


def _check_link_tree(
    members: Mapping[str, BundleMember], links: Mapping[str, str], bundle: Path
) -> None:
    """Refuse what the lexical checks of :func:`check_members` cannot see, because the file
    system resolves links and the order of the members does not matter to it: a member below a
    link that comes after it, and a link that, followed through the other link members (as
    ``open`` will follow it), leaves its top-level directory or loops. Every step of the walk
    must stay inside that directory: outside it lie the project's own files and links
    (``.pixi/envs``...), which the bundle does not describe. Pure."""
    for name in members:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in links:
                raise BundleError(
                    f"bundle member {name!r} lies below the symbolic link {parent!r}: the "
                    "bundle is unsafe, refusing it"
                )
    for name, target in links.items():
        top = name.split("/", 1)[0]
        try:
            resolved = _follow(name.split("/")[:-1], target, links, budget=[_MAX_LINK_HOPS])
        except _LinkLoop:
            raise BundleError(
                f"bundle member {name!r} is a symbolic link to {target!r} in a loop of links: "
                "the bundle is unsafe, refusing it"
            ) from None
        if resolved is None or len(resolved) < 2:
            raise BundleError(
                f"bundle member {name!r} is a symbolic link to {target!r}, which leaves the "
                f"bundle's {top}/ once the links it goes through are followed: the bundle is "
                "unsafe, refusing it"
            )


class _LinkLoop(Exception):
    """More than :data:`_MAX_LINK_HOPS` links followed for one link (the kernel's ELOOP)."""


def _follow(
    parent: list[str], target: str, links: Mapping[str, str], *, budget: list[int]
) -> list[str] | None:
    """Where ``target``, a link's text read in directory ``parent`` (path parts from the
    extraction root, with no link in them), ends up when every link member on the way is
    followed. None when a step leaves ``parent[0]`` (the link's top-level directory); raises
    _LinkLoop when more than :data:`_MAX_LINK_HOPS` links are followed in all. Pure."""
    parts = list(parent)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if len(parts) <= 1:
                return None
            parts.pop()
            continue
        here = "/".join([*parts, comp])
        if here not in links:
            parts.append(comp)
            continue
        budget[0] -= 1
        if budget[0] < 0:
            raise _LinkLoop(here)
        followed = _follow(parts, links[here], links, budget=budget)
        if followed is None:
            return None
        parts = followed
    return parts


def _normalize(name: str, bundle: Path) -> str:
    if "\0" in name or "\\" in name:
        raise BundleError(
            f"bundle member {name!r} has a NUL or backslash in its name: the bundle is unsafe, "
            "refusing it"
        )
    if name.startswith("/"):
        raise BundleError(
            f"bundle member {name!r} has an absolute path: the bundle is unsafe, refusing it"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(
            f"bundle member {name!r} climbs out with '..': the bundle is unsafe, refusing it"
        )
    return "/".join(parts)


def hash_pass(fd: int, size: int, members: Iterable[BundleMember]) -> tuple[str, dict[int, str]]:
    """Read the tar once, start to end: its sha256, and the sha256 of each file member's data
    keyed by the member's data offset (names are not normalized yet at this point).

    Blocks for one sequential read of ``size`` bytes. Three threads share the work: one
    reads ahead, this one hashes the whole, another hashes the members from the same buffers
    (``os.pread`` and ``hashlib`` release the GIL), so the two hashes cost about the time of
    one on two cores. Raises BundleError when the file ends early (it shrank while read).
    """
    regions = sorted({(m.offset, m.offset + m.size) for m in members if m.kind == "file"})
    hashers: dict[int, Any] = {start: hashlib.sha256() for start, _stop in regions}
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    work: queue.Queue[list[tuple[Any, memoryview]] | None] = queue.Queue(maxsize=8)
    stop_reading = threading.Event()

    def read_ahead() -> None:
        pos = 0
        try:
            while pos < size and not stop_reading.is_set():
                chunk = os.pread(fd, min(_HASH_CHUNK, size - pos), pos)
                if not chunk:
                    raise BundleError(
                        f"the bundle shrank while it was being read (at byte {pos} of {size}); "
                        "do not change it during the install"
                    )
                chunks.put(chunk)
                pos += len(chunk)
            chunks.put(None)
        except BaseException as exc:
            chunks.put(exc)

    def hash_members() -> None:
        while (batch := work.get()) is not None:
            for hasher, view in batch:
                hasher.update(view)

    reader = threading.Thread(target=read_ahead, name="bundle-reader", daemon=True)
    worker = threading.Thread(target=hash_members, name="member-hashes", daemon=True)
    reader.start()
    worker.start()
    total = hashlib.sha256()
    first = 0  # regions before it are complete
    pos = 0
    try:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            end = pos + len(chunk)
            view = memoryview(chunk)
            batch: list[tuple[Any, memoryview]] = []
            index = first
            while index < len(regions) and regions[index][0] < end:
                start, stop = regions[index]
                lo, hi = max(start, pos), min(stop, end)
                if lo < hi:
                    batch.append((hashers[start], view[lo - pos : hi - pos]))
                if stop > end:
                    break
                index += 1
            first = index
            if batch:
                work.put(batch)
            total.update(chunk)
            pos = end
    finally:
        stop_reading.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a reader waiting on a full queue
                chunks.get_nowait()
        work.put(None)
        worker.join()
        reader.join()
    return total.hexdigest(), {start: h.hexdigest() for start, h in hashers.items()}


def read_member(fd: int, member: BundleMember, bundle: Path) -> bytes:
    """The data of a small member (metadata, extras), size-capped against memory blow-ups."""
    limit = _MAX_SMALL.get(member.name, 64 << 20)
    if member.size > limit:
        raise BundleError(
            f"bundle {bundle}: {member.name} is {member.size} bytes, more than the {limit} "
            "allowed; the bundle is corrupt or not a pixi-pack bundle"
        )
    return os.pread(fd, member.size, member.offset) if member.size else b""


def _first_error(exc: ValidationError) -> str:
    """``<what> at <where>`` of the first error of ``exc`` (``top``: the whole document)."""
    first = exc.errors()[0]
    return f"{first['msg']} at {'.'.join(str(p) for p in first['loc']) or 'top'}"


def check_metadata(data: bytes, bundle: Path, host: str) -> PixiPackMetadata:
    """Parse ``pixi-pack.json`` and require format version 1 and this host's platform."""
    try:
        metadata = PixiPackMetadata.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(
            f"bundle {bundle}: {METADATA_FILE} is not valid ({_first_error(exc)}); "
            "the bundle is corrupt"
        ) from None
    if metadata.version != FORMAT_VERSION:
        raise BundleError(
            f"bundle {bundle}: {METADATA_FILE} has format version {metadata.version!r}, and "
            f"this tool reads version {FORMAT_VERSION!r} only; pack it with a matching pixi-pack "
            "or pipeline version"
        )
    if metadata.platform != host:
        raise BundleError(
            f"bundle {bundle} is for platform {metadata.platform}, this host is {host}; pack the "
            f"environment for {host} (PIPELINE_PLATFORM={host})"
        )
    return metadata


# ---- the stage ------------------------------------------------------------------------------


def extract_is_current(
    bundle: Path, project_dir: Path, *, environment: str, configured_sha256: str | None
) -> bool:
    """True when the last extraction is of this bundle (same tar stat, same expected sha256,
    same environment) and every extracted file is unchanged. Reads metadata only (a few
    ``stat`` calls); never raises. The doit ``uptodate`` check of ``extract``."""
    try:
        expected, _source = expected_sha256(bundle, configured_sha256)
        return _stale_reason(ProjectPaths.of(project_dir), bundle, expected, environment) is None
    except (OSError, BundleError):
        return False


def extract_bundle(
    bundle: Path,
    project_dir: Path,
    *,
    environment: str,
    configured_sha256: str | None = None,
    template_dir: Path | None = None,
    host: str | None = None,
    say: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract ``bundle`` into ``project_dir`` (see the module docstring for every step).

    Idempotent: the same bundle again returns at once (``extracted`` False) without reading
    the tar. Blocks on the project's install lock, then for one read of the tar and one copy of
    its members. ``template_dir`` is the ``vllm-pixi/`` project used for bundles without
    extras; ``host`` replaces this host's platform (tests). Raises BundleError; on any failure
    the project dir keeps its previous extraction (or none) and ``.pixi/envs`` is untouched.
    """
    say = say or reporting.say
    bundle = Path(bundle).absolute()
    paths = ProjectPaths.of(project_dir)
    host = host or host_platform()
    started = time.monotonic()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"warning: {message}")

    with (
        install_lock(paths, say=say),
        os_errors_as(BundleError, f"cannot extract {bundle} into {paths.root}"),
    ):
        expected, expected_from = expected_sha256(bundle, configured_sha256)
        try:
            st = bundle.stat()
        except OSError as exc:
            raise BundleError(
                f"no bundle at {bundle} ({exc.strerror}); set AUTO_INFER_VLLM_BUNDLE_PATH to the "
                "bundle tar"
            ) from None
        refuse_other_layouts(bundle, st)
        reason = _stale_reason(paths, bundle, expected, environment)
        if reason is None:
            digest = read_extract_stamp(paths) or ""
            return ExtractResult(bundle, digest, extracted=False, reason="nothing changed")
        if expected is None:
            warn(
                f"no expected sha256 for {bundle} (set AUTO_INFER_VLLM_BUNDLE_SHA256 or put "
                f"{checksum_path(bundle).name} beside it): its integrity is not checked"
            )

        fd = os.open(bundle, os.O_RDONLY)
        try:
            scan_error: BundleError | None = None
            members: list[BundleMember] = []
            try:
                members = scan_members(bundle, st.st_size)
            except BundleError as exc:
                scan_error = exc
            say(f"checking {bundle.name} ({st.st_size / 1e6:.1f} MB)")
            digest, member_sha = hash_pass(fd, st.st_size, members)
            if expected is not None and digest != expected:
                raise BundleError(
                    f"bundle {bundle} has sha256 {digest}, expected {expected} (from "
                    f"{expected_from}): the file is truncated, corrupt or not the bundle you "
                    "meant; copy it again or fix the expected sha256"
                )
            if scan_error is not None:
                raise scan_error
            if _same_content(paths, digest, environment):
                _refresh_bundle_stat(paths, bundle, st)
                return ExtractResult(
                    bundle, digest, extracted=False, reason="same content (tar stat refreshed)"
                )
            kept, skipped = check_members(members, bundle)
            if skipped:
                warn(
                    f"bundle {bundle} has {len(skipped)} members outside "
                    f"{', '.join(BUNDLE_NAMES)} (first: {skipped[0]}); they are not extracted"
                )
            by_name = {m.name: m for m in kept}
            if METADATA_FILE not in by_name:
                raise BundleError(
                    f"bundle {bundle} has no {METADATA_FILE}: it is not a pixi-pack bundle"
                )
            metadata = check_metadata(read_member(fd, by_name[METADATA_FILE], bundle), bundle, host)
            extras = _read_extras(fd, by_name.get(EXTRAS_FILE), bundle, metadata)
            env_yml = (
                read_member(fd, by_name[ENVIRONMENT_FILE], bundle).decode("utf-8", "replace")
                if ENVIRONMENT_FILE in by_name
                else None
            )
            file_members = {m.name: m for m in kept if m.kind in ("file", "hardlink")}
            # A hard link's offset is its original's (check_members): same bytes, same hash.
            sha_of = {name: member_sha[m.offset] for name, m in file_members.items()}

            staging = paths.state / f"staging-{uuid.uuid4().hex[:12]}"
            _remove_leftovers(paths)
            try:
                staging.mkdir(parents=True)
                say(f"extracting {len(kept)} members into {paths.root}")
                _extract_members(fd, kept, staging, bundle, st)
                source = _project_files(
                    staging,
                    paths,
                    environment=environment,
                    platform=(extras.lock_platform if extras else None) or metadata.platform,
                    extras=extras,
                    template_dir=template_dir,
                    env_yml=env_yml,
                    sha_of=sha_of,
                    warn=warn,
                )
                lock_sha = hashlib.sha256((staging / LOCK_NAME).read_bytes()).hexdigest()
                _commit(paths, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)

        files: dict[str, FileFacts] = {}
        total = 0
        for name in sorted(sha_of):
            fst = (paths.root / name).stat()
            files[name] = FileFacts.of(fst, sha_of[name])
            total += fst.st_size
        write_extract_record(
            paths,
            ExtractRecord(
                bundle=BundleStat.of(bundle, st),
                sha256=digest,
                expected_from=expected_from,
                environment=environment,
                # The lock platform the stages after this one select (by name, else subdir).
                platform=(extras.lock_platform if extras else None) or metadata.platform,
                pixi_pack_version=metadata.pixi_pack_version,
                source=source,
                lock_sha256=lock_sha,
                skipped_sdists=tuple(extras.skipped_sdists) if extras else (),
                tool_version=__version__,
                extracted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                files=files,
            ),
        )
        write_extract_stamp(paths, digest)
        fsync_dir(paths.state)
        return ExtractResult(
            bundle,
            digest,
            extracted=True,
            reason=reason,
            source=source,
            files=len(files),
            bytes=total,
            seconds=time.monotonic() - started,
            warnings=tuple(warnings),
        )


# ---- internals ------------------------------------------------------------------------------


def _files_intact(paths: ProjectPaths, record: ExtractRecord) -> bool:
    for name, facts in record.files.items():
        try:
            st = (paths.root / name).lstat()
        except OSError:
            return False
        if not facts.matches(st):
            return False
    return paths.manifest.is_file() and paths.lock.is_file()


def _stale_reason(
    paths: ProjectPaths, bundle: Path, expected: str | None, environment: str
) -> str | None:
    """Why the extraction must run again, or None when it is current. Metadata only."""
    record = read_extract_record(paths)
    if record is None:
        return "nothing extracted yet"
    if record.bundle != BundleStat.of(bundle, bundle.stat()):
        return "the bundle file changed"
    if expected is not None and record.sha256 != expected:
        return "a different bundle is expected"
    if record.environment != environment:
        return f"environment changed to '{environment}'"
    if not _files_intact(paths, record):
        return "extracted files were changed or removed"
    return None


def _same_content(paths: ProjectPaths, digest: str, environment: str) -> bool:
    record = read_extract_record(paths)
    return (
        record is not None
        and record.sha256 == digest
        and record.environment == environment
        and _files_intact(paths, record)
    )


def _refresh_bundle_stat(paths: ProjectPaths, bundle: Path, st: os.stat_result) -> None:
    record = read_extract_record(paths)
    if record is not None:
        write_extract_record(paths, replace(record, bundle=BundleStat.of(bundle, st)))


def _read_extras(
    fd: int, member: BundleMember | None, bundle: Path, metadata: PixiPackMetadata
) -> BundleExtras | None:
    if member is None:
        return None
    try:
        extras = BundleExtras.model_validate_json(read_member(fd, member, bundle))
    except ValidationError as exc:
        raise BundleError(
            f"bundle {bundle}: {EXTRAS_FILE} is not valid ({_first_error(exc)}); pack it again"
        ) from None
    if hashlib.sha256(extras.pixi_lock.encode("utf-8")).hexdigest() != extras.lock_sha256:
        raise BundleError(
            f"bundle {bundle}: the pixi.lock inside {EXTRAS_FILE} does not have its recorded "
            "sha256; the bundle is corrupt: pack it again"
        )
    if extras.platform != metadata.platform:
        raise BundleError(
            f"bundle {bundle}: {EXTRAS_FILE} says platform {extras.platform} but "
            f"{METADATA_FILE} says {metadata.platform}; pack it again"
        )
    return extras


def _extract_members(
    fd: int, members: Iterable[BundleMember], staging: Path, bundle: Path, st: os.stat_result
) -> None:
    """Write the members under ``staging``: directories, files copied from the tar's bytes,
    links as checked by :func:`check_members`."""
    target = staging
    try:
        for member in members:
            target = staging / member.name
            if member.kind == "dir":
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if member.kind == "symlink":
                target.symlink_to(member.target)
                continue
            mode = 0o755 if member.mode & 0o111 else 0o644
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                _copy_region(fd, out, member.offset, member.size)
            finally:
                os.close(out)
            target.chmod(mode)
    except OSError as exc:
        raise BundleError(
            f"cannot extract {bundle} into {staging.parent.parent} "
            f"({os_error_text(exc, target)}); {os_error_advice(exc)}"
        ) from None
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise BundleError(f"bundle {bundle} changed while it was extracted; run the install again")


def _copy_region(src: int, dst: int, offset: int, size: int) -> None:
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < size:
        count = min(_COPY_CHUNK, size - done)
        if kernel:
            try:
                copied = os.copy_file_range(src, dst, count, offset + done, done)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                kernel = False
                continue
        else:
            data = os.pread(src, count, offset + done)
            copied = os.pwrite(dst, data, done) if data else 0
        if copied <= 0:
            raise OSError(errno.EIO, "unexpected end of the bundle", "bundle")
        done += copied


def _project_files(
    staging: Path,
    paths: ProjectPaths,
    *,
    environment: str,
    platform: str,
    extras: BundleExtras | None,
    template_dir: Path | None,
    env_yml: str | None,
    sha_of: Mapping[str, str],
    warn: Callable[[str], None],
) -> Source:
    """Put ``pixi.toml`` and ``pixi.lock`` into ``staging`` and check the lock against the
    staged channel; return where they came from."""
    repodata = read_repodata(staging / CHANNEL_DIR)

    def check(label: str, skipped: Iterable[str] = ()) -> LockedEnvironment:
        return check_lock_against_channel(
            staging / LOCK_NAME,
            environment,
            platform,
            repodata,
            sha_of.get,
            lock_label=label,
            skipped_sdists=skipped,
            file_md5=lambda rel: _md5(staging / rel),
        )

    if extras is not None:
        (staging / MANIFEST_NAME).write_text(extras.pixi_toml, encoding="utf-8")
        (staging / LOCK_NAME).write_text(extras.pixi_lock, encoding="utf-8")
        check(f"the bundle's pixi.lock ({EXTRAS_FILE})", extras.skipped_sdists)
        return "extras"

    if template_dir is not None:
        t_manifest, t_lock = template_dir / MANIFEST_NAME, template_dir / LOCK_NAME
        if t_manifest.is_file() and t_lock.is_file():
            shutil.copyfile(t_manifest, staging / MANIFEST_NAME)
            shutil.copyfile(t_lock, staging / LOCK_NAME)
            try:
                check(f"the template lock {t_lock}")
                return "template"
            except BundleError as exc:
                warn(
                    f"the bundle has no {EXTRAS_FILE} and the template {t_lock} does not "
                    f"describe it ({exc.message}); installing the bundle's channel as "
                    "pixi-unpack does"
                )
    synthesize_project(staging, paths.channel, paths.pypi, environment, platform, repodata, env_yml)
    check(f"the lock generated from {CHANNEL_DIR}/*/{REPODATA_FILE}")
    return "channel"


def _md5(path: Path) -> str | None:
    try:
        digest = hashlib.md5()
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def _remove_leftovers(paths: ProjectPaths) -> None:
    """Staging and trash dirs of an install that crashed (we hold the lock: nobody uses them)."""
    if paths.state.is_dir():
        for entry in paths.state.iterdir():
            if entry.name.startswith(("staging-", "trash-")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _commit(paths: ProjectPaths, staging: Path) -> None:
    """Replace the project's managed names with the staged ones. The stamps go first, so a
    crash in between leaves a project that the next run extracts again."""
    for stamp in (paths.extract_stamp, paths.patch_stamp):
        stamp.unlink(missing_ok=True)
    fsync_dir(paths.state)
    trash = paths.state / f"trash-{uuid.uuid4().hex[:12]}"
    trash.mkdir()
    try:
        for name in MANAGED_NAMES:
            current = paths.root / name
            if os.path.lexists(current):
                current.rename(trash / name)
        for name in MANAGED_NAMES:
            staged = staging / name
            if os.path.lexists(staged):
                staged.rename(paths.root / name)
        fsync_dir(paths.root)
    except OSError as exc:
        raise BundleError(
            f"cannot move the extracted bundle into {paths.root} ({exc.strerror}); fix the "
            "permissions there and run the install again"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(trash, ignore_errors=True)


__all__ = [
    "BUNDLE_NAMES",
    "BundleMember",
    "ExtractResult",
    "check_members",
    "check_metadata",
    "expected_sha256",
    "extract_bundle",
    "extract_is_current",
    "hash_pass",
    "refuse_other_layouts",
    "scan_members",
]
