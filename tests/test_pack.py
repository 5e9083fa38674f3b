"""pipeline.build.pack: a real lock of the local test channel, fetched over HTTP, packed.

The module builds the channel (conda-package-handling), serves it on loopback, locks a project
with py-rattler (two environments: ``default`` with every package plus a wheel, ``small`` with
one linux-64 package) and packs it. Errors are checked against the real locks in
``tests/data/real-locks`` and against copies of the test lock edited to break one thing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import __version__
from pipeline.build.fetch import Fetcher
from pipeline.build.lock import lock
from pipeline.build.pack import PackResult, fetch_items, pack, plan_bundle
from pipeline.build.verified import VerifiedStamps
from pipeline.bundle.format import EXTRAS_FILE, TAR_MTIME
from pipeline.bundle.metadata import BundleExtras
from pipeline.bundle.writer import environment_yml, repodata_json
from pipeline.demo.channel import (
    LocalChannel,
    build_channel,
    build_wheel,
    serve_directory,
    write_pixi_toml,
)
from pipeline.errors import BundleError, FetchError, LockError
from pipeline.pixi.lockfile import read_environment

REAL_LOCKS = Path(__file__).parent / "data" / "real-locks"
SDIST = "tinysdist-0.2.tar.gz"


# ---- fixtures -------------------------------------------------------------------------------


def add_pypi(lock_path: Path, url: str, name: str, version: str, sha256: str | None) -> None:
    """Add a PyPI file to environment ``default`` on linux-64 of a v6/v7 lock (text edit:
    py-rattler cannot modify a lock it has read, and pixi cannot run here)."""
    text = lock_path.read_text()
    start = text.index("  default:\n")
    head = text.index("      linux-64:\n", start) + len("      linux-64:\n")
    end = head
    for line in text[head:].splitlines(keepends=True):
        if not line.startswith("      - "):
            break
        end += len(line)
    entry = f"- pypi: {url}\n  name: {name}\n  version: '{version}'\n"
    if sha256:
        entry += f"  sha256: {sha256}\n"
    lock_path.write_text(text[:end] + f"      - pypi: {url}\n" + text[end:] + entry)


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> LocalChannel:
    channel = build_channel(tmp_path_factory.mktemp("channel"))
    build_wheel(channel.root / "wheels")
    return channel


@pytest.fixture(scope="module")
def channel_url(channel: LocalChannel) -> Iterator[str]:
    with serve_directory(channel.root) as url:
        yield url


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, channel: LocalChannel, channel_url: str):
    """A locked project: ``default`` (python, tinytool, tinydata, the wheel), ``small``."""
    root = tmp_path_factory.mktemp("project")
    write_pixi_toml(
        root,
        channels=[channel_url],
        dependencies={"tinytool": "*", "tinydata": "*", "python": "*"},
        extra={
            "feature": {"small": {"dependencies": {"tinytool": "*"}}},
            "environments": {"small": {"features": ["small"], "no-default-feature": True}},
            "tasks": {"verify": "tinytool"},
        },
    )
    result = lock(root, pixi=None, cache_dir=tmp_path_factory.mktemp("repodata-cache"))
    assert result.outcome == "solved"
    wheel = channel.root / "wheels" / "tinywheel-0.1-py3-none-any.whl"
    add_pypi(
        root / "pixi.lock",
        f"{channel_url}wheels/{wheel.name}",
        "tinywheel",
        "0.1",
        hashlib.sha256(wheel.read_bytes()).hexdigest(),
    )
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, project: Path) -> PackResult:
    out = tmp_path_factory.mktemp("out")
    return pack(project, out / "bundle.tar", out / "cache", fetcher=quiet_fetcher())


def quiet_fetcher(warnings: list[str] | None = None) -> Fetcher:
    return Fetcher(
        progress_stream=io.StringIO(),
        warn=(warnings.append if warnings is not None else lambda _m: None),
        sleep=lambda _s: None,
    )


def copy_project(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest, ignore=shutil.ignore_patterns(".pixi"))
    return dest


def members(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tf:
        return {m.name: m for m in tf.getmembers()}


def read_member(tar_path: Path, name: str) -> bytes:
    with tarfile.open(tar_path) as tf:
        stream = tf.extractfile(name)
        assert stream is not None
        return stream.read()


# ---- the bundle -----------------------------------------------------------------------------


def test_bundle_layout_is_pixi_packs(packed: PackResult, channel: LocalChannel):
    found = members(packed.bundle)
    with tarfile.open(packed.bundle) as tf:
        order = [m.name for m in tf.getmembers()]
    assert order == [
        "channel",
        "channel/linux-64",
        "channel/linux-64/libtiny-1.0-h1a2b3c4_0.conda",
        f"channel/linux-64/{channel.get('python').filename}",
        "channel/linux-64/repodata.json",
        "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda",
        "channel/noarch",
        "channel/noarch/repodata.json",
        "channel/noarch/tinydata-1.0-pyh0_0.tar.bz2",
        "environment.yml",
        "infer-vllm-bundle.json",
        "infer-vllm-index.json",
        "infer-vllm-sbom.cdx.json",
        "pixi-pack.json",
        "pypi",
        "pypi/tinywheel-0.1-py3-none-any.whl",
    ]
    for info in found.values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (TAR_MTIME, 0, 0, "", "")
        assert info.mode == (0o755 if info.isdir() else 0o644)
        assert info.isdir() or info.isfile()
    with packed.bundle.open("rb") as fh:
        assert fh.read(512)[257:265] == b"ustar  \0", "GNU format, as the tar crate writes"
    assert packed.bundle.stat().st_size % tarfile.RECORDSIZE == 0


def test_package_files_are_the_locked_bytes(packed: PackResult, project: Path):
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    for pkg in locked.conda:
        data = read_member(packed.bundle, f"channel/{pkg.subdir}/{pkg.filename}")
        assert hashlib.sha256(data).hexdigest() == pkg.sha256
    (wheel,) = locked.pypi
    data = read_member(packed.bundle, f"pypi/{wheel.filename}")
    assert hashlib.sha256(data).hexdigest() == wheel.sha256


def test_metadata_files(packed: PackResult, project: Path, channel: LocalChannel):
    metadata = read_member(packed.bundle, "pixi-pack.json")
    assert json.loads(metadata) == {
        "version": "1",
        "pixi-pack-version": "0.7.0",
        "platform": "linux-64",
    }
    assert metadata.startswith(b'{\n  "version": "1",\n'), "serde's pretty JSON"

    python = channel.get("python")
    assert read_member(packed.bundle, "environment.yml").decode() == (
        "channels:\n"
        "  - ./channel\n"
        "  - nodefaults\n"
        "dependencies:\n"
        "  - libtiny=1.0=h1a2b3c4_0\n"
        f"  - python={python.version}={python.build}\n"
        "  - tinydata=1.0=pyh0_0\n"
        "  - tinytool=1.0=h5d6e7f8_0\n"
        "  - pip:\n"
        "    - --no-index\n"
        "    - --find-links ./pypi\n"
        "    - tinywheel==0.1\n"
    )

    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    for subdir in ("linux-64", "noarch"):
        repodata = json.loads(read_member(packed.bundle, f"channel/{subdir}/repodata.json"))
        assert list(repodata) == ["info", "packages", "packages.conda", "repodata_version"]
        assert repodata["info"] == {"subdir": subdir}
        assert repodata["repodata_version"] == 2
        expected = {p.filename: p.repodata for p in locked.conda if p.subdir == subdir}
        assert {**repodata["packages"], **repodata["packages.conda"]} == expected
        assert all(f.endswith(".tar.bz2") for f in repodata["packages"])
        assert all(f.endswith(".conda") for f in repodata["packages.conda"])
        for filename, record in expected.items():
            assert (
                record["sha256"]
                == hashlib.sha256(
                    read_member(packed.bundle, f"channel/{subdir}/{filename}")
                ).hexdigest()
            )

    extras = BundleExtras.model_validate_json(read_member(packed.bundle, "infer-vllm-bundle.json"))
    lock_bytes = (project / "pixi.lock").read_bytes()
    assert extras.tool_version == __version__
    assert (extras.environment, extras.platform) == ("default", "linux-64")
    assert extras.lock_sha256 == hashlib.sha256(lock_bytes).hexdigest()
    assert extras.pixi_lock == lock_bytes.decode()
    assert extras.pixi_toml == (project / "pixi.toml").read_text()
    assert (extras.conda_packages, extras.pypi_packages) == (4, 1)
    assert extras.package_bytes == sum(
        m.size for n, m in members(packed.bundle).items() if n.endswith((".conda", ".bz2", ".whl"))
    )
    assert extras.skipped_sdists == ()


def test_rattler_reads_the_bundle_channel_as_pixi_unpack_does(packed: PackResult, tmp_path):
    """pixi-unpack parses channel/<subdir>/repodata.json with rattler's RepoData and takes
    every file under packages and packages.conda: so does py-rattler here."""
    from rattler import Channel, RepoData

    with tarfile.open(packed.bundle) as tf:
        tf.extractall(tmp_path, filter="data")
    channel_dir = tmp_path / "channel"
    found = {}
    for subdir in sorted(p.name for p in channel_dir.iterdir()):
        repodata = RepoData.from_path(channel_dir / subdir / "repodata.json")
        for record in repodata.into_repo_data(Channel(channel_dir.as_uri())):
            path = channel_dir / subdir / record.file_name
            assert hashlib.sha256(path.read_bytes()).digest() == record.sha256
            found[record.name.normalized] = record.subdir
    assert found == {
        "libtiny": "linux-64",
        "python": "linux-64",
        "tinytool": "linux-64",
        "tinydata": "noarch",
    }


def test_result_counts_and_digest(packed: PackResult):
    assert (packed.downloaded, packed.reused) == (5, 0)
    assert packed.downloaded_bytes == packed.package_bytes > 0
    assert packed.sha256 == hashlib.sha256(packed.bundle.read_bytes()).hexdigest()
    assert packed.bundle_bytes == packed.bundle.stat().st_size
    assert packed.values() | {"downloaded": 5} == packed.values()
    assert {"downloaded", "reused", "bytes"} <= set(packed.values())


def test_packing_again_gives_the_same_bytes_from_the_warm_cache(packed: PackResult, project):
    cache = packed.bundle.parent / "cache"
    again = pack(project, packed.bundle.with_name("again.tar"), cache, fetcher=quiet_fetcher())
    assert (again.downloaded, again.reused, again.downloaded_bytes) == (0, 5, 0)
    assert again.bundle.read_bytes() == packed.bundle.read_bytes()
    assert again.sha256 == packed.sha256


def test_an_environment_without_noarch_or_wheels_has_no_such_directories(packed, project):
    out = packed.bundle.parent
    small = pack(
        project, out / "small.tar", out / "cache", environment="small", fetcher=quiet_fetcher()
    )
    assert sorted(members(small.bundle)) == [
        "channel",
        "channel/linux-64",
        "channel/linux-64/libtiny-1.0-h1a2b3c4_0.conda",
        "channel/linux-64/repodata.json",
        "channel/linux-64/tinytool-1.0-h5d6e7f8_0.conda",
        "environment.yml",
        "infer-vllm-bundle.json",
        "infer-vllm-index.json",
        "infer-vllm-sbom.cdx.json",
        "pixi-pack.json",
    ]
    assert "pip:" not in read_member(small.bundle, "environment.yml").decode()
    assert (small.downloaded, small.reused) == (0, 2)


def test_a_corrupt_cache_entry_is_fetched_again_and_the_bundle_is_unchanged(
    packed, project, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(packed.bundle.parent / "cache", cache)
    entry = cache / "linux-64" / "libtiny-1.0-h1a2b3c4_0.conda"
    entry.write_bytes(b"\0" * entry.stat().st_size)
    warnings: list[str] = []

    result = pack(project, tmp_path / "b.tar", cache, fetcher=quiet_fetcher(warnings))

    assert (result.downloaded, result.reused) == (1, 4)
    assert result.bundle.read_bytes() == packed.bundle.read_bytes()
    assert len(warnings) == 1 and "libtiny-1.0-h1a2b3c4_0.conda is corrupt" in warnings[0]


def test_a_warm_pack_trusts_entries_hashed_before_but_not_a_rewrite_with_its_mtime_put_back(
    packed, project, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(packed.bundle.parent / "cache", cache)
    pack(project, tmp_path / "a.tar", cache, fetcher=quiet_fetcher([]))  # hashes and stamps
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    items = [i for i in fetch_items(plan_bundle(locked), cache) if i.check is not None]
    stamps = VerifiedStamps(cache)
    assert items and all(stamps.trusted(item) for item in items)

    entry = cache / "linux-64" / "libtiny-1.0-h1a2b3c4_0.conda"
    st = entry.stat()
    entry.write_bytes(b"\0" * st.st_size)
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime moved
    warnings: list[str] = []
    result = pack(project, tmp_path / "b.tar", cache, fetcher=quiet_fetcher(warnings))

    assert result.downloaded == 1 and len(warnings) == 1 and "is corrupt" in warnings[0]
    assert result.bundle.read_bytes() == packed.bundle.read_bytes()


# ---- nothing corrupt is left ----------------------------------------------------------------


class InterruptingTTY(io.StringIO):
    """A terminal whose first progress redraw is a Ctrl-C, mid-way through the tar."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.partial: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.partial = sorted(p.name for p in self.directory.glob(".*.part"))
        raise KeyboardInterrupt


