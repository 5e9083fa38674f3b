"""Loading the serve TOML: read, apply ``AUTO_INFER_VLLM_OVERRIDES``, merge the defaults tables
into each instance, validate into the models. Every error names the file, the dotted key the
user wrote (the defaults table or the instance's own) and the instance. Pure."""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError
from pipeline.serve.config.checks import Located, check_gateway, check_instances
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
    ServeConfig,
    Server,
)

_M = TypeVar("_M", bound=BaseModel)


def load_config(path: Path, overrides: str | None = None) -> ServeConfig:
    """Read, merge and validate the serve TOML at ``path``.

    ``overrides`` is the raw ``AUTO_INFER_VLLM_OVERRIDES`` text (a JSON object) or None.
    Raises ConfigError for a missing file, bad TOML, bad overrides or an invalid value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: serve config not found; pass --config or set AUTO_INFER_VLLM_CONFIG"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the serve config: {exc}") from None
    return parse_config(
        text,
        source=str(path),
        overrides=overrides,
        base_dir=Path(os.path.normpath(path.absolute())).parent,
    )


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
    patch = parse_overrides(overrides) if overrides else {}
    document = deep_merge(document, patch)
    return build_config(document, source=source, overridden=_paths(patch), base_dir=base_dir)


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``AUTO_INFER_VLLM_OVERRIDES``: a JSON object, or ConfigError."""
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
    _check_keys(document, ("master", "instance", "gateway"), "", loc)
    master_raw = _check_table(document.get("master", {}), "master", loc)
    _check_keys(master_raw, Master.model_fields, "master.", loc)
    master = _anchor(_validate(Master, master_raw, "master.", loc), base_dir)
    gateway_raw = _check_table(document.get("gateway", {}), "gateway", loc)
    _check_keys(gateway_raw, Gateway.model_fields, "gateway.", loc)
    if "aliases" in gateway_raw:
        _check_table(gateway_raw["aliases"], "gateway.aliases", loc)
    gateway = _anchor(_validate(Gateway, gateway_raw, "gateway.", loc), base_dir)

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
    config = ServeConfig(source=source, master=master, instances=tuple(instances), gateway=gateway)
    check_instances(config, loc)
    check_gateway(config, loc)
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
