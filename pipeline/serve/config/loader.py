"""Loading the serve TOML: read, apply ``AUTO_INFER_VLLM_OVERRIDES``, merge the defaults tables
into each instance, validate into the models. Every error names the file, the dotted key the
user wrote (the defaults table or the instance's own) and the instance. Pure."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError
from pipeline.serve.config.checks import Located, check_gateway, check_instances, check_pools
from pipeline.serve.config.models import (
    DEFAULT_INSTANCE,
    GATEWAY_NAME,
    INSTANCE_NAME_RE,
    RESERVED_NAMES,
    Cluster,
    Control,
    Gateway,
    Instance,
    Master,
    Pool,
    ServeConfig,
    Server,
)

_M = TypeVar("_M", bound=BaseModel)


# A serve config is a few KiB; past these something else was given. The overrides arrive in
# one environment variable (Linux caps one at 128 KiB); the deepest key of a serve config is
# 5 tables down (instance.<name>.control.env.<VAR>).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_OVERRIDES_CHARS = 1024 * 1024
MAX_DEPTH = 32
_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def load_config(path: Path, overrides: str | None = None) -> ServeConfig:
    """Read, merge and validate the serve TOML at ``path``.

    ``overrides`` is the raw ``AUTO_INFER_VLLM_OVERRIDES`` text (a JSON object) or None.
    Raises ConfigError for a missing file, one that is not a regular file, bad TOML, bad
    overrides or an invalid value. Never blocks (see :func:`read_config_text`).
    """
    text = read_config_text(path)
    return parse_config(
        text,
        source=str(path),
        overrides=overrides,
        base_dir=Path(os.path.normpath(path.absolute())).parent,
    )


def read_config_text(path: Path) -> str:
    """The text of the serve config at ``path``, which must be a regular file.

    Anything else (a FIFO, a directory, a device, a socket) is refused from its ``stat``,
    without opening it: reading a FIFO blocks until something writes to it, and a device may
    never end. The file is then opened non-blocking (a FIFO swapped in after the ``stat`` does
    not block the open either) and checked again through the open descriptor. Raises
    ConfigError naming the path and what to pass instead.
    """
    hint = "pass the TOML file itself with --config or AUTO_INFER_VLLM_CONFIG"
    try:
        kind = _not_a_file(path.stat().st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                kind = _not_a_file(info.st_mode)
                if kind is None and info.st_size > MAX_CONFIG_BYTES:
                    raise ConfigError(
                        f"{path}: the serve config is {info.st_size} bytes, more than "
                        f"{MAX_CONFIG_BYTES // (1024 * 1024)} MiB; {hint}"
                    )
                if kind is None:
                    return handle.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        raise ConfigError(f"{path}: the serve config is {kind}, not a regular file; {hint}")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: serve config not found; pass --config or set AUTO_INFER_VLLM_CONFIG"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the serve config: {exc}") from None
    except ValueError:
        # os.stat refuses a path with a NUL byte (no file can have one).
        raise ConfigError(f"{str(path)!r}: a path cannot hold a NUL byte; {hint}") from None


def _not_a_file(mode: int) -> str | None:
    """What a file of ``mode`` is, when it is not a regular file; None when it is one."""
    if stat.S_ISREG(mode):
        return None
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    overrides: str | None = None,
    base_dir: Path | None = None,
) -> ServeConfig:
    """Like :func:`load_config`, from TOML text; ``source`` names it in errors.

    ``base_dir`` anchors relative paths (see :func:`build_config`); :func:`load_config` passes
    the config file's folder.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib reads nested arrays and inline tables recursively.
        raise ConfigError(
            f"{source}: arrays or tables nested deeper than Python can read; a serve config "
            f"needs at most {MAX_DEPTH} levels"
        ) from None
    if _depth(document) > MAX_DEPTH:
        raise ConfigError(
            f"{source}: arrays or tables nested more than {MAX_DEPTH} levels deep; a serve "
            "config needs 5"
        )
    patch = parse_overrides(overrides) if overrides else {}
    document = deep_merge(document, patch)
    return build_config(document, source=source, overridden=_paths(patch), base_dir=base_dir)


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``AUTO_INFER_VLLM_OVERRIDES``: a JSON object, or ConfigError.

    Bounded before it is parsed: at most :data:`MAX_OVERRIDES_CHARS` characters, arrays and
    objects nested at most :data:`MAX_DEPTH` deep (Python's JSON parser recurses, and so does
    the merge). The messages never show the text: it may hold keys."""
    if len(text) > MAX_OVERRIDES_CHARS:
        raise ConfigError(
            f"AUTO_INFER_VLLM_OVERRIDES: {len(text)} characters, more than "
            f"{MAX_OVERRIDES_CHARS // (1024 * 1024)} MiB; put the settings in the TOML file"
        )
    if _json_depth(text) > MAX_DEPTH:
        raise ConfigError(
            f"AUTO_INFER_VLLM_OVERRIDES: arrays or objects nested more than {MAX_DEPTH} levels "
            'deep; a serve config needs 5, as in {"instance": {"server": {"port": 8001}}}'
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"AUTO_INFER_VLLM_OVERRIDES: invalid JSON at line {exc.lineno} column {exc.colno}: "
            f"{exc.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            "AUTO_INFER_VLLM_OVERRIDES: must be a JSON object such as "
            '{"instance": {"server": {"port": 8001}}}, got ' + type(value).__name__
        )
    return value


# A JSON string (closed or not) or a bracket: strings are skipped whole, so that brackets in
# them do not count.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text``, without parsing it (no recursion)."""
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _depth(tree: Any) -> int:
    """How deep lists and tables nest in a parsed document (iterative: no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, Mapping):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; lists and scalars in ``patch`` replace. Inputs are not changed."""
    merged: dict[str, Any] = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _paths(tree: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    out: set[str] = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.add(dotted)
        if isinstance(value, Mapping):
            out |= _paths(value, dotted + ".")
    return frozenset(out)


def _check_table(value: Any, key: str, loc: Located, instance: str | None = None) -> dict:
    if not isinstance(value, Mapping):
        raise loc.error(key, f"must be a table, got {_type_name(value)}", instance)
    return dict(value)


def _check_keys(
    table: Mapping[str, Any],
    allowed: Iterable[str],
    prefix: str,
    loc: Located,
    instance: str | None = None,
) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise loc.error(
                f"{prefix}{key}",
                f"unknown key{did_you_mean} (allowed: {', '.join(allowed)})",
                instance,
            )


def build_config(
    document: Mapping[str, Any],
    *,
    source: str = "<config>",
    overridden: frozenset[str] = frozenset(),
    base_dir: Path | None = None,
) -> ServeConfig:
    """Validate a parsed (and already overridden) document into a :class:`ServeConfig`.

    With ``base_dir`` (an absolute folder: the config file's), every relative path key
    (``log_dir``, ``pixi_project_dir``, ``env_prefix``, and ``server.model`` when it starts with
    ``./`` or ``../``) is made absolute against it, here and only here: the background
    supervisor runs in ``/``, and ``doit logs`` must find what it wrote. Without it, relative
    paths stay as written.
    """
    loc = Located(source, overridden)
    _check_keys(document, ("master", "instance", "gateway", "pool"), "", loc)
    master_raw = _check_table(document.get("master", {}), "master", loc)
    _check_keys(master_raw, Master.model_fields, "master.", loc)
    master = _anchor(_validate(Master, master_raw, "master.", loc), base_dir)
    gateway_raw = _check_table(document.get("gateway", {}), "gateway", loc)
    _check_keys(gateway_raw, Gateway.model_fields, "gateway.", loc)
    if "aliases" in gateway_raw:
        _check_table(gateway_raw["aliases"], "gateway.aliases", loc)
    gateway = _anchor(_validate(Gateway, gateway_raw, "gateway.", loc), base_dir)
    pools: dict[str, Pool] = {}
    for group, table in _check_table(document.get("pool", {}), "pool", loc).items():
        if not INSTANCE_NAME_RE.match(group):
            raise loc.error(
                f"pool.{group}",
                "pool names use letters, digits, '.', '_' and '-' (at most 63), "
                "starting with a letter or digit",
            )
        raw = _check_table(table, f"pool.{group}", loc)
        _check_keys(raw, Pool.model_fields, f"pool.{group}.", loc)
        if "instances" not in raw:
            raise loc.error(f"pool.{group}.instances", "required: the instances of the pool")
        pools[group] = _validate(Pool, raw, f"pool.{group}.", loc)

    instance_root = _check_table(document.get("instance", {}), "instance", loc)
    default_control = _check_table(instance_root.get("control", {}), "instance.control", loc)
    default_server = _check_table(instance_root.get("server", {}), "instance.server", loc)
    for section, table in (("control", default_control), ("server", default_server)):
        for key, value in table.items():
            if key in RESERVED_NAMES and isinstance(value, Mapping):
                raise loc.error(
                    f"instance.{section}.{key}",
                    f"{section!r} cannot be an instance name: [instance.control] and "
                    "[instance.server] hold the defaults; rename the instance",
                )
    _check_keys(default_control, Control.model_fields, "instance.control.", loc)
    _check_keys(default_server, Server.model_fields, "instance.server.", loc)

    names = sorted(k for k in instance_root if k not in RESERVED_NAMES)
    if not names:
        names = [DEFAULT_INSTANCE]
    instances = []
    for name in names:
        own = _check_table(instance_root.get(name, {}), f"instance.{name}", loc, name)
        if name == GATEWAY_NAME:
            raise loc.error(
                f"instance.{name}",
                f"{name!r} is reserved for the gateway process (`doit stop {name}`, "
                f"`doit logs {name}`); rename the instance",
                name,
            )
        if not INSTANCE_NAME_RE.match(name):
            raise loc.error(
                f"instance.{name}",
                "instance names use letters, digits, '.', '_' and '-' (at most 63), "
                "starting with a letter or digit",
                name,
            )
        _check_keys(own, (*RESERVED_NAMES, "cluster"), f"instance.{name}.", loc, name)
        own_control = _check_table(own.get("control", {}), f"instance.{name}.control", loc, name)
        own_server = _check_table(own.get("server", {}), f"instance.{name}.server", loc, name)
        _check_keys(own_control, Control.model_fields, f"instance.{name}.control.", loc, name)
        _check_keys(own_server, Server.model_fields, f"instance.{name}.server.", loc, name)
        cluster = None
        if "cluster" in own:
            own_cluster = _check_table(own["cluster"], f"instance.{name}.cluster", loc, name)
            _check_keys(own_cluster, Cluster.model_fields, f"instance.{name}.cluster.", loc, name)
            cluster = _validate(Cluster, own_cluster, f"instance.{name}.cluster.", loc, name)

        implicit = name not in instance_root
        origin_of = {
            section: _origin(name, section, own_table, default_table, implicit)
            for section, own_table, default_table in (
                ("control", own_control, default_control),
                ("server", own_server, default_server),
            )
        }
        loc.origins[name] = origin_of

        control = _validate(
            Control,
            deep_merge(default_control, own_control),
            "",
            loc,
            name,
            origin_of["control"],
        )
        server = _validate(
            Server,
            deep_merge(default_server, own_server),
            "",
            loc,
            name,
            origin_of["server"],
        )
        instances.append(
            Instance(
                name=name,
                control=_anchor(control, base_dir),
                server=_anchor(server, base_dir),
                cluster=cluster,
            )
        )

    if gateway.log_dir is None:
        # Beside the instances' logs: the defaults table's log_dir (validated with them).
        default_log_dir = Control.model_fields["log_dir"].default
        written = default_control.get("log_dir")
        log_dir = Path(written).expanduser() if isinstance(written, str) else default_log_dir
        if base_dir is not None and not log_dir.is_absolute():
            log_dir = base_dir / log_dir
        gateway = gateway.model_copy(update={"log_dir": log_dir})
    config = ServeConfig(
        source=source, master=master, instances=tuple(instances), gateway=gateway, pools=pools
    )
    check_instances(config, loc)
    check_gateway(config, loc)
    check_pools(config, loc)
    return config


def _anchor(model: _M, base_dir: Path | None) -> _M:
    """``model`` with its relative paths made absolute against ``base_dir`` (None: unchanged)."""
    if base_dir is None:
        return model
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = base_dir / value
        elif name == "model" and isinstance(value, str) and value.startswith(("./", "../")):
            # Only an explicit relative path: `org/name` is a hub id, not a folder.
            update[name] = str(base_dir / value)
    return model.model_copy(update=update) if update else model


def _origin(
    name: str, section: str, own: Mapping[str, Any], defaults: Mapping[str, Any], implicit: bool
) -> Callable[[str], str]:
    """Maps a key of a merged instance table to the dotted key where the user wrote it."""

    def where(key: str) -> str:
        if key in own:
            return f"instance.{name}.{section}.{key}"
        if key in defaults or implicit:
            return f"instance.{section}.{key}"
        return f"instance.{name}.{section}.{key}"

    return where


def _validate(
    model: type[BaseModel],
    data: Mapping[str, Any],
    prefix: str,
    loc: Located,
    instance: str | None = None,
    origin: Callable[[str], str] | None = None,
) -> Any:
    bad = _line_breaking(data)
    if bad is not None:
        parts, what = bad
        top = parts[0]
        key = origin(top) if origin is not None else f"{prefix}{top}"
        raise loc.error(
            ".".join([key, *parts[1:]]),
            f"{what} holds control characters (NUL, CR or LF), which no argument, environment "
            "variable or path of a served process may hold; remove them (the value is not shown)",
            instance,
        )
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = [str(p) for p in err["loc"]]
        top = parts[0] if parts else ""
        key = origin(top) if origin is not None else f"{prefix}{top}"
        key = ".".join([key, *parts[1:]])
        if err["type"] == "missing" and model is Cluster:
            raise loc.error(key, "required in a cluster table", instance) from None
        if err["type"] == "missing":
            section = "server" if model is Server else "control"
            raise loc.error(
                key,
                f"required; set it in [instance.{section}] or [instance.{instance}.{section}]",
                instance,
            ) from None
        message = _describe(err, model, top)
        raise loc.error(key, message, instance) from None


_LINE_BREAKING = re.compile(r"[\x00\r\n]")


def _line_breaking(table: Mapping[str, Any]) -> tuple[list[str], str] | None:
    """The first string in ``table`` (a value, or a key of a table inside, at any depth) that
    holds a NUL byte, CR or LF: its dotted path and "the value" or "a name"; None when none.

    Such a string cannot be an argument, an environment variable or a path (NUL: the kernel
    refuses it, and ``doit serve`` failed with "embedded null byte"), and would break the
    plan's, the logs' and the state file's lines. Iterative: the depth is bounded elsewhere."""
    # The table's own keys are known field names (checked before).
    stack: list[tuple[list[str], Any]] = [([str(k)], v) for k, v in reversed(table.items())]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _LINE_BREAKING.search(value):
                return path, "the value"
        elif isinstance(value, Mapping):
            for key in value:
                if isinstance(key, str) and _LINE_BREAKING.search(key):
                    return path, "a name"
            stack.extend(([*path, str(k)], v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(([*path, str(i)], v) for i, v in reversed(list(enumerate(value))))
    return None


# Keys whose values are secrets (api_key, api_keys, an env var such as HF_TOKEN): an error
# about them says what is wrong, never what was written. `*_env` keys hold variable names.
_SECRET_KEY = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)


def is_secret_key(loc: Iterable[Any]) -> bool:
    """True when any part of a dotted key path names a secret (and is not a ``*_env`` name)."""
    return any(
        isinstance(part, str) and _SECRET_KEY.search(part) and not part.endswith("_env")
        for part in loc
    )


def _describe(err: Mapping[str, Any], model: type[BaseModel], field: str) -> str:
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    got = err.get("input")
    shown = "the value is not shown" if is_secret_key(err["loc"]) else f"got {got!r}"
    if err["type"] in ("literal_error", "enum"):
        return f"{message} ({shown})"
    if not isinstance(got, Mapping) and err["type"] != "value_error":
        message += f" ({shown})"
    info = model.model_fields.get(field)
    if info is not None and info.description and err["type"].endswith("_type"):
        message += f"; {info.description}"
    return message


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
    }.get(type(value), type(value).__name__)