def test_an_interrupted_pack_leaves_the_previous_bundle_and_no_partial_file(
    packed, project, tmp_path
):
    out = tmp_path / "bundles" / "b.tar"
    out.parent.mkdir()
    out.write_bytes(b"the previous bundle")
    tty = InterruptingTTY(out.parent)

    with pytest.raises(KeyboardInterrupt):
        pack(
            project,
            out,
            packed.bundle.parent / "cache",
            fetcher=quiet_fetcher(),
            progress_stream=tty,
        )

    assert tty.partial and tty.partial[0].startswith(".b.tar."), "interrupted while writing"
    assert out.read_bytes() == b"the previous bundle"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.tar"]


def test_a_package_not_matching_the_lock_fails_and_leaves_nothing(packed, project, tmp_path):
    broken = copy_project(project, tmp_path / "proj")
    lock_path = broken / "pixi.lock"
    locked = read_environment(lock_path, "default", "linux-64")
    libtiny = next(p for p in locked.conda if p.name == "libtiny")
    assert libtiny.sha256 is not None
    lock_path.write_text(lock_path.read_text().replace(libtiny.sha256, "ab" * 32))
    cache, out = tmp_path / "cache", tmp_path / "b.tar"

    with pytest.raises(FetchError) as err:
        pack(broken, out, cache, fetcher=quiet_fetcher())

    message = err.value.message
    assert "linux-64/libtiny-1.0-h1a2b3c4_0.conda" in message and libtiny.url in message
    assert f"sha256 expected {'ab' * 32}, got {libtiny.sha256}" in message
    assert not (cache / "linux-64" / libtiny.filename).exists()
    assert not list(cache.rglob("*.part"))
    assert not out.exists()


