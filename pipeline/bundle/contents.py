"""What an extracted bundle holds, checked: its channel's repodata, its lock against that
channel, ``environment.yml``'s specs, and a lock for bundles that carry none (written by
pixi-pack itself).

The reading half of what :mod:`pipeline.bundle.writer` writes, on files already on disk: used
by the ``extract`` stage (:mod:`pipeline.install.extract`, on the staged files) and the
``frozen-install`` stage (:mod:`pipeline.install.frozen`, on the extracted ones): both refuse a
bundle whose lock does not describe exactly the packages in its channel, with the lock's
hashes; extract also refuses package files the lock does not list
(:func:`check_package_members`). Errors are :class:`~pipeline.errors.BundleError`, one line each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.bundle.format import (
    CHANNEL_DIR,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    PYPI_DIR,
    REPODATA_FILE,
)
from pipeline.errors import BundleError, LockError
from pipeline.pixi.lockfile import LockedEnvironment, environments, read_environment

MANIFEST_NAME = "pixi.toml"
LOCK_NAME = "pixi.lock"
_SPEC_LINE = re.compile(r"^\s*-\s+['\"]?([^\s=<>!'\"]+)=([^\s=]+)=([^\s'\"]+)['\"]?\s*$")


def read_repodata(channel_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{subdir: {filename: record}}`` from every ``<channel>/<subdir>/repodata.json``
    (``packages`` and ``packages.conda`` merged, as pixi-unpack does). Raises BundleError for
    a repodata file that is not JSON."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    if not channel_dir.is_dir():
        return result
    for sub in sorted(p for p in channel_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        path = sub / REPODATA_FILE
        if not path.is_file():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(
                f"{path} is not readable JSON ({exc}); the bundle is corrupt: pack it again"
            ) from None
        records: dict[str, dict[str, Any]] = {}
        for key in ("packages", "packages.conda"):
            table = document.get(key) or {}
            if isinstance(table, dict):
                records.update({k: v for k, v in table.items() if isinstance(v, dict)})
        result[sub.name] = records
    return result


def check_lock_against_channel(
    lock_path: Path,
    environment: str,
    platform: str,
    repodata: Mapping[str, Mapping[str, Mapping[str, Any]]],
    file_sha256: Callable[[str], str | None],
    *,
    lock_label: str,
    skipped_sdists: Iterable[str] = (),
    file_md5: Callable[[str], str | None] | None = None,
) -> LockedEnvironment:
    """Check that ``environment`` on ``platform`` of the lock is exactly the bundle's content.

    ``repodata`` is :func:`read_repodata` of the channel; ``file_sha256(relpath)`` gives the
    sha256 of ``channel/<subdir>/<file>`` or ``pypi/<wheel>`` (None: missing). Order of checks
    and their errors (BundleError, one line): the environment and platform are in the lock;
    no source packages; the lock's conda packages are exactly the channel's (same files, same
    sha256 in repodata.json) -- else "does not match the channel"; every package file is there
    ("missing"); every file has the lock's sha256 (else "swapped"); every locked wheel is in
    ``pypi/`` with its sha256, except ``skipped_sdists`` (``name==version``). Returns the
    locked environment.
    """
    where = f"{lock_label} (environment '{environment}', {platform})"
    try:
        available = environments(lock_path)
    except LockError as exc:
        raise BundleError(f"{lock_label} cannot be read: {exc.message}") from None
    if environment not in available:
        raise BundleError(
            f"environment '{environment}' is not in {lock_label}; available: "
            f"{', '.join(available) or 'none'}; set AUTO_INFER_VLLM_ENVIRONMENT to one of them"
        )
    if platform not in available[environment]:
        raise BundleError(
            f"{lock_label} has no {platform} packages for environment '{environment}' "
            f"(locked: {', '.join(available[environment]) or 'none'}); lock and pack it for "
            f"{platform}"
        )
    locked = read_environment(lock_path, environment, platform)
    if locked.source_packages:
        raise BundleError(
            f"{where} has source packages that cannot be installed offline: "
            f"{', '.join(locked.source_packages)}; publish them as packages and re-lock"
        )
    in_lock = {(p.subdir, p.filename): p for p in locked.conda}
    in_channel = {(sub, fn): rec for sub, recs in repodata.items() for fn, rec in recs.items()}
    not_in_channel = sorted(f"{s}/{f}" for s, f in set(in_lock) - set(in_channel))
    not_locked = sorted(f"{s}/{f}" for s, f in set(in_channel) - set(in_lock))
    if not_in_channel or not_locked:
        parts = []
        if not_in_channel:
            parts.append(
                f"{len(not_in_channel)} locked packages are not in channel/*/repodata.json "
                f"(first: {not_in_channel[0]})"
            )
        if not_locked:
            parts.append(
                f"{len(not_locked)} channel packages are not locked (first: {not_locked[0]})"
            )
        raise BundleError(
            f"{where} does not match the bundle's channel: {'; '.join(parts)}; the bundle was "
            "not packed from this lock: pack it again"
        )
    for key, pkg in sorted(in_lock.items()):
        listed = in_channel[key].get("sha256")
        if pkg.sha256 and isinstance(listed, str) and listed.lower() != pkg.sha256:
            raise BundleError(
                f"{where} does not match the bundle's channel: {key[0]}/{key[1]} has sha256 "
                f"{listed[:12]}... in repodata.json and {pkg.sha256[:12]}... in the lock; pack "
                "it again"
            )
    for (subdir, filename), pkg in sorted(in_lock.items()):
        rel = f"{CHANNEL_DIR}/{subdir}/{filename}"
        actual = file_sha256(rel)
        if actual is None:
            raise BundleError(
                f"package file {rel} of {where} is missing from the bundle; pack it again"
            )
        if pkg.sha256:
            if actual != pkg.sha256:
                raise BundleError(
                    f"package file {rel} does not match the lock: sha256 {actual[:12]}... "
                    f"instead of {pkg.sha256[:12]}... ({lock_label}); the bundle holds a "
                    "different archive: pack it again from the lock"
                )
        elif pkg.md5 and file_md5 is not None:
            md5 = file_md5(rel)
            if md5 != pkg.md5:
                raise BundleError(
                    f"package file {rel} does not match the lock: md5 {md5} instead of "
                    f"{pkg.md5} ({lock_label}); pack it again from the lock"
                )
        else:
            raise BundleError(
                f"{where} records no sha256 or md5 for {subdir}/{filename}, so it cannot be "
                "checked; re-lock with a current pixi"
            )
    skipped = set(skipped_sdists)
    for wheel in locked.pypi:
        rel = f"{PYPI_DIR}/{wheel.filename}"
        if not wheel.is_wheel:
            if f"{wheel.name}=={wheel.version}" in skipped:
                continue
            raise BundleError(
                f"{where} has the PyPI source distribution {wheel.filename}, which cannot be "
                "installed offline; use a wheel"
            )
        actual = file_sha256(rel)
        if actual is None:
            raise BundleError(f"wheel {rel} of {where} is missing from the bundle; pack it again")
        if wheel.sha256 and actual != wheel.sha256:
            raise BundleError(
                f"wheel {rel} does not match the lock: sha256 {actual[:12]}... instead of "
                f"{wheel.sha256[:12]}... ({lock_label}); pack it again from the lock"
            )
    return locked


def check_package_members(
    names: Iterable[str], locked: LockedEnvironment, *, lock_label: str
) -> None:
    """Refuse a bundle member that sits where packages go but is no package of ``locked``.

    ``names`` are the bundle's member names (normalized, as extracted). Where packages go:
    anything below a subdir of ``channel/`` but its ``repodata.json``, and anything below
    ``pypi/``. Each such member must be a locked conda file (``channel/<subdir>/<file>``) or a
    locked wheel (``pypi/<file>``): no installer here reads the others, but they would lie in
    the project's channel and ``pypi/`` folder (``--find-links ./pypi``) where another
    installer could take them (a wheel holding a ``.pth`` file runs code in every Python of
    the environment). Raises BundleError naming the first such member (sorted). Pure.
    """
    allowed = {f"{CHANNEL_DIR}/{p.subdir}/{p.filename}" for p in locked.conda}
    allowed |= {f"{PYPI_DIR}/{w.filename}" for w in locked.pypi if w.is_wheel}
    for name in sorted(names):
        parts = name.split("/")
        in_subdir = parts[0] == CHANNEL_DIR and len(parts) > 2
        if in_subdir and len(parts) == 3 and parts[2] == REPODATA_FILE:
            continue
        if (in_subdir or (parts[0] == PYPI_DIR and len(parts) > 1)) and name not in allowed:
            raise BundleError(
                f"bundle member {name!r} lies where packages go but is no package of "
                f"{lock_label} (environment '{locked.environment}', {locked.platform}): the "
                "bundle is unsafe, refusing it; pack it again from the lock"
            )


def environment_yml_specs(text: str) -> list[tuple[str, str, str]]:
    """The conda ``name=version=build`` lines of a pixi-pack ``environment.yml``. Pure."""
    specs: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        match = _SPEC_LINE.match(line)
        if match:
            specs.append((match.group(1), match.group(2), match.group(3)))
    return specs


def synthesize_project(
    staging: Path,
    channel_dir: Path,
    pypi_dir: Path,
    environment: str,
    platform: str,
    repodata: Mapping[str, Mapping[str, Mapping[str, Any]]],
    env_yml: str | None,
) -> None:
    """For a pixi-pack bundle: write ``staging/pixi.lock`` with every package of the staged
    channel (records from its repodata.json, URLs under ``channel_dir``, the final place) and
    every wheel of ``staging/pypi`` (URLs under ``pypi_dir``), and a ``pixi.toml`` naming them
    exactly, as pixi-unpack would install them. ``environment.yml``'s specs must all be in the
    channel. Raises BundleError."""
    import tomlkit
    from rattler import Channel, LockChannel, LockFile, LockPlatform, RepoData

    if not any(repodata.values()):
        raise BundleError(
            f"the bundle has no {EXTRAS_FILE} and no packages in {CHANNEL_DIR}/*/"
            f"{REPODATA_FILE}: nothing to install"
        )
    channel_url = channel_dir.as_uri() + "/"
    records = []
    for subdir in sorted(repodata):
        path = staging / CHANNEL_DIR / subdir / REPODATA_FILE
        try:
            records += RepoData.from_path(path).into_repo_data(Channel(channel_url))
        except Exception as exc:
            raise BundleError(
                f"{CHANNEL_DIR}/{subdir}/{REPODATA_FILE} of the bundle cannot be read as "
                f"repodata ({type(exc).__name__}: {exc}); the bundle is corrupt"
            ) from None
    names = {(r.name.normalized, str(r.version), str(r.build)) for r in records}
    for spec in environment_yml_specs(env_yml or ""):
        if spec not in names:
            raise BundleError(
                f"{ENVIRONMENT_FILE} of the bundle lists {'='.join(spec)}, which is not in "
                f"{CHANNEL_DIR}/*/{REPODATA_FILE}: the bundle does not match its channel"
            )
    lock = LockFile([LockPlatform(platform)])
    lock_platform = lock.platforms()[0]
    lock.set_channels(environment, [LockChannel(channel_url)])
    for record in sorted(records, key=lambda r: r.name.normalized):
        lock.add_conda_package(environment, lock_platform, record)
    wheels = sorted((staging / PYPI_DIR).glob("*.whl")) if (staging / PYPI_DIR).is_dir() else []
    pypi: dict[str, str] = {}
    for wheel in wheels:
        parts = wheel.name[: -len(".whl")].split("-")
        if len(parts) < 5:
            raise BundleError(f"{PYPI_DIR}/{wheel.name} is not a wheel file name; pack it again")
        name, version = parts[0].replace("_", "-").lower(), parts[1]
        pypi[name] = version
        lock.add_pypi_package(
            environment, lock_platform, name, version, (pypi_dir / wheel.name).as_uri()
        )
    lock.to_path(staging / LOCK_NAME)

    doc = tomlkit.document()
    doc.add(tomlkit.comment("Written by `doit install` for a bundle that carries no pixi.toml"))
    doc.add(tomlkit.comment("(made by pixi-pack): exactly the packages of its channel."))
    workspace = tomlkit.table()
    workspace["name"] = "pixi-pack-bundle"
    workspace["channels"] = [channel_url]
    workspace["platforms"] = [platform]
    doc["workspace"] = workspace
    deps = tomlkit.table()
    for name, version, build in sorted(names):
        spec = tomlkit.inline_table()
        spec.update({"version": f"=={version}", "build": build})
        deps[name] = spec
    doc["dependencies"] = deps
    if pypi:
        doc["pypi-dependencies"] = {n: f"=={v}" for n, v in sorted(pypi.items())}
    if environment != "default":
        doc["environments"] = {environment: []}
    (staging / MANIFEST_NAME).write_text(tomlkit.dumps(doc), encoding="utf-8")


__all__ = [
    "check_lock_against_channel",
    "check_package_members",
    "environment_yml_specs",
    "read_repodata",
    "synthesize_project",
]
