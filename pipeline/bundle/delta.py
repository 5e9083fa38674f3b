"""Delta bundles: only what changed crosses the gap, and the full bundle is rebuilt byte for byte.

Conda packages and wheels never change once published, and the index of every bundle this
project writes (:mod:`pipeline.bundle.index`) lists each file's sha256. A delta therefore works
by whole file: ``doit pack`` with ``PIPELINE_BASE_BUNDLE`` writes, beside the new bundle,
``PIPELINE_DELTA`` (default ``<bundle stem>.delta.tar``) and its ``.sha256``::

    delta/                          (always the first member: how a delta is recognized)
    delta/<name>                    a package file the base does not have, stored as is
    delta/<name>.zlib               a generated member (index, signature, extras with the
                                    lock, SBOM, environment.yml, repodata.json), compressed
    infer-vllm-delta.json           the manifest below

The manifest (:class:`DeltaFile`) names the base (its sha256, size and index sha256) and the
full new bundle (sha256, size), and lists every member of the new bundle in tar order with
where its bytes come from: ``delta``, ``zlib`` or ``base`` (with its name there). Nothing
else is needed: a tar's headers, padding and end blocks follow from names and sizes
(:func:`pipeline.bundle.tar.tar_layout`, the same code that wrote the full tar).

In the container, :func:`open_delta` pieces the full bundle's bytes together from the delta
and the base, as a :class:`~pipeline.bundle.parts.BundleSource`: headers and decompressed
members from memory, new packages from the delta, the rest from the base, which is either
the bundle tar (or parts) in ``AUTO_INFER_VLLM_BASE_BUNDLE_PATH`` or the project dir's
installed extraction (its files, each recorded with its sha256 when it was extracted). The
extract stage then reads that source exactly as it reads a tar: one pass computes the full
bundle's sha256, which must be the manifest's, and every member's, checked against the new
index (and its signature). Nothing is written to disk first; :func:`rebuild_bundle` writes
the same bytes as a tar for pixi-unpack or the next hop (``doit rebuild-bundle``).

Refusals, in one line each, before anything changes: a delta for another base (both sha256s
named), a base file that is not what the delta needs (named, with where it came from), a
damaged delta (its ``.sha256``), and a rebuilt bundle whose sha256 is not the recorded one
(the first member that differs is named, and whether its bytes came from the delta or the
base).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field

from pipeline import __version__
from pipeline.bundle import reader
from pipeline.bundle.format import (
    CHANNEL_DIR,
    DELTA_DIR,
    DELTA_FILE,
    DELTA_FORMAT,
    INDEX_FILE,
    PYPI_DIR,
    REPODATA_FILE,
    SIG_FILE,
    ZLIB_SUFFIX,
    checksum_path,
)
from pipeline.bundle.index import BundleIndex, Sha256Hex, load_versioned, read_index
from pipeline.bundle.parts import BundleSource, Piece, Segment, is_parts_file, write_source
from pipeline.bundle.signature import write_signature
from pipeline.bundle.tar import TarMember, tar_layout, write_tar
from pipeline.errors import BundleError
from pipeline.fsutil import Fingerprint, atomic_output, os_error_text
from pipeline.progress import human_bytes

_MAX_ZLIB = 256 << 20  # a generated member is a few hundred KB; a bomb is refused


# ---- the manifest ---------------------------------------------------------------------------


class BundleRef(BaseModel):
    """A whole bundle as the delta knows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: Sha256Hex
    size: int = Field(ge=0)
    index_sha256: Sha256Hex


