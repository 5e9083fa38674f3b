"""``doit pack-model``: a model's weights as a bundle with a hash for every file.

The source (``PIPELINE_MODEL_SOURCE``) is a local model directory, as ``hf download`` or
``huggingface-cli download`` wrote it (a ``--local-dir`` folder, or a snapshot of the Hugging
Face cache, whose files are symlinks into ``blobs/``), or a hub id, fetched with
``huggingface_hub`` (``HF_ENDPOINT``, ``HF_TOKEN``, ``PIPELINE_MODEL_REVISION``) into the pack
cache. :func:`scan_model_dir` refuses, in one line each, what must not cross the gap:

- a download that did not finish (``*.incomplete`` files: ``hf download`` can exit 0 and leave
  them, huggingface_hub#4223);
- a symlink that leaves the source (the cache's own snapshot links into its ``blobs/`` are
  followed), and a dangling one;
- a file whose sha256 is not the one the hub recorded: the cache stores LFS files under their
  sha256 (``blobs/<sha256>``), so the name is the hub's record;
- pickle-format weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``), unless
  ``PIPELINE_MODEL_ALLOW_PICKLE=1``: loading a pickle runs code, loading safetensors does not.

:func:`pack_model` then hashes every file (the index comes first in the tar), writes the
bundle with the tar writer (which hashes each file again while it copies it: a file changed
in between is refused), the ``.sha256`` beside it and, with ``PIPELINE_PART_SIZE``, its parts.
The bundle is ``infer-vllm-index.json``, its sha256 (``infer-vllm-index.sha256``), then
``model/<the files>``; members sorted, fixed metadata: the same files give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline import __version__
from pipeline.bundle.format import INDEX_FILE, INDEX_SUM_FILE, MODEL_DIR, SIG_FILE, checksum_path
from pipeline.bundle.index import IndexedFile, index_digest, index_json, make_index
from pipeline.bundle.parts import PartsFile, write_parts
from pipeline.bundle.signature import sign, signature_path, write_signature
from pipeline.bundle.tar import MemberMismatch, TarMember, write_tar
from pipeline.errors import BundleError
from pipeline.fsutil import Fingerprint, atomic_write_text, sha256_file
from pipeline.progress import Progress, human_bytes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
# What `hf download --local-dir` keeps beside the files (its own metadata), never packed.
_LOCAL_DIR_METADATA = ".cache"


@dataclass(frozen=True)
class ModelFile:
    """One file of the model: its name under ``model/``, the real file, its size, and the
    sha256 the hub recorded for it (the cache's blob name), when there is one."""

    name: str
    path: Path
    size: int
    hub_sha256: str | None = None


@dataclass(frozen=True)
class ModelPackResult:
    bundle: Path
    sha256: str
    size: int
    files: int
    model_bytes: int
    index_sha256: str
    parts: PartsFile | None

    def summary(self) -> str:
        parts = f", {len(self.parts.parts)} parts" if self.parts else ""
        return (
            f"packed model {self.bundle.name}: {self.files} files, "
            f"{human_bytes(self.model_bytes)} ({self.sha256[:12]}{parts})"
        )


def check_model_name(name: str, where: str = "PIPELINE_MODEL_NAME") -> str:
    """A model's name under the models dir: letters, digits, ``.``, ``_``, ``-``; no leading
    dot. Raises BundleError naming ``where``."""
    if not _NAME.match(name) or name in (".", ".."):
        raise BundleError(
            f"{where}={name!r} is not a usable model name: use letters, digits, '.', '_' and "
            "'-' (at most 128, not starting with '.' or '-'); it becomes /models/<name>"
        )
    return name


def default_model_name(source: str) -> str:
    """The name a source gives when ``PIPELINE_MODEL_NAME`` is unset: a hub id's or a cache
    repo's last part (``Qwen/Qwen2-VL-7B-Instruct`` -> ``Qwen2-VL-7B-Instruct``), else the
    directory's name."""
    path = Path(source)
    repo = hf_cache_repo(path)
    if repo is not None:
        return repo[0].split("/")[-1]
    if _HUB_ID.match(source) and not path.exists():
        return source.split("/")[-1]
    return path.absolute().name


def hf_cache_repo(path: Path) -> tuple[str, str] | None:
    """``(repo id, commit)`` when ``path`` is a snapshot of the Hugging Face cache
    (``.../models--org--name/snapshots/<commit>``), else None. Pure."""
    parts = path.absolute().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/"), parts[-1]
    return None


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


# ---- the source -----------------------------------------------------------------------------


def download_model(
    repo_id: str,
    revision: str | None,
    cache_dir: Path,
    *,
    endpoint: str | None,
    token: str | None,
) -> Path:
    """Fetch ``repo_id`` at ``revision`` with ``huggingface_hub`` into ``cache_dir`` (the
    Hugging Face cache layout) and return the snapshot directory. Raises BundleError with
    huggingface_hub's reason in one line (never the token)."""
    try:
        import httpx2  # huggingface_hub's HTTP client: connection, protocol and proxy errors
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - a declared dependency
        raise BundleError(
            "huggingface_hub is not installed; `pip install huggingface_hub`, or set "
            "PIPELINE_MODEL_SOURCE to a local model directory"
        ) from None
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token or False,
        )
    except (HfHubHTTPError, OSError, ValueError, httpx2.HTTPError) as exc:
        text = " ".join(str(exc).split())
        if token:
            text = text.replace(token, "<HF_TOKEN>")
        where = endpoint or "https://huggingface.co"
        raise BundleError(
            f"cannot download {repo_id}@{revision or 'main'} from {where} "
            f"({type(exc).__name__}: {text[:300]}); check PIPELINE_MODEL_SOURCE, "
            "PIPELINE_MODEL_REVISION, HF_ENDPOINT and HF_TOKEN"
        ) from None
    return Path(folder)


