"""What this host offers to conda packages: platform, glibc, kernel and CUDA driver.

The install side's host check (``frozen-install``: can this environment run here?), not to be
confused with :mod:`pipeline.serve.preflight` (``doit serve``: GPUs, ports and model paths that
the instances of a plan need).

Conda packages state what they need from the system as *virtual package* dependencies
(``__glibc >=2.17``, ``__cuda >=12``, ``__linux >=4.18``). A solver checks them against the
build host's (or ``[system-requirements]``); nothing checks them where the bundle is installed,
pixi-unpack included. :func:`preflight` does, before anything is linked:

- ``__glibc``: ``CONDA_OVERRIDE_GLIBC``, else ``os.confstr("CS_GNU_LIBC_VERSION")``, else
  ``ldd --version``. Too old (or no glibc): an error, the binaries would not even load.
- ``__cuda``: ``CONDA_OVERRIDE_CUDA`` (an empty value means "no CUDA", as in conda and pixi),
  else the driver's CUDA version from NVML (``libnvidia-ml.so.1``), else ``libcuda.so.1``,
  else ``nvidia-smi``. A driver that is too old: an error. No driver at all: a warning, since
  a CUDA environment can be installed on a GPU-less host and used later on a GPU one.
- ``__linux``: the kernel release. ``__unix`` holds on Linux; ``__osx`` / ``__win`` never do.
- ``__archspec`` is covered by the platform check; other virtual packages get a warning.

Detection (:func:`detect_host`) reads the host once; the checks (:func:`check_virtual_packages`)
are pure, so tests feed them any :class:`HostFacts`.
"""

from __future__ import annotations

import ctypes
import os
import platform as pyplatform
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from rattler import MatchSpec, Version, VersionSpec

from pipeline.errors import PipelineError
from pipeline.pixi.envs import host_platform
from pipeline.procs import nvidia_smi, query

_VERSION_RE = re.compile(r"\d+(?:\.\d+)*")
_SMI_CUDA_RE = re.compile(r"CUDA Version:\s*(\d+\.\d+)")


@dataclass(frozen=True)
class HostFacts:
    """The host as conda sees it. ``None`` means absent (no glibc, no CUDA driver).

    ``cuda_source`` says where the CUDA version came from (``CONDA_OVERRIDE_CUDA``, ``NVML``,
    ``libcuda``, ``nvidia-smi`` or ``none``), for messages.
    """

    platform: str
    glibc: str | None
    linux: str | None
    cuda: str | None
    cuda_source: str = "none"


