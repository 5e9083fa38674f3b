"""Point the extracted project at its own channel: the ``patch-channels`` stage.

``pixi install --frozen`` installs from the URLs written in ``pixi.lock``, so patching the
channels of ``pixi.toml`` alone would still send pixi to conda-forge (and pixi's ``[mirrors]``
cannot point at ``file://``). :func:`patch_project` therefore rewrites both files:

- ``pixi.toml`` (tomlkit, comments and layout kept): every ``channels`` list (workspace or
  legacy ``[project]``, and each feature's) becomes the extracted channel's absolute
  ``file://`` URL, and so does the ``channel`` key of any dependency table;
- ``pixi.lock`` (line by line, everything else byte for byte): the location of every package
  the bundle holds becomes its extracted file (``channel/<subdir>/<file>``, ``pypi/<wheel>``):
  an absolute path in lock v6/v7 (what py-rattler writes for local packages, read back as a
  ``file://`` URL), a ``file://`` URL in v5; and each environment's ``channels`` list
  becomes that one channel, so pixi finds the lock current for the patched manifest and runs
  offline. Packages of other environments or platforms (not in the bundle) keep their URLs.

The result is read back with py-rattler: every package of the installed environment must then
point at its extracted file, else :class:`~pipeline.errors.InstallError`. Idempotent (patching
a patched project changes nothing); its stamp, ``.infer-vllm/patch.stamp``, holds the bundle's
sha256, the project path and the environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import tomlkit

from pipeline import reporting
from pipeline.errors import InstallError, LockError
from pipeline.fsutil import atomic_write_text
from pipeline.install.layout import (
    PatchStamp,
    ProjectPaths,
    install_lock,
    read_extract_record,
    read_extract_stamp,
    read_patch_stamp,
    write_patch_stamp,
)
from pipeline.pixi.lockfile import LockedEnvironment, read_environment

_DEPENDENCY_TABLES = ("dependencies", "host-dependencies", "build-dependencies")
_LOCATION_LINE = re.compile(
    r"^(?P<lead>\s*(?:-\s+)?)(?P<key>conda|pypi|url):(?P<space>\s+)"
    r"(?P<quote>['\"]?)(?P<value>[^'\"\s]+)(?P=quote)(?P<tail>\s*)$"
)
_SUBDIR_LINE = re.compile(r"^  subdir:\s")
_DIRECT = "direct+"


@dataclass(frozen=True)
class PatchResult:
    """What :func:`patch_project` did; ``changed`` False when both files were already patched."""

    project: Path
    channel_url: str
    manifest_changed: bool
    lock_changed: bool
    packages: int
    up_to_date: bool = False

    @property
    def changed(self) -> bool:
        return self.manifest_changed or self.lock_changed

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.project}: channels already point at {self.channel_url}"
        what = [
            name
            for name, changed in (
                ("pixi.toml", self.manifest_changed),
                ("pixi.lock", self.lock_changed),
            )
            if changed
        ]
        done = f"rewrote {' and '.join(what)}" if what else "nothing to rewrite"
        return f"{self.project}: {done}; {self.packages} packages now come from {self.channel_url}"


# ---- pure rewriting -------------------------------------------------------------------------


def patch_manifest_text(text: str, channel_url: str) -> str:
    """``pixi.toml`` with every channel list, and every dependency's ``channel``, set to
    ``channel_url``. Comments, order and formatting elsewhere are kept. Pure; raises
    ``tomlkit.exceptions.ParseError`` for invalid TOML."""
    doc = tomlkit.parse(text)

    def set_channels(table: Any) -> None:
        if isinstance(table, Mapping) and "channels" in table:
            table["channels"] = [channel_url]

    def set_dependency_channels(table: Any) -> None:
        if not isinstance(table, Mapping):
            return
        for kind in _DEPENDENCY_TABLES:
            deps = table.get(kind)
            if isinstance(deps, Mapping):
                for spec in deps.values():
                    if isinstance(spec, Mapping) and "channel" in spec:
                        spec["channel"] = channel_url
        targets = table.get("target")
        if isinstance(targets, Mapping):
            for target in targets.values():
                set_dependency_channels(target)

    for key in ("workspace", "project"):
        set_channels(doc.get(key))
    set_dependency_channels(doc)
    features = doc.get("feature")
    if isinstance(features, Mapping):
        for feature in features.values():
            set_channels(feature)
            set_dependency_channels(feature)
    return tomlkit.dumps(doc)


def package_key(value: str, kind: str) -> str | None:
    """The bundle path a lock location refers to: ``<subdir>/<file>`` for conda packages,
    ``<file>`` for PyPI ones (percent-decoded); None when the location names no file."""
    if value.startswith(_DIRECT):
        value = value[len(_DIRECT) :]
    path = urlsplit(value).path if "://" in value else value
    parts = [unquote(p) for p in PurePosixPath(path).parts if p not in ("/", "")]
    if not parts or value.endswith("/"):
        return None
    if kind == "pypi":
        return parts[-1]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def patch_lock_text(
    text: str,
    conda_urls: Mapping[str, str],
    wheel_urls: Mapping[str, str],
    channel_url: str,
) -> str:
    """``pixi.lock`` text with the locations of the given packages replaced, and every
    environment's ``channels`` list replaced by ``channel_url``.

    ``conda_urls`` maps ``<subdir>/<file>`` and ``wheel_urls`` maps ``<wheel file>`` to the new
    URL. Works on lock formats v5 to v7 line by line (``- conda: URL``, ``url: URL``,
    ``- pypi: URL``); every other byte is kept, except that a rewritten conda package entry
    gains a ``subdir:`` line when it had none: v6 locks leave it out when the URL says it, and
    py-rattler derives it from ``https://`` URLs only, not from ``file://`` ones. Pure.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped and indent == 0 and not stripped.startswith(("#", "-")):
            section = stripped.split(":", 1)[0]
        if section == "environments" and stripped == "channels:":
            out.append(line)
            index, item_indent = _skip_block(lines, index + 1, indent)
            out.append(f"{' ' * item_indent}- url: {channel_url}\n")
            continue
        if section == "packages" and indent == 0 and stripped.startswith("- "):
            end = index + 1
            while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" ")):
                end += 1
            out.extend(_patch_entry(lines[index:end], conda_urls, wheel_urls))
            index = end
            continue
        out.append(_patch_location(line, conda_urls, wheel_urls)[0])
        index += 1
    return "".join(out)


