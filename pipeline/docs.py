"""Generated parts of the docs, kept in step with the code by a test.

``python -m pipeline.docs --write`` rewrites them; ``--check`` exits 1 when one is stale:

- docs/serve-config.schema.json: the JSON schema of the serve TOML (from the pydantic models)
- docs/serve-config.md: the key tables between ``<!-- BEGIN keys -->`` and ``<!-- END keys -->``
- README.md: the variable table between ``<!-- BEGIN variables -->`` and ``<!-- END variables -->``
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.serve.config import Cluster, Control, Gateway, Master, Server, json_schema
from pipeline.serve.config.models import Pool
from pipeline.settings import REPO_ROOT, variables_markdown

SCHEMA = REPO_ROOT / "docs" / "serve-config.schema.json"
REFERENCE = REPO_ROOT / "docs" / "serve-config.md"
README = REPO_ROOT / "README.md"


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, Path):
        return f'`"{value}"`'
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{getattr(value, 'value', value)}`"


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}


def _type(annotation: Any) -> str:
    """A reader's name for a field type: ``path``, ``list of integer``, ``one of: a, b``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in kept)
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of: " + ", ".join(f"`{m.value}`" for m in annotation)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"table of {_type(args[1])}"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _table(model: type[BaseModel], section: str) -> str:
    rows = [f"#### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(rows)


def keys_markdown() -> str:
    return "\n\n".join(
        [
            _table(Master, "[master]"),
            _table(Control, "[instance.control] and [instance.<name>.control]"),
            _table(Server, "[instance.server] and [instance.<name>.server]"),
            _table(Cluster, "[instance.<name>.cluster]"),
            _table(Gateway, "[gateway]"),
            _table(Pool, "[pool.<group>]"),
        ]
    )


def _replace_region(text: str, name: str, body: str, path: Path) -> str:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} / {end} are missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def expected() -> dict[Path, str]:
    """Each generated file's full expected content."""
    return {
        SCHEMA: schema_text(),
        REFERENCE: _replace_region(
            REFERENCE.read_text(encoding="utf-8"), "keys", keys_markdown(), REFERENCE
        ),
        README: _replace_region(
            README.read_text(encoding="utf-8"), "variables", variables_markdown(), README
        ),
    }


def main(argv: list[str]) -> int:
    if argv not in (["--write"], ["--check"]):
        print("usage: python -m pipeline.docs --write|--check", file=sys.stderr)
        return 2
    stale = []
    for path, content in expected().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != content:
            stale.append(path)
            if argv == ["--write"]:
                path.write_text(content, encoding="utf-8")
    for path in stale:
        verb = "rewrote" if argv == ["--write"] else "stale (run python -m pipeline.docs --write)"
        print(f"{path.relative_to(REPO_ROOT)}: {verb}", file=sys.stderr)
    return 1 if stale and argv == ["--check"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
