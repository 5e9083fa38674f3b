"""Serving a project that `doit install` made, with a pixi on PATH that must never be called.

`launcher = "auto"` used to run vLLM through `pixi run` whenever pixi was on PATH: an old pixi
cannot read lock v7, and a first `pixi run` reinstalls the wheels. Here the installed
environment gets a stand-in ``vllm.entrypoints.openai.api_server`` module (it runs
tests/standin_server.py), and ``pixi`` on PATH writes a marker and fails whatever it is asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bundle_factory import Kit, make_bundle, shared_kit
from conftest import STANDIN, doit_env, free_port, run_doit, standin_config

from pipeline.install.extract import extract_bundle
from pipeline.install.frozen import frozen_install
from pipeline.install.host import HostFacts
from pipeline.install.layout import ProjectPaths
from pipeline.install.patch import patch_project

HOST = HostFacts(platform="linux-64", glibc="2.36", linux="6.1.0", cuda=None)

_API_SERVER = f"""import runpy, sys
print("standin vllm in", sys.prefix, flush=True)
sys.argv = [{str(STANDIN)!r}, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[1:]]
runpy.run_path({str(STANDIN)!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return shared_kit(tmp_path_factory)


def _quiet(_message: str) -> None:
    pass


def installed_project(tmp_path: Path, kit: Kit) -> Path:
    """A project installed as `doit install` does, whose env holds a stand-in vLLM."""
    project = tmp_path / "project"
    extract_bundle(make_bundle(tmp_path, kit), project, environment="default", say=_quiet)
    patch_project(project, "default", say=_quiet)
    frozen_install(
        project,
        "default",
        cache_dir=tmp_path / "pkgs",
        facts=HOST,
        verify_command="none",
        say=_quiet,
    )
    prefix = ProjectPaths.of(project).env_link("default").resolve()
    (site,) = prefix.glob("lib/python*/site-packages")
    package = site / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (site / "vllm", site / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(_API_SERVER)
    return project


def failing_pixi(bindir: Path, marker: Path) -> None:
    bindir.mkdir()
    pixi = bindir / "pixi"
    pixi.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 1\n')
    pixi.chmod(0o755)


def test_a_failing_pixi_on_path_is_never_called_by_plan_check_or_serve(tmp_path, kit: Kit):
    project = installed_project(tmp_path, kit)
    marker = tmp_path / "pixi-was-called"
    bindir = tmp_path / "bin"
    failing_pixi(bindir, marker)
    port = free_port()
    text = standin_config(Path("/unused"), tmp_path / "logs", {"tiny": {"port": port}})
    text = text.replace('env_prefix = "/unused"', f"pixi_project_dir = {json.dumps(str(project))}")
    config = tmp_path / "serve.toml"
    config.write_text(text)
    state = tmp_path / "state"
    env = doit_env(state, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    python = ProjectPaths.of(project).env_link("default") / "bin" / "python"

    try:
        planned = run_doit(["plan", "--check", "--config", str(config)], env, timeout=60)
        assert planned.returncode == 0, planned.stderr
        (instance,) = json.loads(planned.stdout)["instances"]
        assert instance["argv"][0] == str(python)

        served = run_doit(["serve", "--config", str(config)], env, timeout=90)
        assert served.returncode == 0, served.stderr
        log = (tmp_path / "logs" / "tiny.log").read_text()
        assert f"standin vllm in {python.parent.parent}" in log
        assert "standin: pid" in log
    finally:
        stopped = run_doit(["stop"], env, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not marker.exists(), f"pixi was called: {marker.read_text()}"


def test_an_explicit_project_dir_that_is_not_installed_is_one_error_line(tmp_path):
    missing = tmp_path / "never-installed"
    text = standin_config(Path("/unused"), tmp_path / "logs", {"tiny": {"port": free_port()}})
    text = text.replace('env_prefix = "/unused"', f"pixi_project_dir = {json.dumps(str(missing))}")
    config = tmp_path / "serve.toml"
    config.write_text(text)
    env = doit_env(tmp_path / "state")
    for args in (["plan", "--check", "--config", str(config)], ["serve", "--config", str(config)]):
        result = run_doit(args, env, timeout=60)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: {config}: master.pixi_project_dir: environment 'default' is not installed "
            f"at {missing}/.pixi/envs/default (no bin/python); run `doit install` first"
        ], result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs" / "tiny.log").exists(), "nothing was started"
