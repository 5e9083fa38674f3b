"""Which lock platform pixi >= 0.71 installs for a workspace platform, applied to our locks.

The functions under "model of pixi" are a re-statement in Python, written from reading
prefix-dev/pixi at commit 2b25fc76dd3b5cc50a235387d948474975c40d73 (the same functions are
byte-identical at v0.71.0, 5f7900633b86c4ca57d46ab9cd15fa346987572d, the release that brought
rich platforms: CHANGELOG.md "Rich Platform support (#6178)"). No pixi code is copied. Two steps:

1. On load (``Workspace::load_lock_file`` in ``crates/pixi_core/src/lock_file/update.rs``)
   ``align_platform_names`` (``crates/pixi_core/src/lock_file/platform_rename.rs``) renames a
   lock platform to the manifest name of the one workspace platform with the same identity:
   the same subdir, and the same virtual packages once each side's subdir defaults are dropped
   (``compute_renames``, ``workspace_customisations``, ``locked_customisations``; defaults per
   ``subdir_default_virtual_packages``/``is_subdir_default`` in
   ``crates/pixi_manifest/src/platform.rs``: name, version compared as a version, build string
   compared exactly). Nothing else changes; no match, or two, leaves the name.
2. Every consumer -- the install of ``pixi install`` / ``pixi run`` / ``pixi shell``
   (``update_prefix`` and the conda prefix update in ``update.rs``), satisfiability, the
   quick-validate hash -- takes the packages of ``resolve_lock_platform_for``
   (``crates/pixi_core/src/lock_file/satisfiability/platform.rs``): the lock platform named as
   the workspace platform; else the one named as its subdir, taken when it records no virtual
   packages or records (as strings, compared exactly) every one the workspace platform declares
   -- and a workspace platform declares the subdir defaults too (``PixiPlatform::from_subdir``,
   ``new_with_defaults``); else none. "None" becomes an empty package list
   (``InstallSubset::filter(None)`` in ``install_subset.rs``; an empty ``Vec`` in the conda
   prefix update), which rattler's ``Installer`` turns into removing every installed package
   (``Transaction::from_current_and_desired``). ``--frozen`` skips the satisfiability check
   (``LockFileUsage::should_check_if_out_of_date``) that would otherwise call the lock stale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from lock_helpers import patched, solve
from rattler import LockFile, Version

from pipeline.build.lock import lock
from pipeline.demo.channel import write_pixi_toml

PIXI_DATA = Path(__file__).parent / "data" / "pixi"

# ---- model of pixi (see the module docstring for the functions restated) ----------------------


@dataclass(frozen=True)
class Vp:
    """A virtual package as pixi holds it: ``GenericVirtualPackage`` (name, version, build)."""

    name: str
    version: str
    build: str = ""

    def __str__(self) -> str:  # GenericVirtualPackage's Display: `=build` only when not empty
        return f"{self.name}={self.version}" + (f"={self.build}" if self.build else "")

    def same(self, other: Vp) -> bool:  # GenericVirtualPackage ==: Version ==, build exact
        return (
            self.name == other.name
            and Version(self.version) == Version(other.version)
            and self.build == other.build
        )


@dataclass(frozen=True)
class WorkspacePlatform:
    """pixi_manifest's ``PixiPlatform``: name, subdir, declared virtual packages (defaults in)."""

    name: str
    subdir: str
    declared: tuple[Vp, ...]


@dataclass(frozen=True)
class LockedPlatform:
    """rattler_lock's platform entry: its name, subdir and virtual-package strings verbatim."""

    name: str
    subdir: str
    virtual_packages: tuple[str, ...]


_ARCHSPEC = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "osx-64": "x86_64"}
_ARCHSPEC |= {"osx-arm64": "m1", "win-64": "x86_64"}


