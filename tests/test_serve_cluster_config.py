"""The [instance.<name>.cluster] table: keys, defaults and the one-line located refusals."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.serve.config import json_schema, parse_config

TWO_NODES = """
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/m"
[instance.big.server]
tensor_parallel_size = 2
[instance.big.cluster]
nodes = 2
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="serve.toml")
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith("serve.toml: ")
    return message


def test_a_cluster_table_gets_the_documented_defaults():
    inst = parse_config(TWO_NODES).instance("big")
    cluster = inst.cluster
    assert cluster is not None
    assert (cluster.nodes, cluster.leader, cluster.rank) == (2, "auto", "auto")
    assert (cluster.interface, cluster.master_port, cluster.data_parallel) == (None, 29501, 1)
    assert cluster.token_env is None
    assert inst.nodes == 2


def test_an_instance_without_a_cluster_table_is_one_node():
    inst = parse_config(TWO_NODES.replace("[instance.big.cluster]\nnodes = 2\n", "")).instances[0]
    assert inst.cluster is None and inst.nodes == 1


def test_every_key_can_be_set():
    text = TWO_NODES + (
        'leader = "10.0.0.1"\nrank = 1\ninterface = "eth1"\nmaster_port = 30000\n'
        'data_parallel = 1\ntoken_env = "GANG_TOKEN"\n'
    )
    cluster = parse_config(text).instance("big").cluster
    assert cluster is not None
    assert (cluster.leader, cluster.rank, cluster.interface) == ("10.0.0.1", 1, "eth1")
    assert (cluster.master_port, cluster.token_env) == (30000, "GANG_TOKEN")


def test_unknown_cluster_key_says_did_you_mean():
    message = error_of(TWO_NODES + "node = 3\n")
    assert "instance.big.cluster.node: unknown key; did you mean 'nodes'?" in message


def test_nodes_is_required_and_at_least_two():
    assert "instance.big.cluster.nodes: required in a cluster table" in error_of(
        TWO_NODES.replace("nodes = 2", 'leader = "a"')
    )
    message = error_of(TWO_NODES.replace("nodes = 2", "nodes = 1"))
    assert "instance.big.cluster.nodes: Input should be greater than or equal to 2" in message


def test_rank_is_an_integer_or_auto():
    assert "instance.big.cluster.rank" in error_of(TWO_NODES + 'rank = "first"\n')
    assert "instance.big.cluster.rank" in error_of(TWO_NODES + "rank = -1\n")


def test_a_rank_out_of_range_is_refused():
    message = error_of(TWO_NODES + "rank = 2\n")
    assert "serve.toml: instance.big.cluster.rank: rank 2 is out of range" in message
    assert "(0 to 1)" in message


def test_a_cluster_must_be_a_table():
    text = TWO_NODES.replace("[instance.big.cluster]\nnodes = 2\n", "") + "[instance.big]\n"
    text += "cluster = 2\n"
    assert "instance.big.cluster: must be a table" in error_of(text)


def test_parallel_sizes_must_fill_the_gpus_of_all_nodes():
    text = TWO_NODES.replace("gpu_ids = []", "gpu_ids = [0]").replace(
        "tensor_parallel_size = 2", "tensor_parallel_size = 4"
    )
    message = error_of(text)
    assert "instance.big.server.tensor_parallel_size" in message
    assert "= 4 must equal cluster.nodes 2 * 1 GPU(s) per node" in message


def test_tensor_parallel_over_nodes_is_not_the_one_node_gpu_count_rule():
    # TP=2 over 2 nodes with one GPU each: the one-node rule (tp == len(gpu_ids)) must not apply.
    text = TWO_NODES.replace("gpu_ids = []", "gpu_ids = [0]")
    assert parse_config(text).instance("big").server.tensor_parallel_size == 2


def test_pipeline_parallel_in_extra_args_counts():
    text = TWO_NODES.replace("gpu_ids = []", "gpu_ids = [0, 1]").replace(
        "tensor_parallel_size = 2", 'tensor_parallel_size = 2\nextra_args = ["-pp", "2"]'
    )
    assert parse_config(text).instance("big").nodes == 2
    wrong = text.replace('"-pp", "2"', '"--pipeline-parallel-size=3"')
    assert "* pipeline_parallel_size 3 = 6 must equal" in error_of(wrong)


def test_cpu_nodes_divide_the_product():
    text = TWO_NODES.replace("tensor_parallel_size = 2", "tensor_parallel_size = 3")
    message = error_of(text)
    assert "instance.big.server.tensor_parallel_size" in message
    assert "does not divide over cluster.nodes 2" in message
    dp = TWO_NODES.replace("tensor_parallel_size = 2", "tensor_parallel_size = 1")
    assert parse_config(dp + "data_parallel = 2\n").instance("big").cluster.data_parallel == 2