def scan_model_dir(root: Path, *, allow_pickle: bool = False) -> list[ModelFile]:
    """The files of the model directory ``root``, sorted by name, with the refusals of the
    module docstring. Directories are walked without following links; a link to a file is
    followed where it stays inside ``root`` (or, for a cache snapshot, inside the repo's
    ``blobs/``). Raises BundleError (one line, naming the file and what to do)."""
    root = root.absolute()
    if not root.is_dir():
        raise BundleError(
            f"model source {root} is not a directory; set PIPELINE_MODEL_SOURCE to a model "
            "directory or a hub id (org/name)"
        )
    allowed = [root.resolve()]
    blobs: Path | None = None
    if hf_cache_repo(root) is not None:
        blobs = (root.parent.parent / "blobs").resolve()
        allowed.append(blobs)
    found: list[ModelFile] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        rel_dir = here.relative_to(root)
        # `hf download --local-dir` keeps its own metadata (and its unfinished downloads)
        # in .cache/huggingface/: never packed, but an unfinished download there is refused.
        metadata = rel_dir.parts[:1] == (_LOCAL_DIR_METADATA,)
        for entry in sorted(dirs):
            if (here / entry).is_symlink():
                raise BundleError(
                    f"model source {root}: {rel_dir / entry} is a link to a directory; copy "
                    "the directory in instead"
                )
        for entry in sorted(files):
            path = here / entry
            rel = (rel_dir / entry).as_posix()
            if entry.endswith(".incomplete"):
                raise BundleError(
                    f"model source {root} holds {rel}: a download that did not finish; run the "
                    "download again until no *.incomplete files remain"
                )
            if metadata:
                continue
            if _CONTROL.search(rel):
                raise BundleError(
                    f"model source {root}: the name {rel!r} has a control character or a "
                    "backslash; rename it"
                )
            real = path
            if path.is_symlink():
                real = path.resolve()
                if not any(real.is_relative_to(base) for base in allowed):
                    raise BundleError(
                        f"model source {root}: {rel} is a link to {path.readlink()}, which "
                        "leaves the model directory; copy the file in instead"
                    )
                if not real.is_file():
                    raise BundleError(
                        f"model source {root}: {rel} is a link to {path.readlink()}, which is "
                        "not a file (dangling?); download the model again"
                    )
            elif not path.is_file():
                raise BundleError(f"model source {root}: {rel} is not a regular file; remove it")
            if rel.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
                raise BundleError(
                    f"model source {root} holds {rel}, pickle-format weights: loading a pickle "
                    "runs code; use the model's safetensors files (delete the pickle ones), or "
                    "set PIPELINE_MODEL_ALLOW_PICKLE=1 if you trust it"
                )
            hub_sha = None
            if blobs is not None and real.parent == blobs and _HEX64.match(real.name):
                hub_sha = real.name
            found.append(ModelFile(rel, real, real.stat().st_size, hub_sha))
    if not found:
        raise BundleError(f"model source {root} holds no files; download the model first")
    return sorted(found, key=lambda f: f.name)


