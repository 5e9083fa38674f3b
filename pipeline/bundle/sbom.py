"""The SBOM of an environment bundle: CycloneDX 1.6 JSON, one component per conda package and
wheel of the lock.

Written with ``cyclonedx-python-lib`` (the CycloneDX project's own Python library: its models,
its SPDX license parsing, its 1.6 serializer), not by hand. Each component has:

- a purl: ``pkg:conda/<name>@<version>?build=...&channel=...&subdir=...&type=conda`` (or
  ``type=tar.bz2``), ``pkg:pypi/<name>@<version>``; the purl is also its ``bom-ref``;
- its sha256 (the lock's);
- its licenses where they are known: a conda package's ``license`` from the lock's record; a
  wheel's ``License-Expression`` (PEP 639), else ``License``, else its ``License ::``
  classifiers, read from the wheel's ``METADATA``. An SPDX expression or id becomes one; any
  other text a license name.

The document is reproducible (the same lock gives the same bytes, so the bundle stays
byte-for-byte reproducible): its serial number is derived from the lock's sha256, its
timestamp is the epoch (as ``SOURCE_DATE_EPOCH=0``), components are sorted by purl.
``infer-vllm-sbom.cdx.json`` in the bundle, ``<bundle>.cdx.json`` beside it; ``doit sbom``
summarizes it (:func:`summary`).
"""

from __future__ import annotations

import datetime
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from pipeline.errors import BundleError
from pipeline.pixi.lockfile import CondaPackage, PypiPackage

SBOM_SUFFIX = ".cdx.json"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def sbom_path(bundle: Path) -> Path:
    """``<bundle>.cdx.json``."""
    return bundle.with_name(bundle.name + SBOM_SUFFIX)


def wheel_license(path: Path) -> str | None:
    """A wheel's license as its ``METADATA`` says it (see the module docstring), or None."""
    try:
        with zipfile.ZipFile(path) as wheel:
            name = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
            if name is None:
                return None
            text = wheel.read(name).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile):
        return None
    headers = HeaderParser().parsestr(text)
    expression = (headers.get("License-Expression") or "").strip()
    if expression:
        return expression
    plain = (headers.get("License") or "").strip()
    if plain and "\n" not in plain and len(plain) <= 100:
        return plain
    classifiers = [
        c.split("::")[-1].strip()
        for c in headers.get_all("Classifier") or []
        if c.startswith("License ::") and c.count("::") >= 2
    ]
    return " AND ".join(classifiers) if classifiers else None


def _channel(pkg: CondaPackage) -> str:
    if pkg.channel:
        return pkg.channel.rstrip("/")
    base = pkg.url.rsplit("/", 2)[0] if "/" in pkg.url else pkg.url
    return base.rstrip("/")


def sbom_json(
    conda: Sequence[CondaPackage],
    wheels: Sequence[PypiPackage],
    wheel_files: Mapping[str, Path],
    *,
    environment: str,
    platform: str,
    lock_sha256: str,
    tool_version: str,
) -> bytes:
    """The CycloneDX 1.6 JSON document of the locked packages (``wheel_files``: wheel file
    name -> the file, for its licenses)."""
    from cyclonedx.contrib.license.factories import LicenseFactory
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    licenses = LicenseFactory()

    def component(name: str, version: str, purl: PackageURL, sha256: str | None, text: Any):
        return Component(
            name=name,
            version=version,
            type=ComponentType.LIBRARY,
            purl=purl,
            bom_ref=purl.to_string(),
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha256)] if sha256 else [],
            licenses=[licenses.make_from_string(text)] if isinstance(text, str) and text else [],
        )

    components = []
    for pkg in conda:
        purl = PackageURL(
            type="conda",
            name=pkg.name,
            version=pkg.version,
            qualifiers={
                "build": pkg.build,
                "channel": _channel(pkg),
                "subdir": pkg.subdir,
                "type": "conda" if pkg.filename.endswith(".conda") else "tar.bz2",
            },
        )
        components.append(
            component(pkg.name, pkg.version, purl, pkg.sha256, pkg.repodata.get("license"))
        )
    for wheel in wheels:
        purl = PackageURL(type="pypi", name=wheel.name.lower(), version=wheel.version)
        file = wheel_files.get(wheel.filename)
        text = wheel_license(file) if file is not None else None
        components.append(component(wheel.name, wheel.version, purl, wheel.sha256, text))
    subject = Component(
        name=environment,
        version=lock_sha256[:12],
        type=ComponentType.APPLICATION,
        bom_ref=f"infer-vllm-environment:{environment}@{platform}",
        description=f"the '{environment}' environment of a pixi.lock for {platform}",
    )
    bom = Bom(
        components=components,
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"infer-vllm:{lock_sha256}:{environment}"),
        metadata=BomMetaData(component=subject, timestamp=_EPOCH),
    )
    from cyclonedx.model.tool import Tool

    bom.metadata.tools.tools.add(Tool(name="infer-vllm-pipeline", version=tool_version))
    # The environment holds every package (the lock's own dependency edges are not copied).
    bom.register_dependency(subject, components)
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    return (text + "\n").encode()


