"""Model directories for the model-bundle tests, laid out as the Hugging Face cache lays them out
(and the one-line check of their refusals).

``huggingface_hub`` (``file_download.py``: ``_create_symlink``, ``_cache_commit_hash_for_specific_
revision``) keeps a repo as ``models--<org>--<name>/`` with ``blobs/<etag>`` (an LFS file's etag
is its sha256; a small git file's is its git blob sha1), ``refs/<revision>`` (the commit) and
``snapshots/<commit>/<path>``, a relative symlink into ``../../blobs/`` (one more ``..`` per
folder level of the path).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    """What git names a file's blob: sha1 of ``blob <size>\\0<data>``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def hf_cache_model(
    cache: Path, repo_id: str, files: Mapping[str, bytes], *, commit: str = COMMIT
) -> Path:
    """Write ``files`` (path -> bytes) as the cache holds ``repo_id`` at ``commit``; return the
    snapshot directory (what ``snapshot_download`` returns)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        lfs = rel.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (blobs / etag).write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / etag, link.parent))
    return snapshot


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (path -> bytes), links followed."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def cache_model_from(directory: Path, cache: Path, repo_id: str = "tiny-org/tiny-chat") -> Path:
    """The model in ``directory`` copied into a Hugging Face cache layout under ``cache``."""
    return hf_cache_model(cache, repo_id, files_of(directory))


def one_line(exc: pytest.ExceptionInfo[PipelineError], *needles: str) -> str:
    """The refusal's message, which must be one line holding every needle."""
    message = exc.value.message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message