# ---- refused inputs: one-line errors --------------------------------------------------------


def project_with_lock(tmp_path: Path, lock_name: str) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REAL_LOCKS / lock_name, proj / "pixi.lock")
    (proj / "pixi.toml").write_text('[workspace]\nname = "x"\nchannels = []\nplatforms = []\n')
    return proj


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_source_packages_are_refused(tmp_path):
    proj = project_with_lock(tmp_path, "local-build.lock")
    with pytest.raises(BundleError) as err:
        pack(proj, tmp_path / "b.tar", tmp_path / "cache")
    text = one_line(err.value)
    assert "source packages" in text
    assert "local-build-local-pkg, local-build-local-pkg-2, local-build-main-pkg" in text
    assert not (tmp_path / "cache").exists(), "refused before fetching anything"


def test_an_unknown_environment_lists_the_available_ones(tmp_path):
    proj = project_with_lock(tmp_path, "webserver.lock")
    with pytest.raises(LockError) as err:
        pack(proj, tmp_path / "b.tar", tmp_path / "cache", environment="gpu")
    assert "environment 'gpu'" in one_line(err.value) and "available: default, prod" in str(
        err.value
    )


def test_an_unlocked_platform_lists_the_available_ones(tmp_path):
    proj = project_with_lock(tmp_path, "no-timestamp.lock")
    with pytest.raises(LockError) as err:
        pack(proj, tmp_path / "b.tar", tmp_path / "cache", platform="linux-64")
    assert "platform 'linux-64'" in one_line(err.value) and "available: osx-64" in str(err.value)


