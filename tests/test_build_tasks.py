"""The build host's doit tasks, run as a user runs them (``doit`` in a subprocess), and verify.

Every doit run gets private PIPELINE_* paths in tmp and the local test channel over HTTP, so
the whole chain runs for real: a py-rattler solve, a rattler install and the verify command,
downloads into the pack cache, the tar and its .sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import doit_env, run_doit

from pipeline.build.verify import verify
from pipeline.demo.channel import (
    LocalChannel,
    build_channel,
    build_wheel,
    serve_directory,
    write_pixi_toml,
)
from pipeline.errors import BundleError, PipelineError
from pipeline.pixi.envs import host_platform
from pipeline.pixi.tasks import Task, task_chain
from pipeline.settings import load_settings
from pipeline.tasks.build import check_cache

VERIFY_CMD = 'tinytool && test -n "$CONDA_PREFIX" && echo "verified in $PIXI_ENVIRONMENT_NAME"'


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> LocalChannel:
    channel = build_channel(tmp_path_factory.mktemp("channel"))
    build_wheel(channel.root / "wheels")
    return channel


@pytest.fixture(scope="module")
def channel_url(channel: LocalChannel) -> Iterator[str]:
    with serve_directory(channel.root) as url:
        yield url


def make_project(root: Path, channel_url: str, verify_cmd: str = VERIFY_CMD) -> Path:
    write_pixi_toml(
        root,
        channels=[channel_url],
        dependencies={"tinytool": "*", "tinydata": "*"},
        extra={"tasks": {"verify": verify_cmd}},
    )
    return root


def env_for(tmp: Path, project: Path, **extra: str) -> dict[str, str]:
    return doit_env(
        tmp / "state",
        PIPELINE_PROJECT=str(project),
        PIPELINE_BUNDLE=str(tmp / "bundles" / "offline.tar"),
        PIPELINE_PACK_CACHE=str(tmp / "pack-cache"),
        PIXI_CACHE_DIR=str(tmp / "rattler-cache"),
        PIXI_HOME=str(tmp / "no-pixi"),
        HOME=str(tmp),
        **extra,
    )


def ran(result, task: str) -> bool:
    return f".  {task}\n" in result.stderr


def skipped(result, task: str) -> bool:
    return f"-- {task} (up to date)\n" in result.stderr


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ---- the doit chain -------------------------------------------------------------------------


def test_doit_pack_runs_the_chain_then_is_a_no_op_and_a_repack_hits_the_cache(
    tmp_path, channel_url
):
    project = make_project(tmp_path / "proj", channel_url)
    env = env_for(tmp_path, project)
    bundle = tmp_path / "bundles" / "offline.tar"
    checksum = tmp_path / "bundles" / "offline.tar.sha256"

    first = run_doit(["pack"], env)
    assert first.returncode == 0, first.stderr
    for task in ("lock", "verify", "pack:tar", "pack:sha256"):
        assert ran(first, task), task
    order = [first.stderr.index(f".  {t}\n") for t in ("lock", "verify", "pack:tar", "pack:sha256")]
    assert order == sorted(order), "lock -> verify -> pack:tar -> pack:sha256"
    assert "tinytool 1.0: hello from libtiny 1.0" in first.stderr
    assert "verified in default" in first.stderr
    assert (project / ".pixi" / "envs" / "default" / "bin" / "tinytool").exists()
    assert "3 downloaded" in first.stderr
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert checksum.read_text() == f"{digest}  offline.tar\n"
    assert first.stdout == "", "stdout stays free for commands' data"
    original = bundle.read_bytes()

    # The first pack downloaded everything: the cache check fails, in one line.
    cold = run_doit(["check-cache"], env)
    assert cold.returncode != 0
    assert len(error_lines(cold)) == 1
    assert "downloaded 3 package files" in error_lines(cold)[0]

    # Nothing changed: every stage is skipped and the bundle is not touched.
    mtime = bundle.stat().st_mtime_ns
    noop = run_doit(["pack"], env)
    assert noop.returncode == 0, noop.stderr
    assert all(skipped(noop, t) for t in ("lock", "verify", "pack:tar", "pack:sha256"))
    assert ".  " not in noop.stderr
    assert bundle.stat().st_mtime_ns == mtime

    # "Run the builder twice": forget the pack, build again, the cache serves everything.
    forget = run_doit(["forget", "pack"], env)
    assert forget.returncode == 0 and "forgetting pack:tar" in forget.stdout
    warm = run_doit(["pack", "check-cache"], env)
    assert warm.returncode == 0, warm.stderr
    assert skipped(warm, "lock") and skipped(warm, "verify")
    assert ran(warm, "pack:tar") and ran(warm, "check-cache")
    assert "0 downloaded (0 B), 3 reused" in warm.stderr
    assert "reused all 3 package files" in warm.stderr
    assert bundle.read_bytes() == original, "same lock, same bytes"
    assert checksum.read_text() == f"{digest}  offline.tar\n"

    # A bundle changed behind doit's back is packed again (a stat, not a read, notices).
    with bundle.open("r+b") as fh:
        fh.truncate(1024)
    repaired = run_doit(["pack"], env)
    assert repaired.returncode == 0, repaired.stderr
    assert ran(repaired, "pack:tar") and skipped(repaired, "verify")
    assert bundle.read_bytes() == original


def test_pack_with_a_part_size_writes_the_parts_and_a_rerun_skips_them(tmp_path, channel_url):
    project = make_project(tmp_path / "proj", channel_url)
    env = env_for(tmp_path, project, PIPELINE_PART_SIZE="1M", PIPELINE_SKIP_VERIFY="1")
    bundle = tmp_path / "bundles" / "offline.tar"
    first = run_doit(["pack"], env)
    assert first.returncode == 0, first.stderr
    assert ran(first, "pack:parts")
    parts = json.loads((tmp_path / "bundles" / "offline.tar.parts.json").read_text())
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert parts["sha256"] == digest and parts["size"] == bundle.stat().st_size
    part = tmp_path / "bundles" / parts["parts"][0]["name"]
    assert part.read_bytes() == bundle.read_bytes(), "a bundle under 1 MiB is one part"
    again = run_doit(["pack"], env)
    assert skipped(again, "pack:parts"), again.stderr


def test_a_failing_verify_stops_the_pack_and_skip_verify_packs_anyway(tmp_path, channel_url):
    project = make_project(tmp_path / "proj", channel_url, "echo 'libtiny is broken' >&2; exit 3")
    env = env_for(tmp_path, project)
    bundle = tmp_path / "bundles" / "offline.tar"

    failed = run_doit(["pack"], env)
    assert failed.returncode != 0
    (line,) = error_lines(failed)
    assert "failed (exit 3): libtiny is broken" in line
    assert "PIPELINE_SKIP_VERIFY=1" in line and "full output in " in line
    assert not bundle.exists()

    quick = run_doit(["pack"], {**env, "PIPELINE_SKIP_VERIFY": "1"})
    assert quick.returncode == 0, quick.stderr
    assert not ran(quick, "verify") and not skipped(quick, "verify")
    assert bundle.is_file() and bundle.with_name("offline.tar.sha256").is_file()


def test_a_missing_project_is_one_line(tmp_path):
    env = env_for(tmp_path, tmp_path / "nowhere")
    result = run_doit(["pack"], env)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert "pixi.toml: no pixi manifest there; point PIPELINE_PROJECT at a pixi project" in line


def test_the_runtime_role_has_no_task_that_builds_a_bundle(tmp_path):
    listed = run_doit(["list", "--all"], doit_env(tmp_path / "state", PIPELINE_ROLE="runtime"))
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert not names & {"lock", "verify", "pack", "pack:tar", "sha256", "check-cache"}
    build = run_doit(["list", "--all"], doit_env(tmp_path / "state", PIPELINE_ROLE="build"))
    names = {line.split()[0] for line in build.stdout.splitlines() if line.strip()}
    assert {"lock", "verify", "pack", "pack:tar", "pack:sha256", "sha256", "check-cache"} <= names
    assert "serve" not in names


# ---- check-cache and verify, in process -----------------------------------------------------


def test_check_cache_message_names_the_count_and_what_to_do(tmp_path):
    settings = load_settings({"PIPELINE_PACK_CACHE": str(tmp_path / "c"), "HOME": str(tmp_path)})
    with pytest.raises(BundleError) as err:
        check_cache({"downloaded": 2, "reused": 5, "bytes": 3 * 1024**2}, settings)
    assert "downloaded 2 package files (3.0 MiB) and reused 5" in err.value.message
    assert str(tmp_path / "c") in err.value.message
    check_cache({"downloaded": 0, "reused": 5, "bytes": 0}, settings)


def test_task_chain_runs_dependencies_first_and_refuses_cycles():
    tasks = [
        Task("verify", "check", depends_on=("imports", "versions")),
        Task("imports", "python -c 'import x'", depends_on=("env",)),
        Task("versions", None, depends_on=("env",)),
        Task("env", "env"),
    ]
    assert [t.name for t in task_chain(tasks, "verify", "pixi.toml")] == [
        "env",
        "imports",
        "versions",
        "verify",
    ]
    with pytest.raises(PipelineError, match=r"cycle \(a -> b -> a\)"):
        task_chain([Task("a", "x", ("b",)), Task("b", "y", ("a",))], "a", "pixi.toml")
    with pytest.raises(PipelineError, match="no `verify` task; add one under \\[tasks\\]"):
        task_chain([Task("build", "make")], "verify", "pixi.toml")


def test_verify_uses_pixi_when_it_is_there(tmp_path, channel_url):
    project = make_project(tmp_path / "proj", channel_url)
    (project / "pixi.lock").write_text("version: 6\n")  # pixi reads it, not us
    fake = tmp_path / "bin" / "pixi"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "pixi $*" > "{tmp_path}/args"\necho fine\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    result = verify(
        project,
        "default",
        pixi=fake,
        cache_dir=tmp_path / "pkgs",
        log_path=tmp_path / "verify.log",
        platform=host_platform(),
    )

    assert result.via == "pixi" and "fine" in result.log.read_text()
    assert (tmp_path / "args").read_text().split() == [
        "pixi",
        "run",
        "--manifest-path",
        str(project / "pixi.toml"),
        "--environment",
        "default",
        "--frozen",
        "verify",
    ]


def test_verify_refuses_another_platform(tmp_path, channel_url):
    project = make_project(tmp_path / "proj", channel_url)
    other = "osx-arm64" if host_platform() != "osx-arm64" else "linux-64"
    with pytest.raises(PipelineError, match=f"cannot verify the {other} environment"):
        verify(
            project,
            "default",
            pixi=None,
            cache_dir=tmp_path / "pkgs",
            log_path=tmp_path / "v.log",
            platform=other,
        )


def test_verify_without_pixi_installs_conda_packages_and_wheels_then_runs_the_task(
    tmp_path, channel, channel_url
):
    from test_pack import add_pypi

    from pipeline.build.lock import lock

    project = tmp_path / "proj"
    write_pixi_toml(
        project,
        channels=[channel_url],
        dependencies={"tinytool": "*", "python": "*"},
        extra={
            "tasks": {
                "verify": {
                    "cmd": "tinywheel && python -c 'import tinywheel'",
                    "depends-on": ["tool"],
                },
                "tool": {"cmd": ["tinytool"], "env": {"EXTRA": "yes"}},
            }
        },
    )
    assert lock(project, pixi=None, cache_dir=tmp_path / "repodata").outcome == "solved"
    wheel = channel.root / "wheels" / "tinywheel-0.1-py3-none-any.whl"
    add_pypi(
        project / "pixi.lock",
        f"{channel_url}wheels/{wheel.name}",
        "tinywheel",
        "0.1",
        hashlib.sha256(wheel.read_bytes()).hexdigest(),
    )
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}

    result = verify(
        project,
        "default",
        pixi=None,
        cache_dir=tmp_path / "pkgs",
        log_path=tmp_path / "v.log",
        environ=env,
    )

    prefix = project / ".pixi" / "envs" / "default"
    assert result.via == "prefix" and result.prefix == prefix
    assert result.commands == ("tinytool", "tinywheel && python -c 'import tinywheel'")
    log = result.log.read_text()
    assert "tinytool 1.0: hello from libtiny 1.0" in log and "tinywheel 0.1" in log
    assert (prefix / "conda-meta").is_dir() and (prefix / "bin" / "tinywheel").exists()
    meta = [json.loads(p.read_text())["name"] for p in (prefix / "conda-meta").glob("*.json")]
    assert sorted(meta) == ["libtiny", "python", "tinytool"]


def test_a_bundle_rewritten_with_its_size_and_mtime_put_back_is_packed_again(tmp_path):
    import time
    from types import SimpleNamespace

    from pipeline.fsutil import Fingerprint
    from pipeline.tasks.stamps import bundle_unchanged, write_pack_stamp

    bundle, stamp = tmp_path / "b.tar", tmp_path / "pack.json"
    bundle.write_bytes(b"a" * 100)
    result = SimpleNamespace(bundle=bundle, sha256="0" * 64, lock_sha256="1" * 64)
    write_pack_stamp(result, stamp)  # type: ignore[arg-type]
    assert bundle_unchanged(stamp, bundle)
    before = bundle.stat()
    time.sleep(0.05)  # past the kernel's coarse ctime clock (a jiffy)
    bundle.write_bytes(b"b" * 100)  # same size, in place: same inode
    os.utime(bundle, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = Fingerprint.read(bundle)
    assert after is not None and (after.size, after.mtime_ns, after.ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert not bundle_unchanged(stamp, bundle), "ctime moved: the tar is packed again"
    assert Fingerprint.read(tmp_path / "missing") is None


def test_an_error_line_is_one_line_and_may_name_its_program(capsys):
    from pipeline.reporting import error_line, print_error

    assert error_line("no such\n  file") == "error: no such file"
    assert error_line("port in use", "gateway") == "gateway: error: port in use"
    print_error("disk full")
    assert capsys.readouterr() == ("", "error: disk full\n")


def test_pack_with_a_base_bundle_writes_a_delta_that_rebuilds_the_bundle(tmp_path, channel_url):
    import shutil

    from pipeline.bundle.delta import read_manifest

    project = make_project(tmp_path / "proj", channel_url)
    env = env_for(tmp_path, project, PIPELINE_SKIP_VERIFY="1")
    bundle = tmp_path / "bundles" / "offline.tar"
    assert run_doit(["pack"], env).returncode == 0
    base = tmp_path / "base" / "offline.tar"
    base.parent.mkdir()
    for name in (bundle.name, bundle.name + ".sha256"):
        shutil.copy(bundle.with_name(name), base.with_name(name))
    # The project gains a package: the delta holds it and nothing else the base has.
    make_project(project, channel_url)
    text = (project / "pixi.toml").read_text()
    (project / "pixi.toml").write_text(
        text.replace('tinydata = "*"', 'tinydata = "*"\npython = "*"')
    )
    env = {**env, "PIPELINE_BASE_BUNDLE": str(base)}
    first = run_doit(["pack"], env)
    assert first.returncode == 0, first.stderr
    assert ran(first, "pack:delta")
    delta = tmp_path / "bundles" / "offline.delta.tar"
    manifest = read_manifest(delta)
    carried = [m.name for m in manifest.members if m.source == "delta"]
    assert len(carried) == 1 and carried[0].startswith("channel/linux-64/python-"), carried
    assert manifest.target.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    again = run_doit(["pack"], env)
    assert skipped(again, "pack:delta"), again.stderr
    out = tmp_path / "rebuilt" / "offline.tar"
    out.parent.mkdir()
    rebuilt = run_doit(
        ["rebuild-bundle", "--delta", str(delta), "--base", str(base), "--output", str(out)], env
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert out.read_bytes() == bundle.read_bytes()
    wrong = run_doit(["rebuild-bundle", "--delta", str(bundle)], env)
    assert wrong.returncode != 0
    (line,) = error_lines(wrong)
    assert "is not a delta" in line and "--delta" in line
