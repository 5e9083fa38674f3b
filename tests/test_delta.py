"""Delta bundles (pipeline.bundle.delta): two real packs of the local test channel that differ
by one wheel (tinywheel 0.1 -> 0.2), the delta between them, and its install and rebuild.

The packs are the pack stage's own (py-rattler lock, HTTP fetch, the bundle writer); the
installs are the extract stage's. What the delta must give is the full new bundle: the
rebuilt tar is compared byte for byte, the extraction file by file.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from model_factory import one_line

from pipeline.build.lock import lock
from pipeline.build.pack import PackResult, pack
from pipeline.bundle.delta import (
    DELTA_FILE,
    InstalledBase,
    is_delta,
    open_delta,
    read_manifest,
    rebuild_bundle,
    write_delta,
)
from pipeline.bundle.parts import parts_path, write_parts
from pipeline.demo.channel import build_channel, build_wheel, serve_directory, write_pixi_toml
from pipeline.errors import BundleError
from pipeline.install.extract import extract_bundle
from pipeline.install.layout import ProjectPaths, read_extract_record

QUIET = io.StringIO()


def quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class Packs:
    base: PackResult
    new: PackResult
    other: PackResult  # the same lock without the wheel: neither base nor target
    hooked: PackResult  # tinywheel 0.3, which ships a `.pth` startup hook
    delta: Path
    wheel: str  # the new wheel's member name


def _add_wheel(lock_path: Path, url: str, version: str, sha256: str) -> None:
    """tinywheel into environment ``default`` on linux-64 (a text edit: py-rattler cannot
    modify a lock it has read)."""
    text = lock_path.read_text()
    head = text.index("      linux-64:\n", text.index("  default:\n")) + len("      linux-64:\n")
    entry = f"- pypi: {url}\n  name: tinywheel\n  version: '{version}'\n  sha256: {sha256}\n"
    lock_path.write_text(text[:head] + f"      - pypi: {url}\n" + text[head:] + entry)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Packs]:
    root = tmp_path_factory.mktemp("delta")
    channel = build_channel(root / "channel")
    wheels = {v: build_wheel(channel.root / "wheels", version=v) for v in ("0.1", "0.2")}
    hook = {"tinywheel_hook.pth": b"import os\n"}
    wheels["0.3"] = build_wheel(channel.root / "wheels", version="0.3", extra=hook)
    with serve_directory(channel.root) as url:
        project = root / "project"
        write_pixi_toml(
            project, channels=[url], dependencies={"tinytool": "*", "tinydata": "*", "python": "*"}
        )
        assert lock(project, pixi=None, cache_dir=root / "repodata").outcome == "solved"
        plain = (project / "pixi.lock").read_text()
        results = {}
        for version, wheel in [*wheels.items(), ("none", None)]:
            (project / "pixi.lock").write_text(plain)
            if wheel is not None:
                sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
                _add_wheel(project / "pixi.lock", f"{url}wheels/{wheel.name}", version, sha)
            out = root / f"v{version}" / "bundle.tar"
            results[version] = packed = pack(project, out, root / "cache", progress_stream=QUIET)
            # what `doit pack` writes beside it (pack:sha256)
            out.with_name(out.name + ".sha256").write_text(f"{packed.sha256}  {out.name}\n")
    base, new = results["0.1"], results["0.2"]
    del wheels["0.3"]
    delta = root / "bundle.delta.tar"
    write_delta(new.bundle, new.sha256, base.bundle, delta, progress_stream=QUIET)
    yield Packs(base, new, results["none"], results["0.3"], delta, f"pypi/{wheels['0.2'].name}")


def _extraction(project: Path) -> dict[str, str]:
    """Every file the extraction wrote, with its sha256 (the project's own state aside)."""
    return {
        str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(project.rglob("*"))
        if p.is_file() and ".infer-vllm" not in p.parts
    }


def _copy(src: Path, dest: Path, *, sha256: bool = True) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    if sha256:
        shutil.copy(src.with_name(src.name + ".sha256"), dest.with_name(dest.name + ".sha256"))
    return dest


# ---- the delta ------------------------------------------------------------------------------


def test_the_delta_carries_only_the_new_wheel_and_the_generated_files(packs: Packs):
    manifest = read_manifest(packs.delta)
    assert is_delta(packs.delta) and not is_delta(packs.new.bundle)
    carried = [m.name for m in manifest.members if m.source == "delta"]
    assert carried == [packs.wheel]
    from_base = {m.name for m in manifest.members if m.source == "base"}
    with tarfile.open(packs.new.bundle) as tar:
        packages = {
            n for n in tar.getnames() if n.startswith(("channel/", "pypi/")) and "." in n
        } - {n for n in tar.getnames() if n.endswith("repodata.json")}
    assert from_base == packages - {packs.wheel}
    assert (manifest.base.sha256, manifest.target.sha256) == (packs.base.sha256, packs.new.sha256)
    with tarfile.open(packs.delta) as tar:
        names = tar.getnames()
    assert names[0] == "delta" and DELTA_FILE in names
    assert f"delta/{packs.wheel}" in names
    assert not any(n.startswith("delta/channel/linux-64/") and n.endswith(".conda") for n in names)
    expected = hashlib.sha256(packs.delta.read_bytes()).hexdigest()
    assert packs.delta.with_name(packs.delta.name + ".sha256").read_text().split()[0] == expected


def test_the_full_bundle_is_rebuilt_byte_for_byte_from_the_base_tar_or_its_parts(
    packs: Packs, tmp_path
):
    for base in (packs.base.bundle, None):
        if base is None:  # the base in parts, the tar itself gone
            carried = _copy(packs.base.bundle, tmp_path / "parts" / "bundle.tar")
            write_parts(carried, packs.base.sha256, 1 << 20, progress_stream=QUIET)
            carried.unlink()
            base = parts_path(carried)
        source, _ = open_delta(packs.delta, None, base_bundle=base)
        out = tmp_path / f"rebuilt-{base.name}.tar"
        with source:
            rebuild_bundle(source, out, progress_stream=QUIET)
        assert out.read_bytes() == packs.new.bundle.read_bytes()
        assert out.with_name(out.name + ".sha256").read_text().split()[0] == packs.new.sha256


def test_a_delta_installs_over_the_installed_base_as_the_full_bundle_does(packs: Packs, tmp_path):
    full = tmp_path / "full"
    extract_bundle(packs.new.bundle, full, environment="default", say=quiet)
    project = tmp_path / "project"
    extract_bundle(packs.base.bundle, project, environment="default", say=quiet)
    said: list[str] = []
    result = extract_bundle(packs.delta, project, environment="default", say=said.append)
    assert result.extracted and result.sha256 == packs.new.sha256, said
    assert _extraction(project) == _extraction(full)
    record = read_extract_record(ProjectPaths.of(project))
    assert record is not None and record.sha256 == packs.new.sha256
    again = extract_bundle(packs.delta, project, environment="default", say=quiet)
    assert not again.extracted
    # The installed extraction is now the new bundle: the delta's base is gone from it.
    with pytest.raises(BundleError) as exc:
        open_delta(
            packs.delta,
            None,
            installed=InstalledBase("the project", packs.new.sha256, {}),
        )
    message = one_line(exc)
    assert packs.base.sha256 in message and packs.new.sha256 in message


def test_a_delta_over_a_base_bundle_installs_into_an_empty_project(packs: Packs, tmp_path):
    result = extract_bundle(
        packs.delta,
        tmp_path / "project",
        environment="default",
        say=quiet,
        base_bundle=packs.base.bundle,
    )
    assert result.sha256 == packs.new.sha256
    with pytest.raises(BundleError) as exc:
        extract_bundle(packs.delta, tmp_path / "empty", environment="default", say=quiet)
    assert "AUTO_INFER_VLLM_BASE_BUNDLE_PATH" in one_line(exc)


# ---- refusals: nothing changes --------------------------------------------------------------


def test_a_delta_for_another_base_is_refused_naming_both_sha256s(packs: Packs, tmp_path):
    project = tmp_path / "project"
    extract_bundle(packs.other.bundle, project, environment="default", say=quiet)
    before = _extraction(project)
    with pytest.raises(BundleError) as exc:
        extract_bundle(packs.delta, project, environment="default", say=quiet)
    message = one_line(exc)
    assert packs.base.sha256 in message and packs.other.sha256 in message
    # a base bundle that is not the delta's: the new bundle itself
    with pytest.raises(BundleError) as exc:
        extract_bundle(
            packs.delta, project, environment="default", say=quiet, base_bundle=packs.new.bundle
        )
    message = one_line(exc)
    assert packs.base.sha256 in message and packs.new.sha256 in message
    assert _extraction(project) == before


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _data_offset(tar_path: Path, name: str) -> int:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name).offset_data


