"""Signed bundles: the index signed with an SSH key by the pack, checked against an
``allowed_signers`` file by both installs before anything is written, with this host's real
``ssh-keygen`` (OpenSSH). Keys are made here (Ed25519, no passphrase).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import doit_env, run_doit
from model_factory import hf_cache_model, one_line

from pipeline.build.model import pack_model
from pipeline.bundle.format import SIG_FILE
from pipeline.bundle.parts import parts_path
from pipeline.bundle.signature import signature_path
from pipeline.errors import BundleError
from pipeline.install.model import install_model

FILES = {"config.json": b'{"model_type": "tiny"}\n', "model.safetensors": os.urandom(200_000)}

if shutil.which("ssh-keygen") is None:  # pragma: no cover - OpenSSH is on every CI machine
    pytest.fail("ssh-keygen (OpenSSH) is needed for the signature tests", pytrace=False)


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    builder = keygen(root / "builder", "builder@site")
    stranger = keygen(root / "stranger", "stranger@elsewhere")
    allowed = root / "allowed_signers"
    public = (root / "builder.pub").read_text().split()
    allowed.write_text(f'builder@site namespaces="infer-vllm-bundle" {public[0]} {public[1]}\n')
    return {"builder": builder, "stranger": stranger, "allowed": allowed}


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return hf_cache_model(tmp_path / "hub", "org/tiny", FILES)


def signed_bundle(tmp_path: Path, snapshot: Path, key: Path, tag: str = "a") -> Path:
    out = tmp_path / f"out-{key.name}-{tag}" / "tiny.model.tar"
    return pack_model(snapshot, "tiny", out, signing_key=key).bundle


def test_a_signed_model_bundle_installs_and_names_its_signer(tmp_path, snapshot, keys):
    bundle = signed_bundle(tmp_path, snapshot, keys["builder"])
    with tarfile.open(bundle) as tar:
        inside = tar.extractfile(SIG_FILE).read()  # type: ignore[union-attr]
    assert inside.startswith(b"-----BEGIN SSH SIGNATURE-----")
    assert signature_path(bundle).read_bytes() == inside, "beside it too"
    said: list[str] = []
    result = install_model(
        bundle, tmp_path / "models", say=said.append, trusted_signers=keys["allowed"]
    )
    assert result.installed
    assert any("signed by builder@site" in line for line in said), said


def test_without_a_trust_file_the_install_says_it_did_not_check(tmp_path, snapshot, keys):
    bundle = pack_model(snapshot, "tiny", tmp_path / "u" / "tiny.model.tar").bundle
    said: list[str] = []
    install_model(bundle, tmp_path / "models", say=said.append)
    assert [line for line in said if "not checked for a signature" in line] != []


def test_an_unsigned_bundle_is_refused_when_a_trust_file_is_set(tmp_path, snapshot, keys):
    bundle = pack_model(snapshot, "tiny", tmp_path / "u" / "tiny.model.tar").bundle
    with pytest.raises(BundleError) as exc:
        install_model(bundle, tmp_path / "models", say=print, trusted_signers=keys["allowed"])
    one_line(exc, "is not signed", "AUTO_INFER_VLLM_TRUSTED_SIGNERS", "PIPELINE_SIGNING_KEY")
    assert not (tmp_path / "models" / "tiny").exists()


def test_an_unknown_signer_is_refused(tmp_path, snapshot, keys):
    bundle = signed_bundle(tmp_path, snapshot, keys["stranger"])
    with pytest.raises(BundleError) as exc:
        install_model(bundle, tmp_path / "models", say=print, trusted_signers=keys["allowed"])
    one_line(exc, "signed by a key that", "does not list")
    assert not (tmp_path / "models" / "tiny").exists()


def rewrite(bundle: Path, out: Path, change: dict[str, bytes]) -> Path:
    """``bundle`` with the data of some members replaced (and nothing beside it)."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name in change:
                data = change[member.name]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out


