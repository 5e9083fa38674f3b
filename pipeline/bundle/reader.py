"""The bundle reader and its safety rules: what extract may trust, checked before anything is
written.

- :func:`refuse_other_layouts`: pixi-pack's two other outputs (a ``--directory-only`` folder, a
  ``--create-executable`` script) are refused in one line with the command that makes a tar.
- :func:`expected_sha256`: the sha256 the bundle must have (configured, else ``<tar>.sha256``,
  which must name the bundle's file: :func:`parse_checksum_file`).
- :func:`scan_members`: the tar's headers only (an uncompressed tar; a truncated or corrupt one
  is refused, and so is data after the end-of-archive blocks beyond the record's zero padding),
  as :class:`BundleMember` items; devices, FIFOs and sparse files are refused.
- :func:`check_members`: the member safety rules, pure, each refusal naming the member: no
  control character in a name, no absolute path, no ``..``, no link pointing outside its own
  top-level directory (``channel/``, ``pypi/``), also when followed through the other link
  members as the file system will, no path through a link, no duplicate; names outside
  :data:`~pipeline.bundle.format.BUNDLE_NAMES` are skipped. (Which package files the lock
  allows is :func:`pipeline.bundle.contents.check_package_members`'s, once the lock is known.)
- :func:`hash_pass`: ONE sequential pass over the file for the bundle's sha256 and, from the
  same bytes, the sha256 of every member.
- :func:`read_member`: a small member's bytes (metadata, extras), size-capped.

The metadata files are parsed and checked by :mod:`pipeline.bundle.metadata`, the channel and
the lock by :mod:`pipeline.bundle.contents`. Writing the members into a project directory (the
staging, the switch, the records) is the extract stage's (:mod:`pipeline.install.extract`).
Every refusal is a :class:`~pipeline.errors.BundleError` with one line: what, which file or
member, what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import queue
import re
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.bundle.format import (
    BUNDLE_NAMES,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    METADATA_FILE,
    checksum_path,
)
from pipeline.bundle.parts import BundleSource, is_parts_file
from pipeline.errors import BundleError
from pipeline.fsutil import CHUNK, os_error_text

_HASH_CHUNK = 4 * CHUNK
_MAX_SMALL = {METADATA_FILE: 1 << 20, ENVIRONMENT_FILE: 64 << 20, EXTRAS_FILE: 512 << 20}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TAGGED_LINE = re.compile(r"^SHA256 \((.*)\) = ([0-9A-Fa-f]+)$")  # `sha256sum --tag`
_MAX_LINK_HOPS = 40  # Linux's limit for one path lookup (ELOOP)
# C0 (NUL and newline included), DEL and C1: the characters ``str.isprintable`` and ``repr``
# treat as control characters (Unicode category Cc).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# ---- members --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleMember:
    """One tar member as the reader sees it (headers only, no data read).

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


# ---- the expected sha256 --------------------------------------------------------------------


def expected_sha256(bundle: Path, configured: str | None) -> tuple[str | None, str]:
    """The sha256 the bundle must have, and where it comes from.

    ``configured`` (``AUTO_INFER_VLLM_BUNDLE_SHA256``, already validated) wins; else the
    digest in ``<tar>.sha256`` when that file exists (:func:`parse_checksum_file`); else
    ``(None, "none")``. Raises BundleError when the ``.sha256`` file is unreadable, malformed
    or names another file.
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
    return parse_checksum_file(text, bundle.name, path), str(path)


def parse_checksum_file(text: str, bundle_name: str, path: Path) -> str:
    """The sha256 (lower-case hex) in the text of ``path``, a ``.sha256`` file that must be
    about the file ``bundle_name``. Pure.

    One line, in one of the forms ``sha256sum`` writes or reads: ``<hex>  <name>`` (what
    ``doit pack`` writes), ``<hex> *<name>`` (binary mode), ``SHA256 (<name>) = <hex>``
    (``--tag``), or a bare ``<hex>`` (no name: nothing to compare). The name may carry the
    directory ``sha256sum`` was given (``bundles/x.tar``): its last part must be
    ``bundle_name``. pixi-pack writes no such file. Raises BundleError (one line) for
    another form, several lines, or a name of another file: a checksum copied from another
    bundle must not pass as this one's.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise BundleError(
            f"{path} holds {len(lines)} lines; it must hold the sha256 of {bundle_name} alone: "
            f"write it as `sha256sum {bundle_name} > {path.name}` or remove it"
        )
    line = lines[0] if lines else ""
    tagged = _TAGGED_LINE.match(line)
    if tagged:
        named: str | None = tagged.group(1)
        digest = tagged.group(2)
    else:
        digest, _space, rest = line.partition(" ")
        named = rest[1:] if rest[:1] in (" ", "*") else rest or None
    digest = digest.lower()
    if not _HEX64.match(digest) or named == "":
        raise BundleError(
            f"{path} does not start with a sha256 (64 hex digits); write it as "
            f"`sha256sum {bundle_name} > {path.name}` or remove it"
        )
    if named is not None and posixpath.basename(named) != bundle_name:
        raise BundleError(
            f"{path} is the sha256 of {named!r}, not of {bundle_name!r}; write it as "
            f"`sha256sum {bundle_name} > {path.name}` beside the bundle, or remove it"
        )
    return digest


