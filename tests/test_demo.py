"""The README's main command, the CPU demo, runs the whole chain (real vLLM: slow)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO, doit_env, run_doit

pytestmark = pytest.mark.slow


def test_cpu_demo_runs_the_whole_chain(tmp_path, tiny_model):
    work = tmp_path / "demo"
    env = doit_env(tmp_path / "unused-state")
    result = subprocess.run(
        [str(REPO / "scripts" / "cpu-demo.sh"), "--workdir", str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    summary = out.split("=== summary", 1)[1]
    assert "rebuild downloaded nothing" in summary
    assert "tinytool says 'tinytool 1.0: hello from libtiny 1.0'" in summary
    assert "second run: up to date" in summary
    assert "OpenAI:" in summary and "Anthropic:" in summary
    assert "stopped" in summary
    for stage in (
        "lock",
        "verify",
        "pack:tar",
        "pack:sha256",
        "extract",
        "patch-channels",
        "frozen-install",
    ):
        assert f".  {stage}" in result.stderr, f"stage {stage} ran"
    assert (work / "bundles" / "vllm-offline-bundle.tar.sha256").is_file()
    status = run_doit(
        ["status", "--json"], {**env, "PIPELINE_STATE_DIR": str(work / "container" / "state")}
    )
    assert '"state": "stopped"' in status.stdout
