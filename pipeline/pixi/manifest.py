"""Read a pixi manifest (``pixi.toml``) and check its shape: :func:`load_manifest`.

The file is parsed once; every table is checked the way pixi would refuse it, and turned into
the frozen objects of :mod:`pipeline.pixi.model` (a :class:`~pipeline.pixi.model.Manifest`,
which resolves environments). ``[workspace]`` (or the legacy ``[project]``) holds ``name``,
``channels``, ``platforms`` (subdir strings or pixi's rich inline tables); dependencies,
targets, features, ``[system-requirements]``, ``[pypi-dependencies]``, ``[pypi-options]``,
``[tasks]`` and ``[environments]`` follow pixi's ``pixi_manifest``.

Nothing here touches the network or a process; the only import from py-rattler is its
synchronous version and match-spec parsers, used to reject malformed specs early. Errors are
:class:`~pipeline.errors.LockError` with one line: the file, the dotted key, what to do.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from rattler import MatchSpec, Version

from pipeline.errors import LockError
from pipeline.pixi.model import (
    DEFAULT_ENVIRONMENT,
    DEFAULT_FEATURE,
    ChannelEntry,
    CondaDependency,
    EnvironmentDefinition,
    Feature,
    FindLinks,
    Manifest,
    PypiDependency,
    PypiOptions,
    Target,
    pypi_name,
)
from pipeline.pixi.platforms import (
    KNOWN_PLATFORMS,
    TARGET_FAMILIES,
    PlatformDef,
    SystemRequirements,
    VirtualPackage,
    is_subdir_default,
)
from pipeline.pixi.tasks import Task

MANIFEST_NAME = "pixi.toml"

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
_PYPI_SOURCE_KEYS = ("path", "git", "url", "branch", "tag", "rev", "subdirectory", "editable")
# pixi's other [pypi-options] keys: accepted (pixi reads them) but not passed to uv here.
_PYPI_OPTIONS_IGNORED = (
    "no-build-isolation",
    "no-binary",
    "skip-wheel-filename-check",
)


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
