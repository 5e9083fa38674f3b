"""A delta of the real vLLM bundle: one small wheel and the demo channel's ``python`` bumped
(:mod:`pipeline.demo.bump`), packed, the delta written from the cached bundle, installed by
`doit install` in a network namespace with no interfaces over its base, and compared with the
install of the full new bundle.

Slow (about 40 s): the new bundle is packed from the warm pack cache (hard links to it, so
the shared cache is not written), and two environments are installed into private dirs.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest
from conftest import run_doit

from pipeline.build.pack import pack
from pipeline.bundle.delta import read_manifest, write_delta
from pipeline.demo import vllm_bundle
from pipeline.demo.bump import bump_project
from pipeline.install.frozen import installed_record
from pipeline.settings import load_settings

pytestmark = pytest.mark.slow


def _env_files(project: Path) -> set[str]:
    """The installed environment's files, less bytecode (the verify compiles what it
    imports) and the install record (it names its bundle and times)."""
    env = (project / ".pixi" / "envs" / "default").resolve()
    return {
        str(p.relative_to(env))
        for p in env.rglob("*")
        if "__pycache__" not in p.parts and p.name != ".installed-from.json"
    }


@pytest.mark.usefixtures("vllm_project")  # the cached build exists (else: its setup command)
def test_a_delta_of_the_vllm_bundle_installs_over_its_base_as_the_full_bundle(tmp_path: Path):
    settings = load_settings()
    cache = vllm_bundle.vllm_cache(settings, vllm_bundle.read_pip_settings())
    netns = vllm_bundle.network_namespace_prefix()
    if not netns:
        pytest.fail("needs `unshare -n` (root): the install must run with no network")
    base = cache.bundle
    base_sha = cache.sha256_file.read_text().split()[0]

    # build host: the update (mdurl 0.1.2 -> 0.1.2.post1, python rebuilt), packed
    bumped = bump_project(
        cache.project, tmp_path / "project", "mdurl", "0.1.2.post1", settings.pack_cache
    )
    pack_cache = tmp_path / "pack-cache"
    subprocess.run(["cp", "-al", str(settings.pack_cache), str(pack_cache)], check=True)
    new = pack(bumped.project, tmp_path / "new" / "vllm-cpu.tar", pack_cache,
               progress_stream=io.StringIO())  # fmt: skip
    assert new.downloaded == 2, "only the two bumped packages are new"
    new.bundle.with_name("vllm-cpu.tar.sha256").write_text(f"{new.sha256}  vllm-cpu.tar\n")
    delta = tmp_path / "carried" / "vllm-cpu.delta.tar"
    written = write_delta(new.bundle, new.sha256, base, delta, progress_stream=io.StringIO())
    carried = sorted(m.name for m in read_manifest(delta).members if m.source == "delta")
    assert carried == sorted(
        [f"pypi/{bumped.wheel_new.name}", f"channel/linux-64/{bumped.python_new.name}"]
    )
    assert written.size < 256 << 10, "the delta holds the two small packages and metadata"

    # container: the delta over the base bundle, no network
    def runtime(bundle: Path, project: Path, **extra: str) -> dict[str, str]:
        env = vllm_bundle.runtime_env(bundle, project, project.parent / "state", tmp_path / "rc")
        return {**env, **extra}

    p_delta = tmp_path / "c1" / "vllm-pixi-offline"
    env = runtime(delta, p_delta, AUTO_INFER_VLLM_BASE_BUNDLE_PATH=str(base))
    installed = run_doit(["install"], env, timeout=900, prefix=netns)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "imports: torch 2.13.0+cpu, vllm 0.32.0" in installed.stderr
    p_full = tmp_path / "c2" / "vllm-pixi-offline"
    env_full = runtime(new.bundle, p_full, AUTO_INFER_VLLM_VERIFY="none")
    full = run_doit(["install"], env_full, timeout=900, prefix=netns)
    assert full.returncode == 0, full.stderr[-2000:]
    from_delta, from_full = (
        installed_record(p_delta, "default"),
        installed_record(p_full, "default"),
    )
    assert from_delta is not None and from_full is not None
    assert from_delta.bundle_sha256 == from_full.bundle_sha256 == new.sha256
    assert from_delta.lock_sha256 == from_full.lock_sha256
    assert _env_files(p_delta) == _env_files(p_full)
    dist = p_delta / ".pixi" / "envs" / "default" / "lib" / "python3.11" / "site-packages"
    assert (dist / "mdurl-0.1.2.post1.dist-info").is_dir()

    # the full tar again, byte for byte, for pixi-unpack or the next hop
    rebuilt = tmp_path / "rebuilt" / "vllm-cpu.tar"
    rebuilt.parent.mkdir()
    again = run_doit(["rebuild-bundle", "--base", str(base), "--output", str(rebuilt)], env)
    assert again.returncode == 0, again.stderr[-2000:]
    digest = hashlib.sha256()
    with rebuilt.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == new.sha256
    rebuilt.unlink()

    # a wrong base: refused in one line naming both sha256s, nothing installed
    p_wrong = tmp_path / "c3" / "vllm-pixi-offline"
    wrong = run_doit(
        ["install"], runtime(delta, p_wrong, AUTO_INFER_VLLM_BASE_BUNDLE_PATH=str(new.bundle))
    )
    assert wrong.returncode != 0
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and base_sha in errors[0] and new.sha256 in errors[0], wrong.stderr
    assert not (p_wrong / ".pixi").exists()


from vllm_runtime import vllm_project  # noqa: E402, F401
