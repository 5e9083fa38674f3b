"""The identity of a pixi platform: subdirs, virtual packages and target selectors.

pixi tells platforms apart by their conda subdir plus the virtual packages that differ from
that subdir's defaults (:func:`customised`); the rules here are pixi's own (``pixi_manifest``,
read at prefix-dev/pixi 2b25fc76): the defaults it assumes for a subdir
(:func:`subdir_default_virtual_packages`), how declared ones merge with them
(:func:`merge_subdir_defaults`), what ``[system-requirements]`` declare
(:class:`SystemRequirements`), how a lock spells a virtual package
(:func:`parse_locked_virtual_package`), and which ``[target.<selector>]`` tables apply to a
platform (:func:`selector_matches`, :func:`selector_rank`).

Pure: the only import from py-rattler is its synchronous version parser. Errors are
:class:`~pipeline.errors.LockError` with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rattler import Version

from pipeline.errors import LockError

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


def selector_rank(selector: str) -> int:
    """How specific a target selector is: ``unix`` 1, a family 2, a platform 3."""
    return {"unix": 1, "linux": 2, "osx": 2, "win": 2}.get(selector, 3)


def _max_version(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if Version(a) >= Version(b) else b