def test_a_flipped_byte_in_the_delta_or_the_base_is_named_and_nothing_changes(
    packs: Packs, tmp_path
):
    project = tmp_path / "project"
    extract_bundle(packs.base.bundle, project, environment="default", say=quiet)
    before = _extraction(project)
    # In the carried wheel, with the delta's .sha256: the delta itself is refused.
    delta = _copy(packs.delta, tmp_path / "d1" / packs.delta.name)
    _flip(delta, _data_offset(delta, f"delta/{packs.wheel}") + 10)
    with pytest.raises(BundleError) as exc:
        extract_bundle(delta, project, environment="default", say=quiet)
    assert "sha256" in exc.value.message and str(delta) in exc.value.message
    # Without its .sha256: the rebuilt bundle's check names the wheel and the delta.
    delta.with_name(delta.name + ".sha256").unlink()
    with pytest.raises(BundleError) as exc:
        extract_bundle(delta, project, environment="default", say=quiet)
    message = one_line(exc)
    assert packs.wheel in message and "the delta" in message
    # In a conda package of the base bundle (its index untouched, no .sha256): named, "base".
    base = _copy(packs.base.bundle, tmp_path / "b" / "bundle.tar", sha256=False)
    manifest = read_manifest(packs.delta)
    conda = next(m for m in manifest.members if m.source == "base" and m.name.endswith(".conda"))
    _flip(base, _data_offset(base, conda.name) + 5)
    with pytest.raises(BundleError) as exc:
        extract_bundle(packs.delta, tmp_path / "other", environment="default", say=quiet,
                       base_bundle=base)  # fmt: skip
    message = one_line(exc)
    assert conda.name in message and "base" in message
    assert not (tmp_path / "other" / "pixi.lock").exists()
    # An installed base file changed since it was extracted: not taken, named.
    wheel_base = next(m for m in manifest.members if m.source == "base")
    (project / wheel_base.name).write_bytes(b"changed")
    with pytest.raises(BundleError) as exc:
        extract_bundle(packs.delta, project, environment="default", say=quiet)
    assert wheel_base.name in one_line(exc)
    before[wheel_base.name] = hashlib.sha256(b"changed").hexdigest()
    assert _extraction(project) == before


