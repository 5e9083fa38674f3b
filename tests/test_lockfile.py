"""pipeline.pixi.lockfile against real pixi.lock files, checked by an independent pyyaml reader."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from rattler import RepoDataRecord

from pipeline.errors import LockError
from pipeline.pixi.lockfile import (
    CondaPackage,
    LockedEnvironment,
    environments,
    file_sha256,
    rattler_records,
    read_environment,
    read_lock,
    record_with_url,
)

REAL_LOCKS = Path(__file__).parent / "data" / "real-locks"
LOCK_FILES = sorted(REAL_LOCKS.glob("*.lock"))
CONDA_KEYS = ["name", "version", "build", "subdir", "url", "filename", "sha256", "md5", "size"]
PYPI_KEYS = ["name", "version", "url", "filename", "sha256", "is_wheel"]


# --- an independent reader of the lock YAML (v5, v6, v7) ------------------------------------


@functools.cache
def _doc(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


def _yaml_platforms(path: Path) -> dict[str, list[str]]:
    envs = _doc(path)["environments"]
    return {name: sorted(env["packages"]) for name, env in envs.items()}


def _basename(url: str) -> str:
    return unquote(PurePosixPath(urlsplit(url).path).name)


def _pypi_url(location: str, lock_dir: Path) -> str:
    location = location.removeprefix("direct+")
    if "://" in location:
        return location
    return Path(os.path.normpath(lock_dir / location)).as_uri()


def _yaml_index(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, location) -> package entry, for every entry of the top-level `packages:` list."""
    index: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in doc["packages"]:
        if doc["version"] == 5:
            # v5: `kind: conda|pypi` plus an explicit `url:` and full metadata.
            index[(entry["kind"], entry["url"])] = entry
        else:
            # v6+: the location is the value of the `conda:` / `pypi:` / `conda_source:` key.
            (kind,) = (k for k in ("conda", "pypi", "conda_source") if k in entry)
            index[(kind, entry[kind])] = entry
    return index


