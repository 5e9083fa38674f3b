"""Tiny wheels and sdists in a PEP 503 simple index, for the tests that lock PyPI packages.

``build_index(root, dists)`` writes ``root/files/<file>`` and ``root/simple/<name>/index.html``
(links with ``#sha256=``); a wheel made with ``pep658=True`` also gets ``<file>.metadata`` and
a ``data-core-metadata`` attribute, as PyPI serves them. Serve ``root`` with
``pipeline.demo.channel.serve_directory`` and use ``<url>simple`` as the index URL.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.demo.channel import add_wheel_record


@dataclass(frozen=True)
class Dist:
    """One distribution file to put in the index."""

    name: str
    version: str
    requires: tuple[str, ...] = ()
    requires_python: str | None = None
    tag: str = "py3-none-any"  # a wheel; "sdist" for a .tar.gz
    pep658: bool = False

    @property
    def project(self) -> str:
        return re.sub(r"[-_.]+", "-", self.name).lower()

    @property
    def filename(self) -> str:
        stem = f"{self.name.replace('-', '_')}-{self.version}"
        return f"{stem}.tar.gz" if self.tag == "sdist" else f"{stem}-{self.tag}.whl"

    def metadata(self) -> bytes:
        lines = ["Metadata-Version: 2.2", f"Name: {self.name}", f"Version: {self.version}"]
        if self.requires_python:
            lines.append(f"Requires-Python: {self.requires_python}")
        lines += [f"Requires-Dist: {r}" for r in self.requires]
        return ("\n".join(lines) + "\n").encode()


def _fixed(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_dist(dist: Dist, out_dir: Path) -> Path:
    """Write ``dist`` into ``out_dir``; same bytes on every call."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module = dist.name.replace("-", "_")
    stem = f"{module}-{dist.version}"
    path = out_dir / dist.filename
    if dist.tag == "sdist":
        pyproject = (
            f'[project]\nname = "{dist.name}"\nversion = "{dist.version}"\n'
            f"dependencies = {list(dist.requires)!r}\n"
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        ).encode()
        members = {
            f"{stem}/PKG-INFO": dist.metadata(),
            f"{stem}/pyproject.toml": pyproject,
            f"{stem}/{module}/__init__.py": b"",
        }
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1704067200, 0o644
                tf.addfile(info, io.BytesIO(data))
        path.write_bytes(buffer.getvalue())
        return path
    files = {
        f"{module}/__init__.py": f'VERSION = "{dist.version}"\n'.encode(),
        f"{stem}.dist-info/METADATA": dist.metadata(),
        f"{stem}.dist-info/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {dist.tag}\n"
        ).encode(),
    }
    add_wheel_record(files, f"{stem}.dist-info")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(_fixed(name), data)
    return path


def build_index(root: Path, dists: Sequence[Dist]) -> dict[str, Path]:
    """Write every dist under ``root/files`` and a simple index under ``root/simple``.

    Returns ``{filename: path}``.
    """
    files: dict[str, Path] = {}
    by_project: dict[str, list[tuple[Dist, Path]]] = {}
    for dist in dists:
        path = write_dist(dist, root / "files")
        files[dist.filename] = path
        by_project.setdefault(dist.project, []).append((dist, path))
        if dist.pep658:
            (root / "files" / f"{dist.filename}.metadata").write_bytes(dist.metadata())
    simple = root / "simple"
    simple.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(by_project))
    (simple / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    for project, entries in by_project.items():
        rows = []
        for dist, path in entries:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            attrs = ""
            if dist.requires_python:
                attrs += f' data-requires-python="{html.escape(dist.requires_python)}"'
            if dist.pep658:
                meta = hashlib.sha256(dist.metadata()).hexdigest()
                attrs += f' data-core-metadata="sha256={meta}"'
            rows.append(f'<a href="../../files/{path.name}#sha256={digest}"{attrs}>{path.name}</a>')
        (simple / project).mkdir(exist_ok=True)
        (simple / project / "index.html").write_text(
            "<html><body>\n" + "\n".join(rows) + "\n</body></html>\n"
        )
    return files