def test_a_delta_with_a_changed_manifest_is_refused(packs: Packs, tmp_path):
    """The manifest says another target size: refused before anything is read."""
    delta = tmp_path / "d" / packs.delta.name
    delta.parent.mkdir()
    with (
        tarfile.open(packs.delta) as src,
        tarfile.open(delta, "w", format=tarfile.GNU_FORMAT) as out,
    ):
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == DELTA_FILE:
                doc = json.loads(data)  # type: ignore[arg-type]
                doc["target"]["size"] += 512
                data = json.dumps(doc).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(BundleError) as exc:
        extract_bundle(delta, tmp_path / "p", environment="default", say=quiet,
                       base_bundle=packs.base.bundle)  # fmt: skip
    assert "corrupt" in one_line(exc)


# ---- signatures -----------------------------------------------------------------------------


def test_a_signed_delta_carries_the_new_index_signature_and_an_unsigned_one_is_refused(
    packs: Packs, tmp_path
):
    import subprocess

    from pipeline.bundle.signature import signature_path

    key = tmp_path / "builder"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(key)],
        check=True,
        timeout=30,
    )
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"builder@site {kind} {blob}\n")
    lock_dir = tmp_path / "proj"
    lock_dir.mkdir()
    extras = json.loads(_member(packs.new.bundle, "infer-vllm-bundle.json"))
    (lock_dir / "pixi.lock").write_text(extras["pixi_lock"])
    (lock_dir / "pixi.toml").write_text(extras["pixi_toml"])
    cache = packs.base.bundle.parent.parent / "cache"
    signed = pack(lock_dir, tmp_path / "s" / "bundle.tar", cache, signing_key=key,
                  progress_stream=QUIET)  # fmt: skip
    delta = tmp_path / "s" / "bundle.delta.tar"
    write_delta(signed.bundle, signed.sha256, packs.base.bundle, delta, progress_stream=QUIET)
    assert signature_path(delta).read_bytes() == _member(signed.bundle, "infer-vllm-index.sig")
    said: list[str] = []
    result = extract_bundle(delta, tmp_path / "p", environment="default", say=said.append,
                            base_bundle=packs.base.bundle, trusted_signers=allowed)  # fmt: skip
    assert result.sha256 == signed.sha256
    assert any("signed by builder@site" in line for line in said), said
    with pytest.raises(BundleError) as exc:
        extract_bundle(packs.delta, tmp_path / "q", environment="default", say=quiet,
                       base_bundle=packs.base.bundle, trusted_signers=allowed)  # fmt: skip
    assert "not signed" in one_line(exc)
    assert not (tmp_path / "q" / "pixi.lock").exists()


