"""A tiny conda channel, an HTTP server for it and a hand-made wheel: the CPU demo's embedded
default, and the tests' channel.

conda-forge is out of reach on the machines this runs on, so the demo and the tests build
their own channel with conda-package-handling (the ``demo`` extra) and index it with py-rattler:

============  =========  ===========  ======================================================
package       subdir     format       content
============  =========  ===========  ======================================================
libtiny 1.0   linux-64   ``.conda``   ``lib/libtiny.so.1`` and ``share/libtiny/message.txt``
libtiny 0.9   linux-64   ``.tar.bz2`` an older build, so specs can pin it
tinytool 1.0  linux-64   ``.conda``   ``bin/tinytool`` (sh script with a prefix placeholder,
                                      prints ``tinytool 1.0: <libtiny's message>``);
                                      depends on ``libtiny >=1.0`` and ``__glibc >=2.17``
tinycuda 1.0  linux-64   ``.conda``   depends on ``__cuda >=12`` (needs system-requirements)
tinydata 1.0  noarch     ``.tar.bz2`` ``noarch: generic``, ``share/tinydata/data.txt``
python 3.11   linux-64   ``.conda``   a *venv of the host interpreter*, see below
============  =========  ===========  ======================================================

The ``python`` package: conda-forge's python cannot be downloaded, so the package holds
``pyvenv.cfg`` (``home`` = the host interpreter's bin dir) and ``bin/python3.X`` as a symlink
to the host's real binary (plus ``bin/python`` and ``bin/python3``). Installed into a prefix,
``<prefix>/bin/python`` behaves like a venv: ``sys.prefix`` is the prefix and
``<prefix>/lib/python3.X/site-packages`` is on ``sys.path``, so wheels can be installed into
the environment offline (``uv pip install --python <prefix>/bin/python``). The package only
works on the machine that built it, which is all a test needs.

py-rattler 0.28 can crash at interpreter exit after its async calls, so the channel is
indexed (and, in tests, environments are installed) in a child process that ends with
``os._exit`` (:func:`run_rattler_child`); the pytest process never runs rattler's async code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from conda_package_handling import api as cph

PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"  # conda-build's prefix placeholder
TIMESTAMP_MS = 1_700_000_000_000
PY_VERSION = "{}.{}.{}".format(*sys.version_info[:3])
PY_MAJOR_MINOR = "{}.{}".format(*sys.version_info[:2])
WHEEL_NAME = "tinywheel-0.1-py3-none-any.whl"


@dataclass(frozen=True)
class Symlink:
    """A file entry that is a symbolic link to ``target`` (absolute or relative)."""

    target: str


@dataclass(frozen=True)
class Recipe:
    """What goes into one conda package."""

    name: str
    version: str
    build: str
    subdir: str
    files: Mapping[str, bytes | Symlink]
    depends: tuple[str, ...] = ()
    fmt: str = ".conda"
    noarch: str | None = None
    text_prefix: tuple[str, ...] = ()  # files whose PLACEHOLDER is replaced at install
    build_number: int = 0

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}{self.fmt}"


@dataclass(frozen=True)
class BuiltPackage:
    """One package file of the channel."""

    name: str
    version: str
    build: str
    subdir: str
    filename: str
    sha256: str
    md5: str
    size: int
    depends: tuple[str, ...]
    path: Path

    @property
    def relpath(self) -> str:
        """``<subdir>/<filename>``: the path under the channel root (and in URLs)."""
        return f"{self.subdir}/{self.filename}"


@dataclass(frozen=True)
class LocalChannel:
    """A built and indexed channel directory."""

    root: Path
    packages: tuple[BuiltPackage, ...]
    subdirs: tuple[str, ...] = field(default=("linux-64", "noarch"))

    def get(self, name: str, version: str | None = None) -> BuiltPackage:
        """The package ``name`` (highest version unless ``version`` is given)."""
        found = [p for p in self.packages if p.name == name and version in (None, p.version)]
        if not found:
            raise KeyError(f"{name} {version or ''} is not in the test channel")
        return max(found, key=lambda p: tuple(int(x) for x in p.version.split(".")))

    @property
    def url(self) -> str:
        """The channel as a ``file://`` URL with a trailing slash."""
        return self.root.as_uri() + "/"


