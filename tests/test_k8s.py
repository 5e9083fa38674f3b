"""`doit k8s`: a LeaderWorkerSet manifest from the serve TOML (pipeline/serve/k8s.py).

The manifest is checked against the LWS CRD's OpenAPI schema (kubernetes-sigs/lws v0.10.0,
tests/data/lws/README.md), which embeds the core PodTemplateSpec, and against a minimal
hand-written schema of the Service and ConfigMap fields it writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import doit_env, run_doit, wait_for

from pipeline.errors import ConfigError, PipelineError
from pipeline.serve import k8s
from pipeline.serve.k8s import K8sOptions

DATA = Path(__file__).parent / "data" / "lws"
LWS_SCHEMA = json.loads((DATA / "leaderworkerset-v1.schema.json").read_text(encoding="utf-8"))
CORE_SCHEMA = json.loads((DATA / "core-v1-minimal.schema.json").read_text(encoding="utf-8"))

TWO_NODES = """\
[instance.control]
background = false

[instance.big.control]
gpu_ids = [0, 1, 2, 3]
stop_grace = 60.0
[instance.big.server]
model = "/models/big"
served_model_name = "big"
port = 8000
tensor_parallel_size = 4
api_key_env = "VLLM_API_KEY_BIG"
extra_args = ["--pipeline-parallel-size", "2"]
[instance.big.cluster]
nodes = 2
token_env = "GANG_TOKEN"

[instance.small.control]
gpu_ids = []
[instance.small.server]
model = "/models/small"
port = 8001

