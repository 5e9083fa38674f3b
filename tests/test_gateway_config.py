"""The `[gateway]` table: validation, what the planner makes of it, clients, and HTTP pieces.

Pure tests (no process): config -> plan -> display; the wire helpers on bytes.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.gateway.config import CONFIG_VAR, GatewayConfig, GatewayConfigError, Upstream
from pipeline.gateway.wire import (
    BodyModel,
    ChunkedReader,
    HttpError,
    ModelScanner,
    find_model,
    parse_request_head,
)
from pipeline.pixi.envs import Runtime
from pipeline.serve import clients
from pipeline.serve.config import json_schema, parse_config
from pipeline.serve.plan import Plan, build_plan
from pipeline.serve.preflight import host_problems

RUNTIME = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")

GATEWAY = """enable = true
port = 9000
api_keys = ["plain-gw-key"]
api_keys_env = ["GW_KEY"]"""
ALIASES = 'coder = ["claude-sonnet", "claude-haiku"]'
INSTANCES = """
[instance.control]
gpu_ids = []
log_dir = "/var/log/vllm"
[instance.server]
model = "/models/m"
host = "0.0.0.0"
[instance.coder.server]
port = 8001
served_model_name = "coder"
api_key = "coder-instance-key"
[instance.chat.server]
port = 8002
api_key_env = "CHAT_KEY"
"""


def config_text(gateway: str = GATEWAY, aliases: str = ALIASES, extra: str = "") -> str:
    return f"[gateway]\n{gateway}\n[gateway.aliases]\n{aliases}\n{INSTANCES}{extra}"


TEXT = config_text()
ENVIRON = {"GW_KEY": "env-gw-key", "CHAT_KEY": "chat-instance-key"}
SECRETS = ("plain-gw-key", "env-gw-key", "coder-instance-key", "chat-instance-key")


def plan_of(text: str = TEXT, environ: dict[str, str] | None = None, overrides: str | None = None):
    config = parse_config(text, source="serve.toml", overrides=overrides)
    environ = ENVIRON if environ is None else environ
    return config, build_plan(config, RUNTIME, environ, state_file=None, python="/venv/python")


def error_of(text: str, overrides: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="serve.toml", overrides=overrides)
    return str(info.value)


# ---- validation -------------------------------------------------------------------------------


def test_the_gateway_is_off_by_default_and_off_changes_nothing():
    off = config_text(gateway="enable = false")
    config, plan = plan_of(off)
    assert config.gateway.enable is False
    assert plan.gateway is None
    coder = plan.instance("coder")
    assert coder.host == "0.0.0.0" and coder.notes == ()
    assert coder.model_names == ("coder",), "aliases only with the gateway on"
    assert "claude-sonnet" not in coder.argv
    assert plan_of(INSTANCES)[1].digest() == plan.digest(), "a disabled [gateway] is no gateway"
    assert parse_config(INSTANCES).gateway.enable is False


PORT_TAKEN = (
    "serve.toml: instance.coder.server.port: port 8001 is the gateway's (gateway.port); with the "
    "gateway on, instances listen on 127.0.0.1 on ports of their own: move the instance or the "
    "gateway"
)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"aliases": "codr = ['x']"},
            "serve.toml: gateway.aliases.codr: no instance named 'codr' (did you mean 'coder'? "
            "instances: chat, coder)",
        ),
        (
            {"aliases": "chat = ['coder']"},
            "serve.toml: gateway.aliases.chat (instance 'chat'): alias 'coder' is served by "
            "instance 'coder'; a model name routes to one instance",
        ),
        (
            {"aliases": ALIASES + "\nchat = ['claude-haiku']"},
            "gateway.aliases.coder (instance 'coder'): alias 'claude-haiku' is also an alias of "
            "instance 'chat'",
        ),
        ({"aliases": "chat = ['a', 'a']"}, "'chat' lists an alias twice"),
        ({"aliases": "chat = ['has space']"}, "alias 'has space' of 'chat': aliases are"),
        ({"gateway": GATEWAY + "\nprot = 1"}, "gateway.prot: unknown key; did you mean 'port'?"),
        ({"gateway": "api_keys_env = ['1BAD']"}, "'1BAD' is not a valid environment variable"),
        ({"extra": "[instance.gateway.server]\nport = 1"}, "'gateway' is reserved for the gat"),
        ({"gateway": "enable = true\nport = 8001"}, PORT_TAKEN),
        (
            {"gateway": "enable = true", "aliases": "chat = 'x'"},
            "gateway.aliases.chat: Input should be a valid list",
        ),
    ],
)
def test_gateway_errors_name_the_key_and_what_is_allowed(parts, expected):
    message = error_of(config_text(**parts))
    assert expected in message
    assert message.startswith("serve.toml: ")


def test_aliases_of_a_disabled_instance_are_allowed_and_ignored():
    text = config_text(aliases="chat = ['talk']", extra="[instance.chat.control]\nenabled = false")
    _, plan = plan_of(text)
    assert "talk" not in plan.gateway.routes


def test_a_bad_key_is_refused_without_showing_it():
    message = error_of(config_text(gateway='enable = true\napi_keys = ["ok", "secret value"]'))
    assert message == (
        "serve.toml: gateway.api_keys: key #2 is empty or holds spaces or non-ASCII characters "
        "(the value is not shown)"
    )


def test_overrides_turn_the_gateway_on_and_add_aliases():
    base = config_text(gateway="enable = false")
    overrides = json.dumps({"gateway": {"enable": True, "aliases": {"chat": ["talk"]}}})
    config, plan = plan_of(base, overrides=overrides)
    assert plan.gateway is not None
    assert config.gateway.aliases == {"coder": ["claude-sonnet", "claude-haiku"], "chat": ["talk"]}
    assert plan.gateway.routes["talk"] == "chat"
    message = error_of(base, json.dumps({"gateway": {"enable": True, "port": 8002}}))
    assert "instance.chat.server.port" in message and "gateway.port" in message


# ---- the plan ---------------------------------------------------------------------------------


def test_instances_are_forced_onto_loopback_and_doit_plan_says_so():
    _, plan = plan_of()
    for inst in plan.instances:
        assert inst.host == "127.0.0.1"
        assert inst.argv[inst.argv.index("--host") + 1] == "127.0.0.1"
        assert inst.notes == (
            "host 0.0.0.0 -> 127.0.0.1: the gateway (0.0.0.0:9000) is the only exposed port",
        )
    shown = plan.to_display()
    assert shown["instances"][0]["notes"] == list(plan.instances[0].notes)


def test_aliases_become_extra_served_names_after_the_primary_one():
    _, plan = plan_of()
    coder = plan.instance("coder")
    at = coder.argv.index("--served-model-name")
    assert coder.argv[at : at + 4] == (
        "--served-model-name",
        "coder",
        "claude-sonnet",
        "claude-haiku",
    )
    assert coder.model_names == ("coder", "claude-sonnet", "claude-haiku")
    chat = plan.instance("chat")
    assert chat.model_names == ("/models/m",)
    assert "--served-model-name" not in chat.argv


def test_the_gateway_is_one_more_supervised_process_with_its_config_in_a_secret():
    _, plan = plan_of()
    gw = plan.gateway
    assert gw is not None
    assert plan.processes == (*plan.instances, gw)
    assert plan.instance("gateway") is gw
    assert gw.kind == "gateway" and gw.name == "gateway"
    assert gw.argv == ("/venv/python", "-m", "pipeline.gateway")
    assert gw.health_url == "http://127.0.0.1:9000/health"
    assert gw.log_file == "/var/log/vllm/gateway.log", "beside the instances' logs"
    assert gw.start_after is None, "started with the instances, waiting for none"
    assert gw.routes == {
        "/models/m": "chat",
        "claude-haiku": "coder",
        "claude-sonnet": "coder",
        "coder": "coder",
    }
    assert set(gw.secret_env) == {CONFIG_VAR}
    config = GatewayConfig.from_json(gw.secret_env[CONFIG_VAR].get_secret_value())
    assert config.keys == ("plain-gw-key", "env-gw-key")
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert [(u.name, u.port, u.key, u.models) for u in config.instances] == [
        ("chat", 8002, "chat-instance-key", ("/models/m",)),
        ("coder", 8001, "coder-instance-key", ("coder", "claude-sonnet", "claude-haiku")),
    ]
    assert all(u.host == "127.0.0.1" for u in config.instances)
    assert not any(secret in repr(config) for secret in SECRETS), "repr leaves keys out"


def test_no_secret_is_shown_and_the_plan_roundtrips_for_the_detached_supervisor():
    _, plan = plan_of()
    shown = json.dumps(plan.to_display())
    assert not any(secret in shown for secret in SECRETS)
    display = plan.to_display()["gateway"]
    assert display["env"][CONFIG_VAR] == "***"
    assert display["auth"].startswith("2 key(s)")
    assert display["routes"]["claude-sonnet"] == "coder"
    again = Plan.model_validate_json(plan.to_secret_json())
    assert again.gateway is not None
    assert again.gateway.secret_env[CONFIG_VAR].get_secret_value() == (
        plan.gateway.secret_env[CONFIG_VAR].get_secret_value()
    )
    assert again.digest() == plan.digest()


def test_the_state_file_reaches_the_gateway(tmp_path):
    config = parse_config(TEXT, source="serve.toml")
    plan = build_plan(config, RUNTIME, ENVIRON, state_file=tmp_path / "state.json")
    gw_config = GatewayConfig.from_json(plan.gateway.secret_env[CONFIG_VAR].get_secret_value())
    assert gw_config.state_file == str(tmp_path / "state.json")


def test_the_limits_reach_the_gateway_with_sane_defaults():
    _, plan = plan_of()
    defaults = GatewayConfig.from_json(plan.gateway.secret_env[CONFIG_VAR].get_secret_value())
    assert (defaults.header_timeout, defaults.body_timeout) == (60.0, 60.0)
    assert defaults.max_body == 64 * 1024 * 1024 and defaults.max_connections == 4096
    limits = "header_timeout = 5\nbody_timeout = 2.5\nmax_body_mib = 8\nmax_connections = 100"
    _, plan = plan_of(config_text(gateway=GATEWAY + "\n" + limits))
    gw = GatewayConfig.from_json(plan.gateway.secret_env[CONFIG_VAR].get_secret_value())
    assert (gw.header_timeout, gw.body_timeout) == (5.0, 2.5)
    assert gw.max_body == 8 * 1024 * 1024 and gw.max_connections == 100
    assert "gateway.body_timeout" in error_of(config_text(gateway=GATEWAY + "\nbody_timeout = 0"))


def test_a_missing_key_variable_stops_serve_and_shows_in_the_plan():
    config, plan = plan_of(environ={"CHAT_KEY": "k"})
    assert plan.gateway.missing_keys == ("GW_KEY",)
    problems = host_problems(config, plan, {}, gpus=lambda _: None, in_use=lambda h, p: False)
    assert [p for p in problems if ": gateway: " in p] == [
        "serve.toml: gateway: gateway.api_keys_env names GW_KEY, which is not set; export it or "
        "use gateway.api_keys (the gateway would otherwise accept fewer keys)"
    ]
    busy = host_problems(config, plan, ENVIRON, gpus=lambda _: None, in_use=lambda h, p: p == 9000)
    assert any("gateway: port 9000 is already in use" in p for p in busy)


def test_no_keys_means_no_auth_and_the_plan_says_so():
    _, plan = plan_of(config_text(gateway="enable = true\nport = 9000"))
    assert plan.gateway.key_count == 0
    assert plan.to_display()["gateway"]["auth"].startswith("none")


# ---- schema, settings, clients ----------------------------------------------------------------


def test_the_schema_knows_the_gateway():
    import tomllib

    schema = json_schema()
    jsonschema.validate(tomllib.loads(TEXT), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gateway": {"prot": 1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"instance": {"gateway": {}}}, schema)


def test_the_settings_variable_is_the_one_the_planner_sets():
    from pipeline.settings import VARIABLES, load_settings, variables_markdown

    (var,) = [v for v in VARIABLES if v.field == "gateway_config"]
    assert var.names == (CONFIG_VAR,) and var.internal
    assert load_settings({CONFIG_VAR: "{}"}).gateway_config == "{}"
    assert CONFIG_VAR not in variables_markdown(), "internal: not in the README table"


def test_the_gateway_config_refuses_what_it_does_not_understand():
    with pytest.raises(GatewayConfigError, match="not JSON"):
        GatewayConfig.from_json("{")
    with pytest.raises(GatewayConfigError, match="not a version 1 gateway config"):
        GatewayConfig.from_json('{"version": 2}')


def test_clients_point_at_the_gateway_with_its_key():
    config, plan = plan_of()
    text = clients.instructions(config, plan)
    assert not any(secret in text for secret in SECRETS)
    assert "== gateway: every model below at http://127.0.0.1:9000 (one port)" in text
    assert "OpenAI SDK:   base_url=http://127.0.0.1:9000/v1  api_key=$GW_KEY" in text
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9000\n" in text
    assert "(aliases: claude-sonnet, claude-haiku)" in text
    assert "127.0.0.1:8001" not in text, "instances are not exposed"
    data = yaml.safe_load(clients.litellm_config(config, plan))
    assert {m["litellm_params"]["api_base"] for m in data["model_list"]} == {
        "http://127.0.0.1:9000/v1"
    }
    assert {m["litellm_params"]["api_key"] for m in data["model_list"]} == {"os.environ/GW_KEY"}
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:9000" in clients.env_file(plan).splitlines()


# ---- wire -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "a", "messages": [{"model": "b"}]}', BodyModel(True, "a")),
        (b'{"messages": [{"content": "x"}], "model": "a", "stream": true}', BodyModel(True, "a")),
        (b'{"metadata": {"model": "b"}, "model": "a", "x": {}}', BodyModel(True, "a")),
        (b'{"metadata": {"model": "b"}, "x": []}', BodyModel(True)),
        (b'{"a": "{\\"model\\": \\"b\\"}", "model": "c"}', BodyModel(True, "c")),
        (b'{"model": "caf\\u00e9"}', BodyModel(True, "caf\u00e9")),
        (b'{"model": null}', BodyModel(True)),
        (b'[{"model": "a"}]', BodyModel(False)),
        (b"not json", BodyModel(False)),
        (b"", BodyModel(False)),
    ],
)
def test_find_model_reads_only_the_top_level_key(body, expected):
    assert find_model(body) == expected
    assert find_model(json.dumps(json.loads(body)).encode() if expected[0] else body) == expected


def test_chunked_reader_finds_the_end_whatever_the_split():
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"
    for split in range(1, len(body)):
        reader = ChunkedReader(collect=True)
        first = reader.feed(body[:split])
        if first >= 0:
            assert body[:split][first:] == b"NEXT"[: split - (len(body) - 4)]
            end = split - len(body[:split][first:])
        else:
            second = reader.feed(body[split:])
            assert second >= 0
            end = split + second
        assert body[end:] == b"NEXT"
        assert reader.payload() == b"hello world"
    with pytest.raises(HttpError):
        ChunkedReader().feed(b"zz\r\n")
    with pytest.raises(HttpError) as info:
        ChunkedReader(limit=4).feed(b"5\r\nhello\r\n")
    assert info.value.status == 413


def test_request_heads_keep_their_lines_and_refuse_ambiguity():
    req = parse_request_head(
        b"POST http://gw/v1/messages?beta=true HTTP/1.1\r\nX-Api-Key: k\r\n"
        b"Connection: keep-alive, X-Hop\r\nContent-Length: 10"
    )
    assert req.target == b"/v1/messages?beta=true" and req.path == b"/v1/messages"
    assert req.x_api_key == b"k" and req.content_length == 10 and req.keep_alive
    assert req.connection_tokens == {b"keep-alive", b"x-hop"}
    assert req.headers[0] == (b"x-api-key", b"X-Api-Key: k", b"k")
    for bad in (
        b"POST / HTTP/1.1\r\n folded: x",
        b"POST / HTTP/1.1\r\nContent-Length: -1",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
    ):
        with pytest.raises(HttpError):
            parse_request_head(bad)
    assert parse_request_head(b"GET / HTTP/1.0").keep_alive is False


def test_the_model_is_found_whatever_the_body_is_split_into():
    body = b'{"messages": [{"content": "a \\" } ]"}], "model": "m\\u00e9", "stream": true}'
    for split in range(1, len(body)):
        scanner = ModelScanner()
        scanner.feed(body[:split])
        scanner.feed(body[split:])
        assert scanner.result() == (True, "m\u00e9", None), split
    # json.loads (and so vLLM) would take the last "model": the gateway refuses to guess.
    assert find_model(b'{"model": "a", "model": "b"}').problem is not None
    assert find_model(b'{"model": "a"} trailing') == (False, None, None)


def test_regression_responses_with_a_0x_chunk_size_or_no_crlf_after_data_are_refused():
    with pytest.raises(HttpError):
        ChunkedReader().feed(b"0x5\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(HttpError):
        ChunkedReader().feed(b"5\r\nhelloXX0\r\n\r\n")


def test_regression_a_connection_paused_by_a_slow_client_is_pooled_reading():
    """The read that ends a response can also pause it (the client's buffer filled): back in
    the pool it must read again, or the next request on it would hang."""
    from pipeline.gateway.upstream import Pool, UpstreamConn

    class Transport:
        reading = False
        closed = False

        def is_reading(self) -> bool:
            return self.reading

        def resume_reading(self) -> None:
            self.reading = True

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    pool = Pool(None, Upstream("a", "127.0.0.1", 1, None, ("a",)))  # type: ignore[arg-type]
    conn = UpstreamConn(pool)
    conn.transport = Transport()  # type: ignore[assignment]
    pool.release(conn)
    assert conn.transport.reading is True
    assert pool.acquire() is conn


# ---- replicas ---------------------------------------------------------------------------------

REPLICAS = """
[gateway]
enable = true
port = 9000
[gateway.aliases]
r1 = ["shared"]
r2 = ["shared"]
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/m"
served_model_name = "m"
[instance.r1.server]
port = 8001
[instance.r2.server]
port = 8002
[instance.solo.server]
port = 8003
model = "/models/other"
served_model_name = "other"
"""


def test_two_instances_of_one_served_name_validate_and_plan_as_replicas():
    config, plan = plan_of(REPLICAS)
    assert [i.name for i in plan.instances] == ["r1", "r2", "solo"]
    gw = plan.gateway
    assert gw is not None
    assert gw.routes == {"other": "solo"}
    assert gw.replicas == {"m": ("r1", "r2"), "shared": ("r1", "r2")}
    assert plan.to_display()["gateway"]["replicas"] == {"m": ["r1", "r2"], "shared": ["r1", "r2"]}
    runtime = GatewayConfig.from_json(gw.secret_env[CONFIG_VAR].get_secret_value())
    table = {model: [up.name for up in ups] for model, ups in runtime.routes().items()}
    assert table == {"m": ["r1", "r2"], "shared": ["r1", "r2"], "other": ["solo"]}
    text = clients.instructions(config, plan)
    assert "   models: m, other, shared" in text
    assert "== r1, r2 (replicas: the gateway spreads requests over them): model 'm'" in text
    assert text.count("OpenAI SDK:") == 2, "one section per served name, not per replica"
    data = yaml.safe_load(clients.litellm_config(config, plan))
    assert [m["model_name"] for m in data["model_list"]] == ["m", "other"]


def test_without_the_gateway_replicas_are_separate_ports_and_litellm_balances_them():
    text = REPLICAS.replace("enable = true", "enable = false")
    config, plan = plan_of(text)
    assert plan.gateway is None
    out = clients.instructions(config, plan)
    assert "== r1 (one of the replicas r1, r2; no gateway): model 'm'" in out
    data = yaml.safe_load(clients.litellm_config(config, plan))
    assert [m["model_name"] for m in data["model_list"]] == ["m", "m", "other"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('r2 = ["shared"]', 'solo = ["shared"]'),
            "gateway.aliases.solo (instance 'solo'): alias 'shared' is also an alias of instance "
            "'r1'; a model name routes to one instance, or to replicas",
        ),
        (
            ('r2 = ["shared"]', 'solo = ["m"]'),
            "gateway.aliases.solo (instance 'solo'): alias 'm' is served by instance 'r1'",
        ),
        (('r2 = ["shared"]', 'r2 = ["m"]'), "alias 'm' is the instance's own served name"),
    ],
)
def test_an_alias_is_shared_only_by_replicas(change, expected):
    assert expected in error_of(REPLICAS.replace(*change))


def test_upstream_timeout_reaches_the_gateway_with_a_generous_default():
    _, plan = plan_of()
    gw = GatewayConfig.from_json(plan.gateway.secret_env[CONFIG_VAR].get_secret_value())
    assert gw.upstream_timeout == 600.0, "long prompts and whole non-streamed answers fit"
    _, plan = plan_of(config_text(gateway=GATEWAY + "\nupstream_timeout = 1.5"))
    gw = GatewayConfig.from_json(plan.gateway.secret_env[CONFIG_VAR].get_secret_value())
    assert gw.upstream_timeout == 1.5
    for bad, expected in (("0", "greater than 0"), ("100000", "less than or equal to 86400")):
        message = error_of(config_text(gateway=GATEWAY + f"\nupstream_timeout = {bad}"))
        assert message.startswith("serve.toml: gateway.upstream_timeout: ") and expected in message
    # A gateway config written before the key existed reads with the default.
    data = json.loads(gw.to_json())
    del data["upstream_timeout"]
    assert GatewayConfig.from_json(json.dumps(data)).upstream_timeout == 600.0
