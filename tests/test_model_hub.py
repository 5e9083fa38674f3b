"""``doit pack-model`` from a hub id, through the real huggingface_hub: ``HF_ENDPOINT`` points
it at a loopback stand-in for the Hub (:mod:`hub_server`) that serves one tiny model repo.

What is checked: the bundle holds every file the hub served, with its sha256, and records the
repo and the commit; the token goes to the hub and nowhere else (not into the output); a
refused token is one ``error:`` line; a download damaged on its way (bytes that are not the
sha256 the hub announced) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import doit_env, run_doit
from hub_server import HARNESSES, HUB_COMMIT, HubServer

from pipeline.bundle.format import INDEX_FILE

REPO_ID = "org/tiny-chat"
TOKEN = "hf_loopbackTestToken0123456789abcdef"
FILES = {
    "config.json": b'{"model_type": "tiny", "vocab_size": 64}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}\n',
    "model.safetensors": os.urandom(6000),
}


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(REPO_ID, FILES, token=TOKEN) as server:
        yield server


def pack_from_hub(tmp_path: Path, endpoint: str, token: str) -> subprocess.CompletedProcess[str]:
    """`doit pack-model` of REPO_ID from ``endpoint``, with nothing of this machine's Hugging
    Face setup (HF_* variables, ~/.cache/huggingface) in the way."""
    env = doit_env(tmp_path / "state")
    env = {k: v for k, v in env.items() if not k.startswith("HF_")}
    env.update(
        PIPELINE_MODEL_SOURCE=REPO_ID,
        PIPELINE_PACK_CACHE=str(tmp_path / "cache"),
        PIPELINE_MODEL_BUNDLE=str(tmp_path / "tiny-chat.model.tar"),
        HF_ENDPOINT=endpoint,
        HF_TOKEN=token,
        HF_HOME=str(tmp_path / "hf-home"),
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    return run_doit(["pack-model"], env, timeout=60)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pack_model_from_the_hub(tmp_path, hub):
    result = pack_from_hub(tmp_path, hub.endpoint, TOKEN)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    with tarfile.open(tmp_path / "tiny-chat.model.tar") as tar:
        index = json.loads(tar.extractfile(INDEX_FILE).read())
        packed = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert index["source"] == {"repo": REPO_ID, "revision": HUB_COMMIT}
    listed = {f["name"]: (f["size"], f["sha256"]) for f in index["files"]}
    assert listed == {f"model/{p}": (len(d), sha256(d)) for p, d in FILES.items()}
    assert {n: d for n, d in packed.items() if n.startswith("model/")} == {
        f"model/{p}": d for p, d in FILES.items()
    }
    # The LFS file's blob is named by the sha256 the hub announced: what pack-model checks.
    blobs = tmp_path / "cache" / "huggingface" / "models--org--tiny-chat" / "blobs"
    assert (blobs / sha256(FILES["model.safetensors"])).is_file()
    # Only the plain HTTP endpoints were asked (no Xet), each once, all with the token.
    resolve = f"/{REPO_ID}/resolve/{HUB_COMMIT}/"
    bearer = f"Bearer {TOKEN}"
    assert sorted((s.method, s.path, s.authorization) for s in hub.seen()) == sorted(
        [
            ("GET", HARNESSES, None),
            ("GET", f"/api/models/{REPO_ID}/revision/main", bearer),
            ("GET", f"/api/models/{REPO_ID}/tree/{HUB_COMMIT}", bearer),
            *[(method, resolve + p, bearer) for p in FILES for method in ("HEAD", "GET")],
        ]
    )
    # Again: the revision is looked up (it may have moved), the files come from the cache.
    before = len(hub.seen())
    again = pack_from_hub(tmp_path, hub.endpoint, TOKEN)
    assert again.returncode == 0 and "tiny-chat.model.tar is up to date" in again.stderr, (
        again.stderr
    )
    assert [(s.path, s.authorization) for s in hub.seen()[before:]] == [
        (f"/api/models/{REPO_ID}/revision/main", bearer)
    ]


def test_a_refused_token_is_one_line(tmp_path, hub):
    wrong = "hf_wrongTokenNotTheHubs9876543210"
    result = pack_from_hub(tmp_path, hub.endpoint, wrong)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert REPO_ID in errors[0] and "HF_TOKEN" in errors[0] and "401" in errors[0], errors[0]
    assert wrong not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    asked = [(s.path, s.authorization) for s in hub.seen() if s.path != HARNESSES]
    assert asked == [(f"/api/models/{REPO_ID}/revision/main", f"Bearer {wrong}")]
    assert not (tmp_path / "tiny-chat.model.tar").exists()


def test_changed_bytes_are_refused_by_pack_model(tmp_path):
    """The safetensors bytes arrive changed, at the right size: huggingface_hub checks the
    size only and stores them as ``blobs/<the sha256 the hub announced>``; pack-model hashes
    the blob, finds another sha256, and refuses in one line."""
    good = FILES["model.safetensors"]
    bad = bytes([good[0] ^ 0xFF]) + good[1:]
    with HubServer(REPO_ID, FILES, token=TOKEN, damaged={"model.safetensors": bad}) as hub:
        result = pack_from_hub(tmp_path, hub.endpoint, TOKEN)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert "model.safetensors" in errors[0] and "the hub recorded" in errors[0], errors[0]
    assert sha256(bad)[:16] in errors[0] and sha256(good)[:16] in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    blobs = tmp_path / "cache" / "huggingface" / "models--org--tiny-chat" / "blobs"
    assert (blobs / sha256(good)).read_bytes() == bad  # what huggingface_hub let through
    assert not (tmp_path / "tiny-chat.model.tar").exists()


def test_a_short_download_is_refused_by_huggingface_hub(tmp_path):
    """The safetensors file arrives cut short (a complete answer of fewer bytes than the
    ``X-Linked-Size`` announced): huggingface_hub refuses it, nothing reaches the cache."""
    short = FILES["model.safetensors"][:1000]
    with HubServer(REPO_ID, FILES, token=TOKEN, damaged={"model.safetensors": short}) as hub:
        result = pack_from_hub(tmp_path, hub.endpoint, TOKEN)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert f"cannot download {REPO_ID}@main" in errors[0], errors[0]
    assert "should be of size 6000 but has size 1000" in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    blobs = tmp_path / "cache" / "huggingface" / "models--org--tiny-chat" / "blobs"
    assert not (blobs / sha256(FILES["model.safetensors"])).exists()
    assert not (tmp_path / "tiny-chat.model.tar").exists()
