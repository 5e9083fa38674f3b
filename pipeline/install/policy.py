"""The install policy: what a new environment may hold before it is switched in.

**Startup hooks.** Python's ``site`` module runs every line that starts with ``import`` (then a
space or a tab) of every ``*.pth`` file in a site-packages directory, at the start of every
Python of the environment: vLLM's, the verify's, a user's shell. That is how LiteLLM 1.82.8's
compromised wheel ran its payload "on ANY Python startup" (litellm#24518). So before anything
runs Python in a new environment, :func:`check_startup_hooks` refuses a ``.pth`` file with such
a line unless its package is allowed: :data:`DEFAULT_ALLOWED_PTH` (reviewed below), plus the
names in ``AUTO_INFER_VLLM_ALLOW_PTH``. A ``.pth`` of plain paths only extends ``sys.path`` and
is allowed.

Which package shipped a file: a wheel's ``*.dist-info/RECORD``, a conda package's
``conda-meta/<name>-<version>-<build>.json`` (``files``); a file neither lists is "an unknown
package" and is refused like the others.

**Link scripts.** conda packages may carry ``pre-link``, ``post-link`` and ``pre-unlink``
scripts (``bin/.<name>-post-link.sh``...). The install does not run them (rattler never does),
and :func:`link_scripts` lists the packages that have one, for the install to report.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InstallError

# Reviewed startup hooks of the vLLM bundle's packages (found in its installed environment):
#  setuptools: distutils-precedence.pth, `import os; ...; __import__('_distutils_hack')
#  .add_shim()`: makes `import distutils` find setuptools' copy (Python 3.12 has none);
#  SETUPTOOLS_USE_DISTUTILS=stdlib turns it off. Shipped by every setuptools since 60.
DEFAULT_ALLOWED_PTH: dict[str, str] = {
    "setuptools": "distutils-precedence.pth: the distutils shim (SETUPTOOLS_USE_DISTUTILS)",
}
_LINK_SCRIPT = re.compile(r"^(?:bin|Scripts)/\.(.+)-(pre-link|post-link|pre-unlink)\.(?:sh|bat)$")
_CODE_LINE = re.compile(r"^import[ \t]")


@dataclass(frozen=True)
class StartupHook:
    """A ``.pth`` file that runs code: where, which package shipped it, its first code line."""

    path: Path
    package: str
    line: str


def normalize(name: str) -> str:
    """A package name as pip compares them (PEP 503): lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_allowed(text: str | None) -> frozenset[str]:
    """``AUTO_INFER_VLLM_ALLOW_PTH``: package names separated by commas or spaces."""
    return frozenset(normalize(n) for n in re.split(r"[,\s]+", text or "") if n)


def _owners(prefix: Path, wanted: Iterable[Path]) -> dict[Path, str]:
    """The package that lists each of the ``wanted`` files (resolved paths), where one does.
    A package's list is parsed only when the text holds one of the wanted file names: an
    environment has tens of thousands of listed files and a handful of ``.pth`` files."""
    targets = {p.absolute() for p in wanted}
    names = {p.name for p in targets}
    owners: dict[Path, str] = {}

    def mentions(text: str) -> bool:
        return any(name in text for name in names)

    for meta in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            text = meta.read_text(encoding="utf-8")
            if not mentions(text):
                continue
            record = json.loads(text)
        except (OSError, ValueError):
            continue
        name = str(record.get("name") or meta.stem)
        for rel in record.get("files") or []:
            path = (prefix / str(rel)).absolute()
            if path in targets:
                owners[path] = name
    for record_file in prefix.glob("lib/python*/site-packages/*.dist-info/RECORD"):
        site = record_file.parent.parent
        name = record_file.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        try:
            text = record_file.read_text(encoding="utf-8")
            if not mentions(text):
                continue
            for row in csv.reader(io.StringIO(text)):
                if row and (site / row[0]).absolute() in targets:
                    owners[(site / row[0]).absolute()] = name
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    return owners


def startup_hooks(prefix: Path) -> list[StartupHook]:
    """The ``.pth`` files of the environment at ``prefix`` that run code, sorted by path."""
    found: list[StartupHook] = []
    pth_files = sorted(prefix.glob("lib/python*/site-packages/*.pth"))
    if not pth_files:
        return found
    owners = _owners(prefix, pth_files)
    for path in pth_files:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        code = next((line for line in lines if _CODE_LINE.match(line)), None)
        if code is not None:
            owner = owners.get(path.absolute(), "an unknown package")
            found.append(StartupHook(path, owner, code.strip()))
    return found


def check_startup_hooks(prefix: Path, allowed: Iterable[str]) -> list[StartupHook]:
    """Refuse (InstallError, one line) the first startup hook whose package is neither in
    :data:`DEFAULT_ALLOWED_PTH` nor in ``allowed``; return the hooks that were allowed."""
    allow = {normalize(n) for n in allowed} | {normalize(n) for n in DEFAULT_ALLOWED_PTH}
    hooks = startup_hooks(prefix)
    for hook in hooks:
        if normalize(hook.package) not in allow:
            shown = hook.line if len(hook.line) <= 80 else hook.line[:77] + "..."
            raise InstallError(
                f"the new environment is not switched in: {hook.package} ships "
                f"{hook.path.name}, a startup hook that runs code in every Python of the "
                f"environment ({shown!r}); if you trust it, set "
                f"AUTO_INFER_VLLM_ALLOW_PTH={hook.package}; the running environment is "
                "untouched"
            )
    return hooks


def link_scripts(prefix: Path) -> list[tuple[str, str]]:
    """``(package, kind)`` of every conda package of the environment with a pre-link,
    post-link or pre-unlink script (not run by this install), sorted."""
    found: set[tuple[str, str]] = set()
    for meta in (prefix / "conda-meta").glob("*.json"):
        try:
            text = meta.read_text(encoding="utf-8")
            if "-link." not in text and "-unlink." not in text:
                continue
            record = json.loads(text)
        except (OSError, ValueError):
            continue
        for rel in record.get("files") or []:
            match = _LINK_SCRIPT.match(str(rel))
            if match:
                found.add((str(record.get("name") or match.group(1)), match.group(2)))
    return sorted(found)


__all__ = [
    "DEFAULT_ALLOWED_PTH",
    "StartupHook",
    "check_startup_hooks",
    "link_scripts",
    "parse_allowed",
    "startup_hooks",
]