def test_an_unreadable_lock_is_one_line(tmp_path):
    proj = project_with_lock(tmp_path, "no-timestamp.lock")
    (proj / "pixi.lock").write_text("version: 99\nthis is: [not a lock\n")
    with pytest.raises(LockError, match="cannot read lock file"):
        pack(proj, tmp_path / "b.tar", tmp_path / "cache")
    (proj / "pixi.lock").unlink()
    with pytest.raises(LockError, match="does not exist"):
        pack(proj, tmp_path / "b.tar", tmp_path / "cache")


def test_sdists_are_refused_unless_skipped(packed, project, channel_url, tmp_path):
    proj = copy_project(project, tmp_path / "proj")
    add_pypi(proj / "pixi.lock", f"{channel_url}sdists/{SDIST}", "tinysdist", "0.2", "cd" * 32)

    with pytest.raises(BundleError) as err:
        pack(proj, tmp_path / "b.tar", packed.bundle.parent / "cache", fetcher=quiet_fetcher())
    assert SDIST in one_line(err.value) and "PIPELINE_SKIP_SDISTS=1" in str(err.value)

    warnings: list[str] = []
    result = pack(
        proj,
        tmp_path / "b.tar",
        packed.bundle.parent / "cache",
        skip_sdists=True,
        fetcher=quiet_fetcher(),
        warn=warnings.append,
    )
    assert result.skipped_sdists == ("tinysdist==0.2",)
    assert [w for w in warnings if SDIST in w]
    names = members(result.bundle)
    assert [n for n in names if n.startswith("pypi/")] == ["pypi/tinywheel-0.1-py3-none-any.whl"]
    assert "tinysdist" not in read_member(result.bundle, "environment.yml").decode()
    extras = json.loads(read_member(result.bundle, "infer-vllm-bundle.json"))
    assert extras["skipped_sdists"] == ["tinysdist==0.2"]