# ---- conda packages --------------------------------------------------------------------------


def host_python_binary() -> Path:
    """The host's real ``python3.X`` binary (never a venv link or a pyenv shim).

    ``sys.executable`` may be a venv symlink or a shim script; the base installation's
    ``BINDIR`` (from ``sysconfig`` of ``sys.base_prefix``) holds the real binary.
    """
    bindir = Path(sysconfig.get_config_var("BINDIR") or Path(sys.base_prefix) / "bin")
    candidate = bindir / f"python{PY_MAJOR_MINOR}"
    if not candidate.exists():
        candidate = Path(sys.base_prefix) / "bin" / f"python{PY_MAJOR_MINOR}"
    return candidate.resolve()


def default_recipes() -> tuple[Recipe, ...]:
    """The packages of the test channel (see the module docstring)."""
    real_python = host_python_binary()
    tool = textwrap.dedent(
        f"""\
        #!/bin/sh
        # installed into {PLACEHOLDER}
        echo "tinytool 1.0: $(cat "{PLACEHOLDER}/share/libtiny/message.txt")"
        """
    ).encode()
    pyvenv = (
        f"home = {real_python.parent}\n"
        "include-system-site-packages = false\n"
        f"version = {PY_VERSION}\n"
    ).encode()
    return (
        Recipe(
            "libtiny",
            "1.0",
            "h1a2b3c4_0",
            "linux-64",
            {
                "lib/libtiny.so.1": b"\x7fELF not really a shared library\n",
                "share/libtiny/message.txt": b"hello from libtiny 1.0\n",
            },
        ),
        Recipe(
            "libtiny",
            "0.9",
            "h1a2b3c4_0",
            "linux-64",
            {
                "lib/libtiny.so.0": b"\x7fELF not really a shared library\n",
                "share/libtiny/message.txt": b"hello from libtiny 0.9\n",
            },
            fmt=".tar.bz2",
        ),
        Recipe(
            "tinytool",
            "1.0",
            "h5d6e7f8_0",
            "linux-64",
            {"bin/tinytool": tool},
            depends=("libtiny >=1.0", "__glibc >=2.17"),
            text_prefix=("bin/tinytool",),
        ),
        Recipe(
            "tinycuda",
            "1.0",
            "cuda12_0",
            "linux-64",
            {"share/tinycuda/README": b"needs CUDA 12\n"},
            depends=("__cuda >=12",),
        ),
        Recipe(
            "tinydata",
            "1.0",
            "pyh0_0",
            "noarch",
            {"share/tinydata/data.txt": b"tiny data\n"},
            fmt=".tar.bz2",
            noarch="generic",
        ),
        Recipe(
            "python",
            PY_VERSION,
            "h0_venv",
            "linux-64",
            {
                "pyvenv.cfg": pyvenv,
                f"bin/python{PY_MAJOR_MINOR}": Symlink(str(real_python)),
                "bin/python3": Symlink(f"python{PY_MAJOR_MINOR}"),
                "bin/python": Symlink(f"python{PY_MAJOR_MINOR}"),
                f"lib/python{PY_MAJOR_MINOR}/site-packages/README.txt": b"site-packages\n",
            },
        ),
    )


