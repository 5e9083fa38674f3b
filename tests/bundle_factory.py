"""Bundles for the install tests: pixi-pack's layout from the local test channel, on demand.

The install side must not depend on how the pack side writes bundles, and it must refuse bundles
no honest packer writes. So tests build their own:

- :func:`write_lock` locks chosen packages of a :class:`~pipeline.demo.channel.LocalChannel` by hand
  (py-rattler's ``LockFile``, no solve, no server), as if from a remote channel
  (``https://conda.example.org/tiny/``): an install that tried to download would fail here.
- :func:`bundle_entries` turns a lock into pixi-pack's members: ``pixi-pack.json``,
  ``environment.yml``, ``channel/<subdir>/<file>`` + ``repodata.json``, ``pypi/*.whl`` and,
  unless ``extras=False`` ("exactly as pixi-pack writes it"), ``infer-vllm-bundle.json`` with
  the lock and pixi.toml.
- :func:`write_bundle` writes any list of :class:`Entry` as an uncompressed tar (sorted,
  fixed mtime), with a ``.sha256`` beside it; :class:`Entry` also makes the malicious members
  (absolute paths, ``..``, escaping links, FIFOs, devices).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from pipeline.bundle.metadata import BundleExtras
from pipeline.demo.channel import WHEEL_NAME, LocalChannel, build_channel, build_wheel
from pipeline.pixi.lockfile import read_environment

REMOTE = "https://conda.example.org/tiny/"
WHEEL_URL = f"https://files.example.org/{WHEEL_NAME}"
TAR_MTIME = 1_700_000_000

_CACHE: dict[str, Any] = {}


# ---- the shared channel (built once per session) --------------------------------------------


@dataclass(frozen=True)
class Kit:
    """The local channel and a wheel, built once per test session."""

    channel: LocalChannel
    wheel: Path


def shared_kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """The test channel (``pipeline.demo.channel.build_channel``) and ``tinywheel``'s wheel, built
    once per session whichever test module asks first (each module wraps it in a fixture)."""
    if "kit" not in _CACHE:
        root = tmp_path_factory.mktemp("kit")
        channel = build_channel(root / "channel")
        wheel = build_wheel(root / "wheels")
        _CACHE["kit"] = Kit(channel=channel, wheel=wheel)
    return _CACHE["kit"]


# ---- locks ----------------------------------------------------------------------------------


def write_lock(
    path: Path,
    channel: LocalChannel,
    names: Sequence[str],
    *,
    environment: str = "default",
    platform: str = "linux-64",
    wheel: Path | None = None,
    wheel_sha256: str | None = None,
    channel_url: str = REMOTE,
    wheel_url: str = WHEEL_URL,
) -> Path:
    """Lock the newest version of each package in ``names`` (no dependency solving: list
    them all) as a pixi lock at ``path``, URLs under ``channel_url``; ``wheel`` adds
    its distribution (``tinywheel`` unless another wheel is given) as a PyPI package (with
    ``wheel_sha256``, default the wheel's own)."""
    from rattler import Channel, LockChannel, LockFile, LockPlatform, RepoData

    records = []
    for subdir in channel.subdirs:
        repodata = channel.root / subdir / "repodata.json"
        if repodata.is_file():
            records += RepoData.from_path(repodata).into_repo_data(Channel(channel_url))
    lock = LockFile([LockPlatform(platform)])
    lock_platform = lock.platforms()[0]
    lock.set_channels(environment, [LockChannel(channel_url)])
    for name in names:
        pkg = channel.get(name)
        record = next(r for r in records if r.file_name == pkg.filename)
        lock.add_conda_package(environment, lock_platform, record)
    if wheel is not None:
        dist, version = wheel.name.split("-")[:2]
        if wheel.name != WHEEL_NAME and wheel_url == WHEEL_URL:
            wheel_url = f"https://files.example.org/{wheel.name}"
        lock.add_pypi_package(environment, lock_platform, dist, version, wheel_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock.to_path(path)
    if wheel is not None:
        sha = wheel_sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
        text = path.read_text().replace(
            f"  version: '{version}'\n", f"  version: '{version}'\n  sha256: {sha}\n"
        )
        path.write_text(text)
    return path


def pixi_toml(
    names: Iterable[str],
    *,
    verify: str | None = "tinytool",
    pypi: bool | str = False,
    channel_url: str = REMOTE,
) -> str:
    """A pixi.toml for the locked packages, with a comment to check patching keeps it."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("the tiny test project"))
    workspace = tomlkit.table()
    workspace["name"] = "tiny"
    workspace["channels"] = [channel_url]
    workspace["channels"].comment("patched to the local channel on install")
    workspace["platforms"] = ["linux-64"]
    doc["workspace"] = workspace
    doc["dependencies"] = {n: "*" for n in names}
    if pypi:
        doc["pypi-dependencies"] = {pypi if isinstance(pypi, str) else "tinywheel": "*"}
    if verify:
        doc["tasks"] = {"verify": verify}
    return tomlkit.dumps(doc)


# ---- members ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member: file bytes (``data``) or a file to stream (``source``), a directory,
    a link, or something stranger (``kind``: fifo, chrdev)."""

    name: str
    data: bytes | None = None
    source: Path | None = None
    kind: str = "file"
    target: str = ""
    mode: int = 0o644

    @classmethod
    def file(cls, name: str, data: bytes | str, mode: int = 0o644) -> Entry:
        return cls(name, data=data.encode() if isinstance(data, str) else data, mode=mode)

    @classmethod
    def path(cls, name: str, source: Path) -> Entry:
        return cls(name, source=source)

    @classmethod
    def dir(cls, name: str) -> Entry:
        return cls(name, kind="dir", mode=0o755)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name, kind="symlink", target=target)

    @classmethod
    def hardlink(cls, name: str, target: str) -> Entry:
        return cls(name, kind="hardlink", target=target)

    @classmethod
    def fifo(cls, name: str) -> Entry:
        return cls(name, kind="fifo")

    @classmethod
    def chrdev(cls, name: str) -> Entry:
        return cls(name, kind="chrdev")


@dataclass
class BundleParts:
    """The entries of a bundle, by name, easy to tamper with before writing."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        self.entries[entry.name] = entry

    def remove(self, name: str) -> None:
        del self.entries[name]

    def replace_data(self, name: str, data: bytes) -> None:
        self.entries[name] = replace(self.entries[name], data=data, source=None)

    def values(self) -> list[Entry]:
        return list(self.entries.values())


def bundle_entries(
    lock_path: Path,
    channel: LocalChannel,
    *,
    manifest: str | None,
    environment: str = "default",
    platform: str = "linux-64",
    wheel: Path | None = None,
    extras: bool = True,
    pixi_pack_exact: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> BundleParts:
    """pixi-pack's members for ``environment`` of ``lock_path``: package files from
    ``channel``, repodata from the lock's records, ``environment.yml``; the extras file with
    the lock and ``manifest`` unless ``extras`` is False. ``pixi_pack_exact`` lists every
    package under ``packages.conda`` as pixi-pack does. ``metadata`` replaces pixi-pack.json's
    content."""
    locked = read_environment(lock_path, environment, platform)
    parts = BundleParts()
    meta = metadata or {"version": "1", "pixi-pack-version": "0.7.0", "platform": platform}
    parts.add(Entry.file("pixi-pack.json", json.dumps(meta, indent=2)))
    env_lines = ["channels:", "  - ./channel", "  - nodefaults", "dependencies:"]
    env_lines += [f"  - {p.name}={p.version}={p.build}" for p in locked.conda]
    wheels = [w for w in locked.pypi if w.is_wheel]
    if wheels:
        env_lines += ["  - pip:", "    - --no-index", "    - --find-links ./pypi"]
        env_lines += [f"    - {w.name}=={w.version}" for w in wheels]
    parts.add(Entry.file("environment.yml", "\n".join(env_lines) + "\n"))
    parts.add(Entry.dir("channel"))
    for subdir in sorted({p.subdir for p in locked.conda}):
        parts.add(Entry.dir(f"channel/{subdir}"))
        tar_bz2: dict[str, Any] = {}
        conda: dict[str, Any] = {}
        for pkg in locked.conda:
            if pkg.subdir != subdir:
                continue
            table = conda if pixi_pack_exact or pkg.filename.endswith(".conda") else tar_bz2
            table[pkg.filename] = pkg.repodata
            parts.add(
                Entry.path(f"channel/{subdir}/{pkg.filename}", channel.root / subdir / pkg.filename)
            )
        repodata = {
            "info": {"subdir": subdir},
            "packages": tar_bz2,
            "packages.conda": conda,
            "repodata_version": 2,
        }
        parts.add(Entry.file(f"channel/{subdir}/repodata.json", json.dumps(repodata, indent=2)))
    if wheels:
        assert wheel is not None, "the lock has wheels: pass wheel="
        parts.add(Entry.dir("pypi"))
        parts.add(Entry.path(f"pypi/{wheel.name}", wheel))
    if extras:
        lock_text = lock_path.read_text(encoding="utf-8")
        document = BundleExtras(
            tool_version="0.1.0",
            environment=environment,
            platform=platform,
            lock_sha256=hashlib.sha256(lock_text.encode()).hexdigest(),
            pixi_toml=manifest or "",
            pixi_lock=lock_text,
            conda_packages=len(locked.conda),
            pypi_packages=len(wheels),
            package_bytes=0,
        )
        parts.add(Entry.file("infer-vllm-bundle.json", document.model_dump_json(indent=2)))
    return parts


# ---- the tar ---------------------------------------------------------------------------------


def write_bundle(path: Path, entries: Iterable[Entry], *, checksum: bool = True) -> str:
    """Write ``entries`` (sorted by name) as an uncompressed tar at ``path``; return its
    sha256, also written to ``<path>.sha256`` unless ``checksum`` is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.name):
            info = tarfile.TarInfo(entry.name)
            info.mtime = TAR_MTIME
            info.mode = entry.mode
            fileobj = None
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            elif entry.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif entry.kind == "chrdev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif entry.source is not None:
                info.size = entry.source.stat().st_size
                fileobj = entry.source.open("rb")
            else:
                data = entry.data or b""
                info.size = len(data)
                fileobj = io.BytesIO(data)
            try:
                tar.addfile(info, fileobj)
            finally:
                if fileobj is not None:
                    fileobj.close()
    digest = sha256_of(path)
    if checksum:
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- one call for the usual bundle ----------------------------------------------------------

