"""`doit clients`: what OpenAI SDKs, Claude Code and LiteLLM need; secrets never printed."""

from __future__ import annotations

import yaml

from pipeline.pixi.envs import Runtime
from pipeline.serve import clients
from pipeline.serve.config import parse_config
from pipeline.serve.plan import build_plan

TEXT = """
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/m"
[instance.coder.server]
port = 8000
served_model_name = "coder"
max_model_len = 32768
api_key = "plain-secret-value"
extra_args = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
[instance.chat.server]
port = 8001
served_model_name = "org/chat"
max_model_len = 4096
api_key_env = "CHAT_KEY"
"""


def setup():
    config = parse_config(TEXT, source="serve.toml")
    runtime = Runtime(kind="path", description="python", python="python3")
    return config, build_plan(config, runtime, {"CHAT_KEY": "env-secret-value"})


def test_claude_code_problems_name_what_is_missing():
    config, plan = setup()
    by_name = {i.name: i for i in plan.instances}
    assert clients.claude_code_problems(config, by_name["coder"]) == []
    problems = clients.claude_code_problems(config, by_name["chat"])
    assert len(problems) == 3
    assert "holds '/'" in problems[0]
    assert "--enable-auto-tool-choice --tool-call-parser" in problems[1]
    assert "max_model_len 4096 < 32768" in problems[2]


def test_instructions_use_bearer_tokens_and_no_secret():
    config, plan = setup()
    text = clients.instructions(config, plan)
    assert "plain-secret-value" not in text and "env-secret-value" not in text
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:8000\n" in text
    assert "export ANTHROPIC_AUTH_TOKEN=$CHAT_KEY" in text
    assert "export ANTHROPIC_AUTH_TOKEN=<the api_key of instance coder>" in text
    assert "unset ANTHROPIC_API_KEY" in text
    assert '"CLAUDE_CODE_ATTRIBUTION_HEADER": "0"' in text
    assert "AUTO_INFER_LITELLM_BACKEND_BASE=http://127.0.0.1:8001/v1" in text


def test_litellm_config_is_yaml_with_one_model_per_instance():
    config, plan = setup()
    data = yaml.safe_load(clients.litellm_config(config, plan))
    assert data["model_list"] == [
        {
            "model_name": "org/chat",
            "litellm_params": {
                "model": "hosted_vllm/org/chat",
                "api_base": "http://127.0.0.1:8001/v1",
                "api_key": "os.environ/CHAT_KEY",
            },
        },
        {
            "model_name": "coder",
            "litellm_params": {
                "model": "hosted_vllm/coder",
                "api_base": "http://127.0.0.1:8000/v1",
                "api_key": "<the api_key of instance coder>",
            },
        },
    ]


def test_env_file_for_other_services():
    _, plan = setup()
    lines = clients.env_file(plan).splitlines()
    assert "AUTO_INFER_LITELLM_BACKEND_BASE=http://127.0.0.1:8001/v1" in lines
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8001" in lines
