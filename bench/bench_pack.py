"""Benchmark of the pack stage: a warm-cache pack of ~1 GB, and a no-op `doit pack`.

    .venv/bin/python bench/bench_pack.py [--size-mb 1024] [--repeat 5] [--workdir /tmp]

Prints, from one run on this machine:

- warm-cache pack: :func:`pipeline.build.pack.pack` of a synthetic channel of about
  ``--size-mb`` MiB (random-content ``.conda`` / ``.tar.bz2`` files of mixed sizes, a hand-written
  v6 pixi.lock with their sha256), everything already in the pack cache. That includes reading
  the lock, checking every cached file's sha256, and writing the tar with its own sha256.
  Against `tar cf` of the same files in the same run (best of ``--repeat`` each, page cache warm
  for both, `sync` before each run so one run's write-back does not slow the next). Target:
  ratio <= 1.25.
- no-op `doit pack` (lock, verify, pack:tar, pack:sha256 all up to date) with a ~1 GB bundle
  against the same with a ~1 MB bundle (median of 2 x ``--repeat`` + 1 runs each, the two
  interleaved). Target: ratio
  <= 1.2: a no-op reads metadata, never the bundle. A fake `pixi` (``$PIXI_HOME/bin/pixi``,
  exits 0) stands in for `pixi lock` / `pixi run verify`, since the synthetic packages are
  random bytes that nothing could install.

Everything lives in one temporary directory (about 3x ``--size-mb`` at the peak), removed at
the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.build.fetch import Fetcher  # noqa: E402
from pipeline.build.pack import pack  # noqa: E402

MiB = 1024 * 1024
BASE_URL = "https://bench.invalid/channel"


def make_channel(
    cache: Path, total_mb: int, seed_block: bytes, stem: str = "pkg"
) -> list[tuple[str, str, int, str]]:
    """Write packages of mixed sizes (1 to 96 MiB) adding up to ``total_mb`` MiB into the pack
    cache; return (subdir, filename, size, sha256) for each."""
    sizes_mb: list[int] = []
    pattern = [96, 64, 48, 32, 16, 8, 4, 2, 1]
    left = total_mb
    i = 0
    while left > 0:
        size = min(pattern[i % len(pattern)], left)
        sizes_mb.append(size)
        left -= size
        i += 1
    out: list[tuple[str, str, int, str]] = []
    for index, size_mb in enumerate(sizes_mb):
        subdir = "noarch" if index % 5 == 4 else "linux-64"
        ext = ".tar.bz2" if index % 3 == 2 else ".conda"
        filename = f"{stem}{index:03d}-1.{index}-h{index:08x}_0{ext}"
        path = cache / subdir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as fh:
            for chunk_index in range(size_mb):
                # Unique per file and chunk, incompressible, cheap to produce.
                chunk = index.to_bytes(4, "little") + chunk_index.to_bytes(4, "little")
                chunk += seed_block[8:]
                fh.write(chunk)
                digest.update(chunk)
        out.append((subdir, filename, size_mb * MiB, digest.hexdigest()))
    return out


def write_project(project: Path, packages: list[tuple[str, str, int, str]]) -> None:
    """A pixi.toml and a hand-written v6 pixi.lock listing ``packages``."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "pixi.toml").write_text(
        '[workspace]\nname = "bench"\n'
        f'channels = ["{BASE_URL}/"]\nplatforms = ["linux-64"]\n\n'
        '[tasks]\nverify = "true"\n'
    )
    refs = [f"      - conda: {BASE_URL}/{s}/{f}\n" for s, f, _n, _h in packages]
    entries = []
    for subdir, filename, size, sha in packages:
        entry = f"- conda: {BASE_URL}/{subdir}/{filename}\n"
        if subdir == "noarch":
            entry += "  noarch: generic\n"
        entry += f"  sha256: '{sha}'\n  md5: '{hashlib.md5(sha.encode()).hexdigest()}'\n"
        entry += f"  size: {size}\n"
        entries.append(entry)
    (project / "pixi.lock").write_text(
        "version: 6\nenvironments:\n  default:\n    channels:\n"
        f"    - url: {BASE_URL}/\n    packages:\n      linux-64:\n"
        + "".join(refs)
        + "packages:\n"
        + "".join(entries)
    )


