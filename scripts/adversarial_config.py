"""An adversarial pass over `doit plan`: bad serve configs and overrides, each of which must be
refused the way every user error is, counted by family.

    .venv/bin/python scripts/adversarial_config.py [--only SUBSTRING]

Each case writes a serve TOML (or a FIFO, a directory, an override) into a private temp dir and
runs ``doit plan`` on it as a user would (``python -m doit -f dodo.py plan``, with
``AUTO_INFER_VLLM_CONFIG``), then checks what a safe refusal looks like:

- it exits non-zero, within 15 s (a FIFO must not hang it);
- stderr holds exactly one ``error:`` line and no traceback;
- where the case carries a secret, it appears nowhere in stdout or stderr;
- where the case names what the line must say (the option it would override, the key), it does.

Prints one line per case (``ok`` or ``FAIL`` with what was seen) and the counts per family;
exit status 1 when a case fails. The families: extra_args (spellings vLLM's parser takes for an
option the plan manages), control (NUL, CR, LF in values, names, paths and arguments), file
(what the config path may be), overrides (``AUTO_INFER_VLLM_OVERRIDES``; Linux refuses an
environment string over 128 KiB, so no override reaches the 1 MiB bound), limits (numbers out
of range, the liveness and gateway keys among them) and paths (``log_dir``, with
``plan --check``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-that-must-not-print"
BASE = """\
[instance.control]
gpu_ids = []
[instance.server]
model = "/models/m"
"""


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    # Writes the config into the folder; returns the path to give as the config.
    make: Callable[[Path], Path]
    overrides: str | None = None
    says: tuple[str, ...] = ()  # text the error line must hold
    secret: bool = False  # SECRET is in the case: it must not be printed
    extra_env: dict[str, str] = field(default_factory=dict)


def toml(text: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "serve.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return make


def instance(body: str) -> Callable[[Path], Path]:
    return toml(BASE + "[instance.a.server]\nport = 9001\n" + body)


CASES: list[Case] = []


def extra_args(name: str, args: list[str], says: str, secret: bool = False) -> None:
    body = f"extra_args = {json.dumps(args)}\n"
    CASES.append(Case("extra_args", name, instance(body), says=(says,), secret=secret))


extra_args("prefix of --host", ["--hos", "0.0.0.0"], "--host")
extra_args("prefix of --host with =", ["--ho=0.0.0.0"], "--host")
extra_args("--host itself", ["--host", "0.0.0.0"], "--host")
extra_args("prefix of --port", ["--por", "9"], "--port")
extra_args("--port with =", ["--port=9"], "--port")
extra_args("--api_key with _ and =", [f"--api_key={SECRET}"], "--api-key", secret=True)
extra_args("prefix of --api-key", ["--api-ke", SECRET], "--api-key", secret=True)
extra_args("--api-key.x form", ["--api-key.x", SECRET], "--api-key", secret=True)
extra_args("--served_model_name", ["--served_model_name", "x"], "--served-model-name")
extra_args("prefix of --served-model-name", ["--served-model", "x"], "--served-model-name")
extra_args("--model_name alias", ["--model", "/other"], "--model")
extra_args("prefix of --gpu-memory-utilization", ["--gpu-mem", "0.99"], "--gpu-memory-utilization")
extra_args("--max_model_len", ["--max_model_len", "9"], "--max-model-len")


def control(name: str, body: str, says: str, secret: bool = False) -> None:
    CASES.append(Case("control", name, instance(body), says=(says,), secret=secret))


control("NUL in an env value", f'[instance.a.control]\nenv = {{ X = "{SECRET}\\u0000" }}\n',
        "env", secret=True)  # fmt: skip
control("LF in an env value", f'[instance.a.control]\nenv = {{ X = "{SECRET}\\n" }}\n',
        "env", secret=True)  # fmt: skip
control("CR in an env name", '[instance.a.control]\nenv = { "X\\r" = "1" }\n', "env")
control("NUL in the model path", 'model = "/models/m\\u0000x"\n', "model")
control("LF in an extra_args item", 'extra_args = ["--seed", "1\\n2"]\n', "extra_args")
control("CR in a served name", 'served_model_name = "x\\ry"\n', "served_model_name")
control("LF in log_dir", '[instance.a.control]\nlog_dir = "/tmp/a\\nb"\n', "log_dir")


def fifo(folder: Path) -> Path:
    path = folder / "serve.toml"
    os.mkfifo(path)
    return path


def directory(folder: Path) -> Path:
    path = folder / "serve.toml"
    path.mkdir()
    return path


def missing(folder: Path) -> Path:
    return folder / "no-such.toml"


def big(folder: Path) -> Path:
    path = folder / "serve.toml"
    with path.open("w") as fh:
        fh.write(BASE + "[instance.a.server]\nport = 9001\n")
        fh.write("# " + "x" * (20 * 1024 * 1024) + "\n")
    return path


def deep_toml(folder: Path) -> Path:
    path = folder / "serve.toml"
    path.write_text(BASE + "[instance.a.server]\nextra_args = " + "[" * 20000 + "]" * 20000)
    return path


CASES += [
    Case("file", "a FIFO as the config", fifo, says=("regular file",)),
    Case("file", "a directory as the config", directory, says=("regular file",)),
    Case("file", "/dev/null as the config", lambda _: Path("/dev/null"), says=("regular file",)),
    Case("file", "a missing config", missing, says=("no-such.toml",)),
    Case("file", "a 20 MiB config", big),
    Case("file", "20,000 nested arrays in the TOML", deep_toml),
    Case("file", "not TOML", toml("[instance\nx = = 1\n")),
]

OK_TOML = BASE + "[instance.a.server]\nport = 9001\n"
CASES += [
    Case("overrides", "20,000 nested objects", toml(OK_TOML),
         overrides='{"a":' * 20000 + "1" + "}" * 20000,
         says=("AUTO_INFER_VLLM_OVERRIDES",)),
    Case("overrides", "not JSON", toml(OK_TOML), overrides="{instance:",
         says=("AUTO_INFER_VLLM_OVERRIDES",)),
    Case("overrides", "a JSON list", toml(OK_TOML), overrides="[1, 2]",
         says=("AUTO_INFER_VLLM_OVERRIDES",)),
    Case("overrides", "a secret in a bad override", toml(OK_TOML),
         overrides=json.dumps({"instance": {"server": {"extra_args": ["--api-key", SECRET]}}}),
         secret=True),
]  # fmt: skip


def limit(name: str, body: str, says: str) -> None:
    CASES.append(Case("limits", name, instance(body), says=(says,)))


limit("health_interval = 0", "[instance.a.control]\nhealth_interval = 0\n", "health_interval")
limit("health_interval = -1", "[instance.a.control]\nhealth_interval = -1\n", "health_interval")
limit("health_failures = 0", "[instance.a.control]\nhealth_failures = 0\n", "health_failures")
limit("health_failures a string", '[instance.a.control]\nhealth_failures = "3"\n',
      "health_failures")  # fmt: skip
CASES.append(
    Case(
        "limits",
        "upstream_timeout = -1",
        toml(OK_TOML + "[gateway]\nenable = true\nupstream_timeout = -1\n"),
        says=("upstream_timeout",),
    )
)
CASES.append(
    Case(
        "limits",
        "a port out of range",
        toml(BASE + "[instance.a.server]\nport = 70000\n"),
        says=("port",),
    )
)


def checked(folder: Path, log_dir: Path) -> Path:
    """A config that passes ``plan --check`` but for its ``log_dir``: the model is a folder
    here, and ``python`` on PATH is the runtime."""
    model = folder / "model"
    model.mkdir()
    text = BASE.replace("/models/m", str(model)) + "[instance.a.server]\nport = 9001\n"
    return toml(text + f'[instance.a.control]\nlog_dir = "{log_dir}"\n')(folder)


def log_dir_file(folder: Path) -> Path:
    (folder / "logs").write_text("a file\n")
    return checked(folder, folder / "logs")


def log_dir_under_file(folder: Path) -> Path:
    (folder / "f").write_text("a file\n")
    return checked(folder, folder / "f" / "logs")


CASES += [
    Case("paths", "log_dir is a regular file", log_dir_file, says=("log_dir",)),
    Case("paths", "log_dir under a regular file", log_dir_under_file, says=("log_dir",)),
]


def run_case(case: Case, folder: Path) -> str | None:
    """None when the refusal is safe, else what was wrong."""
    config = case.make(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTO_INFER", "PIPELINE_"))}
    env["AUTO_INFER_VLLM_CONFIG"] = str(config)
    env["AUTO_INFER_VLLM_STATE_DIR"] = str(folder / "state")
    if case.overrides is not None:
        env["AUTO_INFER_VLLM_OVERRIDES"] = case.overrides
    argv = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "plan"]
    if case.family == "paths":
        argv += ["--check"]
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            cwd=folder,
            env={**env, **case.extra_env},
            capture_output=True,
            text=True,
            errors="replace",
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return "still running after 15 s"
    took = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if done.returncode == 0:
        return f"accepted (exit 0 in {took:.1f} s)"
    if "Traceback" in done.stderr or "Traceback" in done.stdout:
        return "a traceback: " + done.stderr.strip().splitlines()[-1][:160]
    if len(errors) != 1:
        tail = done.stderr.strip().splitlines()[-1:] or ["nothing"]
        return f"{len(errors)} error lines; stderr ends: {tail[0][:160]}"
    if case.secret and (SECRET in done.stderr or SECRET in done.stdout):
        return "the secret value was printed"
    missing_words = [word for word in case.says if word not in errors[0]]
    if missing_words:
        return f"the line does not say {missing_words}: {errors[0][:200]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name has this text")
    parser.add_argument("--verbose", action="store_true", help="print each case's error line")
    args = parser.parse_args(argv)
    counts: dict[str, list[int]] = {}
    failures = 0
    for case in CASES:
        if args.only not in case.name and args.only != case.family:
            continue
        with tempfile.TemporaryDirectory(prefix="adversarial-config-") as tmp:
            problem = run_case(case, Path(tmp))
        print(f"{case.family:10} {case.name:45} {'ok' if problem is None else 'FAIL: ' + problem}")
        tally = counts.setdefault(case.family, [0, 0])
        tally[0 if problem is None else 1] += 1
        failures += problem is not None
    print()
    for family, (ok, bad) in counts.items():
        print(f"{family:10} {ok} refused safely, {bad} failed")
    total = sum(ok + bad for ok, bad in counts.values())
    print(f"{'all':10} {total - failures} refused safely, {failures} failed, of {total}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
