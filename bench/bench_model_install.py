"""Benchmark of `doit install-model`: a 2 GiB model bundle, against doing it by hand.

    .venv/bin/python bench/bench_model_install.py [--size-mb 2048] [--repeat 3] [--workdir /tmp]

Prints, from one run on this machine (every figure measured in this run):

- ``doit install-model`` of a model bundle of about ``--size-mb`` MiB of random
  safetensors-like files (the ``.sha256`` beside it, as ``doit pack-model`` writes it), into an
  empty models dir, against the floor a user pays by hand: ``tar xf`` then ``sha256sum -c`` of
  the same files (one pass to write, one to read back). Target: ratio <= 0.75 (one pass beats
  two).
- the same against ``tar xf`` alone (no check at all). Target: ratio <= 1.15.
- from the bundle's parts (``--part-mb``, default 512) against from the one tar.
  Target: ratio <= 1.05.
- sha256 throughput of this machine's ``hashlib`` (OpenSSL), in GB/s per core, and what the
  install reached in GB/s.

Each variant runs ``--repeat`` times, alternating, best run kept, with ``sync`` and the output
removed before each run so one run's write-back does not slow the next; the bundle is read
once first so every variant starts from the page cache. Ours includes doit's own start-up.
Everything lives in one temporary directory (about 4x ``--size-mb`` at the peak), removed at
the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.build.model import pack_model  # noqa: E402
from pipeline.bundle.parts import parts_path, write_parts  # noqa: E402

MiB = 1024 * 1024


def safetensors_like(path: Path, size: int) -> None:
    """A file laid out as safetensors are (8-byte header length, JSON header, raw tensor
    bytes), the tensor bytes random (weights do not compress)."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}})
    raw = header.encode()
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = size
        while left:
            chunk = min(left, 64 * MiB)
            fh.write(os.urandom(chunk))
            left -= chunk


def make_model(root: Path, size_mb: int) -> Path:
    model = root / "model-src"
    model.mkdir()
    shards = 4
    for n in range(1, shards + 1):
        safetensors_like(
            model / f"model-{n:05d}-of-{shards:05d}.safetensors", size_mb * MiB // shards
        )
    (model / "config.json").write_text('{"model_type": "bench"}\n')
    (model / "tokenizer.json").write_text('{"version": "1.0"}\n' * 1000)
    return model


def sync() -> None:
    subprocess.run(["sync"], check=True)


def best_of(
    repeat: int, runs: dict[str, Callable[[], None]], reset: Callable[[], None]
) -> dict[str, float]:
    """Best wall time of each run, alternating between them."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            reset()
            sync()
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def hash_rate() -> float:
    data = os.urandom(256 * MiB)
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - started) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--part-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-model-", dir=args.workdir))
    try:
        print(f"making a {args.size_mb} MiB model in {root} ...", flush=True)
        source = make_model(root, args.size_mb)
        out = root / "bundles"
        with_sum = out / "bench.model.tar"
        with Path(os.devnull).open("w") as quiet:
            packed = pack_model(source, "bench", with_sum, progress_stream=quiet)
        write_parts(with_sum, packed.sha256, args.part_mb * MiB)
        parts = parts_path(with_sum)
        # The floor by hand: the index's hashes as a `sha256sum -c` file.
        index = json.loads(
            subprocess.check_output(["tar", "xOf", str(with_sum), "infer-vllm-index.json"])
        )
        sums = root / "SHA256SUMS"
        sums.write_text("".join(f"{f['sha256']}  {f['name']}\n" for f in index["files"]))
        subprocess.run(["cat", str(with_sum)], stdout=subprocess.DEVNULL, check=True)

        target = root / "target"
        models = root / "models"
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "AUTO_INFER_"))
        }
        env["PIPELINE_STATE_DIR"] = str(root / "state")
        doit = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "install-model"]

        def reset() -> None:
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(models, ignore_errors=True)
            shutil.rmtree(root / "state", ignore_errors=True)
            target.mkdir()

        def ours(bundle: Path) -> Callable[[], None]:
            def run() -> None:
                subprocess.run(
                    doit,
                    env={
                        **env,
                        "AUTO_INFER_VLLM_MODEL_BUNDLES": str(bundle),
                        "AUTO_INFER_VLLM_MODELS_DIR": str(models),
                    },
                    check=True,
                    capture_output=True,
                )

            return run

        def tar_x() -> None:
            subprocess.run(["tar", "xf", str(with_sum), "-C", str(target)], check=True)

        def tar_x_sum() -> None:
            tar_x()
            subprocess.run(["sha256sum", "-c", "--quiet", str(sums)], cwd=target, check=True)

        runs = {
            "install-model": ours(with_sum),
            "install-model from parts": ours(parts),
            "tar xf + sha256sum -c": tar_x_sum,
            "tar xf": tar_x,
        }
        print(f"running each {args.repeat} times ...", flush=True)
        best = best_of(args.repeat, runs, reset)
        reset()
        rate = hash_rate()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    size = packed.size
    print(f"\nmodel bundle: {size / 1e9:.2f} GB, {packed.files} files; best of {args.repeat}")
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds:6.2f} s  ({size / seconds / 1e9:.2f} GB/s)")
    ours_s = best["install-model"]
    rows = [
        ("install-model / (tar xf + sha256sum -c)", ours_s / best["tar xf + sha256sum -c"], 0.75),
        ("install-model / tar xf", ours_s / best["tar xf"], 1.15),
        ("from parts / from one tar", best["install-model from parts"] / ours_s, 1.05),
    ]
    print()
    for label, ratio, target_ratio in rows:
        verdict = "PASS" if ratio <= target_ratio else "MISS"
        print(f"  {label:42s} {ratio:5.2f}x  (target <= {target_ratio}x: {verdict})")
    print(f"\nsha256 (hashlib): {rate:.2f} GB/s per core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