[gateway]
enable = true
port = 9000
"""
OPTIONS = K8sOptions(image="registry.example/infer-dev:1", volumes=(("models", "/models"),))


def build(text: str = TWO_NODES, instance: str = "big", options: K8sOptions = OPTIONS):
    pod = k8s.pod_config(text, "serve.toml", instance)
    return k8s.manifest(pod, instance, options)


def items(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["kind"]: item for item in document["items"]}


def templates(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    lwt = items(document)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    return lwt["leaderTemplate"], lwt["workerTemplate"]


def serve_container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not list: the API server drops them silently (structural
    pruning), so a misspelt pod field would pass jsonschema and do nothing."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if props is not None and key in props:
                found += unknown_fields(child, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(child, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, child in enumerate(value):
            found += unknown_fields(child, schema["items"], f"{path}[{i}]")
    return found


# ---- the schemas --------------------------------------------------------------------------


def test_the_leaderworkerset_validates_against_the_lws_crd_schema():
    lws = items(build())["LeaderWorkerSet"]
    jsonschema.Draft7Validator(LWS_SCHEMA).validate(lws)
    assert unknown_fields(lws, LWS_SCHEMA) == []


def test_the_schema_check_catches_a_misspelt_pod_field():
    lws = items(build())["LeaderWorkerSet"]
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    leader["spec"]["containers"][0]["readinesProbe"] = {}
    leader["spec"]["containers"][0]["env"][0]["valuefrom"] = {}
    assert unknown_fields(lws, LWS_SCHEMA) == [
        ".spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].env[0].valuefrom",
        ".spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].readinesProbe",
    ]
    lws["spec"]["startupPolicy"] = "LeaderRedy"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(LWS_SCHEMA).validate(lws)


def test_the_service_and_configmap_validate_against_the_core_fields_schema():
    kinds = items(build())
    for kind in ("Service", "ConfigMap"):
        schema = {"$defs": CORE_SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"}
        jsonschema.Draft202012Validator(schema).validate(kinds[kind])
    assert [i["kind"] for i in build()["items"]] == ["ConfigMap", "LeaderWorkerSet", "Service"]


# ---- the fields the issue asks for ----------------------------------------------------------


def test_the_group_is_cluster_nodes_pods_recreated_together_workers_created_with_the_leader():
    spec = items(build())["LeaderWorkerSet"]["spec"]
    assert spec["leaderWorkerTemplate"]["size"] == 2
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # LeaderReady would wait for a leader that is ready only once its workers joined.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert spec["replicas"] == 1


def test_an_init_container_installs_the_bundle_into_the_volume_the_server_runs_from():
    for template in templates(build()):
        (install,) = template["spec"]["initContainers"]
        assert install["command"][-1] == "install"
        assert install["command"][:3] == [
            "/soft/app/infer-vllm-pipeline/.venv/bin/doit",
            "-f",
            "/soft/app/infer-vllm-pipeline/dodo.py",
        ]
        env = env_of(install)
        assert env["AUTO_INFER_VLLM_BUNDLE_PATH"] == "/bundles/vllm-offline-bundle.tar"
        assert env["AUTO_INFER_VLLM_PIXI_PROJECT_DIR"] == "/hard/volume/workspace/vllm-pixi-offline"
        assert env["PIPELINE_ROLE"] == "runtime"
        serve = serve_container(template)
        shared = {"name": "workspace", "mountPath": "/hard/volume/workspace"}
        assert shared in install["volumeMounts"]
        assert shared in serve["volumeMounts"]
        assert (
            env_of(serve)["AUTO_INFER_VLLM_PIXI_PROJECT_DIR"]
            == env["AUTO_INFER_VLLM_PIXI_PROJECT_DIR"]
        )
        assert {"name": "workspace", "emptyDir": {}} in template["spec"]["volumes"]


def test_the_main_container_serves_the_one_instance_in_the_foreground_with_the_pod_ip():
    for template in templates(build()):
        serve = serve_container(template)
        shell, flag, script = serve["command"]
        assert (shell, flag) == ("/bin/sh", "-c")
        assert script.endswith(
            " exec /soft/app/infer-vllm-pipeline/.venv/bin/doit -f "
            "/soft/app/infer-vllm-pipeline/dodo.py serve --foreground big"
        )
        assert script.startswith("tail -n +1 -F /tmp/vllm-logs/big.log 2>/dev/null &")
        env = env_of(serve)
        assert env["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["AUTO_INFER_VLLM_CONFIG"] == "/etc/infer-vllm/serve.toml"
        # Rank and leader: LWS puts these in every container itself.
        assert not {"LWS_WORKER_INDEX", "LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE"} & set(env)
        assert serve["resources"] == {"limits": {"nvidia.com/gpu": 4}}
        assert template["spec"]["terminationGracePeriodSeconds"] > 60, "past stop_grace"


def test_dev_shm_is_a_memory_volume():
    for template in templates(build()):
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in template["spec"]["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in serve_container(template)[
            "volumeMounts"
        ]


def test_the_toml_travels_unchanged_in_a_configmap_mounted_read_only():
    document = build()
    configmap = items(document)["ConfigMap"]
    assert configmap["data"] == {"serve.toml": TWO_NODES}
    for template in templates(document):
        volume = {"name": "serve-config", "configMap": {"name": configmap["metadata"]["name"]}}
        assert volume in template["spec"]["volumes"]
        mount = {"name": "serve-config", "mountPath": "/etc/infer-vllm", "readOnly": True}
        assert mount in serve_container(template)["volumeMounts"]


def test_the_pods_run_only_the_instance_and_no_gateway():
    leader, _ = templates(build())
    overrides = json.loads(env_of(serve_container(leader))["AUTO_INFER_VLLM_OVERRIDES"])
    assert overrides == {
        "instance": {"small": {"control": {"enabled": False}}},
        "gateway": {"enable": False},
    }
    pod = k8s.pod_config(TWO_NODES, "serve.toml", "big")
    assert [i.name for i in pod.config.enabled] == ["big"]
    assert pod.config.gateway.enable is False


def test_each_pod_plans_its_member_from_what_lws_and_the_manifest_give_it():
    """The serve side, fed the pod's environment (the manifest's env plus what LWS injects),
    plans a leader on rank 0 and a headless member without key on rank 1."""
    from pipeline.pixi.envs import Runtime
    from pipeline.serve.plan import build_plan

    pod = k8s.pod_config(TWO_NODES, "serve.toml", "big")
    runtime = Runtime(kind="path", description="python on PATH", python="/usr/bin/python3")
    leader_addr = "big-0.big.default"
    plans = {}
    for rank, ip in ((0, "10.1.0.7"), (1, "10.1.0.8")):
        environ = {
            "LWS_LEADER_ADDRESS": leader_addr,
            "LWS_WORKER_INDEX": str(rank),
            "LWS_GROUP_SIZE": "2",
            "VLLM_HOST_IP": ip,  # the manifest's status.podIP
            **({"VLLM_API_KEY_BIG": "k"} if rank == 0 else {}),
        }
        plans[rank] = build_plan(pod.config, runtime, environ, addresses={})
    for rank, plan in plans.items():
        (inst,) = plan.instances
        assert plan.gateway is None
        assert inst.member.platform == "lws" and inst.member.rank == rank
        assert inst.member.leader == leader_addr
        assert inst.env["VLLM_HOST_IP"] == ("10.1.0.7", "10.1.0.8")[rank]
        assert ("--headless" in inst.argv) == (rank == 1)
    assert plans[0].instances[0].port == 8000
    assert plans[1].instances[0].missing_secrets == {}


def test_keys_come_from_the_secret_the_api_key_to_the_leader_only():
    leader, worker = templates(build(options=K8sOptions(image="i", secret="vllm-keys")))
    ref = {"secretKeyRef": {"name": "vllm-keys", "key": "VLLM_API_KEY_BIG"}}
    assert env_of(serve_container(leader))["VLLM_API_KEY_BIG"] == ref
    assert "VLLM_API_KEY_BIG" not in env_of(serve_container(worker)), "headless: no API key"
    # The gang's control token is for bare nodes: under LWS the platform restarts the group.
    assert "GANG_TOKEN" not in env_of(serve_container(worker))
    assert "GANG_TOKEN" not in env_of(serve_container(leader))


def test_the_leader_is_ready_on_health_and_the_workers_probe_the_leader():
    leader, worker = templates(build())
    lead, work = serve_container(leader), serve_container(worker)
    assert lead["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert "livenessProbe" not in lead and "startupProbe" not in lead
    assert "readinessProbe" not in work
    assert work["livenessProbe"]["exec"] == work["startupProbe"]["exec"]
    python, flag, code = work["livenessProbe"]["exec"]["command"]
    assert python.endswith("/.venv/bin/python") and flag == "-c"
    assert "29501" in code
    # The leader's install and load (ready_timeout 900 s) fit in the startup window.
    startup = work["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 900


def test_the_serve_command_execs_doit_as_pid_1_and_copies_the_log_to_stdout(tmp_path):
    """Run the command with a stand-in doit: exec keeps the shell's pid, and the log's lines
    (written after the start, as the supervisor would) reach stdout."""
    log = tmp_path / "logs" / "big.log"
    fake = tmp_path / "doit"
    fake.write_text(
        "#!/bin/sh\n"
        f'mkdir -p {log.parent}; echo "pid $$ args $*"; echo vllm-line >> {log}; sleep 2\n',
        encoding="utf-8",
    )
    fake.chmod(0o755)
    argv = k8s.serve_command([str(fake)], "big", str(log))
    out_file = tmp_path / "stdout"
    with out_file.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, start_new_session=True)
    try:
        proc.wait(timeout=30)
        # tail -F polls each second: wait for the line itself, not for a second and a half.
        wait_for(lambda: "vllm-line" in out_file.read_text(), 30, what="the log line on stdout")
    finally:
        # In a pod the container ends with PID 1; here the tail is left to put down.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = out_file.read_text()
    assert f"pid {proc.pid} args serve --foreground big" in out
    assert "vllm-line" in out


def test_the_worker_probe_passes_while_the_leader_port_answers_and_fails_once_it_is_gone():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = k8s.leader_probe_code(port)
        env = {**os.environ, "LWS_LEADER_ADDRESS": "127.0.0.1"}
        alive = subprocess.run([sys.executable, "-c", code], env=env, timeout=30, check=False)
    gone = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=30, check=False
    )
    assert alive.returncode == 0
    assert gone.returncode != 0


def test_a_service_selects_the_leader_pods_by_the_lws_labels():
    service = items(build())["Service"]
    assert service["metadata"]["name"] == "big-api", "LWS's headless Service is named big"
    assert service["spec"]["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": "big",
        "leaderworkerset.sigs.k8s.io/worker-index": "0",
    }
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    leader, _ = templates(build())
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in serve_container(leader)[
        "ports"
    ]


def test_a_changed_toml_changes_the_pod_templates():
    before, _ = templates(build())
    after, _ = templates(build(TWO_NODES.replace("stop_grace = 60.0", "stop_grace = 61.0")))
    key = "infer-vllm/config-sha256"
    assert before["metadata"]["annotations"][key] != after["metadata"]["annotations"][key]


def test_options_set_namespace_replicas_name_and_volumes():
    options = K8sOptions(
        image="i",
        namespace="llm",
        replicas=3,
        name="qwen",
        bundle="/b/x.tar",
        volumes=(("bundles", "/b"), ("models", "/models")),
    )
    document = build(options=options)
    assert {i["metadata"]["namespace"] for i in document["items"]} == {"llm"}
    lws = items(document)["LeaderWorkerSet"]
    assert lws["metadata"]["name"] == "qwen" and lws["spec"]["replicas"] == 3
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    claims = [
        v["persistentVolumeClaim"]
        for v in worker["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [
        {"claimName": "bundles", "readOnly": True},
        {"claimName": "models", "readOnly": True},
    ]
    jsonschema.Draft7Validator(LWS_SCHEMA).validate(lws)


def test_the_cpu_build_asks_for_no_gpu():
    text = TWO_NODES.replace("gpu_ids = [0, 1, 2, 3]", "gpu_ids = []").replace(
        "tensor_parallel_size = 4", "tensor_parallel_size = 2"
    )
    for template in templates(build(text)):
        assert "resources" not in serve_container(template)


def test_the_multi_node_example_makes_a_valid_manifest():
    path = Path(__file__).parent.parent / "model-configs" / "vllm-multi-node.toml"
    pod = k8s.pod_config(path.read_text(encoding="utf-8"), str(path), "big")
    document = k8s.manifest(pod, "big", OPTIONS)
    lws = items(document)["LeaderWorkerSet"]
    jsonschema.Draft7Validator(LWS_SCHEMA).validate(lws)
    assert unknown_fields(lws, LWS_SCHEMA) == []
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader, _ = templates(document)
    assert serve_container(leader)["resources"] == {"limits": {"nvidia.com/gpu": 8}}


def test_output_is_json_kubectl_reads():
    text = k8s.to_json(build())
    assert json.loads(text)["kind"] == "List" and text.endswith("}\n")


# ---- refusals, one line each -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('[instance.big.cluster]\nnodes = 2\ntoken_env = "GANG_TOKEN"\n', ""),
            "serve.toml: instance.big: has no [instance.big.cluster] table",
        ),
        (
            ('token_env = "GANG_TOKEN"', 'leader = "10.0.0.1"'),
            "instance.big.cluster.leader: is '10.0.0.1'; under a LeaderWorkerSet it must be",
        ),
        (('token_env = "GANG_TOKEN"', "rank = 1"), "instance.big.cluster.rank: is 1;"),
        (
            ("stop_grace = 60.0", 'env = { VLLM_HOST_IP = "10.0.0.5" }'),
            "instance.big.control.env.VLLM_HOST_IP: would be the same on every pod",
        ),
        (
            ("gpu_ids = [0, 1, 2, 3]", "gpu_ids = [4, 5, 6, 7]"),
            "instance.big.control.gpu_ids: is [4, 5, 6, 7]; a pod sees",
        ),
        (
            ('api_key_env = "VLLM_API_KEY_BIG"', 'api_key = "sk-x"'),
            "instance.big.server.api_key: is written in the TOML, which becomes a ConfigMap",
        ),
        (
            ("stop_grace = 60.0", 'log_dir = "logs"'),
            "instance.big.control.log_dir: is a relative path: in the pod it resolves in /etc/",
        ),
        (
            ("port = 8000\n", 'port = 8000\nhost = "127.0.0.1"\n'),
            "instance.big.server.host: is 127.0.0.1",
        ),
        (
            ("[gateway]", '[master]\nenv_prefix = "/opt/env"\n\n[gateway]'),
            "master.env_prefix: points away from the environment",
        ),
    ],
    ids=[
        "no-cluster",
        "leader",
        "rank",
        "host-ip",
        "gpu-ids",
        "api-key",
        "log-dir",
        "host",
        "prefix",
    ],
)
def test_a_toml_the_pods_cannot_use_is_refused_in_one_located_line(change, message):
    old, new = change
    assert old in TWO_NODES
    with pytest.raises(ConfigError) as err:
        build(TWO_NODES.replace(old, new))
    assert message in err.value.message
    assert "\n" not in err.value.message


def test_an_unknown_instance_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"no instance named 'bgi' \(instances: big, small\)"):
        build(instance="bgi")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (K8sOptions(image=""), "--image is required"),
        (K8sOptions(image="i", name="Big_One"), "LeaderWorkerSet name 'Big_One' (--name)"),
        (K8sOptions(image="i", replicas=0), "--replicas 0"),
        (K8sOptions(image="i", bundle="x.tar"), "--bundle 'x.tar'"),
        (K8sOptions(image="i", namespace="LLM"), "--namespace 'LLM'"),
        (K8sOptions(image="i", volumes=(("m", "/dev/shm"),)), "--volume m:/dev/shm"),
    ],
    ids=["image", "name", "replicas", "bundle", "namespace", "volume"],
)
def test_unusable_options_are_refused(options, message):
    with pytest.raises(PipelineError) as err:
        build(options=options)
    assert message in err.value.message


def test_the_set_is_named_after_the_instance_in_kubernetes_spelling():
    document = build(TWO_NODES.replace("instance.big.", "instance.Big_1."), instance="Big_1")
    assert items(document)["LeaderWorkerSet"]["metadata"]["name"] == "big-1"
    assert serve_container(templates(document)[0])["command"][-1].endswith("--foreground Big_1")


def test_an_instance_name_kubernetes_refuses_asks_for_a_name():
    with pytest.raises(PipelineError, match=r"name '7b' \(from instance '7b'\).*pass --name"):
        build(TWO_NODES.replace("instance.big.", "instance.7b."), instance="7b")


def test_parse_volume():
    assert k8s.parse_volume("models:/models") == ("models", "/models")
    with pytest.raises(PipelineError, match="expected CLAIM:/absolute/path"):
        k8s.parse_volume("models")


# ---- the doit task --------------------------------------------------------------------------


def test_doit_k8s_writes_the_manifest_and_names_the_secret_entries(tmp_path, state_dir):
    config = tmp_path / "serve.toml"
    config.write_text(TWO_NODES, encoding="utf-8")
    out = tmp_path / "lws.json"
    result = run_doit(
        ["k8s", "-c", str(config), "--instance", "big", "--image", "reg/i:1", "-o", str(out)],
        doit_env(state_dir, PIPELINE_ROLE="runtime"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text(encoding="utf-8"))["items"][0]["data"] == {
        "serve.toml": TWO_NODES
    }
    assert (
        "kubectl create secret generic big-keys --from-literal=VLLM_API_KEY_BIG=..."
    ) in result.stderr


def test_doit_k8s_refuses_overrides_the_pods_would_not_see(tmp_path, state_dir):
    config = tmp_path / "serve.toml"
    config.write_text(TWO_NODES, encoding="utf-8")
    env = doit_env(state_dir, AUTO_INFER_VLLM_OVERRIDES='{"gateway": {"enable": false}}')
    result = run_doit(["k8s", "-c", str(config), "--instance", "big", "--image", "i"], env)
    assert result.returncode != 0
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "AUTO_INFER_VLLM_OVERRIDES is set, but the pods read only the TOML" in line
