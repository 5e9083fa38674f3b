"""The bundle writer: which members a bundle has and what its generated files say.

:func:`write_bundle` turns the locked packages (already on disk) and the extras into the tar's
members and writes them with :func:`pipeline.bundle.tar.write_tar`::

    channel/<subdir>/<file>            the locked conda packages
    channel/<subdir>/repodata.json     their records; only subdirs that have packages
    environment.yml                    pixi-pack's text, byte for byte in its shape
    infer-vllm-bundle.json             our extras (tool, env, lock sha256, pixi.toml, pixi.lock)
    infer-vllm-index.json              every other file's name, size and sha256 (kind "env")
    infer-vllm-sbom.cdx.json           the CycloneDX 1.6 SBOM of the locked packages
    infer-vllm-index.sig               the index's SSH signature, when signed
    pixi-pack.json                     {"version": "1", "pixi-pack-version": ..., "platform": ...}
    pypi/<wheel>                       the locked wheels, when there are any

What matches pixi-pack (read from Quantco/pixi-pack ``src/pack.rs``, ``src/lib.rs``,
``src/unpack.rs``): the member names (``channel``, ``pypi``), ``pixi-pack.json`` as pretty JSON
with kebab-case keys, the ``environment.yml`` text (``./channel``, ``nodefaults``,
``name=version=build``, then ``- pip:`` with ``--no-index``, ``--find-links ./pypi`` and
``name==version``), ``repodata.json`` with ``info.subdir`` and ``repodata_version: 2`` written
only for subdirs that have packages (pixi-pack writes no empty ``noarch``), directory entries in
the tar, members in a depth-first walk sorted by name, and an uncompressed GNU-format tar.
Where we differ, on purpose: pixi-pack lists every file under ``packages.conda``; we put
``.tar.bz2`` files under ``packages`` and ``.conda`` files under ``packages.conda``, as conda's
own indexers do (pixi-unpack merges both maps, so it reads either). Our fixed mtime is
``TAR_MTIME`` (pixi-pack's tar crate uses its own constant) and we add the extras file, which
pixi-unpack ignores. Nothing else may be in ``pypi/``: pixi-unpack parses every file there as a
wheel name.

What goes in (fetching, the cache, which packages) is the pack stage's
(:mod:`pipeline.build.pack`); reading a bundle back is :mod:`pipeline.bundle.reader`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.bundle.format import (
    CHANNEL_DIR,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    INDEX_FILE,
    METADATA_FILE,
    PYPI_DIR,
    REPODATA_FILE,
    SBOM_FILE,
    SIG_FILE,
)
from pipeline.bundle.index import IndexedFile, index_json, make_index
from pipeline.bundle.metadata import BundleExtras, extras_json, pixi_pack_json
from pipeline.bundle.sbom import sbom_json
from pipeline.bundle.tar import TarMember, TarResult, write_tar
from pipeline.errors import BundleError
from pipeline.fsutil import sha256_file
from pipeline.pixi.lockfile import CondaPackage, PypiPackage

# ---- member names ---------------------------------------------------------------------------


def conda_member(pkg: CondaPackage) -> str:
    """The tar name of a conda package file: ``channel/<subdir>/<file>``."""
    return f"{CHANNEL_DIR}/{pkg.subdir}/{pkg.filename}"


def wheel_member(pkg: PypiPackage) -> str:
    """The tar name of a wheel: ``pypi/<file>``."""
    return f"{PYPI_DIR}/{pkg.filename}"


@dataclass(frozen=True)
class PackageFile:
    """A package file to pack: its tar name, where it lies, its size in bytes."""

    name: str
    source: Path
    size: int
    # Its sha256 when known (the lock's; the tar writer checks it while copying), else the
    # index's entry is hashed from the file before the tar is written.
    sha256: str | None = None


# ---- generated files ------------------------------------------------------------------------


def environment_yml(conda: Iterable[CondaPackage], wheels: Iterable[PypiPackage]) -> str:
    """``environment.yml`` in pixi-pack's exact shape; packages sorted by name for stability."""
    lines = ["channels:", f"  - ./{CHANNEL_DIR}", "  - nodefaults", "dependencies:"]
    for pkg in sorted(conda, key=lambda p: (p.name, p.version, p.build, p.subdir)):
        lines.append(f"  - {pkg.name}={pkg.version}={pkg.build}")
    wheel_list = sorted(wheels, key=lambda p: (p.name.lower(), p.version))
    if wheel_list:
        lines += ["  - pip:", "    - --no-index", f"    - --find-links ./{PYPI_DIR}"]
        lines += [f"    - {p.name}=={p.version}" for p in wheel_list]
    return "\n".join(lines) + "\n"