# ---- the bundle -----------------------------------------------------------------------------


def pack_model(
    source: Path,
    name: str,
    output: Path,
    *,
    allow_pickle: bool = False,
    part_size: int | None = None,
    origin: Mapping[str, str] | None = None,
    signing_key: Path | None = None,
    progress_stream: TextIO | None = None,
) -> ModelPackResult:
    """Write the model bundle of the directory ``source`` at ``output`` (see the module
    docstring), its ``.sha256``, and its parts when ``part_size`` is set. ``origin`` (the hub
    id and revision) goes into the index. Atomic: on any failure nothing new is left under
    ``output``'s names. Raises BundleError."""
    check_model_name(name)
    output = output.absolute()
    files = scan_model_dir(source, allow_pickle=allow_pickle)
    total = sum(f.size for f in files)
    progress = Progress(f"hash {len(files)} model files", total, stream=progress_stream)
    entries: list[IndexedFile] = []
    try:
        for file in files:
            digest = sha256_file(file.path, progress)
            if file.hub_sha256 is not None and digest != file.hub_sha256:
                raise BundleError(
                    f"model file {file.name} has sha256 {digest[:16]}..., the hub recorded "
                    f"{file.hub_sha256[:16]}... (its blob's name in the cache): the download is "
                    f"damaged; delete {file.path} and download again"
                )
            entries.append(
                IndexedFile(name=f"{MODEL_DIR}/{file.name}", size=file.size, sha256=digest)
            )
    except OSError as exc:
        progress.done(None)
        raise BundleError(f"cannot read the model file {exc.filename} ({exc.strerror})") from None
    except BaseException:
        progress.done(None)
        raise
    progress.done(None)
    repo = hf_cache_repo(source)
    info = dict(origin or ({"repo": repo[0], "revision": repo[1]} if repo else {}))
    index = make_index("model", name, entries, tool_version=__version__, source=info)
    index_bytes = index_json(index)
    members = [
        TarMember.text(INDEX_FILE, index_bytes),
        TarMember.text(INDEX_SUM_FILE, f"{index_digest(index_bytes)}  {INDEX_FILE}\n".encode()),
    ]
    signature = sign(index_bytes, signing_key) if signing_key is not None else None
    if signature is not None:
        members.append(TarMember.text(SIG_FILE, signature))
    dirs = {MODEL_DIR}
    for file, entry in zip(files, entries, strict=True):
        members.append(TarMember.file(entry.name, file.path, file.size))
        parts = entry.name.split("/")
        dirs.update("/".join(parts[:d]) for d in range(1, len(parts)))
    members += [TarMember.dir(d) for d in sorted(dirs)]
    checks = {e.name: ("sha256", e.sha256) for e in entries}
    try:
        tar = write_tar(
            output,
            members,
            checks=checks,
            progress_stream=progress_stream,
            label=f"write {output.name}",
        )
    except MemberMismatch as exc:
        changed = ", ".join(sorted(exc.mismatches))
        raise BundleError(
            f"model files changed while they were packed ({changed}); is a download still "
            "running? pack again when it has finished"
        ) from None
    try:
        atomic_write_text(checksum_path(output), f"{tar.sha256}  {output.name}\n")
        write_signature(output, signature)
        parts = (
            write_parts(
                output,
                tar.sha256,
                part_size,
                signing_key=signing_key,
                progress_stream=progress_stream,
            )
            if part_size
            else None
        )
    except BaseException:
        output.unlink(missing_ok=True)
        checksum_path(output).unlink(missing_ok=True)
        signature_path(output).unlink(missing_ok=True)
        raise
    return ModelPackResult(
        bundle=output,
        sha256=tar.sha256,
        size=tar.size,
        files=len(entries),
        model_bytes=total,
        index_sha256=index_digest(index_bytes),
        parts=parts,
    )


