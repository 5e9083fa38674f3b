"""Model bundles: the index, pack-model's refusals, parts, install-model (one pass, atomic,
idempotent, offline) and the hostile bundles it must refuse with the previous model intact.

Models are made here (:mod:`model_factory`: the Hugging Face cache's layout, snapshot links
into ``blobs/``); the real vLLM serving one from a models dir is in ``test_vllm_bundle.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import REPO, doit_env, run_doit
from model_factory import COMMIT, hf_cache_model, one_line

from pipeline.build.model import pack_model, scan_model_dir
from pipeline.bundle.format import INDEX_FILE, INDEX_SUM_FILE, parse_part_size
from pipeline.bundle.index import (
    IndexedFile,
    check_digests,
    check_listing,
    index_json,
    make_index,
    read_index,
)
from pipeline.bundle.parts import join_parts, parts_path, read_parts_file, write_parts
from pipeline.errors import BundleError
from pipeline.install.model import install_model

FILES = {
    "config.json": b'{"model_type": "tiny"}\n',
    "tokenizer.json": b'{"version": "1.0"}\n',
    "model-00001-of-00002.safetensors": os.urandom(700_000),
    "model-00002-of-00002.safetensors": os.urandom(900_000),
    "nested/extra.json": b"{}\n",
}


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return hf_cache_model(tmp_path / "hub", "org/tiny", FILES)


@pytest.fixture
def packed(tmp_path: Path, snapshot: Path):
    return pack_model(snapshot, "tiny", tmp_path / "out" / "tiny.model.tar")


def installed_files(models: Path, name: str) -> dict[str, bytes]:
    root = models / name
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- the index ------------------------------------------------------------------------------


def entry(name: str, data: bytes) -> IndexedFile:
    return IndexedFile(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_index_round_trips_and_is_sorted():
    index = make_index(
        "model", "m", [entry("model/b", b"b"), entry("model/a", b"aa")], tool_version="1"
    )
    data = index_json(index)
    again = read_index(data, "b.tar")
    assert again == index
    assert [f.name for f in again.files] == ["model/a", "model/b"]
    assert again.total_bytes == 3
    assert json.loads(data)["index_format"] == 1


def test_index_of_an_unknown_version_is_refused_in_one_line():
    data = json.dumps({"index_format": 2, "kind": "model", "name": "m", "files": []}).encode()
    with pytest.raises(BundleError) as exc:
        read_index(data, "b.tar")
    one_line(exc, "index format 2", "reads index format 1 only")


def test_a_parts_file_of_an_unknown_version_is_refused_in_one_line(tmp_path):
    path = tmp_path / "b.tar.parts.json"
    path.write_text(json.dumps({"parts_format": 9, "bundle": "b.tar"}))
    with pytest.raises(BundleError) as exc:
        read_parts_file(path)
    one_line(exc, "parts format 9", "reads parts format 1 only")


def test_index_listing_refuses_missing_extra_and_resized_members():
    index = make_index("model", "m", [entry("model/a", b"aa")], tool_version="1")
    check_listing(index, {"model/a": 2}, ["model"], "b.tar")
    with pytest.raises(BundleError) as exc:
        check_listing(index, {"model/a": 2, "model/x": 1}, ["model"], "b.tar")
    one_line(exc, "'model/x'", "does not list")
    with pytest.raises(BundleError) as exc:
        check_listing(index, {}, ["model"], "b.tar")
    one_line(exc, "lacks 'model/a'", "incomplete")
    with pytest.raises(BundleError) as exc:
        check_listing(index, {"model/a": 3}, ["model"], "b.tar")
    one_line(exc, "3 bytes", "says 2")
    with pytest.raises(BundleError) as exc:
        check_listing(index, {"model/a": 2}, ["model", "model/empty"], "b.tar")
    one_line(exc, "'model/empty'")
    with pytest.raises(BundleError) as exc:
        check_digests(index, {"model/a": "0" * 64}, "b.tar")
    one_line(exc, "'model/a'", "damaged or was swapped")


# ---- pack-model: the source refusals --------------------------------------------------------


def test_pack_follows_the_cache_links_and_records_the_repo(tmp_path, snapshot, packed):
    assert packed.files == len(FILES)
    with tarfile.open(packed.bundle) as tar:
        names = tar.getnames()
        index = read_index(tar.extractfile(INDEX_FILE).read(), packed.bundle)  # type: ignore[union-attr]
    assert names[0] == INDEX_FILE, "the index comes first: the install knows every hash first"
    assert {f.name for f in index.files} == {f"model/{n}" for n in FILES}
    assert index.kind == "model" and index.name == "tiny"
    assert index.source == {"repo": "org/tiny", "revision": COMMIT}
    assert packed.bundle.with_name("tiny.model.tar.sha256").read_text() == (
        f"{packed.sha256}  tiny.model.tar\n"
    )


def test_same_files_give_the_same_bytes(tmp_path, snapshot, packed):
    again = pack_model(snapshot, "tiny", tmp_path / "again" / "tiny.model.tar")
    assert again.sha256 == packed.sha256
    assert again.bundle.read_bytes() == packed.bundle.read_bytes()


def test_incomplete_download_is_refused(tmp_path, snapshot):
    (snapshot / "model-00003.safetensors.incomplete").write_bytes(b"x")
    with pytest.raises(BundleError) as exc:
        scan_model_dir(snapshot)
    one_line(exc, "model-00003.safetensors.incomplete", "did not finish")


def test_a_link_out_of_the_source_is_refused(tmp_path, snapshot):
    (tmp_path / "secret").write_text("no")
    (snapshot / "leak.json").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError) as exc:
        scan_model_dir(snapshot)
    one_line(exc, "leak.json", "leaves the model directory")


def test_a_blob_that_is_not_what_the_hub_recorded_is_refused(tmp_path, snapshot):
    blob = (snapshot / "model-00001-of-00002.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        pack_model(snapshot, "tiny", tmp_path / "o" / "t.tar")
    one_line(exc, "model-00001-of-00002.safetensors", "the hub recorded", "download again")
    assert not (tmp_path / "o" / "t.tar").exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_weights_are_refused_unless_allowed(tmp_path, suffix):
    source = tmp_path / "plain"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / f"pytorch_model{suffix}").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BundleError) as exc:
        scan_model_dir(source)
    one_line(exc, f"pytorch_model{suffix}", "runs code", "PIPELINE_MODEL_ALLOW_PICKLE=1")
    assert len(scan_model_dir(source, allow_pickle=True)) == 2


def test_a_local_dir_download_skips_its_metadata_folder(tmp_path):
    source = tmp_path / "local"
    (source / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (source / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("x")
    (source / "config.json").write_text("{}")
    assert [f.name for f in scan_model_dir(source)] == ["config.json"]
    (source / ".cache" / "huggingface" / "download" / "w.safetensors.incomplete").write_text("")
    with pytest.raises(BundleError):
        scan_model_dir(source)


# ---- parts ----------------------------------------------------------------------------------


def test_part_sizes_parse_as_powers_of_1024():
    assert parse_part_size("4G") == 4 << 30
    assert parse_part_size("700M") == 700 << 20
    assert parse_part_size("1.5GiB") == 3 << 29
    for bad in ("", "4X", "-1G", "100K"):
        with pytest.raises(ValueError):
            parse_part_size(bad)


@pytest.fixture
def parted(tmp_path, packed):
    write_parts(packed.bundle, packed.sha256, 1 << 20)
    return packed


def test_split_and_join_are_byte_for_byte(tmp_path, parted):
    parts = read_parts_file(parts_path(parted.bundle))
    assert len(parts.parts) == 2 and parts.sha256 == parted.sha256
    away = tmp_path / "carried"
    away.mkdir()
    for p in [parts_path(parted.bundle), *(parted.bundle.with_name(x.name) for x in parts.parts)]:
        shutil.copy(p, away / p.name)
    joined = join_parts(away / parts_path(parted.bundle).name)
    assert joined.read_bytes() == parted.bundle.read_bytes()
    assert joined.with_name(joined.name + ".sha256").read_text().split()[0] == parted.sha256


@pytest.fixture
def three_parts(tmp_path, packed):
    """The bundle (about 1.6 MB) in four parts of 512 KiB (below the variable's 1M floor,
    which only the variable enforces): part 3 holds model data."""
    return write_parts(packed.bundle, packed.sha256, 512 << 10)


def test_one_flipped_byte_in_part_3_is_named_as_part_3(tmp_path, packed, three_parts):
    part3 = packed.bundle.with_name(three_parts.parts[2].name)
    data = bytearray(part3.read_bytes())
    data[1234] ^= 0xFF
    part3.write_bytes(bytes(data))
    models = tmp_path / "models"
    with pytest.raises(BundleError) as exc:
        install_model(parts_path(packed.bundle), models, say=lambda _m: None)
    message = one_line(exc, "part 3", three_parts.parts[2].sha256, "send part 3 again")
    assert "part 1 " not in message and "part 2 " not in message
    assert not (models / "tiny").exists()
    assert not any(p.name.startswith(".tiny.") for p in models.iterdir())
    with pytest.raises(BundleError) as exc:
        join_parts(parts_path(packed.bundle))
    one_line(exc, "part 3")
    assert not packed.bundle.exists() or packed.bundle.stat().st_size == three_parts.size


def test_a_missing_part_is_named_before_anything_is_read(tmp_path, packed, three_parts):
    packed.bundle.with_name(three_parts.parts[1].name).unlink()
    with pytest.raises(BundleError) as exc:
        install_model(parts_path(packed.bundle), tmp_path / "models", say=lambda _m: None)
    one_line(exc, "part 2", "is missing", three_parts.parts[1].sha256, "send part 2 again")


def test_parts_given_in_the_wrong_order_are_named(tmp_path, packed, three_parts):
    a = packed.bundle.with_name(three_parts.parts[0].name)
    b = packed.bundle.with_name(three_parts.parts[1].name)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(BundleError) as exc:
        install_model(parts_path(packed.bundle), tmp_path / "models", say=lambda _m: None)
    one_line(exc, "part 1", "part 2", "wrong order", "send parts 1, 2 again")


# ---- install-model --------------------------------------------------------------------------


def test_install_checks_every_file_and_the_same_bundle_again_reads_nothing(tmp_path, packed):
    models = tmp_path / "models"
    said: list[str] = []
    first = install_model(packed.bundle, models, say=said.append)
    assert first.installed and first.files == len(FILES)
    assert installed_files(models, "tiny") == FILES
    again = install_model(packed.bundle, models, say=said.append)
    assert not again.installed and again.reason == "nothing read"
    assert "already installed" in again.summary()
    # A copy of the same bundle: its index is read, the data is not.
    copy = tmp_path / "copy" / "tiny.model.tar"
    copy.parent.mkdir()
    shutil.copy(packed.bundle, copy)
    third = install_model(copy, models, say=said.append)
    assert not third.installed and "same content" in third.reason
    # A changed file in the installed model is installed again.
    (models / "tiny" / "config.json").write_text("changed")
    fourth = install_model(copy, models, say=said.append)
    assert fourth.installed and installed_files(models, "tiny") == FILES


def test_a_new_version_replaces_the_model_atomically(tmp_path, snapshot, packed):
    models = tmp_path / "models"
    install_model(packed.bundle, models, say=lambda _m: None)
    other = dict(FILES)
    other["config.json"] = b'{"model_type": "tiny", "v": 2}\n'
    del other["nested/extra.json"]
    snap2 = hf_cache_model(tmp_path / "hub2", "org/tiny", other)
    newer = pack_model(snap2, "tiny", tmp_path / "out2" / "tiny.model.tar")
    install_model(newer.bundle, models, say=lambda _m: None)
    assert installed_files(models, "tiny") == other
    assert sorted(p.name for p in models.iterdir()) == [".infer-vllm", "tiny"]


def test_install_is_refused_when_space_is_short(tmp_path, packed):
    """On a real 1 MiB file system (a tmpfs in a private mount namespace): the model needs
    about 1.6 MB; the shortfall is named and nothing is written."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and `unshare -m` to mount a small tmpfs; CI runs as root")
    models = tmp_path / "small"
    models.mkdir()
    code = (
        "import sys; from pathlib import Path; from pipeline.errors import BundleError;"
        "from pipeline.install.model import install_model\n"
        "try:\n"
        f"    install_model(Path({str(packed.bundle)!r}), Path({str(models)!r}), say=print)\n"
        "except BundleError as exc:\n"
        "    print('REFUSED', exc.message)\n"
        "import os; print('LEFT', sorted(os.listdir(sys.argv[1])))\n"
    )
    script = f'mount -t tmpfs -o size=1m tmpfs {models} && {sys.executable} -c "$0" {models}'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    refused = next(line for line in result.stdout.splitlines() if line.startswith("REFUSED"))
    assert "not enough space" in refused and "free" in refused and "more there" in refused
    assert "nothing was written" in refused
    assert "LEFT ['.infer-vllm']" in result.stdout