def repodata_json(subdir: str, packages: Iterable[CondaPackage]) -> bytes:
    """``channel/<subdir>/repodata.json``: the lock's records, keyed by file name.

    ``.tar.bz2`` files go under ``packages``, ``.conda`` files under ``packages.conda``; keys
    sorted; ``repodata_version`` 2.
    """
    tar_bz2: dict[str, Any] = {}
    conda: dict[str, Any] = {}
    for pkg in sorted(packages, key=lambda p: p.filename):
        target = conda if pkg.filename.endswith(".conda") else tar_bz2
        target[pkg.filename] = pkg.repodata
    document = {
        "info": {"subdir": subdir},
        "packages": tar_bz2,
        "packages.conda": conda,
        "repodata_version": 2,
    }
    return (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()


# ---- the whole bundle -----------------------------------------------------------------------


def bundle_members(
    conda: Sequence[CondaPackage],
    wheels: Sequence[PypiPackage],
    files: Iterable[PackageFile],
    extras: BundleExtras,
    signer: Callable[[bytes], bytes] | None = None,
) -> list[TarMember]:
    """Every member of the bundle, in no particular order (the tar writer sorts them): the
    package ``files`` with their directories, ``pixi-pack.json`` (for ``extras.platform``),
    ``environment.yml``, the extras and one ``repodata.json`` per subdir. Pure."""
    members: list[TarMember] = []
    dirs: set[str] = set()
    files_list = list(files)
    for file in files_list:
        members.append(TarMember.file(file.name, file.source, file.size))
        parts = file.name.split("/")
        for depth in range(1, len(parts)):
            dirs.add("/".join(parts[:depth]))
    members += [TarMember.dir(d) for d in sorted(dirs)]
    members += [
        TarMember.text(METADATA_FILE, pixi_pack_json(extras.platform)),
        TarMember.text(ENVIRONMENT_FILE, environment_yml(conda, wheels).encode()),
        TarMember.text(EXTRAS_FILE, extras_json(extras)),
    ]
    for subdir in sorted({p.subdir for p in conda}):
        in_subdir = [p for p in conda if p.subdir == subdir]
        members.append(
            TarMember.text(
                f"{CHANNEL_DIR}/{subdir}/{REPODATA_FILE}", repodata_json(subdir, in_subdir)
            )
        )
    wheel_files = {Path(f.name).name: f.source for f in files_list if f.name.startswith(PYPI_DIR)}
    members.append(
        TarMember.text(
            SBOM_FILE,
            sbom_json(
                conda,
                wheels,
                wheel_files,
                environment=extras.environment,
                platform=extras.platform,
                lock_sha256=extras.lock_sha256,
                tool_version=extras.tool_version,
            ),
        )
    )
    known = {f.name: f.sha256 for f in files_list}
    entries = [
        IndexedFile(
            name=m.name,
            size=m.size,
            sha256=(
                hashlib.sha256(m.data).hexdigest()
                if m.data is not None
                else known.get(m.name) or _sha256_of(m)
            ),
        )
        for m in members
        if not m.directory
    ]
    index = make_index(
        "env",
        extras.environment,
        entries,
        tool_version=extras.tool_version,
        source={"platform": extras.platform, "lock_sha256": extras.lock_sha256},
    )
    index_bytes = index_json(index)
    members.append(TarMember.text(INDEX_FILE, index_bytes))
    if signer is not None:
        members.append(TarMember.text(SIG_FILE, signer(index_bytes)))
    return members


def _sha256_of(member: TarMember) -> str:
    """A package file's sha256, when the lock gave only its md5: read before the tar is
    written (the tar writer then checks the md5 while copying)."""
    assert member.source is not None
    try:
        return sha256_file(member.source)
    except OSError as exc:
        raise BundleError(
            f"cannot read {member.source} for {member.name} ({exc.strerror}); run the pack "
            "again to fetch it"
        ) from None


def write_bundle(
    output: Path,
    conda: Sequence[CondaPackage],
    wheels: Sequence[PypiPackage],
    files: Iterable[PackageFile],
    extras: BundleExtras,
    *,
    checks: Mapping[str, tuple[str, str]] | None = None,
    progress_stream: TextIO | None = None,
    signer: Callable[[bytes], bytes] | None = None,
) -> TarResult:
    """Write the bundle of :func:`bundle_members` at ``output``, atomically and
    deterministically (:func:`pipeline.bundle.tar.write_tar`, which says what it raises;
    ``checks`` are the package files to hash while they are copied; ``signer`` signs the
    index: the result's ``signature``, also inside the tar)."""
    members = bundle_members(conda, wheels, files, extras, signer)
    return write_tar(output, members, checks=checks, progress_stream=progress_stream)


__all__ = [
    "PackageFile",
    "bundle_members",
    "conda_member",
    "environment_yml",
    "repodata_json",
    "wheel_member",
    "write_bundle",
]