# ---- reruns --------------------------------------------------------------------------------


def _inputs(
    source: Path,
    name: str,
    allow_pickle: bool,
    part_size: int | None,
    signing_key: Path | None = None,
) -> dict[str, object]:
    """What the bundle's bytes depend on, read from metadata only: every source file's
    fingerprint (the real file behind a link), the name, the settings and the tool."""
    files = scan_model_dir(source, allow_pickle=allow_pickle)
    return {
        "name": name,
        "allow_pickle": allow_pickle,
        "part_size": part_size,
        "signing_key": str(signing_key) if signing_key else None,
        "tool_version": __version__,
        "files": {f.name: list(dataclasses.astuple(Fingerprint.of(f.path.stat()))) for f in files},
    }


def model_pack_is_current(
    stamp: Path,
    source: Path,
    name: str,
    output: Path,
    allow_pickle: bool,
    part_size: int | None,
    signing_key: Path | None = None,
) -> bool:
    """True when ``stamp`` says ``output`` (and its ``.sha256`` and parts) was written from
    these very source files and settings and is unchanged since. Metadata only; never
    raises."""
    try:
        document = json.loads(stamp.read_text(encoding="utf-8"))
        if document.get("inputs") != json.loads(
            json.dumps(_inputs(source, name, allow_pickle, part_size, signing_key))
        ):
            return False
        outputs = [output, checksum_path(output)]
        if part_size:
            outputs.append(output.with_name(output.name + ".parts.json"))
        return document.get("outputs") == {
            str(p): list(dataclasses.astuple(Fingerprint.of(p.stat()))) for p in outputs
        }
    except (OSError, ValueError, BundleError):
        return False


def write_model_stamp(
    stamp: Path,
    result: ModelPackResult,
    source: Path,
    name: str,
    allow_pickle: bool,
    part_size: int | None,
    signing_key: Path | None = None,
) -> None:
    """Record what :func:`model_pack_is_current` compares."""
    outputs = [result.bundle, checksum_path(result.bundle)]
    if result.parts is not None:
        outputs.append(result.bundle.with_name(result.bundle.name + ".parts.json"))
    document = {
        "inputs": _inputs(source, name, allow_pickle, part_size, signing_key),
        "outputs": {str(p): list(dataclasses.astuple(Fingerprint.of(p.stat()))) for p in outputs},
        "sha256": result.sha256,
        "index_sha256": result.index_sha256,
    }
    atomic_write_text(stamp, json.dumps(document, indent=2) + "\n")


__all__ = [
    "ModelFile",
    "ModelPackResult",
    "check_model_name",
    "default_model_name",
    "download_model",
    "hf_cache_repo",
    "is_hub_id",
    "model_pack_is_current",
    "pack_model",
    "scan_model_dir",
    "write_model_stamp",
]
