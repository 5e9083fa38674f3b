"""The bundle index: one member that lists every other member's name, size and sha256, and the
bundle's kind. Every bundle this project writes carries it; what reads a bundle checks the
members against it.

``infer-vllm-index.json``::

    {
      "index_format": 1,
      "kind": "model",                       # or "env"
      "name": "tiny-qwen",                   # the model's name under /models, or the environment
      "tool": "infer-vllm-pipeline", "tool_version": "0.1.0",
      "source": {...},                       # where it came from (model: path or hub id, revision)
      "files": [{"name": "model/config.json", "size": 680, "sha256": "..."}, ...]
    }

``files`` holds every file member but the index itself, sorted by name; directories are
implied by the names and are the only other members a bundle may have. The index is the root
the later features rest on: a delta bundle names the files it leaves out by their hash, and a
signature signs the index (its sha256 is :func:`index_digest`).

In a model bundle it is the first member (``infer-vllm-index.json`` sorts before ``model/``),
so the install knows every file's hash before the file's bytes arrive and checks them in the
same pass that writes them. In an environment bundle it is one more of our extras beside
``infer-vllm-bundle.json``: pixi-unpack ignores top-level files it does not know.

Versioned: ``index_format`` is checked before anything else in the document, and a format this
reader does not know is refused in one line (:func:`read_index`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline.bundle.format import INDEX_FILE, INDEX_FORMAT
from pipeline.errors import BundleError

Kind = Literal["env", "model"]
MAX_INDEX_BYTES = 64 << 20
# A sha256 as the bundle's documents write it: 64 lower-case hex digits.
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Doc = TypeVar("_Doc", bound=BaseModel)


def load_versioned(
    data: bytes, model: type[_Doc], *, key: str, version: int, what: str, advice: str
) -> _Doc:
    """Parse a versioned JSON document of the bundle (the index, a parts file): JSON first,
    then ``key`` must be ``version`` (checked before anything else in it, so a newer format
    is refused as such), then ``model``. Raises BundleError (one line: ``what``, the problem,
    ``advice``)."""
    try:
        document: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what} is not JSON ({exc}); {advice}") from None
    found = document.get(key) if isinstance(document, dict) else None
    if found != version:
        raise BundleError(
            f"{what} has {key.replace('_', ' ')} {found!r}, and this tool reads "
            f"{key.replace('_', ' ')} {version} only; "
            "use the pipeline version that wrote it (or newer), or write it again with this one"
        )
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top"
        raise BundleError(f"{what} is not valid ({first['msg']} at {where}); {advice}") from None


class IndexedFile(BaseModel):
    """One file member: its tar name, size in bytes and sha256 (lower-case hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int = Field(ge=0)
    sha256: Sha256Hex


class BundleIndex(BaseModel):
    """``infer-vllm-index.json`` (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index_format: int = INDEX_FORMAT
    kind: Kind
    name: str
    tool: str = "infer-vllm-pipeline"
    tool_version: str
    source: dict[str, str] = Field(default_factory=dict)
    files: tuple[IndexedFile, ...]

    @property
    def by_name(self) -> dict[str, IndexedFile]:
        return {f.name: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def make_index(
    kind: Kind,
    name: str,
    files: Iterable[IndexedFile],
    *,
    tool_version: str,
    source: Mapping[str, str] | None = None,
) -> BundleIndex:
    """The index of ``files`` (any order; stored sorted). Raises BundleError for a name listed
    twice or the index's own name."""
    ordered = sorted(files, key=lambda f: f.name)
    names = [f.name for f in ordered]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(f"the bundle index would list {', '.join(dupes)} twice")
    if INDEX_FILE in names:
        raise BundleError(f"a bundle member may not be named {INDEX_FILE}: that is the index")
    return BundleIndex(
        kind=kind, name=name, tool_version=tool_version, source=dict(source or {}), files=ordered
    )


def index_json(index: BundleIndex) -> bytes:
    """The index as the bundle carries it: pretty JSON, fields in model order, one file per
    line (readable, and small enough for a model with thousands of files)."""
    head = index.model_dump(mode="json", exclude={"files"})
    lines = [json.dumps(head, indent=2)[:-2] + ","]
    files = [json.dumps(f.model_dump(mode="json"), separators=(", ", ": ")) for f in index.files]
    lines.append('  "files": [' + ("" if files else "]"))
    if files:
        lines += [f"    {line}," for line in files[:-1]] + [f"    {files[-1]}", "  ]"]
    lines.append("}")
    return ("\n".join(lines) + "\n").encode()


def index_digest(data: bytes) -> str:
    """The sha256 of the index's bytes: what a bundle's content is known by."""
    return hashlib.sha256(data).hexdigest()


def read_index(data: bytes, bundle: Path | str) -> BundleIndex:
    """Parse ``infer-vllm-index.json``; its ``index_format`` is checked first. Raises
    BundleError (one line) for text that is not JSON, a format this reader does not know, or
    a document that does not hold together."""
    if len(data) > MAX_INDEX_BYTES:
        raise BundleError(
            f"bundle {bundle}: {INDEX_FILE} is {len(data)} bytes, more than the "
            f"{MAX_INDEX_BYTES} allowed; the bundle is corrupt"
        )
    return load_versioned(
        data,
        BundleIndex,
        key="index_format",
        version=INDEX_FORMAT,
        what=f"bundle {bundle}: {INDEX_FILE}",
        advice="the bundle is corrupt: copy it again",
    )


def check_listing(
    index: BundleIndex, files: Mapping[str, int], dirs: Iterable[str], bundle: Path | str
) -> None:
    """Refuse a bundle whose members are not exactly the index's: ``files`` maps every file
    member but the index to its size, ``dirs`` are the directory members. Pure.

    Refused, naming the first member (sorted): a file the index does not list (an extra
    member), a listed file the bundle lacks (a missing member), a size other than the
    listed one, and a directory that holds no listed file."""
    listed = index.by_name
    extra = sorted(set(files) - set(listed))
    if extra:
        raise BundleError(
            f"bundle {bundle} holds {extra[0]!r}, which its {INDEX_FILE} does not list"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: the bundle was "
            "changed after it was packed; refusing it"
        )
    missing = sorted(set(listed) - set(files))
    if missing:
        raise BundleError(
            f"bundle {bundle} lacks {missing[0]!r}, which its {INDEX_FILE} lists"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the bundle is "
            "incomplete; copy it again"
        )
    for name in sorted(files):
        if files[name] != listed[name].size:
            raise BundleError(
                f"bundle member {name!r} is {files[name]} bytes, its {INDEX_FILE} says "
                f"{listed[name].size}: the bundle was changed after it was packed; refusing it"
            )
    parents = {"/".join(n.split("/")[:d]) for n in listed for d in range(1, n.count("/") + 1)}
    for name in sorted(dirs):
        if name not in parents:
            raise BundleError(
                f"bundle {bundle} holds the directory {name!r}, which holds no file its "
                f"{INDEX_FILE} lists: the bundle was changed after it was packed; refusing it"
            )


def check_digests(index: BundleIndex, digests: Mapping[str, str], bundle: Path | str) -> None:
    """Refuse a file whose sha256 (``digests``: name -> hex, every listed file) is not the
    index's, naming the first (sorted). Pure."""
    for entry in index.files:
        actual = digests.get(entry.name)
        if actual != entry.sha256:
            raise BundleError(
                f"bundle member {entry.name!r} has sha256 {(actual or 'none')[:16]}..., its "
                f"{INDEX_FILE} says {entry.sha256[:16]}...: the file is damaged or was "
                "swapped; copy the bundle again"
            )


__all__ = [
    "BundleIndex",
    "IndexedFile",
    "check_digests",
    "check_listing",
    "index_digest",
    "index_json",
    "load_versioned",
    "make_index",
    "read_index",
]
