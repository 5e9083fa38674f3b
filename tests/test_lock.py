"""Locking: py-rattler solves against a local channel served over HTTP, pixi is faked.

The solve and the installs run in child processes (py-rattler's async API can crash an
interpreter at exit); this process only reads locks with rattler's synchronous API.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rattler import LockFile, LockPlatform

from pipeline.build.lock import find_pixi, lock, stale_reason
from pipeline.demo.channel import (
    PY_MAJOR_MINOR,
    LocalChannel,
    build_channel,
    build_wheel,
    install_lock,
    serve_directory,
    write_pixi_toml,
)
from pipeline.errors import LockError
from pipeline.pixi.manifest import load_manifest
from pipeline.settings import load_settings


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> LocalChannel:
    return build_channel(tmp_path_factory.mktemp("channel"))


@pytest.fixture(scope="module")
def channel_url(channel: LocalChannel) -> Iterator[str]:
    with serve_directory(channel.root) as url:
        yield url


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rattler-cache")


def locked(lock_path: Path, env: str = "default", platform: str = "linux-64") -> dict[str, str]:
    """``{name: location}`` of the conda packages locked for ``env`` on ``platform``."""
    lock_file = LockFile.from_path(lock_path)
    environment = lock_file.environment(env)
    assert environment is not None
    platforms = {p.name: p for p in environment.platforms()}
    if platform not in platforms:
        return {}
    return {p.name: p.location for p in environment.packages(platforms[platform]) or []}


def solve(project: Path, cache_dir: Path) -> Path:
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert result.outcome == "solved", result
    return result.lock_path


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