def _patch_entry(
    entry: list[str], conda_urls: Mapping[str, str], wheel_urls: Mapping[str, str]
) -> list[str]:
    """One package of the top-level ``packages:`` list, its location rewritten."""
    has_subdir = any(_SUBDIR_LINE.match(line) for line in entry)
    out: list[str] = []
    for number, line in enumerate(entry):
        patched, subdir = _patch_location(line, conda_urls, wheel_urls)
        out.append(patched)
        # Only the entry's own location (`- conda: URL`, v5's `  url: URL`) gets a subdir;
        # nested references (a source package's build_packages) are just rewritten.
        own = number == 0 or line.startswith("  url:")
        if subdir is not None and own and not has_subdir:
            out.append(f"  subdir: {subdir}\n")
            has_subdir = True
    return out


def _skip_block(lines: list[str], start: int, indent: int) -> tuple[int, int]:
    """The index after the YAML list that follows a ``channels:`` key at ``indent``, and the
    indentation of its items."""
    index = start
    item_indent: int | None = None
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            index += 1
            continue
        current = len(line) - len(line.lstrip(" "))
        if current > indent or (current == indent and stripped.startswith("- ")):
            if item_indent is None:
                item_indent = current
            index += 1
            continue
        break
    return index, item_indent if item_indent is not None else indent


def _patch_location(
    line: str, conda_urls: Mapping[str, str], wheel_urls: Mapping[str, str]
) -> tuple[str, str | None]:
    """``line`` with its package location rewritten when it names a bundled package, and the
    conda subdir of a rewritten conda location (else None)."""
    match = _LOCATION_LINE.match(line.rstrip("\r\n"))
    if match is None:
        return line, None
    kind, value = match.group("key"), match.group("value")
    key = package_key(value, "pypi" if kind == "pypi" else "conda")
    if key is None:
        return line, None
    new = (wheel_urls if kind == "pypi" else conda_urls).get(key)
    if new is None:
        return line, None
    if value.startswith(_DIRECT):
        new = _DIRECT + new
    ending = line[len(line.rstrip("\r\n")) :] or "\n"
    subdir = None if kind == "pypi" else key.split("/", 1)[0]
    return f"{match.group('lead')}{kind}:{match.group('space')}{new}{ending}", subdir


# ---- the stage ------------------------------------------------------------------------------


def patch_is_current(project_dir: Path, environment: str) -> bool:
    """True when the patch stamp matches the current extraction, project path and
    environment. Reads two small files; never raises. The doit ``uptodate`` of the stage."""
    paths = ProjectPaths.of(project_dir)
    digest = read_extract_stamp(paths)
    if digest is None:
        return False
    return read_patch_stamp(paths) == PatchStamp(digest, str(paths.root), environment)


