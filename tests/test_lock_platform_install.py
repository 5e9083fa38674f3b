"""Locks whose platform names are not the manifest's, end to end: lock, pack, offline
`doit install`, and the project's own `verify` task.

pixi >= 0.71 names a lock platform with virtual packages beyond the subdir's defaults ``p1``,
``p2``... A manifest with ``platforms = ["linux-64"]`` and ``[system-requirements]`` gets a lock
whose only platform is ``p1`` (subdir ``linux-64``), as ``tests/data/pixi/projects/
sysreq-platform-restriction-composition/pixi.lock`` shows; rich platforms that share a subdir
(pixi's ``multi-machine`` example) get one lock platform each. The verify task of the installed
lock platform must be found through the manifest platform it stands for.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from conftest import doit_env, run_doit

from pipeline.build.fetch import Fetcher
from pipeline.build.lock import lock
from pipeline.build.pack import pack
from pipeline.build.verify import verify
from pipeline.demo.channel import write_pixi_toml
from pipeline.errors import LockError
from pipeline.install.frozen import installed_record
from pipeline.pixi.lockfile import read_environment
from pipeline.pixi.manifest import load_manifest

# What pixi >= 0.71 writes for `[system-requirements] libc = "2.17"` on linux-64 (the corpus
# lock's platform block, byte for byte).
PIXI_071_P1 = (
    "platforms:\n"
    "- name: p1\n"
    "  subdir: linux-64\n"
    "  virtual-packages:\n"
    "  - __glibc=2.17\n"
    "  - __unix=0=0\n"
    "  - __linux=4.18\n"
    "  - __archspec=0=x86_64\n"
)


def as_pixi_071(lock_path: Path) -> None:
    """Rewrite the v6 lock `doit lock` wrote for a `[system-requirements]` manifest the way
    pixi >= 0.71 writes it: version 7, the platform `p1` with its virtual packages."""
    text = lock_path.read_text(encoding="utf-8")
    assert text.startswith("version: 6\n") and text.count("      linux-64:\n") == 1
    text = text.replace("version: 6\n", "version: 7\n" + PIXI_071_P1, 1)
    lock_path.write_text(text.replace("      linux-64:\n", "      p1:\n"), encoding="utf-8")


def quiet_fetcher() -> Fetcher:
    return Fetcher(progress_stream=io.StringIO(), warn=lambda _m: None, sleep=lambda _s: None)


def pack_project(root: Path, tmp_path: Path, platform: str) -> Path:
    result = pack(
        root,
        tmp_path / "bundle.tar",
        tmp_path / "pack-cache",
        platform=platform,
        fetcher=quiet_fetcher(),
    )
    return Path(result.bundle)


def offline_install(bundle: Path, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    """`doit install` of ``bundle`` as the container runs it, with no network (as root)."""
    env = doit_env(
        tmp_path / "state",
        PIPELINE_ROLE="runtime",
        AUTO_INFER_VLLM_BUNDLE_PATH=str(bundle),
        AUTO_INFER_VLLM_PIXI_PROJECT_DIR=str(tmp_path / "project"),
        PIXI_CACHE_DIR=str(tmp_path / "pixi-cache"),
        PIPELINE_PROJECT=str(tmp_path / "no-template"),
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
        **extra,
    )
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else []
    return run_doit(["install"], env, timeout=180, prefix=prefix)


def test_regression_a_pixi_071_p1_lock_with_a_verify_task_installs_offline_and_verifies(
    tmp_path, channel_url, cache_dir
):
    root = tmp_path / "proj"
    write_pixi_toml(
        root,
        channels=[channel_url],
        dependencies={"tinytool": "*"},
        extra={
            "system-requirements": {"libc": "2.17"},
            "tasks": {"verify": "tinytool && echo verified on $PIXI_ENVIRONMENT_NAME"},
        },
    )
    assert lock(root, pixi=None, cache_dir=cache_dir).outcome == "solved"
    as_pixi_071(root / "pixi.lock")
    locked = read_environment(root / "pixi.lock", "default", "linux-64")
    assert (locked.lock_platform, locked.subdir) == ("p1", "linux-64")

    # The build host's verify finds the task through the manifest's linux-64.
    checked = verify(
        root,
        "default",
        pixi=None,
        cache_dir=cache_dir,
        log_path=tmp_path / "verify.log",
    )
    assert "verified on default" in (tmp_path / "verify.log").read_text()
    assert checked.commands == ("tinytool && echo verified on $PIXI_ENVIRONMENT_NAME",)

    bundle = pack_project(root, tmp_path, platform="linux-64")
    result = offline_install(bundle, tmp_path)
    assert result.returncode == 0, result.stderr
    record = installed_record(tmp_path / "project", "default")
    assert record is not None and record.platform == "p1"
    assert record.verify is not None
    assert record.verify.output.endswith("verified on default")


def test_regression_two_lock_platforms_of_one_subdir_each_verify_with_their_own_task(
    tmp_path, channel_url, cache_dir
):
    # pixi's multi-machine shape: `gpu` (linux-64, CUDA 12) and `linux-64` share the subdir;
    # the lock names them `p1` and `linux-64`. Each bundle runs its own platform's task.
    root = tmp_path / "proj"
    write_pixi_toml(
        root,
        channels=[channel_url],
        platforms=[{"name": "gpu", "platform": "linux-64", "cuda": "12"}, "linux-64"],  # type: ignore[list-item]
        dependencies={"tinytool": "*"},
        extra={
            "tasks": {"verify": "echo cpu task"},
            "target": {"gpu": {"tasks": {"verify": "echo gpu task"}}},
        },
    )
    assert lock(root, pixi=None, cache_dir=cache_dir).outcome == "solved"
    manifest = load_manifest(root / "pixi.toml")
    for name, expected in (("p1", "gpu"), ("linux-64", "linux-64")):
        locked = read_environment(root / "pixi.lock", "default", name)
        found = manifest.platform_of_lock(
            "default", locked.lock_platform, locked.subdir, locked.virtual_packages
        )
        assert found == expected

    checked = verify(
        root, "default", pixi=None, cache_dir=cache_dir, log_path=tmp_path / "v.log", platform="p1"
    )
    assert checked.commands == ("echo gpu task",)

    for platform, output, extra in (
        ("p1", "gpu task", {"CONDA_OVERRIDE_CUDA": "12.4"}),
        ("linux-64", "cpu task", {}),
    ):
        work = tmp_path / platform
        bundle = pack_project(root, work, platform=platform)
        result = offline_install(bundle, work, **extra)
        assert result.returncode == 0, result.stderr
        record = installed_record(work / "project", "default")
        assert record is not None and record.platform == platform
        assert record.verify is not None and record.verify.output == output


def test_a_lock_platform_that_fits_no_manifest_platform_is_one_line(tmp_path):
    (tmp_path / "pixi.toml").write_text(
        '[workspace]\nname = "x"\nchannels = ["c"]\nplatforms = ["linux-64", '
        '{ name = "gpu", platform = "linux-64", cuda = "12" }, '
        '{ name = "gpu2", platform = "linux-64", cuda = "12" }]\n',
        encoding="utf-8",
    )
    manifest = load_manifest(tmp_path / "pixi.toml")
    with pytest.raises(LockError, match=r"has no platform for the lock's platform 'p9'"):
        manifest.platform_of_lock("default", "p9", "osx-arm64", ())
    with pytest.raises(LockError, match=r"fits several platforms \(gpu, gpu2\)"):
        manifest.platform_of_lock("default", "p1", "linux-64", ("__cuda=12",))
    # Nothing recorded (lock v6) and one platform of the subdir besides: by name first.
    assert manifest.platform_of_lock("default", "linux-64", "linux-64", ()) == "linux-64"
