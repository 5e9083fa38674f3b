"""doit tasks of the serve side: plan, serve, status, stop, logs, clients, k8s (always run)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline import reporting
from pipeline.settings import process_environ
from pipeline.tasks.common import SETTINGS, TaskDict

_CONFIG_PARAM = {
    "name": "config",
    "short": "c",
    "long": "config",
    "type": str,
    "default": "",
    "help": "serve TOML (default: $AUTO_INFER_VLLM_CONFIG)",
}


_NODE_RANK_PARAM = {
    "name": "node_rank",
    "long": "node-rank",
    "type": int,
    "default": -1,
    "help": "this node's rank in multi-node instances (default: the platform's, else 0)",
}


def _rank(value: int) -> int | None:
    return None if value == -1 else value


# ---- serve side -----------------------------------------------------------------------------


def task_plan() -> TaskDict:
    """Print the resolved launch plan as JSON; nothing starts (--check: host checks fail it)."""

    @reporting.action
    def run(config: str, check: bool, node_rank: int) -> None:
        from pipeline.serve.commands.plan import plan_command

        plan_command(
            SETTINGS, config or None, process_environ(), check=check, node_rank=_rank(node_rank)
        )

    return {
        "actions": [run],
        "params": [
            _CONFIG_PARAM,
            _NODE_RANK_PARAM,
            {
                "name": "check",
                "long": "check",
                "type": bool,
                "default": False,
                "help": "fail on host problems (missing model, port in use, GPUs)",
            },
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_serve() -> TaskDict:
    """Start the instances of the serve TOML, or `doit serve NAME...` (background or
    foreground, as configured); with a supervisor running, starts what is not running."""

    @reporting.action
    def run(
        names: list[str], config: str, foreground: bool, background: bool, node_rank: int
    ) -> None:
        from pipeline.serve.commands.serve import serve_command

        mode = True if foreground else (False if background else None)
        serve_command(
            SETTINGS,
            config or None,
            process_environ(),
            names=names,
            foreground=mode,
            node_rank=_rank(node_rank),
        )

    return {
        "actions": [run],
        "pos_arg": "names",
        "params": [
            _CONFIG_PARAM,
            _NODE_RANK_PARAM,
            {
                "name": "foreground",
                "long": "foreground",
                "type": bool,
                "default": False,
                "help": "block and supervise here (container PID 1)",
            },
            {
                "name": "background",
                "long": "background",
                "type": bool,
                "default": False,
                "help": "return once ready; a detached supervisor keeps them running",
            },
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_status() -> TaskDict:
    """Show the served instances (--json for scripts)."""

    @reporting.action
    def run(json: bool, node_rank: int) -> None:
        from pipeline.serve.commands.status import status_command

        status_command(SETTINGS, as_json=json, node_rank=_rank(node_rank))

    return {
        "actions": [run],
        "params": [
            {"name": "json", "long": "json", "type": bool, "default": False, "help": "JSON"},
            _NODE_RANK_PARAM,
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_stop() -> TaskDict:
    """Stop instances: `doit stop` (all) or `doit stop NAME...`."""

    @reporting.action
    def run(names: list[str]) -> None:
        from pipeline.serve.commands.stop import stop_command

        stop_command(SETTINGS, names)

    return {
        "actions": [run],
        "pos_arg": "names",
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_logs() -> TaskDict:
    """Print an instance's log: `doit logs [-n N] [-f] NAME` (NAME `supervisor` too)."""

    @reporting.action
    def run(names: list[str], lines: int, follow: bool, config: str) -> None:
        from pipeline.serve.commands.logs import logs_command, parse_logs_args

        # doit leaves options after the name among the names (`doit logs a -n 2`).
        args = parse_logs_args(names, lines=lines, follow=follow, config=config or None)
        logs_command(
            SETTINGS,
            args.name,
            process_environ(),
            lines=args.lines,
            follow=args.follow,
            config_path=args.config,
        )

    return {
        "actions": [run],
        "pos_arg": "names",
        "params": [
            {
                "name": "lines",
                "short": "n",
                "long": "lines",
                "type": int,
                "default": 50,
                "help": "lines to show",
            },
            {
                "name": "follow",
                "short": "f",
                "long": "follow",
                "type": bool,
                "default": False,
                "help": "keep printing new lines (Ctrl-C ends)",
            },
            _CONFIG_PARAM,
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_clients() -> TaskDict:
    """How OpenAI SDKs, Claude Code and LiteLLM reach the instances (--litellm-config FILE)."""

    @reporting.action
    def run(config: str, litellm_config: str, env_file: str) -> None:
        from pipeline.serve.commands.clients import clients_command

        clients_command(
            SETTINGS,
            config or None,
            process_environ(),
            litellm_config=litellm_config or None,
            env_file=env_file or None,
        )

    return {
        "actions": [run],
        "params": [
            _CONFIG_PARAM,
            {
                "name": "litellm_config",
                "long": "litellm-config",
                "type": str,
                "default": "",
                "help": "also write a LiteLLM proxy config (YAML) for all instances here",
            },
            {
                "name": "env_file",
                "long": "env-file",
                "type": str,
                "default": "",
                "help": "also write AUTO_INFER_LITELLM_BACKEND_BASE & co. for other services",
            },
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


def task_k8s() -> TaskDict:
    """Write a Kubernetes LeaderWorkerSet manifest (JSON) for a multi-node instance.

    `doit k8s --instance NAME --image IMAGE [-o FILE]`; nothing is applied."""

    @reporting.action
    def run(
        config: str,
        instance: str,
        image: str,
        bundle: str,
        volume: list[str],
        namespace: str,
        secret: str,
        replicas: int,
        name: str,
        output: str,
    ) -> None:
        from pipeline.serve.commands.k8s import k8s_command
        from pipeline.serve.k8s import K8sOptions, parse_volume

        options = K8sOptions(
            image=image,
            bundle=bundle,
            volumes=tuple(parse_volume(v) for v in volume),
            namespace=namespace or None,
            secret=secret or None,
            replicas=replicas,
            name=name or None,
        )
        k8s_command(SETTINGS, config or None, instance, options, output=output or None)

    # The constant, not pipeline.serve.k8s: every doit command defines this task.
    from pipeline.bundle.format import DEFAULT_POD_BUNDLE as DEFAULT_BUNDLE

    def option(name: str, help_: str, default: str = "", **more: object) -> dict[str, object]:
        return {
            "name": name,
            "long": name.replace("_", "-"),
            "type": str,
            "default": default,
            "help": help_,
            **more,
        }

    return {
        "actions": [run],
        "params": [
            _CONFIG_PARAM,
            option("instance", "the instance with a [instance.NAME.cluster] table (required)"),
            option("image", "image holding the pipeline, for both containers (required)"),
            option("bundle", "the bundle tar's path in the pod", DEFAULT_BUNDLE),
            {
                "name": "volume",
                "long": "volume",
                "type": list,
                "default": [],
                "help": "CLAIM:/path: a PersistentVolumeClaim mounted read-only (repeat it)",
            },
            option("namespace", "metadata.namespace (default: kubectl's)"),
            option("secret", "Secret holding the keys (default: NAME-keys)"),
            {
                "name": "replicas",
                "long": "replicas",
                "type": int,
                "default": 1,
                "help": "groups (each one whole instance)",
            },
            option("name", "LeaderWorkerSet name (default: from the instance)"),
            option("output", "write the manifest here (default: stdout)", short="o"),
        ],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"command": True},
    }


TASKS: dict[str, Callable[[], TaskDict]] = {
    "task_clients": task_clients,
    "task_plan": task_plan,
    "task_serve": task_serve,
    "task_status": task_status,
    "task_stop": task_stop,
    "task_logs": task_logs,
    "task_k8s": task_k8s,
}