def summary(document: Mapping[str, Any]) -> list[str]:
    """``doit sbom``'s lines: counts, the licenses found (with how many packages), and the
    packages with no license."""
    components = list(document.get("components") or [])
    conda = [c for c in components if str(c.get("purl", "")).startswith("pkg:conda/")]
    pypi = [c for c in components if str(c.get("purl", "")).startswith("pkg:pypi/")]
    counts: dict[str, int] = {}
    missing: list[str] = []
    for component in components:
        names = []
        for entry in component.get("licenses") or []:
            if "expression" in entry:
                names.append(str(entry["expression"]))
            else:
                license_ = entry.get("license") or {}
                names.append(str(license_.get("id") or license_.get("name") or "?"))
        if not names:
            missing.append(f"{component.get('name')} {component.get('version')}")
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    lines = [
        f"{len(components)} packages: {len(conda)} conda, {len(pypi)} PyPI "
        f"(CycloneDX {document.get('specVersion')})",
        f"{len(counts)} licenses: "
        + ", ".join(
            f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))
        ),
        f"{len(missing)} packages with no license"
        + (": " + ", ".join(sorted(missing)) if missing else ""),
    ]
    return lines


def read_bundle_sbom(bundle: Path) -> tuple[bytes, str]:
    """The SBOM of ``bundle`` (a tar, its parts file or a delta) and where it was read: the
    ``<bundle>.cdx.json`` beside it, else the member inside (a delta's, compressed). Raises
    BundleError."""
    import zlib

    from pipeline.bundle.format import DELTA_DIR, SBOM_FILE, ZLIB_SUFFIX
    from pipeline.bundle.parts import BundleSource
    from pipeline.bundle.reader import read_member, scan_members

    with BundleSource.open(bundle) as source:
        beside = sbom_path(source.tar_path)
        if beside.is_file():
            return beside.read_bytes(), str(beside)
        for member in scan_members(source):
            if member.name.lstrip("./") == SBOM_FILE:
                return read_member(source, member, bundle), f"{SBOM_FILE} inside it"
            if member.name.lstrip("./") == f"{DELTA_DIR}/{SBOM_FILE}{ZLIB_SUFFIX}":
                try:
                    data = zlib.decompressobj().decompress(
                        read_member(source, member, bundle), 64 << 20
                    )
                except zlib.error:
                    raise BundleError(
                        f"delta {bundle}: its SBOM is corrupt; copy it again"
                    ) from None
                return data, f"{SBOM_FILE} inside the delta"
    raise BundleError(
        f"bundle {bundle} has no SBOM ({SBOM_FILE}, or {beside.name} beside it): it was packed "
        "by pixi-pack or an older pipeline; pack it again with `doit pack`"
    )


__all__ = [
    "SBOM_SUFFIX",
    "read_bundle_sbom",
    "sbom_json",
    "sbom_path",
    "summary",
    "wheel_license",
]