def _yaml_conda(doc: dict[str, Any], url: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's metadata with the fields a v6+ lock leaves out filled in."""
    meta = dict(entry)
    filename = _basename(url)
    stem = re.sub(r"(\.conda|\.tar\.bz2)$", "", filename)
    name, version, build = stem.rsplit("-", 2)
    meta.setdefault("name", name)
    meta["version"] = str(meta.get("version", version))
    meta["build"] = str(meta.get("build", build))
    meta.setdefault("subdir", PurePosixPath(urlsplit(url).path).parent.name)
    meta["url"], meta["filename"] = url, filename
    if doc["version"] >= 6:
        # v6+ omit what rattler_lock derives from the location: build_number from the build
        # string's trailing digits, noarch from a `noarch` subdir ("py" in the build: python).
        trailing = re.search(r"(\d+)$", meta["build"])
        meta.setdefault("build_number", int(trailing.group(1)) if trailing else 0)
        if meta["subdir"] == "noarch":
            meta.setdefault("noarch", "python" if "py" in meta["build"] else "generic")
    return meta


def yaml_selection(path: Path, env: str, platform: str) -> dict[str, Any]:
    """What the lock at `path` holds for env/platform, read with pyyaml only."""
    doc = _doc(path)
    index = _yaml_index(doc)
    conda, pypi, sources, entries = [], [], set(), {}
    for ref in doc["environments"][env]["packages"][platform]:
        ((kind, location),) = ref.items()
        entry = index[(kind, location)]
        if kind == "conda_source":
            sources.add(re.split(r"[\[ ]", location)[0])
        elif kind == "conda":
            meta = _yaml_conda(doc, entry["url"] if doc["version"] == 5 else location, entry)
            conda.append({key: meta.get(key) for key in CONDA_KEYS})
            entries[(meta["subdir"], meta["filename"])] = meta
        else:
            url = _pypi_url(entry["url"] if doc["version"] == 5 else location, path.parent)
            pypi.append(
                {
                    "name": entry["name"],
                    "version": str(entry["version"]),
                    "url": url,
                    "filename": _basename(url),
                    "sha256": entry.get("sha256"),
                    "is_wheel": url.endswith(".whl"),
                }
            )
    return {
        "channels": [c["url"] for c in doc["environments"][env]["channels"]],
        "conda": sorted(conda, key=lambda p: (p["subdir"], p["filename"])),
        "pypi": sorted(pypi, key=lambda p: p["filename"]),
        "source": sorted(sources),
        "entries": entries,
    }


def _combos() -> list[tuple[Path, str, str]]:
    return [
        (path, env, platform)
        for path in LOCK_FILES
        for env, platforms in _yaml_platforms(path).items()
        for platform in platforms
    ]


def _as_dict(pkg: object, keys: list[str]) -> dict[str, Any]:
    return {key: getattr(pkg, key) for key in keys}


# --- the real locks ------------------------------------------------------------------------


def test_real_lock_set_is_complete():
    # v5, v6 and v7 layouts must all be exercised by the parametrised tests below.
    assert {p.name for p in LOCK_FILES} == {
        "local-build.lock",
        "mirror-middleware.lock",
        "no-timestamp.lock",
        "pypi-wheel-packages.lock",
        "repodata-patches.lock",
        "simple-python.lock",
        "webserver.lock",
    }
    assert {_doc(p)["version"] for p in LOCK_FILES} == {5, 6, 7}


@pytest.mark.parametrize("path", LOCK_FILES, ids=lambda p: p.stem)
def test_environments_match_yaml(path):
    assert environments(path) == dict(sorted(_yaml_platforms(path).items()))


@pytest.mark.parametrize(
    ("path", "env", "platform"),
    _combos(),
    ids=lambda v: v.stem if isinstance(v, Path) else v,
)
def test_read_environment_matches_independent_yaml_reading(path, env, platform):
    # Also pins the py-rattler gotcha: a platform object not taken from this very lock makes
    # `env.packages()` panic or return None, which would show up here as missing packages.
    locked = read_environment(path, env, platform)
    want = yaml_selection(path, env, platform)

    assert locked.path == path.absolute()
    assert (locked.environment, locked.platform) == (env, platform)
    assert list(locked.channels) == want["channels"]
    assert len(locked.conda) + len(locked.pypi) + len(locked.source_packages) > 0
    assert [_as_dict(p, CONDA_KEYS) for p in locked.conda] == want["conda"]
    assert [_as_dict(p, PYPI_KEYS) for p in locked.pypi] == want["pypi"]
    assert list(locked.source_packages) == want["source"]

    for pkg in locked.conda:
        entry = want["entries"][(pkg.subdir, pkg.filename)]
        repodata = pkg.repodata
        assert list(repodata) == sorted(repodata)
        json.dumps(repodata)  # serialisable as is
        assert (repodata["name"], repodata["version"], repodata["build"]) == (
            pkg.name,
            pkg.version,
            pkg.build,
        )
        assert repodata["subdir"] == pkg.subdir
        assert repodata["depends"] == entry.get("depends", [])
        assert repodata.get("constrains", []) == entry.get("constrains", [])
        assert repodata.get("build_number", 0) == entry.get("build_number", 0)
        for key in ("sha256", "md5", "size", "timestamp", "license", "license_family", "noarch"):
            assert repodata.get(key) == entry.get(key), key
        for key in ("fn", "url", "channel"):  # record-only keys stay out of repodata.json
            assert key not in repodata


def test_repodata_entry_spelled_out_for_a_v5_package():
    locked = read_environment(REAL_LOCKS / "repodata-patches.lock", "default", "linux-64")
    (pkg,) = [p for p in locked.conda if p.name == "_openmp_mutex"]
    assert pkg == CondaPackage(
        name="_openmp_mutex",
        version="4.5",
        build="2_gnu",
        subdir="linux-64",
        url="https://conda.anaconda.org/conda-forge/linux-64/_openmp_mutex-4.5-2_gnu.tar.bz2",
        filename="_openmp_mutex-4.5-2_gnu.tar.bz2",
        sha256="fbe2c5e56a653bebb982eda4876a9178aedfc2b545f25d0ce9c4c0b508253d22",
        md5="73aaf86a425cc6e73fcf236a5a46396d",
        size=23621,
        channel="https://conda.anaconda.org/conda-forge/",
        repodata=pkg.repodata,
    )
    assert pkg.repodata == {
        "arch": "x86_64",
        "build": "2_gnu",
        "build_number": 16,
        "constrains": ["openmp_impl 9999"],
        "depends": ["_libgcc_mutex 0.1 conda_forge", "libgomp >=7.5.0"],
        "license": "BSD-3-Clause",
        "license_family": "BSD",
        "md5": "73aaf86a425cc6e73fcf236a5a46396d",
        "name": "_openmp_mutex",
        "platform": "linux",
        "sha256": "fbe2c5e56a653bebb982eda4876a9178aedfc2b545f25d0ce9c4c0b508253d22",
        "size": 23621,
        "subdir": "linux-64",
        "timestamp": 1650670423406,
        "version": "4.5",
    }


def test_repodata_entry_of_a_v7_package_derives_name_from_the_filename():
    locked = read_environment(REAL_LOCKS / "local-build.lock", "default", "linux-64")
    (pkg,) = [p for p in locked.conda if p.name == "_openmp_mutex"]
    assert (pkg.version, pkg.build, pkg.subdir) == ("4.5", "20_gnu", "linux-64")
    assert pkg.repodata["depends"] == ["__glibc >=2.17,<3.0.a0", "libgomp >=7.5.0"]
    assert pkg.repodata["constrains"] == ["openmp_impl <0.0a0"]
    assert pkg.repodata["build_number"] == 20
    assert pkg.repodata["run_exports"] == {"strong": ["_openmp_mutex >=4.5"]}
    assert pkg.sha256 == "1dd3fffd892081df9726d7eb7e0dea6198962ba775bd88842135a4ddb4deb3c9"
    assert pkg.size == 28948


def test_v5_lock_without_timestamp_reads():
    locked = read_environment(REAL_LOCKS / "no-timestamp.lock", "default", "osx-64")
    (pkg,) = locked.conda
    assert (pkg.name, pkg.version, pkg.build, pkg.subdir, pkg.size) == (
        "mpi",
        "1.0",
        "openmpi",
        "osx-64",
        4394,
    )
    assert "timestamp" not in pkg.repodata


def test_conda_packages_sorted_by_subdir_then_filename():
    locked = read_environment(REAL_LOCKS / "webserver.lock", "prod", "linux-64")
    keys = [(p.subdir, p.filename) for p in locked.conda]
    assert keys == sorted(keys)
    assert {p.subdir for p in locked.conda} == {"linux-64", "noarch"}


def test_v7_source_packages_are_reported_instead_of_panicking():
    # py-rattler panics ("must be binary", a BaseException) when asked for the record of a
    # source package; they must come back as names, and binaries must still all be there.
    locked = read_environment(REAL_LOCKS / "local-build.lock", "default", "osx-arm64")
    assert locked.source_packages == (
        "local-build-local-pkg",
        "local-build-local-pkg-2",
        "local-build-main-pkg",
    )
    assert len(locked.conda) == 14
    assert not {p.name for p in locked.conda} & set(locked.source_packages)


def test_pypi_wheels_flagged_and_urls_made_downloadable():
    path = REAL_LOCKS / "pypi-wheel-packages.lock"
    locked = read_environment(path, "default", "linux-64")
    by_name = {p.name: p for p in locked.pypi}
    assert sorted(by_name) == ["my-webserver", "numpy", "ordered-enum"]
    assert all(p.is_wheel for p in locked.pypi)
    # pixi's `direct+` marker is not part of the URL.
    assert by_name["numpy"].url.startswith("https://files.pythonhosted.org/packages/0f/50/")
    assert by_name["numpy"].sha256 is None
    # A wheel locked by relative path is a file:// URL resolved against the lock's directory.
    webserver = by_name["my-webserver"]
    wheel_path = REAL_LOCKS.parent / "webserver" / "my_webserver-0.1.0-py3-none-any.whl"
    assert webserver.url == wheel_path.absolute().as_uri()
    assert webserver.filename == "my_webserver-0.1.0-py3-none-any.whl"
    assert (webserver.version, webserver.sha256) == ("0.1.0", None)
    assert by_name["ordered-enum"].sha256 == (
        "9382e88309b56dcbe06be43c4a586984d036b630863b53dbec5039655bab3e83"
    )
    assert [p.filename for p in locked.pypi] == sorted(p.filename for p in locked.pypi)
    # Other platforms lock only the index wheel.
    other = read_environment(path, "default", "osx-arm64")
    assert [p.name for p in other.pypi] == ["ordered-enum"]


# --- synthetic locks for what the real set does not hold ------------------------------------

SYNTHETIC_V6 = """\
version: 6
environments:
  default:
    channels:
    - url: https://conda.anaconda.org/conda-forge/
    indexes:
    - https://pypi.org/simple
    packages:
      linux-64:
      - conda: https://conda.anaconda.org/conda-forge/noarch/md5only-1.0-pyh0_0.tar.bz2
      - conda: ./pkgs/localbin-2.0-h1_3.conda
      - conda: .
      - pypi: https://files.pythonhosted.org/packages/aa/bb/foo-1.0.tar.gz
      - pypi: https://files.pythonhosted.org/packages/aa/bb/space%20pkg-2.0-py3-none-any.whl
      - pypi: git+https://github.com/foo/bar.git?rev=main#0123456789abcdef0123456789abcdef01234567
      - pypi: ./local-dir
packages:
- conda: https://conda.anaconda.org/conda-forge/noarch/md5only-1.0-pyh0_0.tar.bz2
  md5: 0123456789abcdef0123456789abcdef
  noarch: python
  depends:
  - python >=3.9
  size: 1234
- conda: ./pkgs/localbin-2.0-h1_3.conda
  subdir: linux-64
  sha256: 1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a
  md5: 2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b
  size: 10
- conda: .
  name: mysrc
  version: 0.1.0
  build: hbf21a9e_0
  subdir: linux-64
  input:
    hash: 3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c
    globs:
    - pyproject.toml
- pypi: https://files.pythonhosted.org/packages/aa/bb/foo-1.0.tar.gz
  name: foo
  version: '1.0'
  sha256: 4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d
- pypi: https://files.pythonhosted.org/packages/aa/bb/space%20pkg-2.0-py3-none-any.whl
  name: space-pkg
  version: '2.0'
  sha256: 5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e
- pypi: git+https://github.com/foo/bar.git?rev=main#0123456789abcdef0123456789abcdef01234567
  name: bar
  version: '1.0'
- pypi: ./local-dir
  name: local-dir
  version: 0.1.0
  editable: true
"""


@pytest.fixture
def synthetic(tmp_path) -> Path:
    path = tmp_path / "proj" / "pixi.lock"
    path.parent.mkdir()
    path.write_text(SYNTHETIC_V6)
    return path


def test_sdist_git_and_directory_pypi_packages(synthetic):
    locked = read_environment(synthetic, "default", "linux-64")
    assert [(p.filename, p.is_wheel) for p in locked.pypi] == [
        ("foo-1.0.tar.gz", False),
        ("space pkg-2.0-py3-none-any.whl", True),  # percent-decoded, like pixi-pack
    ]
    assert locked.pypi[0].sha256 == "4d" * 32
    # git checkouts, project directories and conda source packages cannot be packed.
    assert locked.source_packages == ("bar", "local-dir", "mysrc")


def test_md5_only_package_keeps_sha256_none(synthetic):
    locked = read_environment(synthetic, "default", "linux-64")
    (pkg,) = [p for p in locked.conda if p.name == "md5only"]
    assert (pkg.sha256, pkg.md5, pkg.size) == (None, "0123456789abcdef0123456789abcdef", 1234)
    assert (pkg.subdir, pkg.repodata["noarch"]) == ("noarch", "python")
    assert "sha256" not in pkg.repodata
    assert pkg.repodata["md5"] == "0123456789abcdef0123456789abcdef"
    assert pkg.repodata["depends"] == ["python >=3.9"]


def test_conda_package_locked_by_relative_path_resolves_against_the_lock(synthetic):
    # py-rattler's repo_data_record() raises ConversionError("The path is not an absolute
    # path") for these; the reader builds the record itself.
    locked = read_environment(synthetic, "default", "linux-64")
    (pkg,) = [p for p in locked.conda if p.name == "localbin"]
    expected = synthetic.parent / "pkgs" / "localbin-2.0-h1_3.conda"
    assert pkg.url == expected.as_uri()
    assert (pkg.filename, pkg.build, pkg.channel) == ("localbin-2.0-h1_3.conda", "h1_3", None)
    assert pkg.repodata["build_number"] == 3


# --- errors ---------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[LockError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_environment_lists_the_available_ones():
    path = REAL_LOCKS / "webserver.lock"
    with pytest.raises(LockError) as exc:
        read_environment(path, "gpu", "linux-64")
    message = _one_line(exc)
    assert "'gpu'" in message
    assert str(path) in message
    assert "available: default, prod" in message


def test_missing_platform_lists_the_available_ones():
    path = REAL_LOCKS / "webserver.lock"
    with pytest.raises(LockError) as exc:
        read_environment(path, "prod", "linux-ppc64le")
    message = _one_line(exc)
    assert "'linux-ppc64le'" in message
    assert "'prod'" in message
    assert "available: linux-64, linux-aarch64, osx-64, osx-arm64, win-64" in message


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("not: [valid\n  yaml: {", "did not find expected"),
        ("hello world\n", "missing `version`"),
        ("version: 99\nenvironments: {}\npackages: []\n", "version 99"),
        (b"\x00\xff\xfe binary", "UTF-8"),
    ],
    ids=["broken-yaml", "not-a-lock", "too-new", "binary"],
)
def test_unreadable_file_gives_a_one_line_error_naming_it(tmp_path, content, detail):
    path = tmp_path / "pixi.lock"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    for call in (
        lambda: read_lock(path),
        lambda: environments(path),
        lambda: read_environment(path, "default", "linux-64"),
    ):
        with pytest.raises(LockError) as exc:
            call()
        message = _one_line(exc)
        assert str(path) in message
        assert detail in message
        assert "pixi lock" in message