# ---- every real lock: the pack plan against an independent reading of the YAML ---------------


@functools.cache
def _yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _yaml_expected(path: Path, env: str, platform: str) -> tuple[set, set]:
    """(conda, pypi) sets of (url, sha256, cache path) read from the YAML with pyyaml."""
    doc = _yaml(path)
    refs = doc["environments"][env]["packages"][platform]
    entries: dict[str, dict[str, Any]] = {}
    for entry in doc["packages"]:
        location = (
            entry.get("url") if doc["version"] == 5 else entry.get("conda", entry.get("pypi"))
        )
        if location is not None:
            entries[location] = entry
    conda, pypi = set(), set()
    for ref in refs:
        if "conda" in ref:
            entry = entries[ref["conda"]]
            url = ref["conda"]
            subdir = entry.get("subdir") or url.rsplit("/", 2)[-2]
            conda.add((url, entry.get("sha256"), f"{subdir}/{url.rsplit('/', 1)[-1]}"))
        elif "pypi" in ref:
            entry = entries[ref["pypi"]]
            location = ref["pypi"].removeprefix("direct+")
            if "://" not in location:
                location = Path(os.path.normpath(path.parent / location)).as_uri()
            pypi.add((location, entry.get("sha256"), f"pypi/{location.rsplit('/', 1)[-1]}"))
    return conda, pypi