@pytest.mark.parametrize(
    "args", ['["--distributed-executor-backend", "uni"]', '["--distributed-executor-backend=uni"]']
)
def test_the_uni_executor_is_refused(args):
    text = TWO_NODES.replace(
        "tensor_parallel_size = 2", f"tensor_parallel_size = 2\nextra_args = {args}"
    )
    message = error_of(text)
    assert "instance.big.server.extra_args" in message and "uni" in message


def test_the_ray_executor_passes_as_an_extra_args_recipe():
    text = TWO_NODES.replace(
        "tensor_parallel_size = 2",
        'tensor_parallel_size = 2\nextra_args = ["--distributed-executor-backend", "ray"]',
    )
    assert parse_config(text).instance("big").server.extra_args[-1] == "ray"


def test_multiprocessing_off_is_refused():
    text = TWO_NODES + '[instance.big.control.env]\nVLLM_ENABLE_V1_MULTIPROCESSING = "0"\n'
    message = error_of(text)
    assert "instance.big.control.env.VLLM_ENABLE_V1_MULTIPROCESSING: " in message


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_a_loopback_host_ip_is_refused(address):
    text = TWO_NODES + f'[instance.big.control.env]\nVLLM_HOST_IP = "{address}"\n'
    message = error_of(text)
    assert "instance.big.control.env.VLLM_HOST_IP: " in message
    assert "not reachable from the other nodes" in message


@pytest.mark.parametrize("flag", ["--nnodes", "--node-rank", "--headless", "-dp", "--master-addr"])
def test_flags_the_cluster_sets_are_refused_in_extra_args(flag):
    text = TWO_NODES.replace(
        "tensor_parallel_size = 2", f'tensor_parallel_size = 2\nextra_args = ["{flag}", "1"]'
    )
    message = error_of(text)
    assert f"instance.big.server.extra_args (instance 'big'): {flag} is set from" in message or (
        f"instance.big.server.extra_args: {flag} is set from" in message
    )


@pytest.mark.parametrize(
    ("args", "flag", "key"),
    [
        ('["--nnode", "2"]', "--nnode is read by vLLM as --nnodes", "cluster.nodes"),
        ('["--node_rank=1"]', "--node_rank is read by vLLM as --node-rank", "cluster.rank"),
        ('["-n2"]', "-n is set from", "cluster.nodes"),
        ('["--master_addr", "h"]', "--master_addr is read by vLLM as --master-addr", "leader"),
        (
            '["--data_parallel_size", "2"]',
            "--data_parallel_size is read by vLLM as --data-parallel-size",
            "data_parallel",
        ),
    ],
)
def test_cluster_flags_under_other_spellings_are_refused(args, flag, key):
    text = TWO_NODES.replace(
        "tensor_parallel_size = 2", f"tensor_parallel_size = 2\nextra_args = {args}"
    )
    message = error_of(text)
    assert f"instance.big.server.extra_args: {flag}" in message
    assert f"{key}" in message and "on a multi-node instance; remove it" in message


def test_pipeline_parallel_and_the_executor_count_under_any_spelling():
    text = TWO_NODES.replace("gpu_ids = []", "gpu_ids = [0, 1]").replace(
        "tensor_parallel_size = 2", 'tensor_parallel_size = 2\nextra_args = ["-pp", "2"]'
    )
    wrong = text.replace('"-pp", "2"', '"--pipeline_parallel_size", "3"')
    assert "* pipeline_parallel_size 3 = 6 must equal" in error_of(wrong)
    uni = TWO_NODES.replace(
        "tensor_parallel_size = 2",
        'tensor_parallel_size = 2\nextra_args = ["--distributed_executor_backend=uni"]',
    )
    assert "--distributed-executor-backend uni runs one process" in error_of(uni)


def test_one_node_instances_keep_their_extra_args():
    # -dp on a one-node instance is vLLM's own business, as before.
    text = TWO_NODES.replace("[instance.big.cluster]\nnodes = 2\n", "").replace(
        "tensor_parallel_size = 2", 'extra_args = ["-dp", "2"]'
    )
    assert parse_config(text).instances[0].server.extra_args == ["-dp", "2"]


def test_the_schema_knows_the_cluster_table():
    schema = json_schema()
    assert schema["$defs"]["Instance"]["properties"]["cluster"] == {"$ref": "#/$defs/Cluster"}
    assert schema["$defs"]["Cluster"]["required"] == ["nodes"]
    assert schema["$defs"]["Cluster"]["properties"]["master_port"]["default"] == 29501