def test_missing_file_gives_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "pixi.lock"
    with pytest.raises(LockError) as exc:
        read_environment(path, "default", "linux-64")
    message = _one_line(exc)
    assert str(path) in message
    assert "does not exist" in message


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(LockError, match="is a directory"):
        read_lock(tmp_path)


# --- records for the install stage ----------------------------------------------------------


def _locked(name: str, env: str = "default", platform: str = "linux-64") -> LockedEnvironment:
    return read_environment(REAL_LOCKS / name, env, platform)


def test_rattler_records_follow_the_locked_packages():
    locked = _locked("pypi-wheel-packages.lock")
    records = rattler_records(locked)
    assert all(isinstance(r, RepoDataRecord) for r in records)
    assert [(r.subdir, r.file_name, r.url) for r in records] == [
        (p.subdir, p.filename, p.url) for p in locked.conda
    ]
    assert [r.sha256.hex() for r in records] == [p.sha256 for p in locked.conda]
    assert [r.size for r in records] == [p.size for p in locked.conda]


def test_rattler_records_pointed_at_a_local_channel(tmp_path):
    locked = _locked("simple-python.lock")
    channel = tmp_path / "channel"
    records = rattler_records(locked, channel_dir=channel)
    for record, pkg in zip(records, locked.conda, strict=True):
        assert record.url == (channel / pkg.subdir / pkg.filename).as_uri()
        assert record.channel == channel.as_uri() + "/"
        assert (record.file_name, record.sha256.hex(), record.md5.hex()) == (
            pkg.filename,
            pkg.sha256,
            pkg.md5,
        )
        assert [str(d) for d in record.depends] == pkg.repodata["depends"]