def open_bundle(bundle: Path, configured: str | None) -> tuple[BundleSource, str]:
    """Open a bundle tar or its parts file for reading, with the sha256 it must have set on
    it, and say where that sha256 comes from (:func:`expected_sha256`; for parts, the parts
    file, which must agree with ``configured`` and with a ``<tar>.sha256`` beside it). A tar
    that is one of pixi-pack's other outputs is refused (:func:`refuse_other_layouts`)."""
    if is_parts_file(bundle):
        source = BundleSource.open(bundle)
        assert source.parts is not None
        whole = source.parts.sha256
        try:
            beside, beside_from = expected_sha256(bundle.parent / source.parts.bundle, configured)
        except BaseException:
            source.close()
            raise
        if beside is not None and beside != whole:
            source.close()
            raise BundleError(
                f"parts file {bundle} is for a bundle with sha256 {whole}, but {beside_from} "
                f"says {beside}: they are of different bundles; copy the right ones"
            )
        return source, str(bundle)
    try:
        st = bundle.stat()
    except OSError as exc:
        raise BundleError(
            f"no bundle at {bundle} ({exc.strerror}); set the bundle variable to the bundle tar "
            "or its .parts.json"
        ) from None
    refuse_other_layouts(bundle, st)
    expected, expected_from = expected_sha256(bundle, configured)
    source = BundleSource.open(bundle, expected)
    source.expected_from = expected_from
    return source, expected_from


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