def patch_project(
    project_dir: Path,
    environment: str,
    *,
    say: Callable[[str], None] | None = None,
) -> PatchResult:
    """Rewrite ``pixi.toml`` and ``pixi.lock`` of the extracted project (see the module).

    Needs a finished extraction (its record says the platform). Blocks on the project's
    install lock. Idempotent; each file is replaced atomically, and only when its text changes.
    Raises InstallError (nothing extracted, unparsable files, a package left unpatched).
    """
    paths = ProjectPaths.of(project_dir)
    with install_lock(paths, say=say or reporting.say):
        record = read_extract_record(paths)
        if record is None:
            raise InstallError(
                f"{paths.root} holds no finished extraction; run `doit extract` (or `doit "
                "install`) first"
            )
        platform = record.platform
        channel_url = paths.channel.as_uri() + "/"
        try:
            locked = read_environment(paths.lock, environment, platform)
        except LockError as exc:
            raise InstallError(f"cannot patch {paths.lock}: {exc.message}") from None
        lock_text = paths.lock.read_text(encoding="utf-8")
        location = location_form(lock_text)
        conda_urls = {
            f"{p.subdir}/{p.filename}": location(paths.channel / p.subdir / p.filename)
            for p in locked.conda
        }
        wheel_urls = {
            p.filename: location(paths.pypi / p.filename) for p in locked.pypi if p.is_wheel
        }

        manifest_text = paths.manifest.read_text(encoding="utf-8")
        try:
            new_manifest = patch_manifest_text(manifest_text, channel_url)
        except Exception as exc:  # tomlkit's ParseError and friends
            raise InstallError(
                f"{paths.manifest} is not valid TOML ({exc}); the bundle is corrupt: pack it again"
            ) from None
        new_lock = patch_lock_text(lock_text, conda_urls, wheel_urls, channel_url)
        if new_manifest != manifest_text:
            atomic_write_text(paths.manifest, new_manifest)
        if new_lock != lock_text:
            atomic_write_text(paths.lock, new_lock)

        _check_patched(paths, environment, platform, locked, channel_url)
        write_patch_stamp(paths, PatchStamp(record.sha256, str(paths.root), environment))
        return PatchResult(
            project=paths.root,
            channel_url=channel_url,
            manifest_changed=new_manifest != manifest_text,
            lock_changed=new_lock != lock_text,
            packages=len(conda_urls) + len(wheel_urls),
        )


def lock_version(text: str) -> int | None:
    """The ``version:`` of a pixi lock's text (None when it has none). Pure."""
    match = re.search(r"^version:\s*(\d+)\s*$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def location_form(lock_text: str) -> Callable[[Path], str]:
    """How a local file is written in this lock: lock v5 wants a ``file://`` URL (its
    ``url:`` key); v6 and v7 take an absolute path, which is what py-rattler itself writes
    for local packages (a v7 lock with ``file://`` package URLs does not even read back)."""
    version = lock_version(lock_text)
    if version is not None and version <= 5:
        return lambda path: path.as_uri()
    return str


def _check_patched(
    paths: ProjectPaths,
    environment: str,
    platform: str,
    locked: LockedEnvironment,
    channel_url: str,
) -> None:
    """Read the patched lock back with py-rattler: every bundled package must point at its
    extracted file and the environment at the local channel."""
    try:
        patched = read_environment(paths.lock, environment, platform)
    except LockError as exc:
        raise InstallError(
            f"the patched {paths.lock} no longer reads ({exc.message}); report this bug with "
            "the bundle's pixi.lock"
        ) from None
    conda_urls = {
        f"{p.subdir}/{p.filename}": (paths.channel / p.subdir / p.filename).as_uri()
        for p in locked.conda
    }
    wheel_urls = {p.filename: (paths.pypi / p.filename).as_uri() for p in locked.pypi}
    for pkg in patched.conda:
        want = conda_urls.get(f"{pkg.subdir}/{pkg.filename}")
        if pkg.url != want:
            raise InstallError(
                f"{paths.lock}: {pkg.subdir}/{pkg.filename} still points at {pkg.url} after "
                f"patching (wanted {want}); report this bug with the bundle's pixi.lock"
            )
    for wheel in patched.pypi:
        want = wheel_urls.get(wheel.filename)
        if want is not None and wheel.url != want:
            raise InstallError(
                f"{paths.lock}: {wheel.filename} still points at {wheel.url} after patching; "
                "report this bug with the bundle's pixi.lock"
            )
    if tuple(c.rstrip("/") for c in patched.channels) != (channel_url.rstrip("/"),):
        raise InstallError(
            f"{paths.lock}: environment '{environment}' still lists channels "
            f"{', '.join(patched.channels)} after patching; report this bug"
        )


__all__ = [
    "PatchResult",
    "location_form",
    "lock_version",
    "package_key",
    "patch_is_current",
    "patch_lock_text",
    "patch_manifest_text",
    "patch_project",
]