def test_rattler_records_of_a_relative_path_package(synthetic):
    locked = read_environment(synthetic, "default", "linux-64")
    # Its source packages would be refused; the binaries alone must still become records.
    locked = dataclasses.replace(locked, source_packages=())
    records = rattler_records(locked)
    assert [r.url for r in records] == [p.url for p in locked.conda]


def test_rattler_records_refuse_source_packages():
    locked = _locked("local-build.lock")
    with pytest.raises(LockError, match="local-build-main-pkg"):
        rattler_records(locked)


def test_rattler_records_notice_a_lock_changed_since_it_was_read(tmp_path):
    path = tmp_path / "pixi.lock"
    original = (REAL_LOCKS / "mirror-middleware.lock").read_text()
    path.write_text(original)
    locked = read_environment(path, "default", "linux-64")
    sha = locked.conda[0].sha256
    assert sha is not None
    path.write_text(original.replace(sha, "ab" * 32))
    with pytest.raises(LockError, match="changed since it was read"):
        rattler_records(locked)


def test_record_with_url_copies_and_leaves_the_original_alone():
    (record,) = rattler_records(_locked("mirror-middleware.lock"))
    moved = record_with_url(record, "file:///srv/channel/linux-64/" + record.file_name)
    assert moved.url == "file:///srv/channel/linux-64/" + record.file_name
    assert record.url.startswith("https://my-custom-url/conda-forge/linux-64/")
    assert (moved.file_name, moved.sha256, moved.md5, moved.channel) == (
        record.file_name,
        record.sha256,
        record.md5,
        record.channel,
    )
    relocated = record_with_url(record, "file:///srv/c/x.conda", channel="file:///srv/c/")
    assert relocated.channel == "file:///srv/c/"


