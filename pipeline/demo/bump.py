"""An update of a locked project without a solve: one wheel re-versioned and the demo channel's
``python`` rebuilt, edited into a copy of the project's ``pixi.lock``.

What a real update looks like ("one or two packages", pixi-pack#245) on the real vLLM bundle,
for the delta test and benchmark (:mod:`pipeline.bundle.delta`). The new wheel is the old one
with its version bumped (its ``.dist-info`` renamed, ``METADATA`` and ``RECORD`` rewritten),
so it installs as a real wheel; the new ``python`` is the demo recipe with another build
string. Both are written as files and the lock points at them by path, as the lock of the
cached vLLM project points at its local channel and wheel store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.demo.channel import add_wheel_record, build_package, default_recipes, write_wheel
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Bumped:
    """A bumped project: its dir, and the old and new files of the two packages."""

    project: Path
    wheel_old: str
    wheel_new: Path
    python_old: str
    python_new: Path

    def changed_bytes(self) -> int:
        return self.wheel_new.stat().st_size + self.python_new.stat().st_size


def rewrap_wheel(wheel: Path, out_dir: Path, version: str) -> Path:
    """``wheel`` as release ``version``: same files, ``<name>-<version>.dist-info``, its
    ``METADATA`` saying the version and a new ``RECORD``. Same bytes on every call."""
    name, old = wheel.name.split("-")[:2]
    old_info, new_info = f"{name}-{old}.dist-info", f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member == f"{old_info}/RECORD":
                continue
            data = zf.read(member)
            if member == f"{old_info}/METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {version}".encode(), data, count=1)
            files[member.replace(old_info + "/", new_info + "/", 1)] = data
    add_wheel_record(files, new_info)
    return write_wheel(
        out_dir / wheel.name.replace(f"{name}-{old}-", f"{name}-{version}-", 1), files
    )


def _replace_entry(text: str, kind: str, old_url: str, new_url: str, fields: dict[str, str]) -> str:
    """Point the lock's ``- <kind>: <old_url>`` entries at ``new_url`` and set ``fields`` in
    its package record (a v6 lock's text; every other byte kept)."""
    if f"- {kind}: {old_url}\n" not in text:
        raise PipelineError(f"the lock has no {kind} package {old_url}")
    text = text.replace(f"- {kind}: {old_url}\n", f"- {kind}: {new_url}\n")
    start = text.index(f"\n- {kind}: {new_url}\n") + 1
    end = text.find("\n- ", start + 1)
    end = len(text) if end < 0 else end + 1
    block = text[start:end]
    for key, value in fields.items():
        block, count = re.subn(rf"(?m)^  {key}: .*$", f"  {key}: {value}", block, count=1)
        if not count:
            raise PipelineError(f"the lock's record of {new_url} has no {key}")
    return text[:start] + block + text[end:]


def bump_project(
    project: Path, dest: Path, wheel: str, version: str, pack_cache: Path | None = None
) -> Bumped:
    """Copy ``project``'s ``pixi.toml`` and ``pixi.lock`` to ``dest``, with the wheel whose
    file name starts with ``wheel-`` re-versioned as ``version`` and ``python`` rebuilt (build
    ``h1_venv``); the new files go under ``dest/files``. The old wheel is read where the lock
    points, or from ``pack_cache`` (``pypi/<file>``) for a URL. Raises PipelineError when the
    lock has no such packages."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "pixi.toml", dest / "pixi.toml")
    text = (project / "pixi.lock").read_text(encoding="utf-8")
    wheel_url = _first(text, rf"(?m)^- pypi: (\S*/{re.escape(wheel)}-[^/\s]+\.whl)$", wheel)
    old_wheel = Path(wheel_url)
    if not old_wheel.is_file():
        if pack_cache is None:
            raise PipelineError(f"{wheel_url} is not a local file: give the pack cache")
        old_wheel = pack_cache / "pypi" / wheel_url.rsplit("/", 1)[-1]
    new_wheel = rewrap_wheel(old_wheel, dest / "files" / "pypi", version)
    text = _replace_entry(
        text,
        "pypi",
        wheel_url,
        str(new_wheel),
        {"version": version, "sha256": hashlib.sha256(new_wheel.read_bytes()).hexdigest()},
    )
    python_url = _first(text, r"(?m)^- conda: (\S*/python-[^/\s]+\.conda)$", "python")
    recipe = next(r for r in default_recipes() if r.name == "python")
    recipe = dataclasses.replace(recipe, build="h1_venv", build_number=1)
    built = build_package(recipe, dest / "files" / recipe.subdir)
    text = _replace_entry(
        text,
        "conda",
        python_url,
        str(built.path),
        {"sha256": built.sha256, "md5": built.md5, "size": str(built.size)},
    )
    (dest / "pixi.lock").write_text(text, encoding="utf-8")
    return Bumped(dest, old_wheel.name, new_wheel, Path(python_url).name, built.path)


def _first(text: str, pattern: str, what: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise PipelineError(f"the lock has no {what} package to bump")
    return match.group(1)


__all__ = ["Bumped", "bump_project", "rewrap_wheel"]
