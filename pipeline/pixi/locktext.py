"""The text of ``pixi.lock``: its version, and every edit made to it line by line.

py-rattler reads and writes whole locks (:mod:`pipeline.pixi.lockfile` reads them), but some
things it cannot say, so they are done on the text here, every other byte kept:

- :func:`lock_version` (and :func:`read_lock_version` for a file): the ``version:`` a lock
  declares, the one answer every stage uses (which pixi reads it, which location form it
  takes, whether it records virtual packages);
- :func:`patch_lock_text`: the channel patch of the ``patch-channels`` stage -- the location
  of every bundled package becomes its extracted file, each environment's ``channels`` the
  local channel (:func:`location_form` says how a local file is written in a lock version,
  :func:`package_key` which bundled file a location names);
- :func:`annotate_lock_text`: the PyPI fields py-rattler 0.28 cannot write (``sha256``,
  ``requires_dist``, ``requires_python``, the environment's ``indexes`` and ``find-links``),
  in pixi's form; :func:`recorded_indexes` reads those environment fields back;
- :func:`downgrade_to_v6`: a v7 lock of bare subdir platforms written as format v6.

Everything here is pure (text in, text out) except :func:`read_lock_version`, which reads the
head of a file. Nothing here runs a process or touches the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.errors import LockError
from pipeline.pixi.model import FindLinks

__all__ = [
    "PypiFields",
    "annotate_lock_text",
    "downgrade_to_v6",
    "location_form",
    "lock_version",
    "package_key",
    "patch_lock_text",
    "read_lock_version",
    "recorded_indexes",
    "yaml_scalar",
]

_VERSION_LINE = re.compile(r"^version:\s*(\d+)\s*$", re.MULTILINE)
# How much of a lock file read_lock_version reads: the version is its first line.
_HEAD_BYTES = 4096
_LOCATION_LINE = re.compile(
    r"^(?P<lead>\s*(?:-\s+)?)(?P<key>conda|pypi|url):(?P<space>\s+)"
    r"(?P<quote>['\"]?)(?P<value>[^'\"\s]+)(?P=quote)(?P<tail>\s*)$"
)
_SUBDIR_LINE = re.compile(r"^  subdir:\s")
# pixi writes "direct+<url>" for PyPI packages given by direct URL rather than from an index.
_DIRECT = "direct+"


# ---- the version -----------------------------------------------------------------------------


def lock_version(text: str) -> int | None:
    """The ``version:`` a pixi lock's text declares (its top-level ``version: N`` line), or
    None when it has none. Pure; the text may be just the head of the file."""
    match = _VERSION_LINE.search(text)
    return int(match.group(1)) if match else None


def read_lock_version(path: Path) -> int | None:
    """:func:`lock_version` of the lock file at ``path``, read from its first bytes; None when
    the file is absent, unreadable or declares none. Raises nothing (py-rattler reports a bad
    lock when it reads it)."""
    try:
        with Path(path).open("rb") as stream:
            head = stream.read(_HEAD_BYTES)
    except OSError:
        return None
    return lock_version(head.decode("utf-8", errors="replace"))


# ---- the channel patch (patch-channels) ------------------------------------------------------


def location_form(lock_text: str) -> Callable[[Path], str]:
    """How a local file is written in this lock: lock v5 wants a ``file://`` URL (its
    ``url:`` key); v6 and v7 take an absolute path, which is what py-rattler itself writes
    for local packages (a v7 lock with ``file://`` package URLs does not even read back)."""
    version = lock_version(lock_text)
    if version is not None and version <= 5:
        return lambda path: path.as_uri()
    return str


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


# ---- the PyPI fields pixi writes -------------------------------------------------------------


class PypiFields(Protocol):
    """What :func:`annotate_lock_text` writes of one locked PyPI file
    (:class:`pipeline.build.pypi.LockedPypi` is one)."""

    @property
    def sha256(self) -> str: ...

    @property
    def requires_dist(self) -> tuple[str, ...]: ...

    @property
    def requires_python(self) -> str | None: ...


def yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain where YAML reads it back as this string, else
    single-quoted (as serde_yaml quotes ``'2.23'`` or ``'>=3.8'``)."""
    plain_ok = (
        value != ""
        and value == value.strip()
        and value[0] not in "!&*-?:,[]{}#|>@`'\"%<=~"
        and ": " not in value
        and " #" not in value
        and not value.endswith(":")
        and not re.fullmatch(
            r"[-+]?(\d[\d_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?|true|false|yes|no|on|off|null|~|"
            r"True|False|TRUE|FALSE|Null|NULL|0x[0-9a-fA-F]+|0o[0-7]+|\.inf|\.nan",
            value,
        )
    )
    return value if plain_ok else "'" + value.replace("'", "''") + "'"


def annotate_lock_text(
    text: str,
    by_location: Mapping[str, PypiFields],
    indexes: Mapping[str, tuple[tuple[str, ...], tuple[FindLinks, ...]]],
) -> str:
    """py-rattler's lock ``text`` with pixi's PyPI fields added. Pure.

    After each ``packages:`` entry ``- pypi: LOC`` ... ``version:``: ``sha256``,
    ``requires_dist`` (when any), ``requires_python`` (when known), from ``by_location[LOC]``.
    In each environment named in ``indexes`` (environment -> (index URLs, find-links)), before
    its ``packages:``: ``indexes:`` and ``find-links:`` (when any).
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    section = ""
    environment: str | None = None
    current: PypiFields | None = None
    for line in lines:
        if not line.startswith(" ") and line.rstrip().endswith(":"):
            section = line.strip().rstrip(":")
        if section == "environments":
            match = re.match(r"^  (\S[^:]*):\s*$", line)
            if match:
                environment = match.group(1).strip("'\"")
            if line.rstrip() == "    packages:" and environment in indexes:
                urls, links = indexes[environment]
                out.append("    indexes:\n")
                out.extend(f"    - {yaml_scalar(u)}\n" for u in urls)
                if links:
                    out.append("    find-links:\n")
                    out.extend(
                        f"    - {link.kind}: {yaml_scalar(link.location)}\n" for link in links
                    )
        if section == "packages":
            if line.startswith("- "):
                current = None
                match = re.match(r"^- pypi: (.*)$", line.rstrip("\n"))
                if match:
                    current = by_location.get(_unquote_yaml(match.group(1)))
            elif current is not None and line.startswith("  version: "):
                out.append(line)
                out.append(f"  sha256: {current.sha256}\n")
                if current.requires_dist:
                    out.append("  requires_dist:\n")
                    out.extend(f"  - {yaml_scalar(r)}\n" for r in current.requires_dist)
                if current.requires_python:
                    out.append(f"  requires_python: {yaml_scalar(current.requires_python)}\n")
                current = None
                continue
        out.append(line)
    return "".join(out)


def _unquote_yaml(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def recorded_indexes(text: str) -> dict[str, Any]:
    """environment -> its ``indexes``/``find-links`` as the lock's ``text`` records them
    (py-rattler does not expose them); an environment without them is absent, and so is
    everything when the text is not YAML."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError:
        return {}
    out: dict[str, Any] = {}
    for env_name, env in ((data or {}).get("environments") or {}).items():
        if isinstance(env, Mapping) and ("indexes" in env or "find-links" in env):
            out[str(env_name)] = env
    return out


# ---- format v6 -------------------------------------------------------------------------------


def downgrade_to_v6(text: str) -> str:
    """Turn a v7 lock that py-rattler wrote for bare subdir platforms into format v6.

    For conda binary packages v6 is v7 without the top-level ``platforms:`` list (v6 keys the
    packages by subdir and records no virtual packages; the package entries are the same). PyPI
    packages are written alike in both (pixi's v6 fixture wheel-with-correct-tags and v7
    pypi-find-links-index: ``pypi:``, name, version, sha256, requires_dist, requires_python;
    the environment's ``indexes``/``find-links``). Proven by reading both with py-rattler 0.15.0
    (rattler_lock 0.23.8, pixi 0.50) and 0.28.0: the same records
    (tests/test_lock_older_pixi.py). Raises LockError for anything else: a rich platform (a
    ``subdir:`` or virtual packages), a source package.
    """
    lines = text.splitlines(keepends=True)
    if not lines or lines[0] != "version: 7\n":
        raise LockError("py-rattler wrote an unexpected lock (no `version: 7` first); report it")
    out = ["version: 6\n"]
    index = 1
    if index < len(lines) and lines[index] == "platforms:\n":
        index += 1
        while index < len(lines) and lines[index].startswith("- name: "):
            index += 1
            if index < len(lines) and lines[index].startswith("  "):
                raise LockError(
                    "cannot write lock format v6 for a platform with a subdir or virtual "
                    "packages of its own; it needs v7"
                )
    rest = lines[index:]
    if any(line.startswith("- conda_source:") for line in rest):
        raise LockError("cannot write lock format v6 with source packages; it needs v7")
    return "".join(out + rest)