def test_an_env_bundle_is_not_a_model_bundle(tmp_path):
    """The kinds are told apart by the index, in both directions."""
    index = make_index("env", "default", [entry("pixi-pack.json", b"{}")], tool_version="1")
    bundle = write_raw(
        tmp_path / "env.tar", [(INDEX_FILE, index_json(index)), ("pixi-pack.json", b"{}")]
    )
    with pytest.raises(BundleError) as exc:
        install_model(bundle, tmp_path / "models", say=lambda _m: None)
    one_line(exc, "env bundle", "doit install")


def test_extract_refuses_a_model_bundle_and_names_install_model(tmp_path, packed):
    from pipeline.install.extract import extract_bundle

    with pytest.raises(BundleError) as exc:
        extract_bundle(packed.bundle, tmp_path / "project", environment="default", say=print)
    one_line(exc, "is a model bundle (tiny)", "doit install-model")
    assert not (tmp_path / "project" / "model").exists()


# ---- hostile bundles: refused, the previous model intact ------------------------------------


def write_raw(path: Path, members: list[tuple[str, bytes]], *, links=()) -> Path:
    """A tar with exactly these members (no checks): what an attacker or a bad copy makes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def hostile(tmp_path: Path, files: dict[str, bytes], *, listed=None, links=()) -> Path:
    """A model bundle named 'tiny' whose index lists ``listed`` (default: ``files``)."""
    listed = files if listed is None else listed
    index = make_index("model", "tiny", [entry(n, d) for n, d in listed.items()], tool_version="1")
    data = index_json(index)
    summed = f"{hashlib.sha256(data).hexdigest()}  {INDEX_FILE}\n".encode()
    return write_raw(
        tmp_path / "hostile.tar",
        [(INDEX_FILE, data), (INDEX_SUM_FILE, summed), *files.items()],
        links=links,
    )


@pytest.fixture
def installed(tmp_path, packed):
    models = tmp_path / "models"
    install_model(packed.bundle, models, say=lambda _m: None)
    return models


def assert_intact(models: Path) -> None:
    assert installed_files(models, "tiny") == FILES
    assert sorted(p.name for p in models.iterdir()) == [".infer-vllm", "tiny"]


def test_hostile_path_traversal_is_refused(tmp_path, installed):
    bad = hostile(tmp_path, {"model/config.json": b"{}", "model/../../evil": b"x"})
    with pytest.raises(BundleError) as exc:
        install_model(bad, installed, say=lambda _m: None)
    one_line(exc, "'..'", "unsafe")
    assert_intact(installed)
    assert not (tmp_path / "evil").exists()


def test_hostile_symlink_out_is_refused(tmp_path, installed):
    bad = hostile(tmp_path, {"model/config.json": b"{}"}, links=[("model/weights", "/etc/passwd")])
    with pytest.raises(BundleError) as exc:
        install_model(bad, installed, say=lambda _m: None)
    one_line(exc, "model/weights", "symlink", "unsafe")
    assert_intact(installed)


def test_hostile_file_that_differs_from_the_index_is_refused(tmp_path, installed):
    bad = hostile(
        tmp_path,
        {"model/config.json": b'{"evil":1}'},
        listed={"model/config.json": b'{"good":1}'},
    )
    with pytest.raises(BundleError) as exc:
        install_model(bad, installed, say=lambda _m: None)
    one_line(exc, "model/config.json", "damaged or was swapped")
    assert_intact(installed)


def test_hostile_unlisted_member_is_refused(tmp_path, installed):
    bad = hostile(
        tmp_path,
        {"model/config.json": b"{}", "model/extra.py": b"import os"},
        listed={"model/config.json": b"{}"},
    )
    with pytest.raises(BundleError) as exc:
        install_model(bad, installed, say=lambda _m: None)
    one_line(exc, "model/extra.py", "does not list")
    assert_intact(installed)


def test_hostile_truncated_tar_is_refused(tmp_path, packed, installed):
    cut = tmp_path / "cut.model.tar"
    cut.write_bytes(packed.bundle.read_bytes()[: packed.size // 2])
    with pytest.raises(BundleError) as exc:
        install_model(cut, installed, say=lambda _m: None)
    one_line(exc, "truncated")
    assert_intact(installed)


def test_a_damaged_tar_is_refused_by_its_file_hash_and_its_sha256_file(tmp_path, packed):
    damaged = tmp_path / "d" / "tiny.model.tar"
    damaged.parent.mkdir()
    with tarfile.open(packed.bundle) as tar:
        weights = tar.getmember("model/model-00002-of-00002.safetensors")
    data = bytearray(packed.bundle.read_bytes())
    data[weights.offset_data + 1000] ^= 1
    damaged.write_bytes(bytes(data))
    models = tmp_path / "fresh-models"
    with pytest.raises(BundleError) as exc:
        install_model(damaged, models, say=lambda _m: None)
    one_line(exc, "model-00002-of-00002.safetensors", "damaged or was swapped")
    shutil.copy(packed.bundle.with_name("tiny.model.tar.sha256"), damaged.parent)
    with pytest.raises(BundleError) as exc:
        install_model(damaged, models, say=lambda _m: None)
    one_line(exc, "has sha256", "tiny.model.tar.sha256")
    assert not (models / "tiny").exists()


def test_a_damaged_bundle_with_an_intact_index_does_not_touch_the_installed_model(
    tmp_path, packed, installed
):
    """Same index as the installed model, intact files there: nothing to install, so the
    damaged data is never read (the installed files were checked against that index)."""
    damaged = tmp_path / "d" / "tiny.model.tar"
    damaged.parent.mkdir()
    data = bytearray(packed.bundle.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    result = install_model(damaged, installed, say=lambda _m: None)
    assert not result.installed and "same content" in result.reason
    assert_intact(installed)


def test_sigkill_during_the_install_leaves_the_previous_model(tmp_path, snapshot, installed):
    """A SIGKILL at any moment: the old model or the new one, whole, and the next run cleans
    up. The install is stopped at random points of a bigger bundle, many times."""
    big = dict(FILES)
    big["model-00003.safetensors"] = os.urandom(48 << 20)
    snap = hf_cache_model(tmp_path / "hubbig", "org/tiny", big)
    bundle = pack_model(snap, "tiny", tmp_path / "big" / "tiny.model.tar").bundle
    code = (
        "import sys; from pathlib import Path; from pipeline.install.model import install_model;"
        f"install_model(Path({str(bundle)!r}), Path({str(installed)!r}), say=lambda m: None)"
    )
    states = set()
    for delay in (0.05, 0.15, 0.3, 0.5):
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        now = installed_files(installed, "tiny")
        assert now in (FILES, big), "a mix of the two models"
        states.add("old" if now == FILES else "new")
    result = install_model(bundle, installed, say=lambda _m: None)
    assert installed_files(installed, "tiny") == big
    assert sorted(p.name for p in installed.iterdir()) == [".infer-vllm", "tiny"]
    assert result.name == "tiny"


# ---- the doit tasks, offline ----------------------------------------------------------------


def test_doit_pack_model_then_install_model_offline_in_parts(tmp_path, snapshot):
    netns = shutil.which("unshare")
    if netns is None or os.geteuid() != 0:
        pytest.fail("needs `unshare -n` (root): the install must run with no network")
    out = tmp_path / "bundles" / "tiny.model.tar"
    build = doit_env(
        tmp_path / "build-state",
        PIPELINE_MODEL_SOURCE=str(snapshot),
        PIPELINE_MODEL_BUNDLE=str(out),
        PIPELINE_PART_SIZE="1M",
    )
    first = run_doit(["pack-model"], build)
    assert first.returncode == 0, first.stderr
    assert "packed model tiny.model.tar: 5 files" in first.stderr
    again = run_doit(["pack-model"], build)
    assert again.returncode == 0 and "pack-model (up to date)" in again.stderr, again.stderr
    parts = parts_path(out)
    assert parts.exists() and len(read_parts_file(parts).parts) == 2
    models = tmp_path / "models"
    runtime = doit_env(
        tmp_path / "run-state",
        AUTO_INFER_VLLM_MODEL_BUNDLES=f"{parts}",
        AUTO_INFER_VLLM_MODELS_DIR=str(models),
    )
    installed = run_doit(["install-model"], runtime, prefix=["unshare", "-n"])
    assert installed.returncode == 0, installed.stderr
    assert "installed model tiny" in installed.stderr
    assert installed_files(models, "tiny") == FILES
    noop = run_doit(["install-model"], runtime, prefix=["unshare", "-n"])
    assert noop.returncode == 0 and "install-model (up to date)" in noop.stderr
    joined = run_doit(["join-parts", "--parts", str(parts)], runtime)
    assert joined.returncode == 0, joined.stderr
    assert out.read_bytes() == (parts.parent / "tiny.model.tar").read_bytes()


def test_doit_pack_model_refusal_is_one_line(tmp_path):
    env = doit_env(tmp_path / "s", PIPELINE_MODEL_SOURCE=str(tmp_path / "nowhere"))
    result = run_doit(["pack-model"], env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a directory" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