DEFAULT_NAMES = ("python", "libtiny", "tinytool", "tinydata")


def make_bundle(
    workdir: Path,
    kit: Kit,
    *,
    name: str = "bundle.tar",
    names: Sequence[str] = DEFAULT_NAMES,
    wheel: bool | Path = True,
    verify: str | None = "python -c 'import tinywheel; print(\"tinywheel\", tinywheel.VERSION)'",
    extras: bool = True,
    pixi_pack_exact: bool = False,
    environment: str = "default",
    tamper: Any = None,
    checksum: bool = True,
) -> Path:
    """Lock ``names`` (+ the wheel: ``tinywheel``'s, or the one given), build the bundle
    parts, let ``tamper(parts)`` change them, write ``workdir/name`` (+ ``.sha256``) and
    return its path."""
    wheel_file = wheel if isinstance(wheel, Path) else kit.wheel if wheel else None
    lock = write_lock(
        workdir / f"{name}.lock" / "pixi.lock",
        kit.channel,
        names,
        environment=environment,
        wheel=wheel_file,
    )
    dist = wheel_file.name.split("-")[0] if wheel_file else False
    parts = bundle_entries(
        lock,
        kit.channel,
        manifest=pixi_toml(names, verify=verify, pypi=dist),
        environment=environment,
        wheel=wheel_file,
        extras=extras,
        pixi_pack_exact=pixi_pack_exact,
    )
    if tamper is not None:
        tamper(parts)
    out = workdir / name
    write_bundle(out, parts.values(), checksum=checksum)
    shutil.rmtree(lock.parent, ignore_errors=True)
    return out