def pixi_subdir_defaults(subdir: str) -> tuple[Vp, ...]:
    """pixi's defaults for a subdir (pixi_default_versions: linux 4.18, glibc 2.28, macOS 13.0,
    Windows 10.0; ``__unix`` and ``__archspec`` with build strings ``0`` and the arch)."""
    out: list[Vp] = []
    if subdir.startswith(("linux-", "osx-")):
        out.append(Vp("__unix", "0", "0"))
    if subdir.startswith("linux-"):
        out += [Vp("__linux", "4.18"), Vp("__glibc", "2.28")]
    if subdir.startswith("win-"):
        out.append(Vp("__win", "10.0"))
    if subdir.startswith("osx-"):
        out.append(Vp("__osx", "13.0"))
    if subdir in _ARCHSPEC:
        out.append(Vp("__archspec", "0", _ARCHSPEC[subdir]))
    return tuple(out)


def is_default(vp: Vp, subdir: str) -> bool:
    return any(vp.same(d) for d in pixi_subdir_defaults(subdir))


def parse_locked(text: str) -> Vp | None:
    """``parse_locked_virtual_package``: ``name=version[=build]``; None when it does not parse."""
    parts = text.split("=", 2)
    if len(parts) < 2:
        return None
    try:
        Version(parts[1])
    except Exception:
        return None
    return Vp(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def _customisations(vps: Sequence[Vp], subdir: str) -> list[Vp]:
    return sorted((vp for vp in vps if not is_default(vp, subdir)), key=lambda vp: vp.name)


def _same_identity(a: Sequence[Vp], b: Sequence[Vp]) -> bool:
    return len(a) == len(b) and all(x.same(y) for x, y in zip(a, b, strict=True))


def align_platform_names(
    locked: Sequence[LockedPlatform], workspace: Sequence[WorkspacePlatform]
) -> dict[str, str]:
    """Step 1: ``{lock name: name pixi uses for it after loading}`` (identity renames)."""
    locked_names = {lp.name for lp in locked}
    renames: dict[str, str] = {}
    for lp in locked:
        parsed = [vp for vp in map(parse_locked, lp.virtual_packages) if vp is not None]
        identity = _customisations(parsed, lp.subdir)
        matching = [
            wp
            for wp in workspace
            if wp.subdir == lp.subdir
            and _same_identity(_customisations(wp.declared, wp.subdir), identity)
        ]
        if len(matching) != 1 or matching[0].name == lp.name:
            continue
        target = matching[0].name
        if target in locked_names or any(wp.name == lp.name for wp in workspace):
            continue
        renames[lp.name] = target
    return {lp.name: renames.get(lp.name, lp.name) for lp in locked}


def resolve_lock_platform_for(
    locked: Sequence[LockedPlatform], platform: WorkspacePlatform
) -> LockedPlatform | None:
    """Step 2, on the renamed lock: by name, else the subdir-named entry if it records no
    virtual packages or every declared one, as a string; else none."""
    by_name = {lp.name: lp for lp in locked}
    if platform.name in by_name:
        return by_name[platform.name]
    candidate = by_name.get(platform.subdir)
    if candidate is None:
        return None
    recorded = candidate.virtual_packages
    if not recorded or all(str(d) in recorded for d in platform.declared):
        return candidate
    return None


# ---- pixi.toml as pixi reads it (the subset the tests use) -----------------------------------

_FRIENDLY = {"cuda": "__cuda", "glibc": "__glibc", "macos": "__osx", "linux": "__linux"}


def _with_defaults(user: Sequence[Vp], subdir: str) -> tuple[Vp, ...]:
    """``merge_subdir_defaults``: the user's, then each default not named (any libc wins)."""
    names = {vp.name for vp in user}
    has_libc = bool(names & {"__glibc", "__musl", "__eglibc"})
    extra = [
        d
        for d in pixi_subdir_defaults(subdir)
        if d.name not in names and not (d.name == "__glibc" and has_libc)
    ]
    return (*user, *extra)


def _synthesised_name(subdir: str, user: Sequence[Vp]) -> str:
    # pixi's ``synthesize_name_string`` gives `linux-64-cuda-12`; all that matters here is
    # that it starts with the subdir and a dash, so it is never a lock name.
    parts = [subdir] + [f"{vp.name.lstrip('_')}-{vp.version}" for vp in user]
    return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(parts))


