"""Benchmark of the install side: `doit install` of a ~1 GB bundle, and a no-op `doit install`.

    .venv/bin/python bench/bench_install.py [--size-mb 1024] [--repeat 3] [--workdir /tmp]

Prints, from one run on this machine:

- first install: ``doit install`` (extract -> patch-channels -> frozen-install, in a fresh
  project dir with a fresh rattler package cache, as a container's first boot) of a synthetic
  bundle of about ``--size-mb`` MiB, against a hand-written baseline in the same run: ``tar -x``
  of the same bundle, then ``rattler.install`` of the same records from the extracted channel
  (a child Python, as ours). Ours does on top: the bundle's sha256 before extracting (one read
  that also hashes every member), the safety checks, the lock against the channel and its
  hashes, patching pixi.toml/pixi.lock, the verify task (``true``), the records and the
  symlink switch, plus doit's own start-up. Best of ``--repeat`` runs each, alternating, with
  ``sync`` before each run so one run's write-back does not slow the next. Target: ratio <= 1.2.
- no-op ``doit install`` (all three stages up to date) with the ~1 GB bundle against the same
  with a ~1 MB bundle (median of ``--repeat`` + 2 runs each). Target: ratio <= 1.2: a no-op
  reads stamps and ``stat``s files, never the tar.

The packages are real ``.conda`` files (zip of zstd tars, level 1) of files whose content is
half random, half repetitive (zstd gets about 2:1, like shared libraries), so rattler really
decompresses about twice the bundle size. Everything lives in one temporary directory (about
5x ``--size-mb`` at the peak), removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from backports import zstd  # noqa: E402
from bundle_factory import REMOTE, bundle_entries, write_bundle  # noqa: E402

from pipeline.demo.channel import LocalChannel, index_channel, install_channel  # noqa: E402

MiB = 1024 * 1024
_BLOCK = 64 * 1024


# ---- the synthetic channel --------------------------------------------------------------------


def _content(size: int) -> bytes:
    """``size`` bytes, half random and half repetitive: zstd compresses it about 2:1."""
    out = bytearray()
    filler = b"symbol table entry 0000000000000000 GLIBC_2.17 .text\n"
    while len(out) < size:
        out += os.urandom(_BLOCK // 2)
        out += (filler * (_BLOCK // 2 // len(filler) + 1))[: _BLOCK // 2]
    return bytes(out[:size])


def _tar_zst(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return zstd.compress(raw.getvalue(), level=1)


def write_conda(out_dir: Path, name: str, raw_mb: int, files: int = 4) -> Path:
    """A real ``.conda`` package ``name-1.0-h0_0`` with ``files`` files of ``raw_mb`` MiB in
    total under ``lib/``; rattler installs it like any conda-forge package."""
    stem = f"{name}-1.0-h0_0"
    payload: dict[str, bytes] = {}
    paths = []
    for i in range(files):
        rel = f"lib/lib{name}_{i}.so"
        data = _content(raw_mb * MiB // files)
        payload[rel] = data
        paths.append(
            {
                "_path": rel,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_in_bytes": len(data),
            }
        )
    index = {
        "name": name,
        "version": "1.0",
        "build": "h0_0",
        "build_number": 0,
        "depends": ["__glibc >=2.17"],
        "license": "MIT",
        "subdir": "linux-64",
        "platform": "linux",
        "arch": "x86_64",
        "timestamp": 1_700_000_000_000,
    }
    info = {
        "info/index.json": json.dumps(index).encode(),
        "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}).encode(),
        "info/files": "".join(f"{p['_path']}\n" for p in paths).encode(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{stem}.conda"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
        zf.writestr(f"info-{stem}.tar.zst", _tar_zst(info))
        zf.writestr(f"pkg-{stem}.tar.zst", _tar_zst(payload))
    return target


def make_bundle(root: Path, size_mb: int, *, stem: str = "big") -> tuple[Path, int]:
    """Channel of packages adding up to about ``size_mb`` MiB of archives, a lock of all of
    them (URLs under a remote channel nothing can reach), and the bundle with its .sha256."""
    channel = root / "channel"
    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    per_package = 80 if size_mb >= 80 else max(1, size_mb)
    count = max(1, round(size_mb / per_package))
    for i in range(count):
        # about 2:1 compression: twice the raw size gives the archive size asked for
        write_conda(channel / "linux-64", f"{stem}{i:02d}", 2 * per_package, files=4)
    index_channel(channel)
    lock = write_lock(root / "project" / "pixi.lock", channel)
    manifest = (
        '[workspace]\nname = "bench"\nchannels = ["' + REMOTE + '"]\nplatforms = ["linux-64"]\n'
        '[tasks]\nverify = "true"\n'
    )
    parts = bundle_entries(lock, LocalChannel(root=channel, packages=()), manifest=manifest)
    bundle = root / f"{stem}.tar"
    write_bundle(bundle, parts.values())
    shutil.rmtree(channel)
    return bundle, count


def write_lock(path: Path, channel: Path) -> Path:
    from rattler import Channel, LockChannel, LockFile, LockPlatform, RepoData

    records = []
    for subdir in ("linux-64", "noarch"):
        repodata = channel / subdir / "repodata.json"
        if repodata.is_file():
            records += RepoData.from_path(repodata).into_repo_data(Channel(REMOTE))
    lock = LockFile([LockPlatform("linux-64")])
    lock.set_channels("default", [LockChannel(REMOTE)])
    for record in records:
        lock.add_conda_package("default", lock.platforms()[0], record)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock.to_path(path)
    return path


# ---- the runs -----------------------------------------------------------------------------------


def timed(fn: Callable[[], None]) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def baseline(bundle: Path, work: Path) -> None:
    """`tar -x`, then py-rattler installs the same records from the extracted channel."""
    out = work / "baseline"
    out.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(out)], check=True)
    install_channel(out / "channel", out / "env", work / "baseline-cache" / "pkgs", timeout=1800)


def doit_env(work: Path, bundle: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTO_INFER_", "PIPELINE_"))}
    env.update(
        PIPELINE_ROLE="runtime",
        PIPELINE_STATE_DIR=str(work / f"{name}-state"),
        AUTO_INFER_VLLM_BUNDLE_PATH=str(bundle),
        AUTO_INFER_VLLM_PIXI_PROJECT_DIR=str(work / f"{name}-project"),
        PIXI_CACHE_DIR=str(work / f"{name}-cache"),
        PIPELINE_PROJECT=str(work / "no-template"),
    )
    return env


def doit_install(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "install"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"doit install failed:\n{proc.stderr}")
    return proc


def bench_first_install(root: Path, bundle: Path, repeat: int) -> dict[str, Any]:
    ours: list[float] = []
    base: list[float] = []
    for i in range(repeat):
        work = root / f"run{i}"
        base.append(timed(lambda w=work: baseline(bundle, w)))
        shutil.rmtree(work)
        ours.append(timed(lambda w=work: doit_install(doit_env(w, bundle, "ours"))))
        shutil.rmtree(work)
    return {"ours": min(ours), "baseline": min(base), "ours_all": ours, "baseline_all": base}


def bench_noop(root: Path, big: Path, small: Path, repeat: int) -> dict[str, float]:
    """Median of ``repeat`` + 2 no-op installs per bundle, big and small alternating, each
    after a ``sync`` (so write-back of the installs before does not weigh on one side)."""
    envs = {
        label: doit_env(root / f"noop-{label}", bundle, label)
        for label, bundle in (("big", big), ("small", small))
    }
    for env in envs.values():
        doit_install(env)
    times: dict[str, list[float]] = {"big": [], "small": []}
    for _ in range(repeat + 2):
        for label, env in envs.items():
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            proc = doit_install(env)
            times[label].append(time.perf_counter() - start)
            if proc.stderr.count("(up to date)") != 3:
                raise SystemExit(f"not a no-op:\n{proc.stderr}")
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-install-", dir=args.workdir))
    try:
        start = time.perf_counter()
        big, count = make_bundle(root / "big-src", args.size_mb, stem="big")
        small, _ = make_bundle(root / "small-src", 1, stem="small")
        print(
            f"bundles: {big.stat().st_size / MiB:.0f} MiB ({count} packages) and "
            f"{small.stat().st_size / MiB:.2f} MiB, built in {time.perf_counter() - start:.0f} s"
        )
        first = bench_first_install(root, big, args.repeat)
        ratio = first["ours"] / first["baseline"]
        medians = statistics.median(first["ours_all"]) / statistics.median(first["baseline_all"])
        print(
            f"first install, {big.stat().st_size / MiB:.0f} MiB bundle: doit install "
            f"{first['ours']:.2f} s vs tar -x + rattler.install {first['baseline']:.2f} s "
            f"(best of {args.repeat}) -> ratio {ratio:.2f} (target <= 1.2; medians: "
            f"{medians:.2f}); all runs: ours {[round(t, 2) for t in first['ours_all']]}, "
            f"baseline {[round(t, 2) for t in first['baseline_all']]}"
        )
        noop = bench_noop(root, big, small, args.repeat)
        print(
            f"no-op doit install: {noop['big']:.3f} s with the big bundle vs {noop['small']:.3f} s "
            f"with the 1 MiB one -> ratio {noop['big'] / noop['small']:.2f} (target <= 1.2)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