def timed(fn: Callable[[], None]) -> float:
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_warm_pack(root: Path, size_mb: int, repeat: int) -> dict[str, float]:
    cache = root / "pack-cache"
    packages = make_channel(cache, size_mb, os.urandom(MiB))
    project = root / "big-project"
    write_project(project, packages)
    total = sum(p[2] for p in packages)
    out = root / "out"
    out.mkdir()

    def run_pack() -> None:
        fetcher = Fetcher(progress_stream=io.StringIO())
        result = pack(
            project, out / "bundle.tar", cache, fetcher=fetcher, progress_stream=io.StringIO()
        )
        assert result.downloaded == 0, "warm cache: nothing to download"

    files = [f"{s}/{f}" for s, f, _n, _h in packages]

    def run_tar() -> None:
        subprocess.run(["tar", "cf", str(out / "tar-cf.tar"), *files], cwd=cache, check=True)

    pack_times, tar_times = [], []
    run_pack()  # warm-up: page cache and imports, not timed
    (out / "bundle.tar").unlink()  # freed before a sync, never inside a timed run
    for _ in range(repeat):
        tar_times.append(timed(run_tar))
        (out / "tar-cf.tar").unlink()
        pack_times.append(timed(run_pack))
        (out / "bundle.tar").unlink()
    shutil.rmtree(out)
    return {
        "files": len(packages),
        "bytes": total,
        "pack_best": min(pack_times),
        "pack_median": statistics.median(pack_times),
        "tar_best": min(tar_times),
        "tar_median": statistics.median(tar_times),
        "pack_runs": pack_times,  # type: ignore[dict-item]
        "tar_runs": tar_times,  # type: ignore[dict-item]
    }


def doit_env(root: Path, project: Path, name: str) -> dict[str, str]:
    fake_home = root / "fake-pixi-home"
    (fake_home / "bin").mkdir(parents=True, exist_ok=True)
    pixi = fake_home / "bin" / "pixi"
    pixi.write_text("#!/bin/sh\nexit 0\n")
    pixi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "AUTO_INFER_"))}
    env.update(
        PIPELINE_ROLE="build",
        PIPELINE_PROJECT=str(project),
        PIPELINE_BUNDLE=str(root / f"{name}.tar"),
        PIPELINE_PACK_CACHE=str(root / "pack-cache"),
        PIPELINE_STATE_DIR=str(root / f"state-{name}"),
        PIXI_HOME=str(fake_home),
        PIXI_CACHE_DIR=str(root / "rattler-cache"),
    )
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p) / "pixi").exists()
    )
    return env


def doit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "pack"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def bench_noop(root: Path, repeat: int) -> dict[str, float]:
    small_cache = root / "pack-cache"
    small = make_channel(small_cache, 1, os.urandom(MiB), stem="small")  # one 1 MiB file
    small_project = root / "small-project"
    write_project(small_project, small)
    big_project = root / "big-project"
    envs = {
        "big": doit_env(root, big_project, "big"),
        "small": doit_env(root, small_project, "small"),
    }
    for name, env in envs.items():
        first = doit(env)
        if first.returncode != 0:
            raise SystemExit(f"doit pack failed for the {name} bundle:\n{first.stderr}")
    times: dict[str, list[float]] = {"big": [], "small": []}
    # Interleaved, so a burst of other load on the machine hits both sides alike.
    for _ in range(2 * repeat + 1):
        for name, env in envs.items():
            os.sync()
            started = time.perf_counter()
            again = doit(env)
            times[name].append(time.perf_counter() - started)
            if again.returncode != 0 or ".  " in again.stderr:
                raise SystemExit(f"doit pack was not a no-op for {name}:\n{again.stderr}")
    results: dict[str, float] = {}
    for name in envs:
        results[f"{name}_median"] = statistics.median(times[name])
        results[f"{name}_best"] = min(times[name])
        results[f"{name}_bytes"] = (root / f"{name}.tar").stat().st_size
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-pack-", dir=args.workdir))
    try:
        warm = bench_warm_pack(root, args.size_mb, args.repeat)
        noop = bench_noop(root, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gib = warm["bytes"] / 1024**3
    ratio_pack = warm["pack_best"] / warm["tar_best"]
    ratio_median = warm["pack_median"] / warm["tar_median"]
    ratio_noop = noop["big_median"] / noop["small_median"]
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"warm-cache pack of {warm['files']} packages, {gib:.2f} GiB:")
    print(
        f"  pack:   best {warm['pack_best']:.2f} s, median {warm['pack_median']:.2f} s "
        f"({gib / warm['pack_best']:.2f} GiB/s; runs "
        + ", ".join(f"{t:.2f}" for t in warm["pack_runs"])  # type: ignore[attr-defined]
        + ")"
    )
    print(
        f"  tar cf: best {warm['tar_best']:.2f} s, median {warm['tar_median']:.2f} s (runs "
        + ", ".join(f"{t:.2f}" for t in warm["tar_runs"])  # type: ignore[attr-defined]
        + ")"
    )
    print(
        f"  ratio pack / tar cf: {ratio_pack:.2f} best, {ratio_median:.2f} median "
        f"(target <= 1.25): {'PASS' if ratio_pack <= 1.25 else 'FAIL'}"
    )
    print("no-op `doit pack` (lock, verify, pack:tar, pack:sha256 up to date):")
    for name, unit, scale in (("big", "GiB", 1024**3), ("small", "MiB", 1024**2)):
        print(
            f"  {noop[f'{name}_bytes'] / scale:.2f} {unit} bundle: median "
            f"{noop[f'{name}_median']:.3f} s, best {noop[f'{name}_best']:.3f} s"
        )
    print(
        f"  ratio big / small: {ratio_noop:.2f} (target <= 1.2): "
        f"{'PASS' if ratio_noop <= 1.2 else 'FAIL'}"
    )
    return 0 if ratio_pack <= 1.25 and ratio_noop <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