class DeltaMember(BaseModel):
    """One member of the full bundle, and where its bytes come from (files only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["dir", "file"]
    size: int = Field(ge=0, default=0)
    sha256: Sha256Hex | None = None
    source: Literal["delta", "zlib", "base"] | None = None
    # Its name in the base when it differs (source "base"); else the same name.
    base_name: str | None = None

    @property
    def in_base(self) -> str:
        """Its name in the base bundle (source "base")."""
        return self.base_name or self.name

    @property
    def stored(self) -> str:
        """Its name inside the delta tar."""
        suffix = ZLIB_SUFFIX if self.source == "zlib" else ""
        return f"{DELTA_DIR}/{self.name}{suffix}"


class DeltaFile(BaseModel):
    """``infer-vllm-delta.json`` (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delta_format: int = DELTA_FORMAT
    tool: str = "infer-vllm-pipeline"
    tool_version: str
    base: BundleRef
    target: BundleRef
    members: tuple[DeltaMember, ...]


# How a base member is read: a function of the member and its offset in the full bundle.
_Locate = Callable[["DeltaMember", int], Piece]


def _is_package(name: str) -> bool:
    """A package file (a conda archive or a wheel): what may come from the base."""
    top, _, rest = name.partition("/")
    if top == PYPI_DIR:
        return "/" not in rest
    return top == CHANNEL_DIR and rest.count("/") == 1 and not rest.endswith("/" + REPODATA_FILE)


# ---- the build host: write a delta ----------------------------------------------------------


@dataclass(frozen=True)
class DeltaResult:
    """The delta written by :func:`write_delta`."""

    path: Path
    sha256: str
    size: int
    manifest: DeltaFile

    def summary(self) -> str:
        carried = [m for m in self.manifest.members if m.source == "delta"]
        reused = [m for m in self.manifest.members if m.source == "base"]
        share = 100 * self.size / max(1, self.manifest.target.size)
        return (
            f"wrote {self.path} ({human_bytes(self.size)}, {share:.1f}% of the full "
            f"{human_bytes(self.manifest.target.size)}): {len(carried)} new package files "
            f"({human_bytes(sum(m.size for m in carried))}), {len(reused)} taken from the base "
            f"{self.manifest.base.name} ({self.manifest.base.sha256[:12]})"
        )


@dataclass
class _Opened:
    """A bundle opened for reading: its source, members by name, index and sha256."""

    source: BundleSource
    members: dict[str, reader.BundleMember]
    order: list[reader.BundleMember]
    index: BundleIndex
    index_bytes: bytes


def _open_indexed(
    path: Path, what: str, sha256: str | None = None, *, hash_unknown: bool = True
) -> tuple[_Opened, str | None]:
    """Open a bundle of this project (tar or parts), its members and its index; returns it
    with its sha256: known from ``sha256``, a ``.sha256`` beside it or its parts file, else
    hashed here (one read of the whole bundle), or None when not ``hash_unknown``."""
    source, _ = reader.open_bundle(path, sha256)
    try:
        order = reader.scan_checked(source)
        members = {reader.normalize_name(m.name, path): m for m in order}
        if INDEX_FILE not in members:
            raise BundleError(
                f"{what} {path} has no {INDEX_FILE}: it was not packed by this pipeline "
                "(or by an older version); a delta needs bundles with an index: pack the base "
                "again with this version"
            )
        index_bytes = reader.read_member(source, members[INDEX_FILE], path)
        index = read_index(index_bytes, path)
        if index.kind != "env":
            raise BundleError(
                f"{what} {path} is a {index.kind} bundle; deltas are made of environment "
                "bundles (`doit pack`)"
            )
        digest = sha256 or source.segments[0].expected
        if source.parts is not None:
            digest = source.parts.sha256
        if digest is None and hash_unknown:
            digests, _ = reader.hash_pass(source, [])
            digest = digests[0]
        return _Opened(source, members, order, index, index_bytes), digest
    except BaseException:
        source.close()
        raise


def write_delta(
    bundle: Path,
    bundle_sha256: str,
    base: Path,
    output: Path,
    *,
    progress_stream: TextIO | None = None,
) -> DeltaResult:
    """Write the delta from ``base`` (a bundle tar or its parts file) to ``bundle`` (the new
    full tar, whose sha256 is ``bundle_sha256``) at ``output``, with ``<output>.sha256`` and,
    when the new bundle is signed, ``<output>.sig`` (its index's signature). Atomic, like
    every bundle file. Raises BundleError (one line)."""
    new, _ = _open_indexed(bundle, "bundle", bundle_sha256)
    with new.source:
        old, base_sha256 = _open_indexed(base, "base bundle")
        assert base_sha256 is not None
        with old.source:
            base_by_sha: dict[str, str] = {}
            for entry in old.index.files:
                if _is_package(entry.name):
                    base_by_sha.setdefault(entry.sha256, entry.name)
            old_names = {e.name: e.sha256 for e in old.index.files}
            listed = {e.name: e.sha256 for e in new.index.files}
            members: list[DeltaMember] = []
            stored: list[TarMember] = []
            for member in new.order:
                name = reader.normalize_name(member.name, bundle)
                if member.kind == "dir":
                    members.append(DeltaMember(name=name, kind="dir"))
                    continue
                if member.kind != "file":
                    raise BundleError(
                        f"bundle {bundle} holds the {member.kind} {name!r}; a delta is made of "
                        "bundles written by `doit pack`"
                    )
                sha = listed.get(name)
                if _is_package(name) and sha is not None:
                    base_name = name if old_names.get(name) == sha else base_by_sha.get(sha)
                    if base_name is not None:
                        entry = DeltaMember(
                            name=name,
                            kind="file",
                            size=member.size,
                            sha256=sha,
                            source="base",
                            base_name=None if base_name == name else base_name,
                        )
                    else:
                        entry = DeltaMember(
                            name=name, kind="file", size=member.size, sha256=sha, source="delta"
                        )
                        stored.append(
                            TarMember.file(entry.stored, bundle, member.size, member.offset)
                        )
                else:
                    data = reader.read_member(new.source, member, bundle)
                    sha = hashlib.sha256(data).hexdigest()
                    entry = DeltaMember(
                        name=name, kind="file", size=member.size, sha256=sha, source="zlib"
                    )
                    stored.append(TarMember.text(entry.stored, zlib.compress(data, 9)))
                members.append(entry)
            manifest = DeltaFile(
                tool_version=__version__,
                base=BundleRef(
                    name=old.source.tar_path.name,
                    sha256=base_sha256,
                    size=old.source.size,
                    index_sha256=hashlib.sha256(old.index_bytes).hexdigest(),
                ),
                target=BundleRef(
                    name=bundle.name,
                    sha256=bundle_sha256,
                    size=new.source.size,
                    index_sha256=hashlib.sha256(new.index_bytes).hexdigest(),
                ),
                members=tuple(members),
            )
            if manifest.target.size != tar_layout(_layout_members(manifest), bundle).size:
                raise BundleError(
                    f"bundle {bundle} is not laid out as `doit pack` writes it (its size "
                    "differs from the one its members give); pack it again with this version"
                )
            # One member per line: readable, and small (no indentation).
            document = _manifest_json(manifest)
            dirs = sorted({d for m in stored for d in _ancestors(m.name)})
            tar = write_tar(
                output,
                [TarMember.text(DELTA_FILE, document), *map(TarMember.dir, dirs), *stored],
                progress_stream=progress_stream,
                label=f"write {output.name}",
            )
            sig_member = new.members.get(SIG_FILE)
            signature = reader.read_member(new.source, sig_member, bundle) if sig_member else None
    write_signature(output, signature)
    with atomic_output(checksum_path(output)) as fh:
        fh.write(f"{tar.sha256}  {output.name}\n".encode())
    return DeltaResult(output, tar.sha256, tar.size, manifest)


def _manifest_json(manifest: DeltaFile) -> bytes:
    head = manifest.model_dump(mode="json", exclude={"members"})
    lines = [json.dumps(m.model_dump(mode="json", exclude_none=True)) for m in manifest.members]
    text = json.dumps(head)[:-1] + ', "members": [\n' + ",\n".join(lines) + "\n]}\n"
    return text.encode()


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts))]


