"""Is an existing ``pixi.lock`` current for ``pixi.toml``? :func:`stale_reason` says why not.

The py-rattler lock path keeps a lock that already satisfies the manifest (not even its mtime
changes), as pixi does. The check reads the lock with py-rattler's synchronous API, the
environments' ``indexes``/``find-links`` from its text (:mod:`pipeline.pixi.locktext`), and
compares them with the plan (:func:`pipeline.build.lockplan.plan_lock`).

The PyPI part, :func:`pypi_stale_reason`, is pixi's satisfiability check: every requirement
(after dependency-overrides, markers evaluated for the platform and the locked Python) is met by
a locked package, so are the requirements of the locked packages, each locked package is
reached, and each one accepts the locked Python. Reads one file; runs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from pipeline.build.lockplan import plan_lock
from pipeline.build.pypi import index_urls, marker_environment
from pipeline.pixi.locktext import read_lock_version, recorded_indexes
from pipeline.pixi.model import Manifest, PypiOptions, ResolvedEnvironment, pypi_name
from pipeline.pixi.platforms import VirtualPackage, customised, parse_locked_virtual_package


def stale_reason(manifest: Manifest, lock_path: Path, project_dir: Path) -> str | None:
    """Why ``lock_path`` does not satisfy ``manifest``, or ``None`` when it does.

    Current means: the lock can be read; it holds exactly the manifest's environments; each
    has the manifest's channels (as URLs, same order); every platform of the environment is
    locked; every conda spec is matched by a locked package; every locked conda package is
    reachable from the specs (a removed dependency makes the lock stale); every virtual
    package a locked package depends on is provided by the manifest's system requirements;
    every source dependency has a locked package of that name; the PyPI packages satisfy the
    PyPI requirements (:func:`pypi_stale_reason`: versions, markers,
    dependency-overrides, nothing extra) and, when the lock records them, the environment's
    ``indexes`` and ``find-links`` are the manifest's.

    Platforms are matched as pixi matches them, not by name (pixi calls them ``p1``, ``p2``...
    in the lock and anything in pixi.toml): a v7 lock platform stands for a manifest platform
    when its subdir is the same and so are the virtual packages that differ from pixi's subdir
    defaults (:func:`~pipeline.pixi.platforms.customised`: versions compared as versions, build
    ``0`` equal to none, order ignored; an entry that lists none has only the defaults). A v5 or
    v6 lock records no virtual packages: its platforms are its subdirs. So a lock any pixi since
    0.50 wrote for this manifest is current. Uses only py-rattler's synchronous API.
    """
    from rattler import LockFile

    if not lock_path.is_file():
        return f"no {lock_path.name}"
    try:
        lock_file = LockFile.from_path(lock_path)
    except Exception as exc:
        return f"{lock_path.name} cannot be read ({' '.join(str(exc).split())})"
    version = read_lock_version(lock_path)
    records_virtual_packages = version is None or version >= 7

    plan = plan_lock(manifest, project_dir)
    locked_envs = {name for name, _ in lock_file.environments()}
    wanted_envs = {name for name, _ in plan.environments}
    if locked_envs != wanted_envs:
        return (
            f"environments differ (lock: {', '.join(sorted(locked_envs)) or 'none'}; "
            f"manifest: {', '.join(sorted(wanted_envs))})"
        )

    recorded_indexes: dict[str, Any] | None = None
    for name, urls in plan.environments:
        env = lock_file.environment(name)
        if env is None:  # pragma: no cover - names checked above
            return f"environment {name!r} is not in the lock"
        locked_urls = tuple(_norm_url(str(c)) for c in env.channels())
        if locked_urls != tuple(_norm_url(u) for u in urls):
            return f"channels of environment {name!r} changed"
        pypi_jobs = [job for job in plan.jobs if job.environment == name and job.pypi_requirements]
        if pypi_jobs:
            if recorded_indexes is None:
                recorded_indexes = _recorded_indexes(lock_path)
            reason = _indexes_stale(recorded_indexes.get(name), pypi_jobs[0].pypi_options)
            if reason:
                return f"environment {name!r}: {reason}"
        # The platform objects must come from this environment (py-rattler panics on a
        # fresh LockPlatform here).
        env_platforms = list(env.platforms())
        used: set[str] = set()
        for platform in manifest.platforms_for(name):
            resolved = manifest.resolve(name, platform)
            subdir = manifest.subdir(platform)
            lock_platform = _matching_platform(
                env_platforms, subdir, resolved.virtual_packages, records_virtual_packages
            )
            if lock_platform is None:
                vps = customised(resolved.virtual_packages, subdir)
                what = ", ".join("=".join(filter(None, key)) for key in sorted(vps))
                return (
                    f"environment {name!r}: platform {platform} ({subdir}"
                    f"{', ' + what if what else ''}) is not in the lock"
                )
            used.add(lock_platform.name)
            packages = env.packages(lock_platform)
            reason = _environment_stale(resolved, packages or [], subdir)
            if reason:
                return f"environment {name!r} on {platform}: {reason}"
        extra = sorted({p.name for p in env_platforms} - used)
        if extra:
            return f"environment {name!r} has platforms the manifest dropped: {', '.join(extra)}"
    return None


def _matching_platform(
    platforms: Sequence[Any],
    subdir: str,
    virtual_packages: Sequence[VirtualPackage],
    records_virtual_packages: bool,
) -> Any | None:
    """The lock platform that stands for a manifest platform (see :func:`stale_reason`)."""
    if not records_virtual_packages:
        return next((p for p in platforms if p.name == subdir), None)
    want = customised(virtual_packages, subdir)
    for lock_platform in platforms:
        if str(lock_platform.subdir) != subdir:
            continue
        locked = [parse_locked_virtual_package(v) for v in lock_platform.virtual_packages]
        if customised(locked, subdir) == want:
            return lock_platform
    return None


def _recorded_indexes(lock_path: Path) -> dict[str, Any]:
    """environment -> its ``indexes``/``find-links`` as the lock at ``lock_path`` records them
    (:func:`~pipeline.pixi.locktext.recorded_indexes`); empty when it cannot be read."""
    try:
        text = lock_path.read_text(encoding="utf-8")
    except OSError:
        return {}
    return recorded_indexes(text)


def _indexes_stale(recorded: Mapping[str, Any] | None, options: PypiOptions) -> str | None:
    if recorded is None:  # not recorded (a lock written by hand or an old tool): not compared
        return None
    locked = tuple(_norm_url(str(u)) for u in recorded.get("indexes") or ())
    wanted = tuple(_norm_url(u) for u in index_urls(options))
    if locked != wanted:
        return "PyPI indexes changed ([pypi-options] index-url / extra-index-urls)"
    links = tuple(
        (str(k), _norm_url(str(v)))
        for item in recorded.get("find-links") or ()
        if isinstance(item, Mapping)
        for k, v in item.items()
    )
    if links != tuple((f.kind, _norm_url(f.location)) for f in options.find_links):
        return "PyPI find-links changed ([pypi-options] find-links)"
    return None


def _environment_stale(
    resolved: ResolvedEnvironment, packages: Sequence[Any], subdir: str
) -> str | None:
    from rattler import CondaLockedPackage, MatchSpec, PypiLockedPackage, Version, VersionSpec

    conda = [p for p in packages if isinstance(p, CondaLockedPackage)]
    pypi = {pypi_name(p.name) for p in packages if isinstance(p, PypiLockedPackage)}
    by_name = {p.name: p for p in conda}
    reason = _pypi_stale(
        resolved, [p for p in packages if isinstance(p, PypiLockedPackage)], by_name, subdir
    )
    if reason:
        return reason
    vps = {vp.name: vp for vp in resolved.virtual_packages}

    roots: list[str] = []
    for spec in resolved.match_specs:
        if not any(p.satisfies(spec) for p in conda):
            return f"no locked package matches {spec!r}"
        roots.append(MatchSpec(spec).name.normalized)
    for source in resolved.source_dependencies:
        if source not in by_name:
            return f"source dependency {source!r} is not locked"
        roots.append(source)
    missing = [name for name in resolved.pypi_sources if name not in pypi]
    if missing:
        return f"PyPI dependency {missing[0]!r} is not locked"

    reached: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in reached or name not in by_name:
            continue
        reached.add(name)
        record = by_name[name].package_record
        for dep in record.depends if record is not None else []:
            spec = MatchSpec(dep)
            dep_name = spec.name.normalized
            if not dep_name.startswith("__"):
                todo.append(dep_name)
                continue
            vp = vps.get(dep_name)
            if vp is None:
                return f"{name} needs {dep!r}, which the system requirements do not provide"
            if spec.version and not VersionSpec(str(spec.version)).matches(Version(vp.version)):
                return f"{name} needs {dep!r}, but the system requirements give {vp.version}"
    unused = sorted(set(by_name) - reached)
    if unused:
        return f"{unused[0]} is locked but no longer required"
    return None


def _pypi_stale(
    resolved: ResolvedEnvironment, pypi: Sequence[Any], conda: Mapping[str, Any], subdir: str
) -> str | None:
    if not resolved.pypi_requirements and not pypi:
        return None
    python = conda.get("python")
    records = [
        LockedPypiRecord(
            name=pypi_name(p.name),
            version=str(p.version),
            requires_dist=tuple(p.requires_dist or ()),
            requires_python=p.requires_python,
        )
        for p in pypi
    ]
    # A PyPI package that pixi locked from a path or git (a source) is the manifest's own.
    sources = set(resolved.pypi_sources)
    return pypi_stale_reason(
        resolved.pypi_requirements,
        resolved.pypi_options.dependency_overrides,
        [r for r in records if r.name not in sources],
        subdir=subdir,
        python_version=_conda_version(python) if python is not None else None,
    )


def _conda_version(package: Any) -> str | None:
    record = package.package_record
    return str(record.version) if record is not None else None


def _norm_url(url: str) -> str:
    return url.rstrip("/")


# ---- the PyPI part (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class LockedPypiRecord:
    """What the staleness check reads of a locked PyPI package (from py-rattler)."""

    name: str
    version: str
    requires_dist: tuple[str, ...]
    requires_python: str | None


def pypi_stale_reason(
    requirements: Sequence[str],
    overrides: Sequence[tuple[str, str]],
    locked: Sequence[LockedPypiRecord],
    *,
    subdir: str,
    python_version: str | None,
) -> str | None:
    """Why ``locked`` does not satisfy ``requirements`` (PEP 508, from the manifest), or None.

    As pixi: an override replaces every requirement on its package; markers are evaluated for
    ``subdir`` and the locked ``python_version`` (with the requesting extras); every applicable
    requirement, direct or from a locked package's ``requires_dist``, is met by a locked
    package of that name whose version the specifier allows (pre-releases included); every
    locked package is reached; each accepts the locked Python. Without a locked Python only the
    names are compared.
    """
    by_name = {canonicalize_name(p.name): p for p in locked}
    override = {canonicalize_name(n): Requirement(r) for n, r in overrides}
    if python_version is None:
        for text in requirements:
            name = canonicalize_name(Requirement(text).name)
            if name not in by_name:
                return f"PyPI dependency {name!r} is not locked"
        return None
    env = marker_environment(subdir, python_version)

    reached: set[str] = set()
    todo: list[tuple[Requirement, str]] = []
    for text in requirements:
        todo.append((Requirement(text), "pixi.toml"))
    while todo:
        req, via = todo.pop()
        name = canonicalize_name(req.name)
        if name in override and via != "override":
            replaced = override[name]
            if replaced.marker is None or replaced.marker.evaluate({**env, "extra": ""}):
                todo.append((Requirement(str(replaced)), "override"))
            continue
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        pkg = by_name.get(name)
        if pkg is None:
            return f"PyPI requirement {str(req)!r} ({via}) is not locked"
        if not _version_allowed(req.specifier, pkg.version):
            return (
                f"PyPI requirement {str(req)!r} ({via}) is not met by locked {name} {pkg.version}"
            )
        first_visit = name not in reached
        reached.add(name)
        if pkg.requires_python and not _version_allowed(pkg.requires_python, python_version):
            return f"locked {name} {pkg.version} needs Python {pkg.requires_python}"
        if first_visit or req.extras:
            for dep_text in pkg.requires_dist:
                try:
                    dep = Requirement(dep_text)
                except InvalidRequirement:
                    continue
                if dep.marker is not None:
                    wanted = [""] if not req.extras else [*req.extras]
                    if not any(dep.marker.evaluate({**env, "extra": e}) for e in wanted):
                        continue
                    dep = Requirement(str(dep).split(";", 1)[0])
                todo.append((dep, name))
    unused = sorted(set(by_name) - reached)
    if unused:
        return f"PyPI package {unused[0]} is locked but no longer required"
    return None


def _version_allowed(specifier: SpecifierSet | str, version: str) -> bool:
    try:
        spec = specifier if isinstance(specifier, SpecifierSet) else SpecifierSet(specifier)
        return spec.contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return True  # what packaging cannot parse, pixi's uv would judge; do not churn the lock