REAL_CASES = [
    (lock_path.name, env, platform)
    for lock_path in sorted(REAL_LOCKS.glob("*.lock"))
    for env, platforms in _yaml(lock_path)["environments"].items()
    for platform in sorted(platforms["packages"])
]


@pytest.mark.parametrize(("lock_name", "env", "platform"), REAL_CASES)
def test_real_lock_pack_plan_matches_the_yaml(lock_name, env, platform, tmp_path):
    path = REAL_LOCKS / lock_name
    locked = read_environment(path, env, platform)
    if locked.source_packages:
        with pytest.raises(BundleError, match="source packages"):
            plan_bundle(locked)
        return
    plan = plan_bundle(locked)
    items = fetch_items(plan, tmp_path)
    got_conda = {
        (i.url, i.sha256, str(i.cache_path.relative_to(tmp_path))) for i in items[: len(plan.conda)]
    }
    got_pypi = {
        (i.url, i.sha256, str(i.cache_path.relative_to(tmp_path))) for i in items[len(plan.conda) :]
    }
    assert (got_conda, got_pypi) == _yaml_expected(path, env, platform)

    # The generated files accept real records.
    text = environment_yml(plan.conda, plan.wheels)
    assert len(re.findall(r"^  - \S+=\S+=\S+$", text, re.M)) == len(plan.conda)
    assert text.count("==") == len(plan.wheels)
    for subdir in {p.subdir for p in plan.conda}:
        repodata = json.loads(repodata_json(subdir, [p for p in plan.conda if p.subdir == subdir]))
        assert len(repodata["packages"]) + len(repodata["packages.conda"]) == sum(
            p.subdir == subdir for p in plan.conda
        )


def test_real_lock_with_wheels_writes_the_pip_section():
    locked = read_environment(REAL_LOCKS / "pypi-wheel-packages.lock", "default", "linux-64")
    text = environment_yml(locked.conda, plan_bundle(locked).wheels)
    assert text.endswith(
        "  - pip:\n"
        "    - --no-index\n"
        "    - --find-links ./pypi\n"
        "    - my-webserver==0.1.0\n"
        "    - numpy==1.26.4\n"
        "    - ordered-enum==0.0.9\n"
    )
    assert "  - python=3.12.12=hd63d673_1_cpython\n" in text


def test_a_named_lock_platform_is_packed_as_its_subdir_and_installed_by_its_name(
    tmp_path, channel_url
):
    # pixi >= 0.71 names a platform with system requirements `p1` (subdir linux-64), and two
    # lock platforms may share a subdir: pixi-pack.json must say the subdir (the container's
    # host check), the install must select the lock platform that was packed.
    from pipeline.install.extract import extract_bundle
    from pipeline.install.layout import ProjectPaths, read_extract_record

    root = tmp_path / "proj"
    write_pixi_toml(
        root,
        channels=[channel_url],
        platforms=[{"name": "gpu", "platform": "linux-64", "cuda": "12"}, "linux-64"],  # type: ignore[list-item]
        dependencies={"tinytool": "*"},
    )
    assert lock(root, pixi=None, cache_dir=tmp_path / "repodata").outcome == "solved"
    result = pack(
        root, tmp_path / "b.tar", tmp_path / "cache", platform="p1", fetcher=quiet_fetcher()
    )
    bundle = Path(result.bundle)
    assert json.loads(read_member(bundle, "pixi-pack.json"))["platform"] == "linux-64"
    extras = json.loads(read_member(bundle, EXTRAS_FILE))
    assert (extras["platform"], extras["lock_platform"]) == ("linux-64", "p1")
    extract_bundle(bundle, tmp_path / "project", environment="default", host="linux-64")
    record = read_extract_record(ProjectPaths.of(tmp_path / "project"))
    assert record is not None and record.platform == "p1"


