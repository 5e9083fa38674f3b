"""The patch-channels stage: pixi.toml channels and pixi.lock URLs -> the extracted channel."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

import pytest
from bundle_factory import Kit, make_bundle, shared_kit
from rattler import LockFile

from pipeline.errors import InstallError
from pipeline.install.extract import extract_bundle
from pipeline.install.layout import ProjectPaths
from pipeline.install.patch import patch_is_current, patch_manifest_text, patch_project
from pipeline.pixi.lockfile import read_environment
from pipeline.pixi.locktext import location_form, package_key, patch_lock_text

REAL_LOCKS = Path(__file__).parent / "data" / "real-locks"
LOCAL = "file:///srv/project/channel/"

MANIFEST = """\
# the project
[workspace]
name = "demo"  # keep this comment
channels = ["conda-forge", "nvidia"]  # and this one
platforms = ["linux-64"]

[dependencies]
python = "3.12.*"  # pinned
cudatoolkit = { version = "12.*", channel = "nvidia" }

[target.linux-64.dependencies]
nccl = { version = "*", channel = "nvidia" }

[feature.gpu]
channels = [{ channel = "pytorch", priority = 2 }, "nvidia"]

[feature.gpu.dependencies]
pytorch = { version = "*", channel = "pytorch" }

[tasks]
verify = "python -c 'import vllm'"
"""


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


def test_manifest_channels_all_point_at_the_local_channel_and_comments_stay():
    text = patch_manifest_text(MANIFEST, LOCAL)
    doc = tomllib.loads(text)
    assert doc["workspace"]["channels"] == [LOCAL]
    assert doc["feature"]["gpu"]["channels"] == [LOCAL]
    assert doc["dependencies"]["cudatoolkit"]["channel"] == LOCAL
    assert doc["target"]["linux-64"]["dependencies"]["nccl"]["channel"] == LOCAL
    assert doc["feature"]["gpu"]["dependencies"]["pytorch"]["channel"] == LOCAL
    for comment in ("# the project", "# keep this comment", "# and this one", "# pinned"):
        assert comment in text
    assert text.replace(LOCAL, "X").count("\n") == MANIFEST.count("\n")
    assert patch_manifest_text(text, LOCAL) == text  # idempotent


def test_legacy_project_table_is_patched_too():
    text = patch_manifest_text('[project]\nname = "x"\nchannels = ["conda-forge"]\n', LOCAL)
    assert tomllib.loads(text)["project"]["channels"] == [LOCAL]


@pytest.mark.parametrize(
    ("value", "kind", "key"),
    [
        ("https://c.org/cf/linux-64/x-1-h_0.conda", "conda", "linux-64/x-1-h_0.conda"),
        ("https://conda.anaconda.org/conda-forge/", "conda", None),
        ("../local/noarch/y-1-0.tar.bz2", "conda", "noarch/y-1-0.tar.bz2"),
        ("direct+https://h/p/pkg-1.0-py3-none-any.whl", "pypi", "pkg-1.0-py3-none-any.whl"),
        ("https://h/p/a%2Bb-1.0-py3-none-any.whl", "pypi", "a+b-1.0-py3-none-any.whl"),
    ],
)
def test_package_key(value: str, kind: str, key: str | None):
    assert package_key(value, kind) == key


def _patch_real(name: str, env: str = "default", platform: str = "linux-64") -> tuple[str, str]:
    path = REAL_LOCKS / name
    text = path.read_text()
    locked = read_environment(path, env, platform)
    form = location_form(text)
    conda = {
        f"{p.subdir}/{p.filename}": form(Path("/b/channel") / p.subdir / p.filename)
        for p in locked.conda
    }
    wheels = {w.filename: form(Path("/b/pypi") / w.filename) for w in locked.pypi if w.is_wheel}
    return text, patch_lock_text(text, conda, wheels, "file:///b/channel/")


@pytest.mark.parametrize(
    "name",
    [
        "pypi-wheel-packages.lock",
        "webserver.lock",
        "mirror-middleware.lock",
        "local-build.lock",
        "repodata-patches.lock",
    ],
)
def test_real_locks_read_back_with_every_url_local(tmp_path, name: str):
    text, patched = _patch_real(name)
    out = tmp_path / "pixi.lock"
    out.write_text(patched)
    locked = read_environment(out, "default", "linux-64")
    assert locked.conda and all(p.url.startswith("file:///b/channel/") for p in locked.conda)
    assert all(w.url.startswith("file:///b/pypi/") for w in locked.pypi if w.is_wheel)
    assert locked.channels == ("file:///b/channel/",)
    # Only location and channel lines change (and subdir lines appear); the rest is kept.
    diff = difflib.ndiff(text.splitlines(), patched.splitlines())
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert added and all("/b/" in line or "subdir: " in line for line in added)
    # Other platforms keep their URLs (their files are not in the bundle).
    lock_file = LockFile.from_path(out)
    env = lock_file.environment("default")
    assert env is not None
    others = [p for p in env.platforms() if p.name != "linux-64"]
    for platform in others:
        for pkg in env.packages(platform) or []:
            # noarch packages and pure wheels are shared with linux-64: rewritten too.
            if "/noarch/" not in pkg.location and not pkg.location.endswith("any.whl"):
                assert not pkg.location.startswith(("file:///b/", "/b/"))


def test_direct_pypi_urls_keep_their_prefix():
    text, patched = _patch_real("pypi-wheel-packages.lock")
    assert "direct+https://files.pythonhosted.org" in text
    assert "- pypi: direct+/b/pypi/numpy-1.26.4" in patched


def test_patch_project_points_everything_at_the_extracted_files(tmp_path, kit: Kit):
    project = tmp_path / "project"
    extract_bundle(make_bundle(tmp_path, kit), project, environment="default", say=lambda m: None)

    result = patch_project(project, "default", say=lambda m: None)

    assert result.manifest_changed and result.lock_changed
    channel = (project / "channel").as_uri() + "/"
    manifest = (project / "pixi.toml").read_text()
    assert tomllib.loads(manifest)["workspace"]["channels"] == [channel]
    assert "# patched to the local channel on install" in manifest
    locked = read_environment(project / "pixi.lock", "default", "linux-64")
    for pkg in locked.conda:
        assert pkg.url == (project / "channel" / pkg.subdir / pkg.filename).as_uri()
    assert [w.url for w in locked.pypi] == [(project / "pypi" / locked.pypi[0].filename).as_uri()]
    assert "example.org" not in (project / "pixi.lock").read_text()
    assert patch_is_current(project, "default")
    assert not patch_is_current(project, "other")

    again = patch_project(project, "default", say=lambda m: None)
    assert not again.changed


def test_patch_without_an_extraction_is_an_error(tmp_path):
    with pytest.raises(InstallError, match="no finished extraction"):
        patch_project(tmp_path / "empty", "default", say=lambda m: None)


def test_a_new_extraction_invalidates_the_patch(tmp_path, kit: Kit):
    project = tmp_path / "project"
    extract_bundle(make_bundle(tmp_path / "a", kit), project, environment="default", say=print)
    patch_project(project, "default", say=lambda m: None)
    extract_bundle(
        make_bundle(tmp_path / "b", kit, names=("tinydata",), wheel=False),
        project,
        environment="default",
        say=lambda m: None,
    )
    assert not patch_is_current(project, "default")
    assert not ProjectPaths.of(project).patch_stamp.exists()
