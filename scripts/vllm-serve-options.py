"""vLLM's own parser of ``vllm serve``, asked from the interpreter that has vLLM installed.

    VLLM_PYTHON scripts/vllm-serve-options.py > pipeline/serve/config/vllm-serve-options.txt
    VLLM_PYTHON scripts/vllm-serve-options.py --parse < cases.json

The first form writes the options list the serve config checks ``extra_args`` against
(:mod:`pipeline.serve.config.vllm_args`): one action of the parser a line, ``dest nargs
option-strings...``, sorted by dest. ``nargs`` is argparse's (``None`` written as ``1``).
The parser is built as ``python -m vllm.entrypoints.openai.api_server`` builds it
(``FlexibleArgumentParser`` + ``make_arg_parser``; ``vllm serve`` adds the same options to its
subparser).

The second form reads a JSON list of argument lists and prints one JSON object: ``options``,
the text of the first form, and ``results``, for each list the dests whose values differ from
parsing no arguments (``{"set": [...]}``) or the parser's error (``{"error": "..."}``). The
test that keeps the rules of ``vllm_args`` in step with vLLM's parser uses it, once: importing
vLLM's parser takes 10 to 20 s.

Run it with vLLM's python only: this script imports nothing from the pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any


def build_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def options_text(parser: Any) -> str:
    import vllm

    lines = [
        f"# vLLM {vllm.__version__}: the options of `vllm serve` (and of its api_server module),",
        "# written by `VLLM_PYTHON scripts/vllm-serve-options.py` (see that script).",
        "# One action a line: dest, argparse nargs (None as 1), option strings.",
    ]
    rows = []
    for action in parser._actions:
        if not action.option_strings:
            continue  # the positional model tag
        nargs = "1" if action.nargs is None else str(action.nargs)
        rows.append(f"{action.dest} {nargs} {' '.join(action.option_strings)}")
    return "\n".join([*lines, *sorted(rows)]) + "\n"


def parse_cases(parser: Any, cases: list[list[str]]) -> list[dict[str, Any]]:
    baseline = vars(parser.parse_args([]))
    results: list[dict[str, Any]] = []
    for args in cases:
        # argparse reports by printing usage and raising SystemExit: keep both off stdout.
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parsed = vars(parser.parse_args(list(args)))
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            results.append({"error": lines[-1] if lines else "exit"})
            continue
        changed = sorted(k for k, v in parsed.items() if baseline.get(k) != v)
        results.append({"set": changed})
    return results


def main(argv: list[str]) -> int:
    parser = build_parser()
    if argv[1:] == ["--parse"]:
        cases = json.load(sys.stdin)
        report = {"options": options_text(parser), "results": parse_cases(parser, cases)}
        print(json.dumps(report))
        return 0
    if argv[1:]:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sys.stdout.write(options_text(parser))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