def _sysreq_vps(table: Mapping[str, Any]) -> list[Vp]:
    out: list[Vp] = []
    for key, value in table.items():
        if key == "libc":
            family, version = (
                (value.get("family", "glibc"), value["version"])
                if isinstance(value, Mapping)
                else ("glibc", value)
            )
            out.append(Vp(f"__{family}", str(version)))
        else:
            out.append(Vp(_FRIENDLY[key], str(value)))
    return out


def _applies(vp: Vp, subdir: str) -> bool:
    """Whether a system requirement applies to ``subdir`` (``virtual_packages_for_subdir``)."""
    if vp.name in ("__linux", "__glibc", "__musl", "__eglibc"):
        return subdir.startswith("linux-")
    if vp.name == "__osx":
        return subdir.startswith("osx-")
    if vp.name == "__cuda":
        return not subdir.startswith("osx-")
    return True


def pixi_platforms(manifest_path: Path) -> dict[str, list[WorkspacePlatform]]:
    """``{environment: its workspace platforms}`` as pixi builds them: inline tables as rich
    platforms; ``[system-requirements]`` migrated onto bare subdirs
    (``migrate_system_requirements_to_platforms`` in ``crates/pixi_manifest/src/toml/
    manifest.rs``); a feature's ``platforms`` restricting by name or subdir."""
    doc = tomlkit.parse(manifest_path.read_text(encoding="utf-8")).unwrap()
    sysreqs = _sysreq_vps(doc.get("system-requirements", {}))
    workspace: list[WorkspacePlatform] = []
    for entry in doc["workspace"]["platforms"]:
        if isinstance(entry, str):
            user = [vp for vp in sysreqs if _applies(vp, entry)]
            if not user or all(is_default(vp, entry) for vp in user):
                workspace.append(WorkspacePlatform(entry, entry, pixi_subdir_defaults(entry)))
            else:
                name = _synthesised_name(entry, user)
                workspace.append(WorkspacePlatform(name, entry, _with_defaults(user, entry)))
            continue
        subdir = entry["platform"]
        user = [Vp(_FRIENDLY[k], str(v)) for k, v in entry.items() if k in _FRIENDLY]
        name = entry.get("name") or _synthesised_name(subdir, user)
        workspace.append(WorkspacePlatform(name, subdir, _with_defaults(user, subdir)))
    features = doc.get("feature", {})
    out = {"default": workspace}
    for env, spec in doc.get("environments", {}).items():
        names = spec if isinstance(spec, list) else spec.get("features", [])
        platforms = list(workspace)
        for feature in names:
            allowed = features.get(feature, {}).get("platforms")
            if allowed is not None:
                platforms = [p for p in platforms if p.name in allowed or p.subdir in allowed]
        out[env] = platforms
    return out


# ---- applying the model to a lock ------------------------------------------------------------