def scan_members(source: BundleSource) -> list[BundleMember]:
    """Parse the tar's headers (no data is read) and return its members in tar order.

    Raises BundleError for a file that is not an uncompressed tar, a truncated one (a member's
    data or the end-of-archive blocks past the end of the file), a corrupt header, or data
    after the end-of-archive blocks other than the zero padding of the last record
    (:func:`trailing_data_at`). Reads the headers and at most one record after them.
    """
    bundle, size = source.label, source.size
    members: list[BundleMember] = []
    try:
        with source.stream() as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
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
    tail_start = end + 2 * tarfile.BLOCKSIZE
    record_end = -(-tail_start // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    marker = source.pread(2 * tarfile.BLOCKSIZE, end)
    # One byte past the record: is there anything beyond the padding?
    tail = source.pread(record_end - tail_start + 1, tail_start)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise BundleError(
            f"bundle {bundle} is truncated or corrupt after {len(members)} members (no "
            "end-of-archive blocks where they belong); copy the bundle again"
        )
    stray = trailing_data_at(tail, tail_start, record_end)
    if stray is not None:
        raise BundleError(
            f"bundle {bundle} has data after its end-of-archive blocks (byte {stray} of "
            f"{size}; a tar ends with its two zero blocks and at most the zero padding of its "
            f"last {tarfile.RECORDSIZE}-byte record): data no member describes, such as a "
            "second archive appended; the bundle is unsafe, refusing it: make the tar again"
        )
    return members


def scan_checked(source: BundleSource) -> list[BundleMember]:
    """:func:`scan_members`, and when the headers do not parse, the bundle's own sha256 (or
    its parts') checked first: a damaged or misplaced part is named rather than the header
    it broke."""
    try:
        return scan_members(source)
    except BundleError:
        source.verify_segments()
        raise


def trailing_data_at(tail: bytes, tail_start: int, record_end: int) -> int | None:
    """Where the bytes after a tar's end-of-archive blocks stop being valid padding, or None
    when they are. ``tail`` is the file from ``tail_start`` (just after the two zero blocks)
    up to one byte past ``record_end`` (the end of the record those blocks end in). Pure.

    Valid: nothing (pixi-pack: the Rust ``tar`` crate's ``finish`` writes the two blocks and
    stops), or zeros up to the end of the record (Python's ``tarfile``, GNU tar and bsdtar
    fill the last 10240-byte record). Anything else is data that ``tarfile`` stops before and
    that a reader which skips zero blocks (``tar --ignore-zeros``) would extract unchecked.
    """
    zeros = len(tail) - len(tail.lstrip(b"\0"))
    if zeros < len(tail):
        return tail_start + zeros
    if tail_start + len(tail) > record_end:
        return record_end
    return None


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


# ---- the safety rules -----------------------------------------------------------------------


def check_members(
    members: Iterable[BundleMember], bundle: Path
) -> tuple[list[BundleMember], list[str]]:
    """Normalize and check every member; return the members to extract and the names skipped.

    Refuses (BundleError, naming the member): absolute paths, ``..``, a control character
    (C0 with NUL and newline, DEL, C1) in a name or link target, a backslash in a name,
    duplicates, symlinks whose target is absolute or leaves the link's top-level
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
        name = normalize_name(raw.name, bundle)
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
            _refuse_control_characters(name, target, "link target")
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
            _refuse_control_characters(name, member.target, "link target")
            target = normalize_name(member.target, bundle)
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


def _refuse_control_characters(name: str, text: str, what: str) -> None:
    """Refuse a control character in ``text`` (the member ``name``'s name or link target).

    No package file name holds one, and printed raw it could end a line of the log early or
    drive the terminal (escape sequences); every message shows the name through ``repr``,
    which escapes them."""
    found = _CONTROL.search(text)
    if found is not None:
        raise BundleError(
            f"bundle member {name!r} has a control character ({found.group()!r}) in its "
            f"{what}: the bundle is unsafe, refusing it"
        )


def normalize_name(name: str, bundle: Path) -> str:
    """A member name with no leading ``./`` or empty parts; refuses control characters, a
    backslash, an absolute path and ``..`` (BundleError naming the member). Pure."""
    _refuse_control_characters(name, name, "name")
    if "\\" in name:
        raise BundleError(
            f"bundle member {name!r} has a backslash in its name: the bundle is unsafe, refusing it"
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


# ---- the data -------------------------------------------------------------------------------


def hash_pass(
    source: BundleSource,
    members: Iterable[BundleMember],
    *,
    segments: bool = True,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[str], dict[int, str]]:
    """Read the bundle once, start to end: the sha256 of each of its segments (the tar, or
    each part: :class:`~pipeline.bundle.parts.BundleSource`) and the sha256 of each file
    member's data keyed by the member's data offset (names are not normalized yet here).

    Blocks for one sequential read. Three threads share the work: one reads ahead, this one
    hashes the segments, another hashes the members from the same buffers (``os.pread`` and
    ``hashlib`` release the GIL), so the two hashes cost about the time of one on two cores.
    ``segments`` False skips the segments' hash (nothing to compare it with): the list is
    then empty. ``progress`` gets the size of each chunk read. Raises BundleError when a file
    ends early (it shrank while read).
    """
    size = source.size
    regions = sorted({(m.offset, m.offset + m.size) for m in members if m.kind == "file"})
    hashers: dict[int, Any] = {start: hashlib.sha256() for start, _stop in regions}
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    work: queue.Queue[list[tuple[Any, memoryview]] | None] = queue.Queue(maxsize=8)
    stop_reading = threading.Event()
    ends = [s.end for s in source.segments]

    def read_ahead() -> None:
        pos = 0
        try:
            for stop in ends:
                while pos < stop and not stop_reading.is_set():
                    chunk = source.pread(min(_HASH_CHUNK, stop - pos), pos)
                    if not chunk:
                        raise BundleError(
                            f"the bundle shrank while it was being read (at byte {pos} of "
                            f"{size}); do not change it during the install"
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
    digests: list[str] = []
    total = hashlib.sha256()
    segment = 0
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
            if segments:
                total.update(chunk)
                if end == ends[segment]:
                    digests.append(total.hexdigest())
                    total = hashlib.sha256()
                    segment += 1
            pos = end
            if progress is not None:
                progress(len(chunk))
        if segments:  # empty segments (an empty file) end where they start
            while segment < len(ends):
                digests.append(total.hexdigest())
                total = hashlib.sha256()
                segment += 1
    finally:
        stop_reading.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a reader waiting on a full queue
                chunks.get_nowait()
        work.put(None)
        worker.join()
        reader.join()
    return digests, {start: h.hexdigest() for start, h in hashers.items()}


def read_member(source: BundleSource, member: BundleMember, bundle: Path) -> bytes:
    """The data of a small member (metadata, extras), size-capped against memory blow-ups."""
    limit = _MAX_SMALL.get(member.name, 64 << 20)
    if member.size > limit:
        raise BundleError(
            f"bundle {bundle}: {member.name} is {member.size} bytes, more than the {limit} "
            "allowed; the bundle is corrupt or not a pixi-pack bundle"
        )
    return source.pread(member.size, member.offset) if member.size else b""


__all__ = [
    "BundleMember",
    "check_members",
    "expected_sha256",
    "hash_pass",
    "normalize_name",
    "open_bundle",
    "parse_checksum_file",
    "read_member",
    "refuse_other_layouts",
    "scan_checked",
    "scan_members",
    "trailing_data_at",
]
