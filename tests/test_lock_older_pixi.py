"""Locks the py-rattler solve writes are read the same by the rattler_lock of older pixi.

Older py-rattler releases carry older pixi's rattler_lock: 0.15.0 (rattler_lock 0.23.8) as in
pixi 0.50, 0.26.0 (0.32.7) as in pixi 0.76. Each reads the lock in its own side venv
(scripts/setup-old-rattler.sh, run by scripts/test.sh's setup and so by .ci/run) through
tests/rattler_records_dump.py, and must print the same records as this project's py-rattler
0.28: names, versions, builds, subdirs, sha256, md5, URLs, dependencies. A missing side venv
fails these tests (it is part of the setup), it does not skip them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lock_helpers import patched, solve
from pypi_index import Dist, build_index

from pipeline.demo.channel import serve_directory, write_pixi_toml
from pipeline.pixi.lockfile import read_environment
from pipeline.pixi.locktext import patch_lock_text

pytestmark = pytest.mark.older_pixi

DUMP = Path(__file__).parent / "rattler_records_dump.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infer-vllm"
PIXI_050 = "0.15.0"  # py-rattler with pixi 0.50's rattler_lock: reads up to v6
PIXI_076 = "0.26.0"  # py-rattler with pixi 0.76's rattler_lock: reads v7


def records(lock_path: Path, rattler: str | None = None) -> dict[str, list[list[object]]]:
    """The lock's records as py-rattler ``rattler`` (None: this venv's 0.28) reads them."""
    python = sys.executable
    if rattler is not None:
        python = str(CACHE / f"py-rattler-{rattler}-venv" / "bin" / "python")
        assert Path(python).is_file(), (
            f"the py-rattler {rattler} side venv is missing ({python}); "
            "run scripts/setup-old-rattler.sh"
        )
    done = subprocess.run(
        [python, str(DUMP), str(lock_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    return json.loads(done.stdout)


def test_pixi_050_reads_a_bare_subdir_lock_as_we_do(tmp_path, channel_url):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        platforms=["linux-64", "osx-arm64"],
        dependencies={"tinydata": "*"},
        extra={
            "target": {"linux-64": {"dependencies": {"tinytool": "*"}}},
            "system-requirements": {"libc": "2.17"},
        },
    )
    lock_path = solve(project, tmp_path / "cache")
    assert lock_path.read_text(encoding="utf-8").startswith("version: 6\n")
    ours = records(lock_path)
    assert set(ours) == {"default/linux-64", "default/osx-arm64"}
    assert {r[0] for r in ours["default/linux-64"]} == {"tinydata", "tinytool", "libtiny"}
    assert records(lock_path, PIXI_050) == ours
    assert records(lock_path, PIXI_076) == ours

    after_patch = patched(lock_path, tmp_path / "channel")
    ours_patched = records(after_patch)
    assert ours_patched != ours  # the URLs moved
    assert all(r[6].startswith("file://") for r in ours_patched["default/linux-64"])
    assert records(after_patch, PIXI_050) == ours_patched


def test_pixi_076_reads_a_rich_platform_lock_as_we_do_and_pixi_050_refuses_it(
    tmp_path, channel_url
):
    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        platforms=[{"name": "gpu", "platform": "linux-64", "cuda": "12"}, "linux-64"],  # type: ignore[list-item]
        dependencies={"tinytool": "*"},
    )
    lock_path = solve(project, tmp_path / "cache")
    assert lock_path.read_text(encoding="utf-8").startswith("version: 7\n")
    ours = records(lock_path)
    assert set(ours) == {"default/linux-64", "default/p1"}
    assert records(lock_path, PIXI_076) == ours
    after_patch = patched(lock_path, tmp_path / "channel")
    assert records(after_patch, PIXI_076) == records(after_patch)

    # What pixi < 0.68 says to a v7 lock: the reason rich platforms are the only v7 case.
    old = CACHE / f"py-rattler-{PIXI_050}-venv" / "bin" / "python"
    done = subprocess.run(
        [str(old), str(DUMP), str(lock_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "found newer lockfile format version 7" in done.stderr


def test_older_pixi_reads_a_lock_with_pypi_packages_as_we_do(tmp_path, channel_url):
    # The PyPI part is written by uv + text into py-rattler's lock, as v6 (pixi >= 0.50).
    index = tmp_path / "index"
    build_index(
        index,
        [
            Dist("alpha", "1.0", ("beta>=2", "gamma; extra == 'g'"), requires_python=">=3.9"),
            Dist("beta", "2.0"),
        ],
    )
    with serve_directory(index) as url:
        project = tmp_path / "proj"
        write_pixi_toml(
            project,
            channels=[channel_url],
            dependencies={"python": "*"},
            extra={
                "pypi-dependencies": {"alpha": "*"},
                "pypi-options": {"index-url": f"{url}simple"},
            },
        )
        lock_path = solve(project, tmp_path / "cache")
    assert lock_path.read_text(encoding="utf-8").startswith("version: 6\n")
    ours = records(lock_path)
    assert [r[:2] + r[4:] for r in ours["default/linux-64/pypi"]] == [
        ["alpha", "1.0", ["beta>=2", "gamma ; extra == 'g'"], ">=3.9"],
        ["beta", "2.0", [], None],
    ]
    assert records(lock_path, PIXI_050) == ours
    assert records(lock_path, PIXI_076) == ours

    # patch-channels points the wheels at the bundle's pypi/ folder; still read alike.
    text = lock_path.read_text(encoding="utf-8")
    wheels = {
        p.filename: str(tmp_path / "pypi" / p.filename)
        for p in read_environment(lock_path, "default", "linux-64").pypi
    }
    after = lock_path.with_name("patched.lock")
    after.write_text(patch_lock_text(text, {}, wheels, str(tmp_path / "channel")))
    ours_patched = records(after)
    assert [r[2] for r in ours_patched["default/linux-64/pypi"]] == sorted(wheels.values())
    assert records(after, PIXI_050) == ours_patched
    assert records(after, PIXI_076) == ours_patched