def _layout_members(manifest: DeltaFile) -> list[TarMember]:
    return [
        TarMember.dir(m.name) if m.kind == "dir" else TarMember(name=m.name, size=m.size)
        for m in manifest.members
    ]


# ---- the container: read a delta ------------------------------------------------------------


def is_delta(path: Path) -> bool:
    """Whether ``path`` is a delta tar: its first member is the ``delta/`` directory (a
    bundle's is ``channel/`` or a top-level file). One 512-byte read; False on any error."""
    if is_parts_file(path):
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return len(head) == 512 and head[:100].rstrip(b"\0") in (b"delta/", b"delta")


def read_manifest(path: Path) -> DeltaFile:
    """The manifest of the delta at ``path`` (headers and one small member read)."""
    with BundleSource.open(path) as source:
        return _manifest(source, _members(source, path), path)


def _members(source: BundleSource, path: Path) -> dict[str, reader.BundleMember]:
    return {reader.normalize_name(m.name, path): m for m in reader.scan_members(source)}


def _manifest(
    source: BundleSource, members: Mapping[str, reader.BundleMember], path: Path
) -> DeltaFile:
    if DELTA_FILE not in members:
        raise BundleError(f"delta {path} has no {DELTA_FILE}; it is not a delta: copy it again")
    manifest = load_versioned(
        reader.read_member(source, members[DELTA_FILE], path),
        DeltaFile,
        key="delta_format",
        version=DELTA_FORMAT,
        what=f"delta {path}",
        advice="copy it again",
    )
    return manifest