def test_file_sha256_streams_files_larger_than_one_chunk(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(1024 * 1024 * 2 + 12345)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


# ---- real pixi output (tests/data/pixi, see its README) ---------------------------------------

PIXI_DATA = Path(__file__).parent / "data" / "pixi"
PIXI_LOCKS = sorted([*PIXI_DATA.glob("projects/*/pixi.lock"), *PIXI_DATA.glob("locks/*.lock")])


@pytest.mark.parametrize("lock_path", PIXI_LOCKS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_environment_and_platform_of_real_pixi_is_selectable(lock_path):
    lock = read_lock(lock_path)
    for env_name, env in lock.environments():
        platforms = list(env.platforms())
        assert platforms
        for platform in platforms:
            by_name = read_environment(lock_path, env_name, platform.name)
            assert (by_name.lock_platform, by_name.subdir) == (platform.name, str(platform.subdir))
            assert len(by_name.conda) + len(by_name.pypi) + len(by_name.source_packages) > 0
            subdir = str(platform.subdir)
            sharing = [p.name for p in platforms if str(p.subdir) == subdir]
            if subdir in sharing or len(sharing) == 1:
                by_subdir = read_environment(lock_path, env_name, subdir)
                expected = platform.name if len(sharing) == 1 else subdir
                assert by_subdir.lock_platform == expected


def test_system_requirements_platform_p1_is_found_by_its_subdir():
    lock_path = PIXI_DATA / "projects" / "sysreq-platform-restriction-composition" / "pixi.lock"
    for env in ("default", "restricted"):
        locked = read_environment(lock_path, env, "linux-64")
        assert (locked.lock_platform, locked.subdir, locked.platform) == (
            "p1",
            "linux-64",
            "linux-64",
        )
        assert [p.filename for p in locked.conda] == ["_r-mutex-1.0.1-anacondar_1.tar.bz2"]


def test_two_unnamed_platforms_sharing_a_subdir_are_refused_naming_both(tmp_path):
    # multi-machine, with the bare linux-64 renamed away: p2 (cuda) and cpu share linux-64,
    # and pixi-pack would silently take the first of them.
    text = (PIXI_DATA / "projects" / "multi-machine" / "pixi.lock").read_text(encoding="utf-8")
    lock_path = tmp_path / "pixi.lock"
    lock_path.write_text(
        text.replace("- name: linux-64\n", "- name: cpu\n  subdir: linux-64\n", 1).replace(
            "      linux-64:\n", "      cpu:\n"
        ),
        encoding="utf-8",
    )
    with pytest.raises(LockError) as info:
        read_environment(lock_path, "default", "linux-64")
    message = info.value.message
    assert "\n" not in message
    assert "platform 'linux-64' is ambiguous" in message
    assert "cpu (__linux=4.18, __glibc=2.28)" in message
    assert "p2 (__cuda=12, __linux=4.18, __glibc=2.28)" in message
    assert read_environment(lock_path, "default", "p2").subdir == "linux-64"


def test_a_lock_version_newer_than_we_read_is_one_line_naming_it(tmp_path):
    text = (PIXI_DATA / "locks" / "changed-platform-virtual-package.lock").read_text()
    lock_path = tmp_path / "pixi.lock"
    lock_path.write_text(text.replace("version: 7\n", "version: 8\n", 1), encoding="utf-8")
    with pytest.raises(LockError) as info:
        read_lock(lock_path)
    message = info.value.message
    assert "\n" not in message
    assert "cannot read lock file" in message
    assert "format version 8 is newer than the 7" in message
    assert "pixi lock" in message
