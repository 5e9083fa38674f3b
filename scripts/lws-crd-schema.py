"""Write the LeaderWorkerSet CRD's OpenAPI schema as the test fixture, without descriptions.

    python scripts/lws-crd-schema.py CRD.yaml > tests/data/lws/leaderworkerset-v1.schema.json

CRD.yaml is kubernetes-sigs/lws's config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml
at the release named in tests/data/lws/README.md. Only ``description`` keys are dropped (1.3 MB
of YAML becomes about 0.2 MB of JSON); every type, enum, default, format and ``required`` stays,
so a manifest that validates against the fixture validates against the CRD. Needs PyYAML (a
test dependency).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip(node: Any) -> Any:
    # A property may itself be named "description": only drop the annotation, which is a
    # string; a schema object under properties.description is kept.
    if isinstance(node, dict):
        return {
            k: strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    crd = yaml.safe_load(Path(argv[1]).read_text(encoding="utf-8"))
    (version,) = (v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strip(version["schema"]["openAPIV3Schema"])
    # One key per line: diffable, a fifth of the indented size.
    sys.stdout.write(json.dumps(schema, indent=0, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