@dataclass(frozen=True)
class InstalledBase:
    """The project dir's installed extraction as a delta's base: the bundle sha256 it was
    extracted from and its package files (path and the sha256 recorded at extraction; the
    caller has checked that each file is unchanged since)."""

    label: str
    sha256: str
    files: Mapping[str, tuple[Path, str]]


class DeltaSource(BundleSource):
    """The full bundle's bytes, pieced from a delta and its base (see the module docstring).
    Its one segment is the whole bundle, checked against the manifest's sha256. Its label and
    ``tar_path`` are the delta's (whose ``.sig`` beside is the new index's signature)."""

    def __init__(
        self,
        delta: Path,
        manifest: DeltaFile,
        pieces: Sequence[Piece],
        files: Sequence[Segment],
        nested: Sequence[BundleSource],
        *,
        base_label: str,
        origin: Mapping[int, DeltaMember],
    ) -> None:
        size = sum(p.size for p in pieces)
        whole = Segment(0, delta, 0, size, manifest.target.sha256)
        super().__init__(delta, [whole], None, pieces=pieces, files=files, nested=nested)
        self.delta = delta
        self.manifest = manifest
        self.base_label = base_label
        self.origin = dict(origin)
        self.expected_from = f"the delta {delta}"

    def check_digests(
        self, digests: Sequence[str], member_sha: Mapping[int, str] | None = None
    ) -> str | None:
        expected = self.manifest.target.sha256
        if digests[0] == expected:
            return expected
        for offset, member in sorted(self.origin.items()):
            found = (member_sha or {}).get(offset)
            if found is not None and found != member.sha256:
                where = (
                    f"the base ({self.base_label}, as {member.in_base})"
                    if member.source == "base"
                    else f"the delta {self.delta}"
                )
                raise BundleError(
                    f"the bundle rebuilt from delta {self.delta.name} is not "
                    f"{self.manifest.target.name}: {member.name} from {where} has sha256 "
                    f"{found}, the delta says {member.sha256}; "
                    + (
                        "the base was changed: give the base bundle in "
                        "AUTO_INFER_VLLM_BASE_BUNDLE_PATH, or install the full bundle"
                        if member.source == "base"
                        else "copy the delta again"
                    )
                )
        raise BundleError(
            f"the bundle rebuilt from delta {self.delta} and {self.base_label} has sha256 "
            f"{digests[0]}, the delta says {expected}: the delta is corrupt; copy it again"
        )


