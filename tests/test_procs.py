"""The one way to run a child (:func:`pipeline.procs.run_logged`) and to stop a group.

The full-disk cases mount a tiny tmpfs (root on these machines): the log of a child then
lives on the filesystem the child filled, as it does in a container whose disk ran out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_factory import Kit, make_bundle, shared_kit
from conftest import pid_running

from pipeline.errors import BundleError, InstallError, PipelineError
from pipeline.fsutil import os_error_text
from pipeline.install import host
from pipeline.install.extract import extract_bundle
from pipeline.procs import (
    DRAIN_GRACE,
    die_with_parent,
    group_alive,
    process_state,
    query,
    run_logged,
    signal_group,
    spawn_detached,
    stop_group,
    worker_env,
)
from pipeline.serve import preflight
from pipeline.settings import REPO_ROOT, package_pythonpath


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the duration of the block."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {where} (root needed): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def run(argv: list[str], log: Path, *, timeout: float = 30, cwd: Path | None = None) -> None:
    run_logged(
        argv,
        cwd=cwd or log.parent,
        env=os.environ,
        log=log,
        timeout=timeout,
        label="the step",
        error=InstallError,
    )


# ---- a full disk ----------------------------------------------------------------------------


def test_disk_full_install_names_enospc_the_log_and_the_childs_last_line(tmp_path):
    # The child fills the disk (its own files and its output, which goes to a log on the same
    # filesystem), then says why it failed. Before: "failed (exit 1): no output; see the log".
    with tiny_filesystem(tmp_path / "disk") as disk:
        log = disk / "install-default.log"
        child = python_child(
            f"""
            import sys
            for i in range(3000):
                print(f"linking package {{i}} of 3000 into the prefix", flush=True)
            try:
                with open({str(disk / "prefix.bin")!r}, "wb") as fh:
                    fh.write(b"x" * (1 << 20))
            except OSError as exc:
                print(f"error: cannot link libbig.so: {{exc.strerror}}", file=sys.stderr)
                sys.exit(1)
            """
        )
        with pytest.raises(InstallError) as info:
            run(child, log, cwd=tmp_path)
        message = info.value.message
        assert "\n" not in message
        assert "the step failed (exit 1): error: cannot link libbig.so: " in message
        assert "No space left on device (ENOSPC)" in message
        assert str(log) in message
        assert "no output" not in message


def test_disk_full_during_extract_names_the_file_not_none(tmp_path, kit: Kit):
    bundle = make_bundle(tmp_path, kit)
    disk = tmp_path / "disk"
    with tiny_filesystem(disk, size="16k"), pytest.raises(BundleError) as info:
        extract_bundle(bundle, disk / "project", environment="default", say=lambda _m: None)
    message = info.value.message
    assert "No space left on device (ENOSPC): " in message, message
    assert f"{disk / 'project'}" in message.split("ENOSPC): ", 1)[1]
    assert ": None" not in message


def test_os_error_text_never_prints_none():
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # raised on a descriptor
    assert os_error_text(exc) == "No space left on device (ENOSPC)"
    assert os_error_text(exc, "/x/y") == "No space left on device (ENOSPC): /x/y"
    named = FileNotFoundError(errno.ENOENT, "No such file or directory", "/a")
    assert os_error_text(named, "/other") == "No such file or directory (ENOENT): /a"


# ---- bounded, and the group put down ------------------------------------------------------


def test_a_timeout_kills_the_whole_group_and_says_the_last_line(tmp_path):
    # A shell, not Python: its line is out within milliseconds of its start, so a loaded
    # machine does not turn "the last line" into "no output" before the timeout.
    pids = tmp_path / "pids"
    child = ["sh", "-c", f"sleep 60 & echo $$ > {pids}; echo 'waiting for the mirror'; sleep 60"]
    started = time.monotonic()
    with pytest.raises(InstallError) as info:
        run(child, tmp_path / "step.log", timeout=3)
    assert time.monotonic() - started < 15
    message = info.value.message
    assert "did not finish in 3 s and was stopped; last output: waiting for the mirror" in message
    assert not group_alive(int(pids.read_text())), "the grandchild was killed with its group"
    assert "waiting for the mirror" in (tmp_path / "step.log").read_text()


def test_a_grandchild_holding_the_output_pipe_does_not_hang_the_step(tmp_path):
    # llama-swap's bug, here: a daemon the child leaves behind keeps the pipe's write end.
    pgid_file = tmp_path / "pgid"
    child = python_child(
        f"""
        import os, subprocess
        subprocess.Popen(["sleep", "60"])  # inherits stdout, outlives its parent
        open({str(pgid_file)!r}, "w").write(f"{{os.getpgid(0)}}")
        print("done", flush=True)
        """
    )
    started = time.monotonic()
    try:
        run(child, tmp_path / "step.log")
        took = time.monotonic() - started
    finally:
        with contextlib.suppress(ValueError, OSError):
            signal_group(int(pgid_file.read_text()), signal.SIGKILL)
    assert took < DRAIN_GRACE + 5
    assert (tmp_path / "step.log").read_text() == "done\n"


def test_stop_group_sigkills_a_group_that_ignores_sigterm(tmp_path):
    proc = subprocess.Popen(
        python_child(
            """
            import signal, subprocess, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(60)"])
            print("ready", flush=True)
            time.sleep(60)
            """
        ),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    assert stop_group(proc.pid, 0.3, leader=proc) is True
    assert proc.returncode == -signal.SIGKILL
    assert not group_alive(proc.pid)


def test_stop_group_of_a_group_that_obeys_sigterm_needs_no_sigkill():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert stop_group(proc.pid, 5.0, leader=proc) is False
    assert proc.returncode == -signal.SIGTERM and not group_alive(proc.pid)


def test_process_state_tells_running_stopped_zombie_and_gone_apart():
    assert process_state(os.getpid()) == "R", "this process, reading its own stat"
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert wait_until(lambda: process_state(proc.pid) == "S", 10)
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: process_state(proc.pid) == "T", 10)
        os.kill(proc.pid, signal.SIGCONT)
        assert wait_until(lambda: process_state(proc.pid) == "S", 10)
        proc.kill()
        # Ended but not reaped: a zombie, which can no more make progress than a stopped one.
        assert wait_until(lambda: process_state(proc.pid) == "Z", 10)
    finally:
        proc.kill()
        proc.wait()
    assert process_state(proc.pid) is None, "reaped: gone"


# ---- a query, a detached child ----------------------------------------------------------------


def test_a_query_returns_its_stdout_and_fails_in_one_line_with_its_last_words():
    assert query(["sh", "-c", "echo answer; echo noise >&2"]) == "answer\n"
    with pytest.raises(InstallError) as info:
        query(
            ["sh", "-c", "echo partial; printf 'first\\nno such device\\n' >&2; exit 3"],
            label="the probe",
            error=InstallError,
        )
    assert info.value.message == "the probe failed (exit 3): no such device"
    with pytest.raises(PipelineError, match=r"^cannot run `/no/such/tool` \(No such file"):
        query(["/no/such/tool"])


def test_a_query_that_overruns_has_its_whole_group_killed(tmp_path):
    pidfile = tmp_path / "grandchild"
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"^`sh -c .*` did not answer in 0.5 s and was stopped"):
        query(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert time.monotonic() - started < 5
    grandchild = int(pidfile.read_text())
    wait_for_gone = time.monotonic() + 5
    while pid_running(grandchild) and time.monotonic() < wait_for_gone:
        time.sleep(0.05)
    assert not pid_running(grandchild)


def test_a_chatty_query_keeps_its_limit_and_a_grandchild_holding_the_pipe_does_not_hang_it(
    tmp_path: Path,
):
    assert len(query(["head", "-c", "5000000", "/dev/zero"], limit=1000)) == 1000
    started = time.monotonic()
    pidfile = tmp_path / "grandchild.pid"
    try:
        out = query(["sh", "-c", f"echo done; sleep 30 & echo $! > {pidfile}"], timeout=20)
        assert out == "done\n" and time.monotonic() - started < 5
    finally:
        # the grandchild outlives the query by design; it must not outlive the test
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_detached_child_leads_its_own_session_and_logs_to_the_file(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("before\n")
    proc = spawn_detached(
        ["sh", "-c", "echo out; echo err >&2; read line || echo no-stdin; sleep 60"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        log=log,
    )
    try:
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
        wait_for_text = time.monotonic() + 10
        while "no-stdin" not in log.read_text() and time.monotonic() < wait_for_text:
            time.sleep(0.05)
        assert log.read_text() == "before\nout\nerr\nno-stdin\n"
        assert proc.poll() is None, "returns at once, the child runs on"
    finally:
        assert stop_group(proc.pid, 5.0, leader=proc) is False
    with pytest.raises(FileNotFoundError):
        spawn_detached(["/no/such/server"], cwd=tmp_path, env={}, log=log)


# ---- one nvidia-smi, one PYTHONPATH ---------------------------------------------------------


def test_install_and_serve_ask_the_same_nvidia_smi(tmp_path):
    calls = tmp_path / "calls"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        'if [ "$1" = "-L" ]; then echo "GPU 0: H200 (UUID: a)"; echo "GPU 1: H200 (UUID: b)"\n'
        'else echo "| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 |"; fi\n'
    )
    smi.chmod(0o755)
    environ = {"PATH": str(smi.parent)}
    assert host._probe_nvidia_smi(environ) == "12.4"
    assert preflight.count_gpus(environ) == 2
    assert calls.read_text().splitlines() == ["", "-L"]


def test_every_child_gets_the_same_pythonpath():
    assert package_pythonpath() == str(REPO_ROOT)
    env = worker_env({"PYTHONPATH": "/opt/extra", "HOME": "/h"})
    assert env == {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}/opt/extra", "HOME": "/h"}
    assert worker_env({})["PYTHONPATH"] == str(REPO_ROOT)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


def test_a_child_whose_parent_died_before_it_was_armed_kills_itself():
    # The race die_with_parent closes: the parent it names is not the child's parent any
    # more (here: never was), so the death signal would never come; the child ends at once.
    arm = die_with_parent(os.getppid())
    assert arm is not None
    started = time.monotonic()
    child = subprocess.run(["sleep", "30"], preexec_fn=arm, timeout=10, check=False)
    assert child.returncode == -signal.SIGKILL and time.monotonic() - started < 15


def test_a_sigkilled_parent_takes_its_logged_child_along(tmp_path):
    pidfile = tmp_path / "child.pid"
    child = python_child(
        f"""
        import os, time
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        python_child(
            f"""
            from pathlib import Path
            from pipeline.procs import run_logged
            run_logged({child!r}, cwd=Path({str(tmp_path)!r}), env={{}},
                       log=Path({str(tmp_path / "child.log")!r}), timeout=120, label="child")
            """
        ),
        env=worker_env(os.environ),
        start_new_session=True,
    )
    pid = 0
    try:
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_until(lambda: not pid_running(pid), 5), "the child outlived its parent"
    finally:
        for pgid in (parent.pid, pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pgid:
                    os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            parent.wait(timeout=10)


def wait_until(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    return None


def test_a_rattler_request_survives_its_json_and_a_bad_one_names_the_field(tmp_path):
    from pipeline.rattler_worker import RattlerRequest, command

    request = RattlerRequest(
        tmp_path / "pixi.lock", "default", "p1", tmp_path / "env", tmp_path / "pkgs"
    )
    assert RattlerRequest.from_json(request.to_json()) == request
    local = RattlerRequest(
        tmp_path / "pixi.lock", "gpu", "linux-64", tmp_path / "env", tmp_path / "pkgs", tmp_path
    )
    assert RattlerRequest.from_json(local.to_json()) == local
    with pytest.raises(ValueError, match="'prefix' must be a non-empty string"):
        RattlerRequest.from_json('{"lock": "l", "environment": "e", "platform": "p"}')
    assert command(tmp_path / "r.json") == [
        sys.executable,
        "-m",
        "pipeline.rattler_worker",
        str(tmp_path / "r.json"),
    ]


# ---- the suite's own check: nothing the tests start outlives them -----------------------------


def test_the_session_end_check_finds_a_detached_child_and_one_with_an_environment_of_its_own(
    tmp_path,
):
    from conftest import RUN_MARK, leftover_processes

    mark = os.environ[RUN_MARK]
    # A daemon in a session of its own, as a detached supervisor is: it inherits the mark.
    inherited = subprocess.Popen(["sleep", "60"], start_new_session=True)
    # One started with an environment of its own: found by the run's temporary root instead.
    script = tmp_path / "own-env.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    own = subprocess.Popen(["sh", str(script)], env={"PATH": "/usr/bin:/bin"})
    try:
        # Popen returns once exec has closed its pipe, which the kernel does before it lays out
        # the new program's argv and environment: until then /proc shows both empty (CI once
        # read them in that window). Wait for sleep's own command line.
        cmdline = Path(f"/proc/{inherited.pid}/cmdline")
        deadline = time.monotonic() + 10
        while not cmdline.read_bytes().startswith(b"sleep\0") and time.monotonic() < deadline:
            time.sleep(0.01)
        found = leftover_processes(mark, str(tmp_path))
        assert inherited.pid in found and "sleep 60" in found[inherited.pid]
        assert own.pid not in found or str(tmp_path) in found[own.pid]
        assert leftover_processes("another-run", None) == {}, "other runs' processes are theirs"
    finally:
        for proc in (inherited, own):
            proc.kill()
            proc.wait()
    assert inherited.pid not in leftover_processes(mark, str(tmp_path)), "reaped: gone"
