"""The extract stage: a verified, safe, atomic and idempotent extraction of a bundle.

Bundles come from :mod:`bundle_factory` (pixi-pack's layout from the local test channel), so
these tests do not depend on the pack side and can build bundles no honest packer writes.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from bundle_factory import (
    Entry,
    Kit,
    make_bundle,
    sha256_of,
    shared_kit,
    swap_tinytool,
    write_bundle,
    write_directory_only,
    write_self_extracting,
)

from pipeline.bundle import reader as unpack
from pipeline.errors import BundleError
from pipeline.install.extract import extract_bundle, extract_is_current
from pipeline.install.layout import ProjectPaths, read_extract_record


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


def extract(bundle: Path, project: Path, **kwargs):
    kwargs.setdefault("environment", "default")
    return extract_bundle(bundle, project, say=lambda _m: None, **kwargs)


def assert_nothing_extracted(project: Path) -> None:
    paths = ProjectPaths.of(project)
    assert not paths.extract_stamp.exists()
    assert not (project / "channel").exists()
    assert not (project / "pixi.lock").exists()
    leftovers = list(paths.state.glob("staging-*")) + list(paths.state.glob("trash-*"))
    assert leftovers == []


def assert_one_line(error: BundleError, *needles: str) -> None:
    message = error.message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---- the good path --------------------------------------------------------------------------


def test_extract_places_the_bundle_and_the_project_files(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"

    result = extract(bundle, project)

    assert result.extracted and result.source == "extras"
    digest = bundle.with_name("bundle.tar.sha256").read_text().split()[0]
    assert result.sha256 == digest
    paths = ProjectPaths.of(project)
    assert paths.extract_stamp.read_text() == f"{digest}\n"
    assert (project / "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda").is_file()
    assert (project / "channel/noarch/tinydata-1.0-pyh0_0.tar.bz2").is_file()
    assert (project / "pypi/tinywheel-0.1-py3-none-any.whl").is_file()
    assert "the tiny test project" in (project / "pixi.toml").read_text()
    assert (project / "pixi.lock").read_text().startswith("version: 7")
    record = json.loads(paths.extract_record.read_text())
    assert record["sha256"] == digest and record["source"] == "extras"
    assert record["files"]["channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda"][1] == (
        kit.channel.get("tinytool").sha256
    )
    assert extract_is_current(bundle, project, environment="default", configured_sha256=None)
    assert list(paths.state.glob("staging-*")) == []


def test_same_bundle_again_reads_nothing(tmp_path, kit: Kit, monkeypatch):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    extract(bundle, project)

    def no_hashing(*_args, **_kwargs):
        raise AssertionError("the tar was read again")

    monkeypatch.setattr(unpack, "hash_pass", no_hashing)
    again = extract(bundle, project)
    assert (again.extracted, again.reason) == (False, "nothing changed")


def test_touched_bundle_is_hashed_again_but_not_extracted(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    extract(bundle, project)
    stamp_before = ProjectPaths.of(project).extract_stamp.stat().st_mtime_ns
    os.utime(bundle, ns=(1_000_000_000, 1_000_000_000))
    assert not extract_is_current(bundle, project, environment="default", configured_sha256=None)

    again = extract(bundle, project)

    assert not again.extracted and "same content" in again.reason
    assert ProjectPaths.of(project).extract_stamp.stat().st_mtime_ns == stamp_before
    assert extract_is_current(bundle, project, environment="default", configured_sha256=None)


def test_damaged_extraction_is_extracted_again(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    extract(bundle, project)
    (project / "channel/noarch/tinydata-1.0-pyh0_0.tar.bz2").unlink()
    assert not extract_is_current(bundle, project, environment="default", configured_sha256=None)
    again = extract(bundle, project)
    assert again.extracted and (project / "channel/noarch/tinydata-1.0-pyh0_0.tar.bz2").is_file()


def test_hashing_across_many_small_chunks_gives_the_lock_hashes(tmp_path, kit: Kit, monkeypatch):
    # Members straddle chunk boundaries; every per-member sha256 must still match the lock.
    monkeypatch.setattr(unpack, "_HASH_CHUNK", 777)
    bundle = make_bundle(tmp_path, kit)
    assert extract(bundle, tmp_path / "project").extracted


def test_a_new_bundle_replaces_the_old_names(tmp_path, kit: Kit):
    project = tmp_path / "project"
    extract(make_bundle(tmp_path / "a", kit), project)
    (project / "unrelated.txt").write_text("mine")
    extract(make_bundle(tmp_path / "b", kit, names=("tinydata",), wheel=False), project)
    assert not (project / "pypi").exists()
    assert not (project / "channel/linux-64").exists()
    assert (project / "unrelated.txt").read_text() == "mine"  # only our names are touched


def test_unknown_top_level_members_are_skipped(tmp_path, kit: Kit):
    messages: list[str] = []
    bundle = make_bundle(tmp_path, kit, tamper=lambda p: p.add(Entry.file("README", "hi")))
    extract_bundle(bundle, tmp_path / "project", environment="default", say=messages.append)
    assert not (tmp_path / "project" / "README").exists()
    assert any("not extracted" in m and "README" in m for m in messages)


# ---- where pixi.toml and pixi.lock come from ------------------------------------------------


def test_pixi_pack_bundle_without_extras_gets_a_lock_from_its_channel(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit, extras=False, pixi_pack_exact=True)
    project = tmp_path / "project"

    result = extract(bundle, project)

    assert result.source == "channel"
    from pipeline.pixi.lockfile import read_environment

    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    assert sorted(p.name for p in locked.conda) == ["libtiny", "python", "tinydata", "tinytool"]
    assert all(p.url.startswith((project / "channel").as_uri()) for p in locked.conda)
    assert [w.filename for w in locked.pypi] == ["tinywheel-0.1-py3-none-any.whl"]
    assert "pixi-pack" in (project / "pixi.toml").read_text()


def test_bundle_without_extras_uses_a_matching_template(tmp_path, kit: Kit):
    from bundle_factory import pixi_toml, write_lock

    template = tmp_path / "template"
    write_lock(template / "pixi.lock", kit.channel, ("tinydata",))
    (template / "pixi.toml").write_text(pixi_toml(["tinydata"], verify=None))
    bundle = make_bundle(tmp_path, kit, names=("tinydata",), wheel=False, extras=False)

    result = extract(bundle, tmp_path / "project", template_dir=template)

    assert result.source == "template"
    assert (tmp_path / "project/pixi.lock").read_bytes() == (template / "pixi.lock").read_bytes()


def test_template_that_does_not_match_falls_back_to_the_channel(tmp_path, kit: Kit):
    from bundle_factory import pixi_toml, write_lock

    template = tmp_path / "template"
    write_lock(template / "pixi.lock", kit.channel, ("tinydata", "libtiny"))
    (template / "pixi.toml").write_text(pixi_toml(["tinydata", "libtiny"]))
    bundle = make_bundle(tmp_path, kit, names=("tinydata",), wheel=False, extras=False)
    messages: list[str] = []

    result = extract_bundle(
        bundle,
        tmp_path / "project",
        environment="default",
        template_dir=template,
        say=messages.append,
    )

    assert result.source == "channel"
    assert any("does not describe it" in m for m in messages)


# ---- bad input: one line, nothing written --------------------------------------------------


def test_sha256_mismatch_is_refused_before_anything_is_written(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    with pytest.raises(BundleError) as info:
        extract(bundle, project, configured_sha256="0" * 64)
    assert_one_line(info.value, "expected " + "0" * 64, "AUTO_INFER_VLLM_BUNDLE_SHA256")
    assert_nothing_extracted(project)


def test_sha256_file_beside_the_tar_is_checked(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    bundle.with_name("bundle.tar.sha256").write_text("1" * 64 + "  bundle.tar\n")
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "bundle.tar.sha256")
    assert_nothing_extracted(tmp_path / "project")


def test_malformed_sha256_file_is_an_error(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    bundle.with_name("bundle.tar.sha256").write_text("not a digest\n")
    with pytest.raises(BundleError, match="does not start with a sha256"):
        extract(bundle, tmp_path / "project")


@pytest.mark.parametrize("where", ["in a member", "in the end marker"])
def test_truncated_tar_without_a_checksum(tmp_path, kit: Kit, where: str):
    bundle = make_bundle(tmp_path, kit, checksum=False)
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        tar.getmembers()
        end = tar.offset  # where the two zero blocks that end the archive start
    cut = len(data) // 2 if where == "in a member" else end + 512
    bundle.write_bytes(data[:cut])
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "truncated")
    assert_nothing_extracted(tmp_path / "project")


def test_truncated_tar_with_a_checksum_is_a_mismatch(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    data = bundle.read_bytes()
    bundle.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "truncated, corrupt", "expected")


def test_compressed_bundle_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit, checksum=False)
    gz = tmp_path / "bundle.tar.gz"
    gz.write_bytes(gzip.compress(bundle.read_bytes()))
    with pytest.raises(BundleError) as info:
        extract(gz, tmp_path / "project")
    assert_one_line(info.value, "not a readable uncompressed tar")


def test_directory_only_folder_is_refused_in_one_line_not_a_traceback(tmp_path, kit: Kit):
    # It used to end in an IsADirectoryError traceback.
    folder = write_directory_only(make_bundle(tmp_path, kit), tmp_path / "env-dir")
    assert (folder / "pixi-pack.json").is_file() and (folder / "channel").is_dir()
    with pytest.raises(BundleError) as info:
        extract(folder, tmp_path / "project")
    assert_one_line(
        info.value, "a pixi-pack --directory-only folder", f"tar -cf env-dir.tar -C {folder} ."
    )
    assert_nothing_extracted(tmp_path / "project")


def test_the_refusal_of_a_folder_says_how_to_make_a_bundle_that_installs(tmp_path, kit: Kit):
    folder = write_directory_only(make_bundle(tmp_path, kit), tmp_path / "env-dir")
    with pytest.raises(BundleError):
        extract(folder, tmp_path / "project")
    tarred = tmp_path / "env-dir.tar"
    subprocess.run(["tar", "-cf", str(tarred), "-C", str(folder), "."], check=True, timeout=60)
    result = extract(tarred, tmp_path / "project")
    assert result.extracted and (tmp_path / "project" / "pixi.lock").is_file()


def test_create_executable_script_is_refused_and_its_command_decodes_the_tar(tmp_path, kit):
    bundle = make_bundle(tmp_path / "made", kit)
    original = bundle.read_bytes()
    script = write_self_extracting(bundle, tmp_path / "env.sh")
    bundle.unlink()
    with pytest.raises(BundleError) as info:
        extract(script, tmp_path / "project")
    message = info.value.message
    assert_one_line(info.value, "pixi-pack --create-executable script", "base64 -d > bundle.tar")
    assert_nothing_extracted(tmp_path / "project")
    command = message.split("`")[1]
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    subprocess.run(["bash", "-c", command], cwd=script.parent, check=True, timeout=60)
    (script.parent / "bundle.tar").rename(decoded / "bundle.tar")
    assert (decoded / "bundle.tar").read_bytes() == original
    assert extract(decoded / "bundle.tar", tmp_path / "project").extracted


def test_missing_bundle_names_the_variable(tmp_path):
    with pytest.raises(BundleError, match="AUTO_INFER_VLLM_BUNDLE_PATH"):
        extract(tmp_path / "nope.tar", tmp_path / "project")


UNSAFE = {
    "absolute path": (Entry.file("/tmp/evil.txt", "x"), "absolute path"),
    "dot-dot": (Entry.file("channel/../../evil.txt", "x"), "'..'"),
    "absolute symlink": (Entry.symlink("channel/passwd", "/etc/passwd"), "outside the bundle"),
    "escaping symlink": (Entry.symlink("channel/up", "../../.."), "outside the bundle"),
    "symlink into the project": (Entry.symlink("channel/envs", "../.pixi/envs"), "outside"),
    "hardlink outside": (Entry.hardlink("channel/h", "/etc/passwd"), "absolute path"),
    "hardlink to nothing": (Entry.hardlink("channel/h", "channel/none"), "hard link"),
    "fifo": (Entry.fifo("channel/fifo"), "a FIFO"),
    "device": (Entry.chrdev("channel/null"), "a device"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE), ids=lambda c: c.replace(" ", "-"))
def test_unsafe_members_are_refused(tmp_path, kit: Kit, case: str):
    entry, needle = UNSAFE[case]
    bundle = make_bundle(tmp_path, kit, tamper=lambda parts: parts.add(entry))
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, needle)
    assert_nothing_extracted(tmp_path / "project")
    assert not (tmp_path / "evil.txt").exists()


def test_member_below_a_symlink_is_refused(tmp_path, kit: Kit):
    def tamper(parts):
        parts.add(Entry.symlink("channel/link", "linux-64"))
        parts.add(Entry.file("channel/link/sneaky.txt", "x"))

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "below the symbolic link")


# Each link of the chain is inside channel/ when read lexically; followed by the file system,
# `deep/up` lands at channel/a and the 5 `..` after it climb out of the project dir.
DEEP = "channel/a/b/c/d/e"
CLIMB = "up/" + "../" * 6 + "outside"


def assert_chain_refused(tmp_path: Path, kit: Kit, entries: list[Entry], member: str) -> None:
    def tamper(parts):
        for entry in entries:
            parts.add(entry)

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    project = tmp_path / "project"
    with pytest.raises(BundleError) as info:
        extract(bundle, project)
    assert_one_line(info.value, repr(member), "unsafe")
    assert_nothing_extracted(project)
    assert not [p for p in tmp_path.parent.rglob("outside")]


def test_symlink_chain_through_earlier_link_is_refused(tmp_path, kit: Kit):
    entries = [Entry.symlink(f"{DEEP}/up", "../../../.."), Entry.symlink(f"{DEEP}/z", CLIMB)]
    assert_chain_refused(tmp_path, kit, entries, f"{DEEP}/z")


def test_symlink_chain_through_later_link_is_refused(tmp_path, kit: Kit):
    # The link that goes through `up` comes first in the tar; the file system does not care.
    entries = [Entry.symlink(f"{DEEP}/up", "../../../.."), Entry.symlink(f"{DEEP}/0z", CLIMB)]
    assert_chain_refused(tmp_path, kit, entries, f"{DEEP}/0z")


def test_symlink_loop_is_refused(tmp_path, kit: Kit):
    entries = [Entry.symlink("channel/l1", "l2"), Entry.symlink("channel/l2", "l1/x")]
    assert_chain_refused(tmp_path, kit, entries, "channel/l1")


def test_member_below_a_later_symlink_is_refused():
    # Sorted bundles put a link before what lies below it; a tar need not be sorted.
    members = [
        unpack.BundleMember("channel/a-dir/x.txt", "file", 1, 512, 0o644),
        unpack.BundleMember("channel/a-dir", "symlink", 0, 1024, 0o777, "linux-64"),
    ]
    with pytest.raises(BundleError) as info:
        unpack.check_members(members, Path("bundle.tar"))
    assert_one_line(info.value, "'channel/a-dir/x.txt'", "below the symbolic link")


def test_symlink_chain_that_stays_inside_is_extracted(tmp_path, kit: Kit):
    def tamper(parts):
        parts.add(Entry.symlink("channel/current", "linux-64"))
        parts.add(Entry.symlink("channel/latest", "current/repodata.json"))

    project = tmp_path / "project"
    extract(make_bundle(tmp_path, kit, tamper=tamper), project)
    assert (project / "channel/latest").read_bytes() == (
        project / "channel/linux-64/repodata.json"
    ).read_bytes()


def test_duplicate_members_are_refused(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    entries = [Entry.file("pixi-pack.json", "{}"), Entry.file("./pixi-pack.json", "{}")]
    write_bundle(bundle, entries)
    with pytest.raises(BundleError, match="twice"):
        extract(bundle, tmp_path / "project")


def test_inside_symlink_and_hardlink_are_extracted(tmp_path, kit: Kit):
    def tamper(parts):
        parts.add(Entry.symlink("channel/current", "linux-64"))
        parts.add(Entry.hardlink("channel/zz-copy.json", "channel/linux-64/repodata.json"))

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    project = tmp_path / "project"
    extract(bundle, project)
    assert (project / "channel/current").resolve() == (project / "channel/linux-64").resolve()
    assert (project / "channel/zz-copy.json").read_bytes() == (
        project / "channel/linux-64/repodata.json"
    ).read_bytes()


def test_wrong_platform_is_refused(tmp_path, kit: Kit):
    meta = {"version": "1", "pixi-pack-version": "0.7.0", "platform": "linux-aarch64"}

    def tamper(parts):
        parts.replace_data("pixi-pack.json", json.dumps(meta).encode())

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project", host="linux-64")
    assert_one_line(info.value, "for platform linux-aarch64", "this host is linux-64")
    assert_nothing_extracted(tmp_path / "project")


def test_unknown_format_version_is_refused(tmp_path, kit: Kit):
    meta = {"version": "2", "platform": "linux-64"}
    bundle = make_bundle(
        tmp_path, kit, tamper=lambda p: p.replace_data("pixi-pack.json", json.dumps(meta).encode())
    )
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "format version '2'", "reads version '1'")


def test_not_a_pixi_pack_bundle(tmp_path):
    bundle = tmp_path / "bundle.tar"
    write_bundle(bundle, [Entry.file("channel/x", "x")])
    with pytest.raises(BundleError, match=r"no pixi-pack\.json"):
        extract(bundle, tmp_path / "project")


def test_swapped_package_archive_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit, tamper=swap_tinytool)
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(
        info.value, "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda does not match the lock"
    )
    assert_nothing_extracted(tmp_path / "project")


def test_missing_package_file_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(
        tmp_path, kit, tamper=lambda p: p.remove("channel/noarch/tinydata-1.0-pyh0_0.tar.bz2")
    )
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "channel/noarch/tinydata-1.0-pyh0_0.tar.bz2", "is missing")


def test_missing_wheel_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(
        tmp_path, kit, tamper=lambda p: p.remove("pypi/tinywheel-0.1-py3-none-any.whl")
    )
    with pytest.raises(
        BundleError, match=r"wheel pypi/tinywheel-0\.1-py3-none-any\.whl .* missing"
    ):
        extract(bundle, tmp_path / "project")


def test_environment_not_in_the_lock_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project", environment="gpu")
    assert_one_line(info.value, "environment 'gpu' is not in", "available: default")
    assert_nothing_extracted(tmp_path / "project")


def test_lock_that_does_not_match_the_channel_is_refused(tmp_path, kit: Kit):
    def tamper(parts):
        # The channel lost tinydata's record: the bundle was not packed from this lock.
        document = json.loads(parts.entries["channel/noarch/repodata.json"].data)
        document["packages"].pop("tinydata-1.0-pyh0_0.tar.bz2")
        parts.replace_data("channel/noarch/repodata.json", json.dumps(document).encode())

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, "does not match the bundle's channel", "noarch/tinydata")


def test_extras_whose_lock_was_altered_are_refused(tmp_path, kit: Kit):
    def tamper(parts):
        document = json.loads(parts.entries["infer-vllm-bundle.json"].data)
        document["pixi_lock"] += "\n# altered\n"
        parts.replace_data("infer-vllm-bundle.json", json.dumps(document).encode())

    bundle = make_bundle(tmp_path, kit, tamper=tamper)
    with pytest.raises(BundleError, match="does not have its recorded sha256"):
        extract(bundle, tmp_path / "project")


def test_a_bad_bundle_leaves_the_previous_extraction_in_place(tmp_path, kit: Kit):
    project = tmp_path / "project"
    good = make_bundle(tmp_path / "good", kit)
    first = extract(good, project)
    bad = make_bundle(tmp_path / "bad", kit, tamper=swap_tinytool)

    with pytest.raises(BundleError):
        extract(bad, project)

    paths = ProjectPaths.of(project)
    assert paths.extract_stamp.read_text() == f"{first.sha256}\n"
    assert extract_is_current(good, project, environment="default", configured_sha256=None)
    assert list(paths.state.glob("staging-*")) == []


def test_crash_leftovers_are_cleaned_and_extraction_redone(tmp_path, kit: Kit):
    project = tmp_path / "project"
    bundle = make_bundle(tmp_path, kit)
    extract(bundle, project)
    paths = ProjectPaths.of(project)
    # As a SIGKILL in the middle of the switch leaves it: no stamp, a staging dir, half moved.
    paths.extract_stamp.unlink()
    (paths.state / "staging-dead").mkdir()
    shutil.rmtree(project / "channel")
    assert not extract_is_current(bundle, project, environment="default", configured_sha256=None)
    assert extract(bundle, project).extracted
    assert not (paths.state / "staging-dead").exists()
    assert (project / "channel/linux-64/repodata.json").is_file()


# ---- the extraction record ------------------------------------------------------------------


def test_extraction_record_reads_back_typed(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    result = extract(bundle, project)

    record = read_extract_record(ProjectPaths.of(project))

    assert record is not None
    assert (record.sha256, record.environment, record.platform) == (
        result.sha256,
        "default",
        "linux-64",
    )
    assert record.bundle.path == str(bundle) and record.bundle.size == bundle.stat().st_size
    assert record.files["channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda"].sha256 == (
        kit.channel.get("tinytool").sha256
    )
    assert record.source == "extras" and len(record.lock_sha256) == 64


CORRUPT_RECORDS = {
    "truncated": lambda text: text[: len(text) // 2],
    "not an object": lambda _text: "[1, 2]",
    "another format": lambda text: json.dumps({**json.loads(text), "format": 99}),
    "no platform": lambda text: json.dumps(
        {k: v for k, v in json.loads(text).items() if k != "platform"}
    ),
    "sha256 a number": lambda text: json.dumps({**json.loads(text), "sha256": 7}),
    "files a list": lambda text: json.dumps({**json.loads(text), "files": []}),
    "bad file facts": lambda text: json.dumps(
        {**json.loads(text), "files": {"channel/x": ["big", "sha", 1, 2]}}
    ),
    "bundle stat a string": lambda text: json.dumps({**json.loads(text), "bundle": "tar"}),
    "not utf-8": lambda _text: "\udcff",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_RECORDS), ids=lambda c: c.replace(" ", "-"))
def test_corrupt_extraction_record_reads_as_none_and_is_extracted_again(
    tmp_path, kit: Kit, case: str
):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    extract(bundle, project)
    paths = ProjectPaths.of(project)
    text = CORRUPT_RECORDS[case](paths.extract_record.read_text())
    paths.extract_record.write_bytes(text.encode("utf-8", "surrogateescape"))

    assert read_extract_record(paths) is None
    assert not extract_is_current(bundle, project, environment="default", configured_sha256=None)
    assert extract(bundle, project).extracted
    assert read_extract_record(paths) is not None


def test_record_of_another_extraction_than_the_stamp_reads_as_none(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    project = tmp_path / "project"
    extract(bundle, project)
    paths = ProjectPaths.of(project)
    paths.extract_stamp.write_text("0" * 64 + "\n")
    assert read_extract_record(paths) is None


# ---- issue 17: what a crafted bundle must not slip past ----------------------------------------


def rewrite_checksum(bundle: Path) -> None:
    """The ``.sha256`` of ``bundle`` as it is now: whoever altered the tar made its checksum too."""
    bundle.with_name(bundle.name + ".sha256").write_text(f"{sha256_of(bundle)}  {bundle.name}\n")


def end_of_archive(bundle: Path) -> int:
    """Where the two zero blocks that end the archive start."""
    with tarfile.open(bundle) as tar:
        tar.getmembers()
        return tar.offset


TRAILING = {
    # bytes written after the two end blocks; None: the file is cut right after them
    "a second tar appended": "second tar",
    "garbage in the record padding": b"rm -rf /\n",
    "zero blocks beyond the record": b"\0" * tarfile.RECORDSIZE,
}


@pytest.mark.parametrize("case", sorted(TRAILING), ids=lambda c: c.replace(" ", "-"))
def test_regression_trailing_data_after_end_of_archive_is_refused(tmp_path, kit: Kit, case: str):
    bundle = make_bundle(tmp_path, kit)
    data = bundle.read_bytes()
    padded = len(data)  # Python's tarfile fills the last 10240-byte record with zeros
    tail_start = end_of_archive(bundle) + 2 * tarfile.BLOCKSIZE
    if TRAILING[case] == "second tar":
        hidden = tmp_path / "hidden.tar"
        write_bundle(hidden, [Entry.file("channel/linux-64/evil.conda", "x")], checksum=False)
        data += hidden.read_bytes()  # `tar --ignore-zeros` would extract its member
    elif case.startswith("garbage"):
        data = data[:tail_start] + TRAILING[case] + data[tail_start + len(TRAILING[case]) :]
        assert len(data) == padded
    else:
        data += TRAILING[case]
    bundle.write_bytes(data)
    rewrite_checksum(bundle)

    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")

    assert_one_line(info.value, "data after its end-of-archive blocks", "unsafe")
    assert_nothing_extracted(tmp_path / "project")


@pytest.mark.parametrize("writer", ["python-tarfile-record-padding", "rust-tar-crate-no-padding"])
def test_zero_padding_after_end_of_archive_is_accepted(tmp_path, kit: Kit, writer: str):
    bundle = make_bundle(tmp_path, kit)
    if writer.startswith("rust"):
        # pixi-pack's writer (the Rust tar crate's `finish`) stops after the two zero blocks.
        data = bundle.read_bytes()
        bundle.write_bytes(data[: end_of_archive(bundle) + 2 * tarfile.BLOCKSIZE])
        assert bundle.stat().st_size < len(data)
        rewrite_checksum(bundle)
    assert extract(bundle, tmp_path / "project").extracted


def test_regression_a_sha256_file_naming_another_file_is_refused(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    checksum = bundle.with_name("bundle.tar.sha256")
    # The right digest even: a checksum file of another name must not pass as this one's.
    checksum.write_text(f"{sha256_of(bundle)}  other.tar\n")
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, str(checksum), "of 'other.tar', not of 'bundle.tar'")
    assert_nothing_extracted(tmp_path / "project")


HEX = "ab" * 32
CHECKSUM_FORMS = {
    "what doit pack writes": f"{HEX}  bundle.tar\n",
    "binary mode": f"{HEX} *bundle.tar\n",
    "tagged": f"SHA256 (bundle.tar) = {HEX}\n",
    "bare digest": f"{HEX}\n",
    "upper case, a directory, CRLF": f"{HEX.upper()}  ./bundles/bundle.tar\r\n",
}


@pytest.mark.parametrize("form", sorted(CHECKSUM_FORMS), ids=lambda c: c.replace(" ", "-"))
def test_the_forms_sha256sum_writes_are_read(form: str):
    text = CHECKSUM_FORMS[form]
    assert unpack.parse_checksum_file(text, "bundle.tar", Path("bundle.tar.sha256")) == HEX


BAD_CHECKSUMS = {
    "another file, tagged": (f"SHA256 (other.tar) = {HEX}\n", "of 'other.tar', not of"),
    "another file in a directory": (f"{HEX}  bundle.tar/other.tar\n", "of 'bundle.tar/other"),
    "two lines": (f"{HEX}  bundle.tar\n{HEX}  other.tar\n", "holds 2 lines"),
    "no name after the star": (f"{HEX} *\n", "does not start with a sha256"),
    "a control character in the name": (f"{HEX}  bundle.tar\x1b[2J\n", "'bundle.tar\\x1b[2J'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKSUMS), ids=lambda c: c.replace(" ", "-"))
def test_checksum_files_about_something_else_are_refused(case: str):
    text, needle = BAD_CHECKSUMS[case]
    with pytest.raises(BundleError) as info:
        unpack.parse_checksum_file(text, "bundle.tar", Path("bundle.tar.sha256"))
    assert_one_line(info.value, needle, "sha256sum bundle.tar > bundle.tar.sha256")
    assert "\x1b" not in info.value.message


CONTROL_NAMES = {
    "newline": ("channel/linux-64/evil\nname.conda", "'channel/linux-64/evil\\nname.conda'"),
    "carriage return": ("channel/noarch/x\r.txt", "'channel/noarch/x\\r.txt'"),
    "escape sequence": ("pypi/\x1b[31mred.whl", "'pypi/\\x1b[31mred.whl'"),
    "DEL": ("channel/x\x7f", "'channel/x\\x7f'"),
    "tab, outside the bundle names": ("README\t", "'README\\t'"),
}


@pytest.mark.parametrize("case", sorted(CONTROL_NAMES), ids=lambda c: c.replace(" ", "-"))
def test_regression_a_member_name_with_a_newline_is_refused(tmp_path, kit: Kit, case: str):
    name, shown = CONTROL_NAMES[case]
    bundle = make_bundle(tmp_path, kit, tamper=lambda parts: parts.add(Entry.file(name, "x")))
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, shown, "control character", "unsafe")
    assert not any(ch in info.value.message for ch in "\n\r\t\x1b\x7f")  # escaped, never raw
    assert_nothing_extracted(tmp_path / "project")


def test_a_control_character_in_a_link_target_or_a_nul_is_refused():
    link = unpack.BundleMember("channel/l", "symlink", 0, 512, 0o777, "linux-64\n/etc")
    with pytest.raises(BundleError) as info:
        unpack.check_members([link], Path("bundle.tar"))
    assert_one_line(info.value, "'channel/l'", "('\\n') in its link target")
    nul = unpack.BundleMember("channel/a\0b", "file", 1, 512, 0o644)
    with pytest.raises(BundleError) as info:
        unpack.check_members([nul], Path("bundle.tar"))
    assert_one_line(info.value, "'channel/a\\x00b'", "control character")


def evil_wheel(folder: Path) -> Path:
    """A wheel no lock lists: a ``.pth`` file (runs at every interpreter start) and a member
    that climbs out of site-packages."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("evil.pth", "import os; os.system('echo owned')\n")
        zf.writestr("../../../bin/python-hook", "#!/bin/sh\n")
        zf.writestr("evil-1.0.dist-info/METADATA", "Name: evil\nVersion: 1.0\n")
    return wheel