def open_delta(
    delta: Path,
    configured_sha256: str | None,
    *,
    base_bundle: Path | None = None,
    installed: InstalledBase | None = None,
) -> tuple[DeltaSource, str]:
    """Open ``delta`` over its base (``base_bundle``, else ``installed``) as the full
    bundle's bytes, and say where its expected sha256 comes from. The delta file itself is
    checked first against ``configured_sha256`` or its ``.sha256`` (one read of the delta,
    which holds only what changed). Raises BundleError naming both sha256s for a delta of
    another base."""
    expected, expected_from = reader.expected_sha256(delta, configured_sha256)
    own = BundleSource.open(delta, expected)
    own.expected_from = expected_from
    nested: list[BundleSource] = []
    files: list[Segment] = list(own.files)
    try:
        if expected is not None:
            digests, _ = reader.hash_pass(own, [])
            own.check_digests(digests)
        members = _members(own, delta)
        manifest = _manifest(own, members, delta)
        locate, label = _base_reader(manifest, delta, base_bundle, installed, nested, files)
        layout = tar_layout(_layout_members(manifest), delta)
        by_name = {m.name: m for m in manifest.members}
        pieces: list[Piece] = []
        origin: dict[int, DeltaMember] = {}
        pending = bytearray()
        pos = 0

        def flush() -> None:
            nonlocal pending
            if pending:
                pieces.append(Piece(pos - len(pending), len(pending), data=bytes(pending)))
                pending = bytearray()

        for header, layout_member in zip(layout.headers, layout.members, strict=True):
            pending += header
            pos += len(header)
            entry = by_name[layout_member.name]
            if entry.kind == "file" and entry.size:
                origin[pos] = entry
                if entry.source == "zlib":
                    pending += _inflate(own, members, entry, delta)
                else:
                    flush()
                    pieces.append(
                        _stored_piece(own, members, entry, delta, pos)
                        if entry.source == "delta"
                        else locate(entry, pos)
                    )
                pos += entry.size
            pad = -entry.size % 512 if entry.kind == "file" else 0
            pending += b"\0" * pad
            pos += pad
        pending += b"\0" * layout.end
        pos += layout.end
        flush()
        if pos != manifest.target.size:
            raise BundleError(
                f"delta {delta} describes a bundle of {pos} bytes, but names its size as "
                f"{manifest.target.size}; it is corrupt: copy it again"
            )
        source = DeltaSource(
            delta, manifest, pieces, files, nested, base_label=label, origin=origin
        )
    except BaseException:
        for opened in nested:
            opened.close()
        for segment in files:
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
        raise
    return source, f"the delta {delta} ({expected_from})"


def _stored(
    members: Mapping[str, reader.BundleMember], entry: DeltaMember, delta: Path
) -> reader.BundleMember:
    member = members.get(entry.stored)
    if member is None or member.kind != "file":
        raise BundleError(
            f"delta {delta} lists {entry.name} as carried, but holds no {entry.stored}; it is "
            "corrupt: copy it again"
        )
    return member


def _stored_piece(
    own: BundleSource,
    members: Mapping[str, reader.BundleMember],
    entry: DeltaMember,
    delta: Path,
    pos: int,
) -> Piece:
    member = _stored(members, entry, delta)
    if member.size != entry.size:
        raise BundleError(
            f"delta {delta}: {entry.stored} has {member.size} bytes, the manifest says "
            f"{entry.size}; it is corrupt: copy it again"
        )
    return Piece(pos, entry.size, file=own.files[0], at=member.offset)


def _inflate(
    own: BundleSource,
    members: Mapping[str, reader.BundleMember],
    entry: DeltaMember,
    delta: Path,
) -> bytes:
    member = _stored(members, entry, delta)
    packed = own.pread(member.size, member.offset)
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(packed, min(entry.size, _MAX_ZLIB) + 1)
    except zlib.error:
        data = b""
    if len(data) != entry.size:
        raise BundleError(
            f"delta {delta}: {entry.stored} does not inflate to the {entry.size} bytes of "
            f"{entry.name}; it is corrupt: copy it again"
        )
    return data