def test_a_signature_from_another_bundle_is_refused(tmp_path, snapshot, keys):
    mine = signed_bundle(tmp_path, snapshot, keys["builder"])
    other_files = dict(FILES, **{"config.json": b'{"model_type": "other"}\n'})
    other = signed_bundle(
        tmp_path,
        hf_cache_model(tmp_path / "hub2", "org/tiny", other_files),
        keys["builder"],
        tag="other",
    )
    swapped = rewrite(
        mine, tmp_path / "swapped.model.tar", {SIG_FILE: signature_path(other).read_bytes()}
    )
    with pytest.raises(BundleError) as exc:
        install_model(swapped, tmp_path / "models", say=print, trusted_signers=keys["allowed"])
    one_line(exc, "the signature by builder@site is not a signature of this bundle's index")


def test_a_flipped_byte_in_the_signature_is_refused(tmp_path, snapshot, keys):
    bundle = signed_bundle(tmp_path, snapshot, keys["builder"])
    sig = bytearray(signature_path(bundle).read_bytes())
    sig[120] = ord("A") if sig[120] != ord("A") else ord("B")  # inside the base64 body
    damaged = rewrite(bundle, tmp_path / "damaged.model.tar", {SIG_FILE: bytes(sig)})
    with pytest.raises(BundleError) as exc:
        install_model(damaged, tmp_path / "models", say=print, trusted_signers=keys["allowed"])
    assert "refusing it" in one_line(exc)


def test_a_flipped_byte_in_the_index_is_refused_with_a_signature_set(tmp_path, snapshot, keys):
    bundle = signed_bundle(tmp_path, snapshot, keys["builder"])
    with tarfile.open(bundle) as tar:
        index = bytearray(tar.extractfile("infer-vllm-index.json").read())  # type: ignore[union-attr]
    index[index.index(b'"tiny"') + 1] = ord("x")
    damaged = rewrite(bundle, tmp_path / "d.model.tar", {"infer-vllm-index.json": bytes(index)})
    with pytest.raises(BundleError):
        install_model(damaged, tmp_path / "models", say=print, trusted_signers=keys["allowed"])
    assert not (tmp_path / "models").exists() or not any(
        p.name != ".infer-vllm" for p in (tmp_path / "models").iterdir()
    )


def test_doit_signs_the_model_and_its_parts_and_install_model_checks_them(tmp_path, snapshot, keys):
    out = tmp_path / "bundles" / "tiny.model.tar"
    build = doit_env(
        tmp_path / "build-state",
        PIPELINE_MODEL_SOURCE=str(snapshot),
        PIPELINE_MODEL_BUNDLE=str(out),
        PIPELINE_PART_SIZE="1M",
        PIPELINE_SIGNING_KEY=str(keys["builder"]),
    )
    packed = run_doit(["pack-model"], build)
    assert packed.returncode == 0, packed.stderr
    assert signature_path(out).exists() and signature_path(parts_path(out)).exists()
    runtime = doit_env(
        tmp_path / "run-state",
        AUTO_INFER_VLLM_MODEL_BUNDLES=str(parts_path(out)),
        AUTO_INFER_VLLM_MODELS_DIR=str(tmp_path / "models"),
        AUTO_INFER_VLLM_TRUSTED_SIGNERS=str(keys["allowed"]),
    )
    installed = run_doit(["install-model"], runtime, prefix=["unshare", "-n"])
    assert installed.returncode == 0, installed.stderr
    assert "signed by builder@site" in installed.stderr
    strangers = tmp_path / "strangers"
    strangers.write_text(keys["allowed"].read_text().replace("builder@site", "someone@else", 1))
    strangers.write_text(
        "someone@else "
        + (keys["stranger"].with_suffix(".pub")).read_text().split(" ", 2)[0]
        + " "
        + keys["stranger"].with_suffix(".pub").read_text().split()[1]
        + "\n"
    )
    refused = run_doit(
        ["install-model"],
        {**runtime, "AUTO_INFER_VLLM_TRUSTED_SIGNERS": str(strangers),
         "AUTO_INFER_VLLM_MODELS_DIR": str(tmp_path / "models2")},
    )  # fmt: skip
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not list" in errors[0], refused.stderr