# ---- the index, and the bundle in parts -----------------------------------------------------


def test_the_index_lists_every_other_file_with_its_size_and_sha256(packed: PackResult):
    from pipeline.bundle.index import read_index

    index = read_index(read_member(packed.bundle, "infer-vllm-index.json"), packed.bundle)
    assert index.kind == "env" and index.name == "default"
    with tarfile.open(packed.bundle) as tar:
        files = [m for m in tar.getmembers() if m.isfile() and m.name != "infer-vllm-index.json"]
        assert {f.name for f in index.files} == {m.name for m in files}
        for member in files:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            listed = index.by_name[member.name]
            assert (listed.size, listed.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_extract_refuses_a_file_that_differs_from_the_index(packed: PackResult, tmp_path):
    """A member changed after packing, its size kept (no .sha256 beside it): the index names it."""
    from pipeline.install.extract import extract_bundle

    changed = tmp_path / "changed.tar"
    with (
        tarfile.open(packed.bundle) as src,
        tarfile.open(changed, "w", format=tarfile.GNU_FORMAT) as out,
    ):
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == "environment.yml":
                data = data.replace(b"nodefaults", b"nodefaultz")  # type: ignore[union-attr]
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(BundleError) as exc:
        extract_bundle(changed, tmp_path / "project", environment="default", say=lambda _m: None)
    assert "'environment.yml'" in exc.value.message and "infer-vllm-index.json" in exc.value.message
    assert not (tmp_path / "project" / "environment.yml").exists()


def test_extract_takes_the_parts_file_in_place_of_the_tar(packed: PackResult, tmp_path):
    from pipeline.bundle.parts import parts_path, write_parts
    from pipeline.install.extract import extract_bundle

    carried = tmp_path / "carried" / packed.bundle.name
    carried.parent.mkdir()
    shutil.copy(packed.bundle, carried)
    parts = write_parts(carried, packed.sha256, 8 << 10)
    carried.unlink()  # only the parts cross the gap
    assert len(parts.parts) > 3
    result = extract_bundle(
        parts_path(carried), tmp_path / "project", environment="default", say=lambda _m: None
    )
    assert result.extracted and result.sha256 == packed.sha256
    same = extract_bundle(
        parts_path(carried), tmp_path / "project", environment="default", say=lambda _m: None
    )
    assert not same.extracted
    # one byte flipped in part 2: named, with its expected sha256; nothing written
    part = carried.with_name(parts.parts[1].name)
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        extract_bundle(
            parts_path(carried), tmp_path / "other", environment="default", say=lambda _m: None
        )
    message = exc.value.message
    assert (
        "part 2" in message and parts.parts[1].sha256 in message and "send part 2 again" in message
    )
    assert not (tmp_path / "other" / "pixi.lock").exists()


# ---- signed environment bundles --------------------------------------------------------------


def test_a_signed_env_bundle_extracts_with_its_signer_and_an_unsigned_one_is_refused(
    project: Path, packed: PackResult, tmp_path
):
    import subprocess

    from pipeline.bundle.signature import signature_path
    from pipeline.install.extract import extract_bundle

    key = tmp_path / "builder"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(key)],
        check=True,
        timeout=30,
    )
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"builder@site {kind} {blob}\n")
    signed = pack(
        project,
        tmp_path / "signed" / "bundle.tar",
        tmp_path / "cache",
        fetcher=quiet_fetcher(),
        signing_key=key,
    )
    assert signature_path(signed.bundle).exists()
    with tarfile.open(signed.bundle) as tar:
        assert "infer-vllm-index.sig" in tar.getnames()
    said: list[str] = []
    result = extract_bundle(
        signed.bundle, tmp_path / "p1", environment="default", say=said.append,
        trusted_signers=allowed,
    )  # fmt: skip
    assert result.extracted and any("signed by builder@site" in line for line in said)
    with pytest.raises(BundleError) as exc:
        extract_bundle(
            packed.bundle, tmp_path / "p2", environment="default", say=print,
            trusted_signers=allowed,
        )  # fmt: skip
    assert "is not signed" in exc.value.message
    assert not (tmp_path / "p2" / "pixi.lock").exists()
    said.clear()
    unchecked = extract_bundle(
        packed.bundle, tmp_path / "p3", environment="default", say=said.append
    )
    assert "not checked for a signature" in " ".join(unchecked.warnings)