def selections(lock_path: Path, manifest_path: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """``{(environment, workspace platform): (lock platform, conda+pypi package count)}``;
    the lock platform is ``""`` where pixi selects none (and so installs nothing)."""
    lock_file = LockFile.from_path(lock_path)
    by_name = {p.name: p for p in lock_file.platforms()}
    locked = [
        LockedPlatform(p.name, str(p.subdir), tuple(p.virtual_packages))
        for p in lock_file.platforms()
    ]
    workspaces = pixi_platforms(manifest_path)
    renames = align_platform_names(locked, workspaces["default"])
    original = {new: old for old, new in renames.items()}
    aligned = [LockedPlatform(renames[lp.name], lp.subdir, lp.virtual_packages) for lp in locked]
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for env, platforms in workspaces.items():
        environment = lock_file.environment(env)
        assert environment is not None, env
        for wp in platforms:
            chosen = resolve_lock_platform_for(aligned, wp)
            if chosen is None:
                out[(env, wp.name)] = ("", 0)
                continue
            lock_name = original[chosen.name]
            packages = environment.packages(by_name[lock_name]) or []
            out[(env, wp.name)] = (lock_name, len(packages))
    return out


def assert_every_platform_installs(lock_path: Path, manifest_path: Path) -> None:
    chosen = selections(lock_path, manifest_path)
    assert chosen
    empty = {key: value for key, value in chosen.items() if value[1] == 0}
    assert not empty, f"pixi would install nothing for {empty}"


# ---- the model against pixi's own tests (a sanity check of the model) ------------------------


def _platform(name: str, subdir: str, *vps: Vp) -> WorkspacePlatform:
    return WorkspacePlatform(name, subdir, _with_defaults(vps, subdir))


def test_model_agrees_with_pixis_own_unit_tests():
    # The cases of satisfiability/platform.rs's tests: a migrated `osx-arm64-macos-12-0`.
    migrated = _platform("osx-arm64-macos-12-0", "osx-arm64", Vp("__osx", "12.0"))
    v6_row = LockedPlatform("osx-arm64", "osx-arm64", ())
    assert resolve_lock_platform_for([v6_row], migrated) == v6_row
    named = LockedPlatform("osx-arm64-macos-12-0", "osx-arm64", ("__osx=12.0",))
    assert resolve_lock_platform_for([named], migrated) == named
    stale = LockedPlatform("osx-arm64", "osx-arm64", ("__osx=11.0",))
    assert resolve_lock_platform_for([stale], migrated) is None
    # platform_rename.rs: `p1` is renamed back to the manifest name by identity.
    gpu = _platform("gpu", "linux-64", Vp("__cuda", "12.0"))
    p1 = LockedPlatform("p1", "linux-64", ("__cuda=12", "__unix=0=0", "__linux=4.18"))
    assert align_platform_names([p1], [gpu]) == {"p1": "gpu"}


# ---- (b) real pixi output --------------------------------------------------------------------

PROJECTS = sorted(p.name for p in (PIXI_DATA / "projects").iterdir())


@pytest.mark.parametrize("project", PROJECTS)
def test_pixi_selects_a_non_empty_platform_in_pixis_own_locks(project):
    root = PIXI_DATA / "projects" / project
    assert_every_platform_installs(root / "pixi.lock", root / "pixi.toml")


def test_pixis_multi_machine_lock_selects_by_identity():
    root = PIXI_DATA / "projects" / "multi-machine"
    chosen = selections(root / "pixi.lock", root / "pixi.toml")
    assert {key: name for key, (name, _) in chosen.items()} == {
        ("default", "cuda-win-64"): "p1",
        ("default", "win-64"): "win-64",
        ("default", "cuda-linux-64"): "p2",
        ("default", "linux-64"): "linux-64",
        ("default", "osx-arm64-osx-13-5"): "p3",
    }


# ---- (a) the locks `doit lock` writes without pixi, before and after patch-channels ----------


CASES: dict[str, tuple[list[Any], dict[str, Any], dict[tuple[str, str], str]]] = {
    # bare subdirs: v6, the lock platforms are the subdirs
    "plain": (
        ["linux-64", "osx-arm64"],
        {"target": {"linux-64": {"dependencies": {"tinytool": "*"}}}},  # tinytool: linux only
        {("default", "linux-64"): "linux-64", ("default", "osx-arm64"): "osx-arm64"},
    ),
    # vllm-pixi's shape: pixi migrates it to `linux-64-cuda-12`; we write v6, whose VP-less
    # `linux-64` row pixi trusts for it
    "system-requirements": (
        ["linux-64"],
        {"system-requirements": {"cuda": "12"}},
        {("default", "linux-64-cuda-12"): "linux-64"},
    ),
    # rich platforms: v7, `p1` renamed back to `gpu` by identity
    "rich": (
        [{"name": "gpu", "platform": "linux-64", "cuda": "12"}, "linux-64"],
        {},
        {("default", "gpu"): "p1", ("default", "linux-64"): "linux-64"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixi_selects_a_non_empty_platform_in_our_locks(
    case, tmp_path, channel, channel_url, cache_dir
):
    platforms, extra, expected = CASES[case]
    project = tmp_path / "proj"
    manifest = write_pixi_toml(
        project,
        channels=[channel_url],
        platforms=platforms,
        dependencies={"tinydata": "*"} if case == "plain" else {"tinytool": "*"},
        extra=extra,
    )
    lock_path = solve(project, cache_dir)
    lock_names = sorted({name for name in expected.values()})
    for path in (lock_path, patched(lock_path, channel.root, lock_names)):
        chosen = selections(path, manifest)
        assert {key: name for key, (name, _) in chosen.items()} == expected, path.name
        assert_every_platform_installs(path, manifest)


# ---- (c) the lock py-rattler wrote before lock.py wrote pixi's form --------------------------

# What pipeline/build/lock.py wrote before 6795b66: a v7 platform list named by subdir, with
# our old defaults (`__linux=5.10`, build `0` everywhere, `__archspec=1`) and `__cuda` from
# [system-requirements].
OLD_STRINGS = ("__unix=0", "__linux=5.10=0", "__glibc=2.28=0", "__archspec=1=x86_64")


def _old_style(lock_path: Path, extra_vps: Sequence[str]) -> Path:
    text = lock_path.read_text(encoding="utf-8")
    assert text.startswith("version: 6\n")
    vps = "".join(f"  - {vp}\n" for vp in (*OLD_STRINGS[:3], *extra_vps, OLD_STRINGS[3]))
    head = f"version: 7\nplatforms:\n- name: linux-64\n  virtual-packages:\n{vps}"
    out = lock_path.with_name("old-style.lock")
    out.write_text(head + text[len("version: 6\n") :], encoding="utf-8")
    return out


def test_old_py_rattler_strings_empty_a_system_requirements_environment(
    tmp_path, channel_url, cache_dir
):
    # The inference, for vllm-pixi's shape: TRUE. The manifest platform becomes
    # `linux-64-cuda-12` (declaring `__linux=4.18`, `__cuda=12`...); the lock has no platform
    # of that name, and its `linux-64` records strings that are not those: no platform, an
    # empty package list, and `pixi install --frozen` / `pixi run --frozen` remove everything.
    project = tmp_path / "proj"
    manifest = write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"tinytool": "*"},
        extra={"system-requirements": {"cuda": "12"}},
    )
    ours = lock(project, pixi=None, cache_dir=cache_dir).lock_path
    old = _old_style(ours, ["__cuda=12=0"])
    assert LockFile.from_path(old).environment("default") is not None  # rattler reads it
    assert selections(old, manifest) == {("default", "linux-64-cuda-12"): ("", 0)}
    # Even pixi's spelling of `__cuda` alone does not help: `__linux=5.10=0` is not
    # `__linux=4.18`. What saves the v6 lock we write is that it records no strings at all.
    assert selections(_old_style(ours, ["__cuda=12"]), manifest) == {
        ("default", "linux-64-cuda-12"): ("", 0)
    }
    assert selections(ours, manifest) == {("default", "linux-64-cuda-12"): ("linux-64", 2)}


def test_old_py_rattler_strings_are_harmless_for_bare_subdirs(tmp_path, channel_url, cache_dir):
    # The inference for a manifest of bare subdirs: FALSE. The workspace platform `linux-64`
    # finds the lock platform `linux-64` by name; the strings are never compared.
    project = tmp_path / "proj"
    manifest = write_pixi_toml(project, channels=[channel_url], dependencies={"tinytool": "*"})
    ours = lock(project, pixi=None, cache_dir=cache_dir).lock_path
    old = _old_style(ours, [])
    assert selections(old, manifest) == {("default", "linux-64"): ("linux-64", 2)}