def swap_tinytool(parts: BundleParts) -> None:
    """Put another valid archive (libtiny's) under tinytool's name: only the lock's sha256
    tells them apart."""
    libtiny = parts.entries["channel/linux-64/libtiny-1.0-h1a2b3c4_0.conda"]
    assert libtiny.source is not None
    parts.replace_data(
        "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda", libtiny.source.read_bytes()
    )


# ---- the other outputs of pixi-pack ---------------------------------------------------------


def write_directory_only(bundle: Path, folder: Path) -> Path:
    """What ``pixi-pack --directory-only`` leaves: the bundle's members as a folder."""
    with tarfile.open(bundle, "r:") as tar:
        tar.extractall(folder, filter="data")
    return folder


def write_self_extracting(bundle: Path, script: Path) -> Path:
    """The layout of ``pixi-pack --create-executable`` (Quantco/pixi-pack src/pack.rs): a shell
    header whose last line is ``@@END_HEADER@@``, a newline, the tar base64-encoded on one
    line, a newline, ``@@END_ARCHIVE@@``, then the base64 of the pixi-unpack binary (here a
    placeholder). Our own header text, not pixi-pack's."""
    header = b'#!/usr/bin/env bash\necho "self-extracting bundle (test stand-in)"\nexit 0\n'
    script.write_bytes(
        header
        + b"@@END_HEADER@@\n\n"
        + base64.b64encode(bundle.read_bytes())
        + b"\n@@END_ARCHIVE@@\n"
        + base64.b64encode(b"not a real pixi-unpack")
    )
    script.chmod(0o755)
    return script
