"""Point the extracted project at its own channel: the ``patch-channels`` stage.

``pixi install --frozen`` installs from the URLs written in ``pixi.lock``, so patching the
channels of ``pixi.toml`` alone would still send pixi to conda-forge (and pixi's ``[mirrors]``
cannot point at ``file://``). :func:`patch_project` therefore rewrites both files:

- ``pixi.toml`` (tomlkit, comments and layout kept): every ``channels`` list (workspace or
  legacy ``[project]``, and each feature's) becomes the extracted channel's absolute
  ``file://`` URL, and so does the ``channel`` key of any dependency table;
- ``pixi.lock`` (line by line, everything else byte for byte, by
  :func:`pipeline.pixi.locktext.patch_lock_text`): the location of every package
  the bundle holds becomes its extracted file (``channel/<subdir>/<file>``, ``pypi/<wheel>``):
  an absolute path in lock v6/v7 (what py-rattler writes for local packages, read back as a
  ``file://`` URL), a ``file://`` URL in v5; and each environment's ``channels`` list
  becomes that one channel, so pixi finds the lock current for the patched manifest and runs
  offline. Packages of other environments or platforms (not in the bundle) keep their URLs.

The result is read back with py-rattler: every package of the installed environment must then
point at its extracted file, else :class:`~pipeline.errors.InstallError`. Idempotent (patching
a patched project changes nothing); its stamp, ``.infer-vllm/patch.stamp``, holds the bundle's
sha256, the project path and the environment. A failure puts back the project files of the
environment that runs (:func:`pipeline.install.extract.previous_extraction_guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from pipeline import reporting
from pipeline.errors import InstallError, LockError
from pipeline.fsutil import atomic_write_text
from pipeline.install.extract import previous_extraction_guard
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
from pipeline.pixi.locktext import location_form, patch_lock_text

_DEPENDENCY_TABLES = ("dependencies", "host-dependencies", "build-dependencies")


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


# ---- pure rewriting of pixi.toml (pixi.lock's text: pipeline.pixi.locktext) ------------------


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
    say = say or reporting.say
    with install_lock(paths, say=say), previous_extraction_guard(paths, environment, say=say):
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
    "patch_is_current",
    "patch_manifest_text",
    "patch_project",
]
