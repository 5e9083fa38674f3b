"""Bundles in parts, and the one way every reader gets a bundle's bytes (:class:`BundleSource`).

``PIPELINE_PART_SIZE`` makes pack cut its tar into ``<bundle>.part-0001``, ``-0002``, ... and
write ``<bundle>.parts.json`` beside them::

    {"parts_format": 1, "bundle": "x.model.tar", "size": 2147493888, "sha256": "<whole tar>",
     "part_size": 734003200,
     "parts": [{"name": "x.model.tar.part-0001", "size": 734003200, "sha256": "..."}, ...]}

Parts for a bad link or a small medium (a DVD, a file-size limit): one damaged part is sent
again, not the whole bundle. Both installs take the parts file where they take a tar and read
the parts in order as one stream (:class:`BundleSource`): nothing is joined on disk first.
Each part's sha256 is computed in the install's one pass (the hash that checks a single tar
restarts at each part's first byte), so a damaged part is named by its number and expected
sha256, and a missing or short one before anything is read. All parts matching means the
whole matches: the parts file's ``sha256`` is then the bundle's. :func:`join_parts` rebuilds
the tar byte for byte for tools that want one (pixi-unpack).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.bundle.format import checksum_path
from pipeline.bundle.index import Sha256Hex, load_versioned
from pipeline.errors import BundleError
from pipeline.fsutil import CHUNK, Fingerprint, RangeCopier, atomic_output, os_error_text
from pipeline.progress import Progress, human_bytes

PARTS_FORMAT = 1
PARTS_SUFFIX = ".parts.json"


def parts_path(bundle: Path) -> Path:
    """``<bundle>.parts.json``."""
    return bundle.with_name(bundle.name + PARTS_SUFFIX)


def part_name(bundle_name: str, number: int) -> str:
    """``<bundle>.part-0001`` (numbered from 1)."""
    return f"{bundle_name}.part-{number:04d}"


def is_parts_file(path: Path) -> bool:
    return path.name.endswith(PARTS_SUFFIX)


class Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int = Field(gt=0)
    sha256: Sha256Hex

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        if "/" in value or value in ("", ".", ".."):
            raise ValueError("must be a file name beside the parts file")
        return value


class PartsFile(BaseModel):
    """``<bundle>.parts.json`` (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parts_format: int = PARTS_FORMAT
    bundle: str
    size: int = Field(ge=0)
    sha256: Sha256Hex
    part_size: int = Field(gt=0)
    parts: tuple[Part, ...]


def read_parts_file(path: Path) -> PartsFile:
    """Parse and check a parts file: its format first, then that the parts add up to the
    bundle's size. Raises BundleError (one line)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the parts file {os_error_text(exc, path)}") from None
    parts = load_versioned(
        data,
        PartsFile,
        key="parts_format",
        version=PARTS_FORMAT,
        what=f"parts file {path}",
        advice="copy it again",
    )
    if sum(p.size for p in parts.parts) != parts.size or not parts.parts:
        raise BundleError(
            f"parts file {path}: its {len(parts.parts)} parts do not add up to the bundle's "
            f"{parts.size} bytes; it is corrupt: copy it again"
        )
    return parts


# ---- the bytes of a bundle ------------------------------------------------------------------


@dataclass
class Segment:
    """One file of a bundle's bytes (the tar itself, or one part), or one range that is
    checked as a whole (a bundle rebuilt from a delta: :mod:`pipeline.bundle.delta`)."""

    number: int  # 1-based; 0 for a whole tar
    path: Path
    start: int  # offset of its first byte in the bundle
    size: int
    expected: str | None  # its sha256, when known
    fd: int = -1
    fingerprint: Fingerprint | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    def label(self) -> str:
        return f"part {self.number} ({self.path.name})" if self.number else str(self.path)


@dataclass(frozen=True)
class Piece:
    """``size`` bytes of the bundle from ``start``: bytes of ``file`` from ``at``, or
    ``data`` (generated: tar headers, decompressed members), or bytes of another
    :class:`BundleSource` from ``at`` (a member of a base bundle in parts)."""

    start: int
    size: int
    file: Segment | None = None
    at: int = 0
    data: bytes | None = None
    source: BundleSource | None = None


class BundleSource:
    """A bundle's bytes, from one tar or from its parts in order (or pieced together from a
    delta and its base), read as one file: positional reads, in-kernel copies into other
    files, a file object for ``tarfile``. Each file's fingerprint is taken at open;
    :meth:`check_unchanged` refuses a bundle written to while it was read. ``segments`` are
    the ranges hashed and checked on their own (the tar, each part). Use as a context manager
    (closes the files)."""

    def __init__(
        self,
        label: Path,
        segments: Sequence[Segment],
        parts: PartsFile | None,
        *,
        pieces: Sequence[Piece] | None = None,
        files: Sequence[Segment] | None = None,
        nested: Sequence[BundleSource] = (),
    ) -> None:
        self.label = label
        self.segments = list(segments)
        self.parts = parts
        # The files this source reads (their fds and fingerprints); the segments themselves
        # for a tar or parts.
        self.files = list(files) if files is not None else self.segments
        self.pieces = (
            list(pieces)
            if pieces is not None
            else [Piece(s.start, s.size, file=s) for s in self.segments]
        )
        self._starts = [p.start for p in self.pieces]
        self.nested = list(nested)
        self.size = sum(p.size for p in self.pieces)
        self.expected_from = str(label) if parts is not None else "none"
        self._copier = RangeCopier()

    # -- opening
    @classmethod
    def open(cls, path: Path, expected_sha256: str | None = None) -> BundleSource:
        """Open ``path``: a bundle tar (``expected_sha256``: its sha256, if known), or a
        parts file. A missing part, or one of another size, is refused before anything is
        read, with every part to send again."""
        if is_parts_file(path):
            return cls._open_parts(path)
        fd = _open(path)
        st = os.fstat(fd)
        segment = Segment(0, path, 0, st.st_size, expected_sha256, fd, Fingerprint.of(st))
        return cls(path, [segment], None)

    @classmethod
    def _open_parts(cls, path: Path) -> BundleSource:
        parts = read_parts_file(path)
        segments: list[Segment] = []
        problems: list[tuple[int, str]] = []
        start = 0
        for number, part in enumerate(parts.parts, 1):
            part_path = path.parent / part.name
            segments.append(Segment(number, part_path, start, part.size, part.sha256))
            start += part.size
            try:
                size = part_path.stat().st_size
            except OSError:
                problems.append((number, "missing"))
                continue
            if size != part.size:
                problems.append((number, f"{size} bytes instead of {part.size}"))
        if problems:
            raise BundleError(_resend(path, parts, problems))
        source = cls(path, segments, parts)
        try:
            for segment in segments:
                segment.fd = _open(segment.path)
                segment.fingerprint = Fingerprint.of(os.fstat(segment.fd))
        except BaseException:
            source.close()
            raise
        return source

    def close(self) -> None:
        for segment in self.files:
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
        for source in self.nested:
            source.close()

    def __enter__(self) -> BundleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading
    def _pieces(self, offset: int, size: int) -> Iterator[tuple[Piece, int, int]]:
        """(piece, offset in it, count) covering ``size`` bytes from ``offset``."""
        end = min(offset + size, self.size)
        index = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while offset < end and index < len(self.pieces):
            piece = self.pieces[index]
            if piece.start + piece.size > offset:
                count = min(end, piece.start + piece.size) - offset
                yield piece, offset - piece.start, count
                offset += count
            index += 1

    def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end)."""
        pieces = list(self._pieces(offset, size))
        if len(pieces) == 1 and pieces[0][0].file is not None:  # the common case: one read
            piece, at, count = pieces[0]
            assert piece.file is not None
            return os.pread(piece.file.fd, count, piece.at + at)
        view = memoryview(bytearray(max(0, min(size, self.size - offset))))
        return bytes(view[: self.preadv(view, offset)])

    def preadv(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; the count read (short at the end)."""
        done = 0
        for piece, at, count in self._pieces(offset, len(view)):
            target = view[done : done + count]
            if piece.data is not None:
                target[:] = piece.data[at : at + count]
                got = count
            elif piece.source is not None:
                got = piece.source.preadv(target, piece.at + at)
            else:
                assert piece.file is not None
                got = os.preadv(piece.file.fd, [target], piece.at + at)
            done += got
            if got < count:
                break
        return done

    def copy_to(
        self, dst: int, offset: int, size: int, progress: Callable[[int], object] | None = None
    ) -> None:
        """Write ``size`` bytes from ``offset`` at ``dst``'s position, in the kernel where it
        can (:class:`~pipeline.fsutil.RangeCopier`). Raises OSError."""
        for piece, at, count in self._pieces(offset, size):
            if piece.data is not None:
                view = memoryview(piece.data)[at : at + count]
                while view:
                    view = view[os.write(dst, view) :]
                if progress is not None:
                    progress(count)
            elif piece.source is not None:
                piece.source.copy_to(dst, piece.at + at, count, progress)
            else:
                assert piece.file is not None
                self._copier.copy(piece.file.fd, dst, piece.at + at, count, progress)

    def stream(self) -> io.BufferedReader:
        """A read-only, seekable file object over the whole bundle (for ``tarfile``)."""
        return io.BufferedReader(_SourceStream(self), buffer_size=CHUNK)

    @property
    def tar_path(self) -> Path:
        """Where the bundle's tar is, or would be once joined (its ``.sig`` and ``.sha256``
        are named after it)."""
        return self.label.parent / self.parts.bundle if self.parts is not None else self.label

    def check_unchanged(self) -> None:
        """Refuse a bundle whose files were written to since :meth:`open` (ctime moves on
        every write): what was checked would not be what was copied."""
        for segment in self.files:
            if Fingerprint.of(os.fstat(segment.fd)) != segment.fingerprint:
                raise BundleError(
                    f"{segment.label()} changed while it was read; do not change a bundle "
                    "during an install: run it again"
                )
        for source in self.nested:
            source.check_unchanged()

    def fingerprints(self) -> list[tuple[str, Fingerprint | None]]:
        return [(str(s.path), s.fingerprint) for s in self.files]

    # -- the per-segment check
    def verify_segments(self) -> None:
        """Hash every segment that has an expected sha256 and raise :meth:`check_digests`'s
        error for a mismatch: after a structural refusal (a tar header that does not parse),
        the damaged or misplaced part is the useful thing to name. A second read: failure
        paths only."""
        if not any(s.expected for s in self.segments):
            return
        digests = []
        buffer = memoryview(bytearray(4 * CHUNK))
        for segment in self.segments:
            digest = hashlib.sha256()
            at = 0
            while at < segment.size:
                want = min(len(buffer), segment.size - at)
                got = self.preadv(buffer[:want], segment.start + at)
                if got == 0:
                    break
                digest.update(buffer[:got])
                at += got
            digests.append(digest.hexdigest())
        self.check_digests(digests)

    def check_digests(
        self, digests: Sequence[str], member_sha: Mapping[int, str] | None = None
    ) -> str | None:
        """Compare the segments' sha256 (from the one pass) with what is expected. Returns the
        bundle's sha256 when it is known (a tar's expected one, or the parts file's once every
        part matches), else None. Raises BundleError naming every damaged part, or the tar.
        ``member_sha`` (the members' sha256 by data offset) lets a source pieced from several
        files name the damaged one."""
        if self.parts is None:
            segment = self.segments[0]
            if segment.expected is not None and digests[0] != segment.expected:
                raise BundleError(
                    f"bundle {segment.path} has sha256 {digests[0]}, expected "
                    f"{segment.expected} (from {self.expected_from}): the file is truncated, "
                    "corrupt or not the bundle you meant; copy it again or fix the expected "
                    "sha256"
                )
            return segment.expected
        expected_at = {p.sha256: n for n, p in enumerate(self.parts.parts, 1)}
        problems: list[tuple[int, str]] = []
        for segment, digest in zip(self.segments, digests, strict=True):
            if digest == segment.expected:
                continue
            other = expected_at.get(digest)
            problems.append(
                (
                    segment.number,
                    f"holds part {other}'s bytes: the parts were renamed or given in the "
                    "wrong order"
                    if other is not None
                    else f"damaged: sha256 {digest[:16]}...",
                )
            )
        if problems:
            raise BundleError(_resend(self.label, self.parts, problems))
        return self.parts.sha256


class _SourceStream(io.RawIOBase):
    def __init__(self, source: BundleSource) -> None:
        self._source = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        got = self._source.preadv(view, self._pos)
        self._pos += got
        return got


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BundleError(
            f"cannot read {os_error_text(exc, path)}; check the path (AUTO_INFER_VLLM_BUNDLE_PATH "
            "or AUTO_INFER_VLLM_MODEL_BUNDLES)"
        ) from None


def _resend(path: Path, parts: PartsFile, problems: Sequence[tuple[int, str]]) -> str:
    """One line: each bad part with its number, what is wrong and its expected sha256, and
    which parts to send again."""
    listed = "; ".join(
        f"part {n} ({parts.parts[n - 1].name}) is {what} (expected sha256 "
        f"{parts.parts[n - 1].sha256})"
        for n, what in problems
    )
    numbers = ", ".join(str(n) for n, _ in problems)
    return (
        f"bundle {path}: {listed}; send part{'s' if len(problems) > 1 else ''} {numbers} "
        "again; nothing was written"
    )


# ---- writing and joining parts --------------------------------------------------------------


def write_parts(
    bundle: Path,
    bundle_sha256: str,
    part_size: int,
    *,
    signing_key: Path | None = None,
    progress_stream: TextIO | None = None,
) -> PartsFile:
    """Cut ``bundle`` into parts of ``part_size`` bytes (the last one shorter) beside it and
    write ``<bundle>.parts.json``. Each part is copied in the kernel and hashed from the same
    pages; every file appears whole or not at all (temp names, renamed when complete), the
    parts file last. Parts of an earlier cut that are no longer needed are removed."""
    size = bundle.stat().st_size
    count = max(1, -(-size // part_size))
    progress = Progress(f"write {count} parts of {bundle.name}", size, stream=progress_stream)
    parts: list[Part] = []
    copier = RangeCopier()
    try:
        with bundle.open("rb") as src:
            fd = src.fileno()
            for number in range(1, count + 1):
                start = (number - 1) * part_size
                length = min(part_size, size - start)
                name = part_name(bundle.name, number)
                with atomic_output(bundle.with_name(name)) as out:
                    out.flush()
                    digest = _copy_hashing(copier, fd, out.fileno(), start, length, progress)
                parts.append(Part(name=name, size=length, sha256=digest))
    except OSError as exc:
        progress.done(None)
        raise BundleError(
            f"cannot write the parts of {bundle} ({os_error_text(exc)}); free disk space "
            "there, or unset PIPELINE_PART_SIZE"
        ) from None
    except BaseException:
        progress.done(None)
        raise
    stale = count + 1
    while bundle.with_name(part_name(bundle.name, stale)).exists():
        bundle.with_name(part_name(bundle.name, stale)).unlink()
        stale += 1
    document = PartsFile(
        bundle=bundle.name, size=size, sha256=bundle_sha256, part_size=part_size, parts=parts
    )
    data = (document.model_dump_json(indent=2) + "\n").encode()
    from pipeline.bundle.signature import sign, write_signature

    write_signature(parts_path(bundle), sign(data, signing_key) if signing_key else None)
    with atomic_output(parts_path(bundle)) as fh:
        fh.write(data)
    progress.done(f"wrote {count} parts of {human_bytes(part_size)} and {parts_path(bundle).name}")
    return document


def _copy_hashing(
    copier: RangeCopier, src: int, dst: int, start: int, length: int, progress: Progress
) -> str:
    """Copy ``length`` bytes of ``src`` from ``start`` to ``dst`` in the kernel while another
    thread hashes the same range (from the page cache the copy reads)."""
    result: list[str] = []
    error: list[BaseException] = []

    def hash_range() -> None:
        try:
            digest = hashlib.sha256()
            view = memoryview(bytearray(4 * CHUNK))
            at = start
            while at < start + length:
                got = os.preadv(src, [view[: min(len(view), start + length - at)]], at)
                if got == 0:
                    raise BundleError("the bundle shrank while its parts were written")
                digest.update(view[:got])
                at += got
            result.append(digest.hexdigest())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=hash_range, name="part-sha256", daemon=True)
    thread.start()
    try:
        copier.copy(src, dst, start, length, progress.update)
    finally:
        thread.join()
    if error:
        raise error[0]
    return result[0]


def write_source(
    source: BundleSource, output: Path, *, label: str, progress_stream: TextIO | None = None
) -> str:
    """Write the bundle that ``source`` reads as one tar at ``output``, byte for byte, with
    its ``.sha256``: copied in the kernel while another thread hashes each of the source's
    segments from the same pages, which must be what they are expected to be
    (:meth:`BundleSource.check_digests`; else nothing is left under ``output``). For
    ``doit join-parts`` (a bundle's parts) and ``doit rebuild-bundle`` (a delta and its base).
    Returns the bundle's sha256."""
    progress = Progress(label, source.size, stream=progress_stream)
    digests: list[str] = []
    error: list[BaseException] = []
    stop = threading.Event()

    def hash_segments() -> None:
        try:
            view = memoryview(bytearray(4 * CHUNK))
            for segment in source.segments:
                digest = hashlib.sha256()
                at = segment.start
                while at < segment.end and not stop.is_set():
                    got = source.preadv(view[: min(len(view), segment.end - at)], at)
                    if got == 0:
                        raise BundleError(
                            f"{segment.label()} shrank while it was read; do not change it "
                            "meanwhile"
                        )
                    digest.update(view[:got])
                    at += got
                digests.append(digest.hexdigest())
        except BaseException as exc:
            error.append(exc)

    try:
        with atomic_output(output) as out:
            out.flush()
            thread = threading.Thread(target=hash_segments, name="bundle-sha256", daemon=True)
            thread.start()
            try:
                source.copy_to(out.fileno(), 0, source.size, progress.update)
            except BaseException:
                stop.set()
                raise
            finally:
                thread.join()
            if error:
                raise error[0]
            digest = source.check_digests(digests) or digests[0]
            source.check_unchanged()
    except OSError as exc:
        progress.done(None)
        raise BundleError(
            f"cannot write {output} ({os_error_text(exc)}); free disk space there"
        ) from None
    except BaseException:
        progress.done(None)
        raise
    with atomic_output(checksum_path(output)) as fh:
        fh.write(f"{digest}  {output.name}\n".encode())
    progress.done(f"wrote {output} ({human_bytes(source.size)}, sha256 {digest[:12]})")
    return digest


def join_parts(parts_file: Path, *, progress_stream: TextIO | None = None) -> Path:
    """Rebuild the bundle tar from its parts beside the parts file, byte for byte, with its
    ``.sha256`` (:func:`write_source`). Every part is checked while it is copied; a damaged
    one is named and nothing is left under the tar's name. Returns the tar's path."""
    with BundleSource.open(parts_file) as source:
        assert source.parts is not None
        output = parts_file.parent / source.parts.bundle
        write_source(source, output, label=f"join {output.name}", progress_stream=progress_stream)
        return output


__all__ = [
    "BundleSource",
    "PartsFile",
    "Piece",
    "Segment",
    "is_parts_file",
    "join_parts",
    "part_name",
    "parts_path",
    "read_parts_file",
    "write_parts",
    "write_source",
]
