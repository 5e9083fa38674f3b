"""How vLLM reads an argument (pipeline.serve.config.vllm_args): its rewriting, argparse's
prefixes and one-character options, against vLLM 0.32.0's options list. Pure and fast; the
agreement with vLLM's own parser is tests/test_vllm_args_agree.py (slow)."""

from __future__ import annotations

import pytest

from pipeline.serve.config.vllm_args import (
    OPTIONS_FILE,
    option_values,
    read_arg,
    read_args,
    vllm_options,
)

# argument -> (flag as messages show it, value in the argument, option strings it matches)
CASES = {
    # exact names, with and without a value
    "--host": ("--host", None, ("--host",)),
    "--port=9": ("--port", "9", ("--port",)),
    "-tp": ("-tp", None, ("-tp",)),
    "-tp=2": ("-tp", "2", ("-tp",)),
    "--device-memory-utilization": (
        "--device-memory-utilization",
        None,
        ("--device-memory-utilization",),
    ),
    # `_` is `-` in a `--` name (vLLM's rewriting), not in a value
    "--api_key=A_B": ("--api_key", "A_B", ("--api-key",)),
    "--served_model_name": ("--served_model_name", None, ("--served-model-name",)),
    # an unambiguous prefix is that option (argparse's allow_abbrev)
    "--hos": ("--hos", None, ("--host",)),
    "--por=9": ("--por", "9", ("--port",)),
    "--served": ("--served", None, ("--served-model-name",)),
    "--tensor_parallel": ("--tensor_parallel", None, ("--tensor-parallel-size",)),
    # an exact name wins over the longer ones it starts
    "--model": ("--model", None, ("--model",)),
    # several: ambiguous (vLLM refuses it)
    "--po": ("--po", None, ("--pooler-config", "--port")),
    "--mode": (
        "--mode",
        None,
        ("--model", "--model-class-overrides", "--model-impl", "--model-loader-extra-config"),
    ),
    # `--name.key`: a JSON value of `--name`, given on its own (the value is not in it)
    "--api-key.x": ("--api-key", None, ("--api-key",)),
    "--hos.a.b=1": ("--hos", None, ("--host",)),
    "--api_key.x+": ("--api_key", None, ("--api-key",)),
    "--host+.x": ("--host+", None, ()),
    "--seed=1.5": ("--seed", "1.5", ("--seed",)),
    # one dash: the one-character option and its glued value, or a prefix of a short name
    "-n4": ("-n", "4", ("-n",)),
    "-r1": ("-r", "1", ("-r",)),
    "-t": ("-t", None, ("-tp",)),
    "-t=2": ("-t", "2", ("-tp",)),  # Python 3.12 and later; 3.11 finds no option
    "-tp4": ("-tp4", None, ()),
    "-np": ("-n", "p", ("-n",)),  # -n with the value "p"
    # -O is rewritten to --optimization-level
    "-O3": ("-O", "3", ("--optimization-level",)),
    "-O=3": ("-O", "3", ("--optimization-level",)),
    # unknown options
    "--no-such-option": ("--no-such-option", None, ()),
    "--host+": ("--host+", None, ()),
    "---host": ("---host", None, ()),
}


@pytest.mark.parametrize(("arg", "expected"), CASES.items(), ids=list(CASES))
def test_how_vllm_reads_an_argument(arg, expected):
    reading = read_arg(arg)
    assert reading is not None
    flag, value, matches = expected
    assert (reading.flag, reading.value, tuple(sorted(reading.matches))) == (
        flag,
        value,
        tuple(sorted(matches)),
    )


@pytest.mark.parametrize("arg", ["0.0.0.0", "", "-", "--", "x--host"])
def test_values_and_the_end_of_options_are_not_options(arg):
    assert read_arg(arg) is None


def test_a_prefix_of_many_short_names_is_ambiguous():
    reading = read_arg("-dp")
    assert reading is not None and reading.matches == ("-dp",), "exact wins"
    reading = read_arg("-d")
    assert reading is not None and {"-dp", "-dpa", "-dc"} <= set(reading.matches)
    assert reading.option is None


def test_every_name_of_an_option_reads_as_the_same_option():
    for string, option in vllm_options().items():
        reading = read_arg(string)
        assert reading is not None and reading.option == option, string


def test_the_options_list_is_vllm_0_32_0s_and_holds_every_managed_option():
    header = OPTIONS_FILE.read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# vLLM 0.32.0: the options of `vllm serve`")
    dests = {o.dest for o in vllm_options().values()}
    from pipeline.serve.config.checks import CLUSTER_OPTIONS
    from pipeline.serve.config.models import MANAGED_OPTIONS

    assert set(MANAGED_OPTIONS) | set(CLUSTER_OPTIONS) | {"pipeline_parallel_size"} <= dests
    assert vllm_options()["--host"].name == "--host"
    assert vllm_options()["-tp"].name == "--tensor-parallel-size"


def test_read_args_skips_values_and_keeps_positions():
    readings = list(read_args(["--seed", "1", "--hos", "0.0.0.0", "-n4"]))
    assert [(r.index, r.flag) for r in readings] == [(0, "--seed"), (2, "--hos"), (4, "-n")]


@pytest.mark.parametrize(
    ("args", "values"),
    [
        (["-pp", "2"], ["2"]),
        (["--pipeline_parallel_size=3", "--pipeline-parallel", "4"], ["3", "4"]),
        (["--pipeline-parallel-size"], [""]),
        (["--seed", "2"], []),
    ],
)
def test_option_values_finds_every_spelling(args, values):
    assert option_values(args, "pipeline_parallel_size") == values