# ---- the SBOM -------------------------------------------------------------------------------


def cyclonedx_validator():
    """A validator of the CycloneDX 1.6 JSON schema committed in tests/data/cyclonedx (its
    README names the source), with the two schemas it references."""
    import jsonschema
    from referencing import Registry, Resource

    folder = Path(__file__).parent / "data" / "cyclonedx"
    schemas = {
        name: json.loads((folder / name).read_text())
        for name in (
            "bom-1.6.SNAPSHOT.schema.json",
            "spdx.SNAPSHOT.schema.json",
            "jsf-0.82.SNAPSHOT.schema.json",
        )
    }
    base = "http://cyclonedx.org/schema/"
    registry = Registry().with_resources(
        (base + name, Resource.from_contents(schema)) for name, schema in schemas.items()
    )
    bom = schemas["bom-1.6.SNAPSHOT.schema.json"]
    return jsonschema.Draft7Validator(bom, registry=registry)


def test_the_sbom_is_valid_cyclonedx_and_lists_exactly_the_lock(packed: PackResult, project):
    from pipeline.bundle.sbom import sbom_path

    inside = read_member(packed.bundle, "infer-vllm-sbom.cdx.json")
    assert sbom_path(packed.bundle).read_bytes() == inside, "the same document beside it"
    document = json.loads(inside)
    errors = sorted(cyclonedx_validator().iter_errors(document), key=lambda e: list(e.path))
    assert errors == [], errors[0].message if errors else ""
    assert document["specVersion"] == "1.6"
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    expected = {(p.name, p.version, p.sha256) for p in locked.conda} | {
        (w.name, w.version, w.sha256) for w in locked.pypi
    }
    listed = {(c["name"], c["version"], c["hashes"][0]["content"]) for c in document["components"]}
    assert listed == expected
    purls = {c["purl"] for c in document["components"]}
    conda = next(p for p in purls if p.startswith("pkg:conda/tinytool@"))
    assert "subdir=" in conda and "channel=" in conda and "build=" in conda
    assert "pkg:pypi/tinywheel@0.1" in purls
    # the same lock, the same document: the bundle stays reproducible
    assert document["serialNumber"].startswith("urn:uuid:")


def test_doit_sbom_summarizes_counts_and_licenses(packed: PackResult, tmp_path):
    from conftest import doit_env, run_doit

    env = doit_env(tmp_path / "state", AUTO_INFER_VLLM_BUNDLE_PATH=str(packed.bundle))
    result = run_doit(["sbom"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"SBOM of {packed.bundle.name} ({packed.bundle}.cdx.json)"
    assert re.match(r"\d+ packages: \d+ conda, 1 PyPI \(CycloneDX 1\.6\)", lines[1]), lines
    assert lines[2].startswith("1 licenses: MIT (") or "licenses:" in lines[2]
    assert "packages with no license" in lines[3]
