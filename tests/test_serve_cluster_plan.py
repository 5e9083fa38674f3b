"""Multi-node instances in the pure planner and the node resolver: argv and env per rank."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.pixi.envs import Runtime
from pipeline.serve.cluster import detect_platform, slurm_first_host
from pipeline.serve.config import RestartPolicy, parse_config
from pipeline.serve.plan import MASK, Plan, build_plan

RUNTIME = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")
TOKEN = {"GANG_TOKEN": "s3cret-token"}

TOML = """
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/tiny"
max_model_len = 512
api_key = "client-key"
[instance.solo.server]
port = 8001
[instance.big.server]
port = 8002
served_model_name = "big"
tensor_parallel_size = 2
extra_args = ["--enforce-eager"]
[instance.big.cluster]
nodes = 2
leader = "192.0.2.1"
interface = "mn0"
token_env = "GANG_TOKEN"
"""
ADDRESSES = {"mn0": "192.0.2.2", "lo": "127.0.0.1"}


def plan(text=TOML, rank=None, environ=None, addresses=None, **kw) -> Plan:
    environ = TOKEN if environ is None else environ
    return build_plan(
        parse_config(text, source="serve.toml"),
        RUNTIME,
        environ,
        node_rank_arg=rank,
        addresses=ADDRESSES if addresses is None else addresses,
        **kw,
    )


def error_of(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        plan(**kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rank_0_runs_the_leader_through_the_cli_with_the_http_side():
    p = plan(rank=0)
    assert [i.name for i in p.instances] == ["big", "solo"]
    big = p.instance("big")
    assert big.argv == (
        "/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/models/tiny",
        "--host", "0.0.0.0", "--port", "8002", "--served-model-name", "big",
        "--dtype", "auto", "--tensor-parallel-size", "2",
        "--distributed-executor-backend", "mp",
        "--nnodes", "2", "--node-rank", "0", "--master-addr", "192.0.2.1",
        "--master-port", "29501", "--max-model-len", "512", "--enforce-eager",
    )  # fmt: skip
    assert big.health_url == "http://127.0.0.1:8002/health"
    assert big.secret_env["VLLM_API_KEY"].get_secret_value() == "client-key"
    assert big.env["GLOO_SOCKET_IFNAME"] == big.env["NCCL_SOCKET_IFNAME"] == "mn0"
    assert big.env["VLLM_HOST_IP"] == "192.0.2.2"
    assert big.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert big.member is not None and big.member.is_leader
    assert big.member.control_url == "http://192.0.2.1:29601"
    # One-node instances keep today's launch.
    assert p.instance("solo").argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server")


def test_rank_1_runs_only_the_headless_member_without_port_or_key():
    p = plan(rank=1)
    assert [i.name for i in p.instances] == ["big"]
    assert p.node_rank == 1 and p.elsewhere == ("solo",)
    big = p.instances[0]
    assert big.argv == (
        "/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/models/tiny",
        "--dtype", "auto", "--tensor-parallel-size", "2",
        "--distributed-executor-backend", "mp",
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "192.0.2.1",
        "--master-port", "29501", "--headless", "--max-model-len", "512", "--enforce-eager",
    )  # fmt: skip
    assert "--port" not in big.argv and "--api-key" not in big.argv
    assert big.secret_env == {} and big.missing_secrets == {}
    assert (big.port, big.health_url, big.base_url, big.model_names) == (0, "", "", ())
    assert "VLLM_API_KEY" in big.env_remove


def test_data_parallel_over_nodes():
    text = TOML.replace("tensor_parallel_size = 2", "tensor_parallel_size = 1").replace(
        "nodes = 2", "nodes = 2\ndata_parallel = 2"
    )
    leader = plan(text, rank=0).instance("big").argv
    follower = plan(text, rank=1).instance("big").argv
    i = leader.index("--data-parallel-size")
    assert leader[i : i + 4] == ("--data-parallel-size", "2", "--api-server-count", "1")
    assert "--distributed-executor-backend" not in leader  # TP=1 per DP rank
    j = follower.index("--data-parallel-size")
    assert follower[j : j + 3] == ("--data-parallel-size", "2", "--nnodes")
    assert "--api-server-count" not in follower and "--headless" in follower


def test_doit_plan_shows_the_follower_with_its_token_masked():
    shown = plan(rank=1).to_display()
    assert shown["node_rank"] == 1 and shown["on_rank_0"] == ["solo"]
    member = shown["instances"][0]["member"]
    assert member["rank"] == 1 and member["token"] == MASK
    assert "s3cret-token" not in json.dumps(shown)


def test_the_token_reaches_the_detached_supervisor_only():
    p = plan(rank=0)
    again = Plan.model_validate_json(p.to_secret_json())
    assert again.instance("big").member.token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in json.dumps(p.to_display())


def test_the_gateway_and_one_node_instances_stay_on_rank_0():
    text = TOML + "[gateway]\nenable = true\nport = 9000\n"
    assert plan(text, rank=0).gateway is not None
    p = plan(text, rank=1)
    assert p.gateway is None and [i.name for i in p.instances] == ["big"]


def test_a_missing_rank_says_how_to_give_one():
    message = error_of(rank=None)
    assert message.startswith("serve.toml: instance.big.cluster.rank: ")
    assert "--node-rank N" in message


def test_a_rank_out_of_range_names_where_it_came_from():
    assert "--node-rank 2 is out of range for nodes = 2 (0 to 1)" in error_of(rank=2)
    lws = {**TOKEN, "LWS_WORKER_INDEX": "3", "LWS_LEADER_ADDRESS": "l", "LWS_GROUP_SIZE": "2"}
    assert "LWS_WORKER_INDEX=3 is out of range" in error_of(environ=lws)


def test_a_platform_size_that_disagrees_with_nodes():
    lws = {"LWS_WORKER_INDEX": "0", "LWS_LEADER_ADDRESS": "l", "LWS_GROUP_SIZE": "4"}
    message = error_of(environ=lws)
    assert "instance.big.cluster.nodes: is 2 but LWS_GROUP_SIZE=4 (lws)" in message


def test_an_interface_without_an_address():
    message = error_of(rank=0, addresses={"lo": "127.0.0.1"})
    assert "instance.big.cluster.interface: 'mn0' has no IPv4 address on this node" in message


def test_a_loopback_host_ip_from_the_environment_is_refused():
    text = TOML.replace('interface = "mn0"\n', "")
    message = error_of(text=text, rank=0, environ={**TOKEN, "VLLM_HOST_IP": "127.0.0.1"})
    assert "VLLM_HOST_IP" in message and "not reachable from the other nodes" in message


def test_bare_nodes_need_the_token():
    message = error_of(rank=0, environ={})
    assert "instance.big.cluster.token_env: names GANG_TOKEN, which is not set" in message
    no_env = TOML.replace('token_env = "GANG_TOKEN"\n', "")
    message = error_of(text=no_env, rank=0)
    assert "instance.big.cluster.token_env: required on bare nodes" in message


def test_the_config_rank_and_the_command_line_must_agree():
    text = TOML + "rank = 1\n"
    assert "is 1 but --node-rank 0 was given" in error_of(text=text, rank=0)
    assert plan(text).instance("big").member.rank == 1


@pytest.mark.parametrize(
    ("environ", "name", "rank", "leader", "size"),
    [
        (
            {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "lead.svc", "LWS_GROUP_SIZE": "2"},
            "lws",
            1,
            "lead.svc",
            2,
        ),
        (
            {
                "SLURM_NODEID": "1",
                "SLURM_JOB_NODELIST": "gpu[07-09],x1",
                "SLURM_JOB_NUM_NODES": "3",
            },
            "slurm",
            1,
            "gpu07",
            3,
        ),
        (
            {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n"},
            "skypilot",
            0,
            "10.0.0.5",
            None,
        ),
    ],
)
def test_platforms_give_rank_leader_and_size(environ, name, rank, leader, size):
    platform = detect_platform(environ)
    assert platform is not None
    assert (platform.name, platform.rank, platform.leader, platform.size) == (
        name,
        rank,
        leader,
        size,
    )


def test_slurm_hostlists():
    assert slurm_first_host("node1") == "node1"
    assert slurm_first_host("node[01-04,07],gpu5") == "node01"
    assert slurm_first_host("a-b[3,5]") == "a-b3"
    assert slurm_first_host("") is None


def test_under_a_platform_members_never_restart_and_need_no_token():
    text = TOML.replace('leader = "192.0.2.1"\n', "")
    lws = {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "lead.svc", "LWS_GROUP_SIZE": "2"}
    big = plan(text, environ=lws).instance("big")
    assert big.member.platform == "lws" and big.member.token is None
    assert big.member.leader == "lead.svc" and "--headless" in big.argv
    assert (big.restart, big.max_restarts) == (RestartPolicy.NO, 0)
    assert any("never restart on their own" in n for n in big.notes)


def test_ray_stays_an_extra_args_recipe():
    text = TOML.replace(
        'extra_args = ["--enforce-eager"]', 'extra_args = ["--distributed-executor-backend", "ray"]'
    )
    argv = plan(text, rank=0).instance("big").argv
    assert argv.count("--distributed-executor-backend") == 1 and argv[-1] == "ray"


def test_one_node_configs_plan_as_before_with_no_rank_anywhere():
    text = TOML.split("[instance.big.server]")[0]
    p = plan(text, environ={})
    assert p.node_rank == 0 and "node_rank" not in p.to_display()