def test_regression_an_unlocked_wheel_in_pypi_is_refused_not_extracted(tmp_path, kit: Kit):
    wheel = evil_wheel(tmp_path / "evil")
    bundle = make_bundle(
        tmp_path, kit, tamper=lambda parts: parts.add(Entry.path(f"pypi/{wheel.name}", wheel))
    )
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(
        info.value, "'pypi/evil-1.0-py3-none-any.whl'", "no package of", "environment 'default'"
    )
    assert_nothing_extracted(tmp_path / "project")


UNLOCKED = {
    "a conda archive the channel does not list": "channel/linux-64/evil-1.0-h0_0.conda",
    "another file in a channel subdir": "channel/noarch/notes.txt",
    "a file in a folder below pypi": "pypi/sub/tinywheel-0.1-py3-none-any.whl",
}


@pytest.mark.parametrize("case", sorted(UNLOCKED), ids=lambda c: c.replace(" ", "-"))
def test_unlocked_files_where_packages_go_are_refused(tmp_path, kit: Kit, case: str):
    name = UNLOCKED[case]
    bundle = make_bundle(tmp_path, kit, tamper=lambda parts: parts.add(Entry.file(name, "x")))
    with pytest.raises(BundleError) as info:
        extract(bundle, tmp_path / "project")
    assert_one_line(info.value, repr(name), "no package of")
    assert_nothing_extracted(tmp_path / "project")


def test_a_template_whose_lock_lacks_a_bundled_wheel_is_not_used(tmp_path, kit: Kit):
    # A bundle without extras (pixi-pack's own) is described by the template only when the
    # template's lock lists every package file; else its lock is generated from the bundle,
    # as pixi-unpack installs it (every wheel of pypi/).
    from bundle_factory import pixi_toml, write_lock

    from pipeline.demo.channel import build_wheel

    template = tmp_path / "template"
    write_lock(template / "pixi.lock", kit.channel, ("tinydata",))
    (template / "pixi.toml").write_text(pixi_toml(["tinydata"], verify=None))
    wheel = build_wheel(tmp_path / "other", name="otherwheel", version="1.0")
    bundle = make_bundle(
        tmp_path,
        kit,
        names=("tinydata",),
        wheel=False,
        extras=False,
        tamper=lambda parts: parts.add(Entry.path(f"pypi/{wheel.name}", wheel)),
    )
    messages: list[str] = []
    result = extract_bundle(
        bundle,
        tmp_path / "project",
        environment="default",
        template_dir=template,
        say=messages.append,
    )
    assert result.source == "channel"
    assert any(f"'pypi/{wheel.name}'" in m and "does not describe" in m for m in messages)