def build_package(recipe: Recipe, out_dir: Path) -> BuiltPackage:
    """Write ``recipe`` as a conda package into ``out_dir`` (the subdir folder).

    The package has ``info/index.json``, ``info/paths.json`` (rattler links from it),
    ``info/files`` and, for placeholder files, ``info/has_prefix``. File mtimes are fixed.
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{recipe.name}-stage-") as tmp:
        stage = Path(tmp)
        paths: list[dict[str, Any]] = []
        for rel, content in sorted(recipe.files.items()):
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Symlink):
                target.symlink_to(content.target)
                paths.append({"_path": rel, "path_type": "softlink"})
                continue
            target.write_bytes(content)
            if rel.startswith("bin/"):
                target.chmod(0o755)
            entry: dict[str, Any] = {
                "_path": rel,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(content).hexdigest(),
                "size_in_bytes": len(content),
            }
            if rel in recipe.text_prefix:
                entry.update(prefix_placeholder=PLACEHOLDER, file_mode="text")
            paths.append(entry)
        info = stage / "info"
        info.mkdir()
        index: dict[str, Any] = {
            "name": recipe.name,
            "version": recipe.version,
            "build": recipe.build,
            "build_number": recipe.build_number,
            "depends": list(recipe.depends),
            "license": "MIT",
            "subdir": recipe.subdir,
            "timestamp": TIMESTAMP_MS,
        }
        if recipe.noarch:
            index["noarch"] = recipe.noarch
        else:
            index["platform"], index["arch"] = recipe.subdir.split("-", 1)
        (info / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (info / "paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}))
        (info / "files").write_text("".join(f"{rel}\n" for rel in sorted(recipe.files)))
        if recipe.text_prefix:
            (info / "has_prefix").write_text(
                "".join(f"{PLACEHOLDER} text {rel}\n" for rel in recipe.text_prefix)
            )
        members = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
        for member in members:
            os.utime(stage / member, (TIMESTAMP_MS / 1000,) * 2, follow_symlinks=False)
        out = out_dir / recipe.filename
        out.unlink(missing_ok=True)
        cph.create(str(stage), members, str(out))
    data = out.read_bytes()
    return BuiltPackage(
        name=recipe.name,
        version=recipe.version,
        build=recipe.build,
        subdir=recipe.subdir,
        filename=recipe.filename,
        sha256=hashlib.sha256(data).hexdigest(),
        md5=hashlib.md5(data).hexdigest(),
        size=len(data),
        depends=recipe.depends,
        path=out,
    )


def build_channel(root: Path, recipes: Sequence[Recipe] | None = None) -> LocalChannel:
    """Build the packages into ``root/<subdir>/`` and index them (``repodata.json`` per subdir).

    Blocks for about a second (the index runs in a child process, see
    :func:`run_rattler_child`). ``noarch/`` always exists, as conda channels require.
    """
    root = root.resolve()
    (root / "noarch").mkdir(parents=True, exist_ok=True)
    built = tuple(build_package(r, root / r.subdir) for r in recipes or default_recipes())
    index_channel(root)
    subdirs = tuple(sorted({"noarch", *(p.subdir for p in built)}))
    return LocalChannel(root=root, packages=built, subdirs=subdirs)


def index_channel(root: Path) -> None:
    """Write ``repodata.json`` in every subdir of ``root`` with ``rattler.index.index_fs``."""
    run_rattler_child(
        """
        from rattler.index import index_fs
        await index_fs(Path(args[0]), write_zst=False, write_shards=False, force=True)
        """,
        str(root),
    )


# ---- child processes for rattler's async API --------------------------------------------------

_CHILD_TEMPLATE = """\
import asyncio, json, os, sys
from pathlib import Path
args = sys.argv[1:]
async def _main():
{body}
code = 0
try:
    result = asyncio.run(_main())
    if result is not None:
        print(json.dumps(result))
except BaseException as exc:
    print(f"{{type(exc).__name__}}: {{exc}}", file=sys.stderr)
    code = 1
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def run_rattler_child(body: str, *args: str, timeout: float = 120) -> Any:
    """Run ``body`` (the inside of an ``async def``; ``args`` in scope) in a child Python.

    Returns what the body returns (JSON round-trip) or ``None``. Raises ``RuntimeError`` with
    the child's stderr when it fails. The child ends with ``os._exit`` after flushing, which
    avoids py-rattler's crash at interpreter exit.
    """
    script = _CHILD_TEMPLATE.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "))
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rattler child failed ({proc.returncode}): {proc.stderr.strip()}")
    out = proc.stdout.strip().splitlines()
    return json.loads(out[-1]) if out else None


def install_channel(channel: Path, prefix: Path, cache_dir: Path, *, timeout: float = 600) -> None:
    """Install every package of a local conda ``channel`` (its ``linux-64`` and ``noarch``
    repodata) into ``prefix`` with ``rattler.install``: what pixi-unpack does with the channel
    of a bundle, which the benches time as the method users would otherwise pick. Runs in a
    child process (:func:`run_rattler_child`)."""
    run_rattler_child(
        """
        import rattler
        from rattler import Channel, RepoData
        channel = Path(args[0])
        records = []
        for sub in ("linux-64", "noarch"):
            repodata = channel / sub / "repodata.json"
            if repodata.is_file():
                records += RepoData.from_path(repodata).into_repo_data(Channel(channel.as_uri()))
        await rattler.install(records, target_prefix=Path(args[1]), cache_dir=Path(args[2]),
                              show_progress=False)
        """,
        str(channel),
        str(prefix),
        str(cache_dir),
        timeout=timeout,
    )