def _member(tar_path: Path, name: str) -> bytes:
    with tarfile.open(tar_path) as tar:
        stream = tar.extractfile(name)
        assert stream is not None
        return stream.read()


def test_doit_sbom_reads_the_sbom_a_delta_carries(packs: Packs):
    from pipeline.bundle.sbom import read_bundle_sbom

    document, where = read_bundle_sbom(packs.delta)
    assert "inside the delta" in where
    assert document == _member(packs.new.bundle, "infer-vllm-sbom.cdx.json")


# ---- the switch: the base's files go only once the new environment runs -----------------------


def test_a_refused_delta_install_puts_the_base_back_and_a_good_one_removes_its_old_files(
    packs: Packs, tmp_path
):
    from pipeline.errors import InstallError
    from pipeline.install.frozen import frozen_install
    from pipeline.install.host import HostFacts
    from pipeline.install.patch import patch_project

    host = HostFacts(platform="linux-64", glibc="2.36", linux="6.1.0", cuda=None)
    cache = tmp_path / "pkgs"

    def install(bundle: Path) -> None:
        extract_bundle(bundle, project, environment="default", say=quiet)
        patch_project(project, "default", say=quiet)
        frozen_install(project, "default", cache_dir=cache, facts=host, say=quiet)

    project = tmp_path / "project"
    install(packs.base.bundle)
    paths = ProjectPaths.of(project)
    running = paths.env_link("default").readlink()
    base_lock = (project / "pixi.lock").read_bytes()
    old_wheel = project / "pypi" / "tinywheel-0.1-py3-none-any.whl"
    assert old_wheel.is_file()
    # A delta whose new environment the install policy refuses (a startup hook): the running
    # environment stays, and so do the base's files it runs from.
    hooked = tmp_path / "hooked.delta.tar"
    write_delta(packs.hooked.bundle, packs.hooked.sha256, packs.base.bundle, hooked,
                progress_stream=QUIET)  # fmt: skip
    with pytest.raises(InstallError) as exc:
        install(hooked)
    assert "startup hook" in exc.value.message
    assert paths.env_link("default").readlink() == running
    assert (project / "pixi.lock").read_bytes() == base_lock and old_wheel.is_file()
    record = read_extract_record(paths)
    assert record is not None and record.sha256 == packs.base.sha256
    # The good delta, over the same installed base: switched in, then the old files go.
    install(packs.delta)
    assert paths.env_link("default").readlink() != running
    assert not old_wheel.exists() and (project / packs.wheel).is_file()
    assert not paths.previous.exists()