def _base_reader(
    manifest: DeltaFile,
    delta: Path,
    base_bundle: Path | None,
    installed: InstalledBase | None,
    nested: list[BundleSource],
    files: list[Segment],
) -> tuple[_Locate, str]:
    """How to read each base member (a function of the member and its offset in the full
    bundle, giving its piece), after the base is checked to be the delta's."""
    want = manifest.base
    needed = [m for m in manifest.members if m.source == "base"]
    if base_bundle is not None:
        # Its sha256 when a .sha256 or parts file says it (no read of the base); the index's
        # sha256 in any case: it lists every file of the base with its sha256.
        opened, digest = _open_indexed(base_bundle, "base bundle", hash_unknown=False)
        nested.append(opened.source)
        index_sha = hashlib.sha256(opened.index_bytes).hexdigest()
        if digest is not None and digest != want.sha256:
            raise _wrong_base(delta, manifest, f"base bundle {base_bundle}", digest)
        if index_sha != want.index_sha256:
            raise _wrong_base(
                delta, manifest, f"base bundle {base_bundle}", f"(its index) {index_sha}"
            )
        listed = {e.name: e for e in opened.index.files}
        for entry in needed:
            have = listed.get(entry.in_base)
            member = opened.members.get(entry.in_base)
            if (
                have is None
                or member is None
                or (have.size, have.sha256)
                != (
                    entry.size,
                    entry.sha256,
                )
            ):
                raise BundleError(
                    f"base bundle {base_bundle} has no {entry.in_base} with sha256 "
                    f"{entry.sha256}, which delta {delta.name} takes from it; it is not the "
                    "delta's base: install the full bundle"
                )
        source = opened.source
        offsets = {name: m.offset for name, m in opened.members.items()}

        def from_bundle(entry: DeltaMember, pos: int) -> Piece:
            at = offsets[entry.in_base]
            if source.parts is None:
                return Piece(pos, entry.size, file=source.files[0], at=at)
            return Piece(pos, entry.size, source=source, at=at)

        return from_bundle, f"base bundle {base_bundle}"
    if installed is None:
        raise BundleError(
            f"delta {delta} needs its base bundle {want.name} ({want.sha256}): nothing is "
            "installed in the project dir yet; set AUTO_INFER_VLLM_BASE_BUNDLE_PATH to the base "
            "bundle, or install the full bundle"
        )
    if installed.sha256 != want.sha256:
        raise _wrong_base(delta, manifest, installed.label, installed.sha256)
    opened_files: dict[str, Segment] = {}
    for entry in needed:
        found = installed.files.get(entry.in_base)
        if found is None or found[1] != entry.sha256:
            raise BundleError(
                f"{installed.label} has no {entry.in_base} with sha256 {entry.sha256}, which "
                f"delta {delta.name} takes from its base; set AUTO_INFER_VLLM_BASE_BUNDLE_PATH "
                "to the base bundle, or install the full bundle"
            )
        if entry.in_base not in opened_files:
            path = found[0]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise BundleError(
                    f"cannot read {os_error_text(exc, path)} of {installed.label}; set "
                    "AUTO_INFER_VLLM_BASE_BUNDLE_PATH to the base bundle"
                ) from None
            segment = Segment(
                0, path, 0, entry.size, entry.sha256, fd, Fingerprint.of(os.fstat(fd))
            )
            files.append(segment)
            opened_files[entry.in_base] = segment

    def from_files(entry: DeltaMember, pos: int) -> Piece:
        return Piece(pos, entry.size, file=opened_files[entry.in_base])

    return from_files, installed.label


def _wrong_base(delta: Path, manifest: DeltaFile, what: str, found: str) -> BundleError:
    return BundleError(
        f"delta {delta} is for the base bundle {manifest.base.name} with sha256 "
        f"{manifest.base.sha256}, but {what} has sha256 {found}; give the delta's base in "
        "AUTO_INFER_VLLM_BASE_BUNDLE_PATH, or install the full bundle"
    )


# ---- rebuilding the full tar ----------------------------------------------------------------


def rebuild_bundle(
    source: DeltaSource, output: Path, *, progress_stream: TextIO | None = None
) -> Path:
    """Write the full bundle that ``source`` pieces together at ``output`` (atomic), with
    ``<output>.sha256`` (:func:`~pipeline.bundle.parts.write_source`): its sha256 must be the
    one the delta records, else nothing is left under ``output``. Returns ``output``."""
    write_source(source, output, label=f"rebuild {output.name}", progress_stream=progress_stream)
    return output


__all__ = [
    "DELTA_FILE",
    "DeltaFile",
    "DeltaMember",
    "DeltaResult",
    "DeltaSource",
    "InstalledBase",
    "is_delta",
    "open_delta",
    "read_manifest",
    "rebuild_bundle",
    "write_delta",
]