def install_lock(
    lock_path: Path,
    prefix: Path,
    cache_dir: Path,
    environment: str = "default",
    platform: str = "linux-64",
) -> list[str]:
    """Install ``environment`` of ``lock_path`` into ``prefix`` with ``rattler.install``.

    Runs in a child process; returns the installed package names.
    """
    return run_rattler_child(
        """
        import rattler
        lock = rattler.LockFile.from_path(Path(args[0]))
        env = lock.environment(args[3])
        platform = next(p for p in env.platforms() if p.name == args[4])
        records = env.conda_repodata_records_for_platform(platform)
        await rattler.install(records, target_prefix=Path(args[1]), cache_dir=Path(args[2]),
                              show_progress=False)
        return sorted(r.name.normalized for r in records)
        """,
        str(lock_path),
        str(prefix),
        str(cache_dir),
        environment,
        platform,
    )


# ---- HTTP ------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(path: Path) -> Iterator[str]:
    """Serve ``path`` read-only on ``127.0.0.1`` (a free port) while the block runs.

    Yields the base URL with a trailing slash (``http://127.0.0.1:PORT/``). The server runs in
    a daemon thread and is shut down (and its socket closed) on exit.
    """
    root = str(Path(path).resolve())

    class Handler(_QuietHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=root, **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---- wheel -----------------------------------------------------------------------------------


def add_wheel_record(files: dict[str, bytes], dist_info: str) -> None:
    """Add ``<dist_info>/RECORD`` to a wheel's ``files`` (member name -> bytes): each member's
    urlsafe-base64 sha256 and size, in order, then the RECORD's own row."""
    rows = []
    for member, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{member},sha256={digest},{len(data)}")
    rows.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(rows) + "\n").encode()


def build_wheel(
    out_dir: Path,
    *,
    name: str = "tinywheel",
    version: str = "0.1",
    init: bytes | None = None,
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` (default ``tinywheel-0.1``: module
    ``tinywheel``, console script ``tinywheel``) into ``out_dir`` and return its path.

    ``init`` replaces the module's ``__init__.py`` (tests make a wheel whose import fails, or
    one that stands for a named distribution); ``extra`` adds files at the wheel's root (a
    ``.pth`` startup hook). Same bytes on every call."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    default_init = (
        b'"""A wheel for offline install tests."""\n\n'
        + f'VERSION = "{version}"\n\n\n'.encode()
        + b"def main() -> None:\n"
        + f'    print(f"{name} {{VERSION}}")\n'.encode()
    )
    files = {
        f"{module}/__init__.py": default_init if init is None else init,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: A wheel for offline install tests\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: infer-vllm-pipeline demo\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": (f"[console_scripts]\n{name} = {module}:main\n".encode()),
        **(extra or {}),
    }
    add_wheel_record(files, dist_info)
    return write_wheel(out_dir / f"{module}-{version}-py3-none-any.whl", files)


def write_wheel(out: Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (member name -> bytes, in order, RECORD included) as the wheel ``out``:
    fixed dates and modes, so the same files give the same bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return out


# ---- pixi.toml -------------------------------------------------------------------------------


def write_pixi_toml(
    project_dir: Path,
    *,
    channels: Sequence[str],
    dependencies: Mapping[str, Any] | None = None,
    platforms: Sequence[str] = ("linux-64",),
    name: str = "tiny",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``project_dir/pixi.toml`` and return its path.

    ``extra`` holds more top-level tables (``{"feature": {...}, "environments": {...}}``).
    """
    project_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "workspace": {"name": name, "channels": list(channels), "platforms": list(platforms)},
        "dependencies": dict(dependencies or {}),
    }
    doc.update(extra or {})
    path = project_dir / "pixi.toml"
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return path