@dataclass(frozen=True)
class Preflight:
    """The outcome of :func:`check_virtual_packages`: one line per problem."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    checked: tuple[str, ...] = field(default=())  # "__glibc >=2.17 (tinytool)", for the record


def detect_host(
    *,
    override_cuda: str | None,
    override_glibc: str | None,
    environ: Mapping[str, str],
    cuda_probes: Iterable[Callable[[Mapping[str, str]], str | None]] | None = None,
) -> HostFacts:
    """Read this host's facts. ``override_cuda`` is ``Settings.conda_override_cuda`` (``None``:
    detect; ``""``: no CUDA); ``override_glibc`` likewise for glibc. ``cuda_probes`` replaces
    the driver probes (NVML, libcuda, nvidia-smi) in tests. Never raises; blocks at most a
    few seconds (``nvidia-smi`` is bounded)."""
    glibc = override_glibc or _glibc_version(environ)
    if override_cuda is not None:
        cuda = _version_prefix(override_cuda) if override_cuda.strip() else None
        source = "CONDA_OVERRIDE_CUDA"
    else:
        cuda, source = None, "none"
        probes = list(cuda_probes) if cuda_probes is not None else list(_CUDA_PROBES)
        for probe in probes:
            found = probe(environ)
            if found:
                cuda, source = found, getattr(probe, "source", probe.__name__)
                break
    return HostFacts(
        platform=host_platform(),
        glibc=glibc,
        linux=_version_prefix(pyplatform.release()) if pyplatform.system() == "Linux" else None,
        cuda=cuda,
        cuda_source=source,
    )


def check_virtual_packages(
    needs: Iterable[tuple[str, str]], facts: HostFacts, *, where: str = "the lock"
) -> Preflight:
    """Check every ``(package, dependency)`` pair whose dependency is a virtual package
    (``__name [version]``) against ``facts``. Pure; the result lists errors and warnings, one
    line each, naming the package, its need and what this host has."""
    errors: list[str] = []
    warnings: list[str] = []
    checked: list[str] = []
    missing_gpu: list[str] = []
    unknown: set[str] = set()
    for package, dep in needs:
        try:
            spec = MatchSpec(dep)
        except Exception:
            warnings.append(f"{package} depends on {dep!r}, which is not a valid spec; not checked")
            continue
        name = spec.name.normalized
        if not name.startswith("__"):
            continue
        version = str(spec.version) if spec.version else None
        need = f"{package} needs {dep!r}"
        checked.append(f"{dep} ({package})")
        if name == "__glibc":
            if facts.glibc is None:
                errors.append(f"{need}, but this host has no glibc (musl?); use a glibc host")
            elif not _matches(version, facts.glibc):
                errors.append(
                    f"{need}, but this host has glibc {facts.glibc}; use a newer base image "
                    "or a bundle locked for an older glibc ([system-requirements] libc)"
                )
        elif name == "__cuda":
            if facts.cuda is None:
                missing_gpu.append(package)
            elif not _matches(version, facts.cuda):
                errors.append(
                    f"{need}, but the NVIDIA driver here supports CUDA {facts.cuda} "
                    f"(from {facts.cuda_source}); update the driver, or use a bundle locked "
                    "for this CUDA ([system-requirements] cuda)"
                )
        elif name == "__linux":
            if facts.linux is None:
                errors.append(f"{need}, but this host does not run Linux")
            elif not _matches(version, facts.linux):
                errors.append(f"{need}, but this host runs Linux {facts.linux}")
        elif name == "__unix":
            if not facts.platform.startswith(("linux", "osx")):
                errors.append(f"{need}, but this is a {facts.platform} host")
        elif name in ("__osx", "__win"):
            errors.append(f"{need}, but this is a {facts.platform} host; use a bundle for it")
        elif name != "__archspec":  # the bundle's platform equals the host's already
            unknown.add(name)
    if missing_gpu:
        names = ", ".join(sorted(set(missing_gpu)))
        source = (
            "CONDA_OVERRIDE_CUDA is empty"
            if facts.cuda_source == "CONDA_OVERRIDE_CUDA"
            else "no NVIDIA driver was found (NVML, libcuda, nvidia-smi)"
        )
        warnings.append(
            f"{names} in {where} need CUDA (__cuda) but {source}: installing anyway; CUDA "
            "code fails until this runs on a GPU host (set CONDA_OVERRIDE_CUDA=<version> to "
            "state the driver's CUDA version)"
        )
    for name in sorted(unknown):
        warnings.append(f"virtual package {name} in {where} is not checked on this host")
    return Preflight(errors=tuple(errors), warnings=tuple(warnings), checked=tuple(checked))


# ---- detection ------------------------------------------------------------------------------


def _matches(spec: str | None, version: str) -> bool:
    if spec is None:
        return True
    try:
        return bool(VersionSpec(spec).matches(Version(version)))
    except Exception:
        return False


def _version_prefix(text: str) -> str | None:
    """``"6.1.0-13-amd64"`` -> ``"6.1.0"``; None when there are no digits."""
    match = _VERSION_RE.search(text or "")
    return match.group(0) if match else None


def _glibc_version(environ: Mapping[str, str]) -> str | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    if text.startswith("glibc "):
        return _version_prefix(text)
    ldd = shutil.which("ldd", path=environ.get("PATH", "/usr/bin:/bin"))
    if ldd is None:
        return None
    try:
        first = query([ldd, "--version"], timeout=10).splitlines()[:1]
    except PipelineError:
        return None
    if first and ("GLIBC" in first[0].upper() or "GNU LIBC" in first[0].upper()):
        return _version_prefix(first[0].rsplit(" ", 1)[-1])
    return None


def _driver_version_text(value: int) -> str:
    """CUDA driver API version ``12040`` -> ``"12.4"``."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _probe_nvml(environ: Mapping[str, str]) -> str | None:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if lib.nvmlInit_v2() != 0:
            return None
        try:
            value = ctypes.c_int(0)
            if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(value)) != 0:
                return None
            return _driver_version_text(value.value) if value.value > 0 else None
        finally:
            lib.nvmlShutdown()
    except AttributeError:
        return None


_probe_nvml.source = "NVML"  # type: ignore[attr-defined]


def _probe_libcuda(environ: Mapping[str, str]) -> str | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    try:
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) != 0 or value.value <= 0:
            return None
        return _driver_version_text(value.value)
    except AttributeError:
        return None


_probe_libcuda.source = "libcuda"  # type: ignore[attr-defined]


def _probe_nvidia_smi(environ: Mapping[str, str]) -> str | None:
    match = _SMI_CUDA_RE.search(nvidia_smi([], environ) or "")
    return match.group(1) if match else None


_probe_nvidia_smi.source = "nvidia-smi"  # type: ignore[attr-defined]

_CUDA_PROBES: tuple[Callable[[Mapping[str, str]], str | None], ...] = (
    _probe_nvml,
    _probe_libcuda,
    _probe_nvidia_smi,
)
