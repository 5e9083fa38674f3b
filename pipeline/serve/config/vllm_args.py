"""How vLLM reads a command-line argument, so that ``extra_args`` is checked as vLLM will read
it, not as it is spelt. Pure.

vLLM parses ``python -m vllm.entrypoints.openai.api_server`` and ``vllm serve`` with its
``FlexibleArgumentParser`` (``vllm/utils/argparse_utils.py``), an argparse parser that first
rewrites each argument:

- ``--a_b`` and ``--a_b=v`` become ``--a-b``: ``_`` is ``-`` in a name, up to its first ``.``;
- ``--name.key v`` and ``--name.key=v`` (also ``--name.key+ v``, ``-x.key v``) become a JSON
  value of ``--name``, given after every other argument, so it wins over an earlier ``--name``;
- ``-O3``, ``-Ox`` and ``-O=x`` become ``--optimization-level``.

argparse (``allow_abbrev``, on) then takes an argument that starts with ``-`` as:

- the option of exactly that name, or of the name before its ``=``;
- with ``--``: every option that starts with the name (before ``=``); one is that option, more
  than one is an "ambiguous option" error;
- with one ``-``: the one-character option named by its first two characters (the rest is its
  value: ``-n4`` is ``--nnodes 4``), and every option that starts with the argument (Python
  3.11: the whole argument; 3.12 and later: the part before ``=``; both are taken here).

The options are vLLM 0.32.0's (``vllm-serve-options.txt`` beside this module, extracted from
the installed vLLM by ``scripts/vllm-serve-options.py``; a test keeps the rules here in step
with vLLM's own parser). Importing vLLM's parser takes 10 to 20 s, so ``doit plan`` never does.

Two simplifications, both on the side of reading an option where vLLM might not: every
argument is read on its own (vLLM's ``--name.key`` form consumes the next argument as its
value, and ``--`` ends the options), and combined one-character flags (``-xy`` as ``-x -y``)
are not unpacked (vLLM 0.32.0's only one-character flag without a value is ``-h``, which
prints the help and exits).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

OPTIONS_FILE = Path(__file__).with_name("vllm-serve-options.txt")


@dataclass(frozen=True)
class VllmOption:
    """One option of vLLM's parser (an argparse action): its dest, nargs and names."""

    dest: str
    nargs: str  # argparse's: "1" (None), "0", "?", "+", "*" or a number
    strings: tuple[str, ...]

    @property
    def name(self) -> str:
        """Its first ``--`` name, the one messages use."""
        return next((s for s in self.strings if s.startswith("--")), self.strings[0])


@dataclass(frozen=True)
class Reading:
    """How vLLM reads one argument that starts with ``-``.

    ``flag`` is the option as written, without any value (messages show it, never the value);
    ``value`` is the value given in the same argument (after ``=``, or glued to a one-character
    option), else None; ``matches`` are the option strings argparse may take it for: none (an
    unknown option), one (that option), or several (an ambiguous abbreviation, which vLLM
    refuses)."""

    index: int
    flag: str
    value: str | None
    matches: tuple[str, ...]

    @property
    def options(self) -> tuple[VllmOption, ...]:
        table = vllm_options()
        return tuple(dict.fromkeys(table[m] for m in self.matches))

    @property
    def option(self) -> VllmOption | None:
        """The option vLLM takes the argument for; None when unknown or ambiguous."""
        return vllm_options()[self.matches[0]] if len(self.matches) == 1 else None


@functools.cache
def vllm_options() -> Mapping[str, VllmOption]:
    """Option string -> option, from :data:`OPTIONS_FILE` (read once)."""
    table: dict[str, VllmOption] = {}
    for line in OPTIONS_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        dest, nargs, *strings = line.split()
        option = VllmOption(dest, nargs, tuple(strings))
        for string in strings:
            table[string] = option
    return table


def read_args(args: Iterable[str]) -> Iterator[Reading]:
    """A :class:`Reading` of every argument that vLLM takes for an option (positional values
    are skipped), in order."""
    for index, arg in enumerate(args):
        reading = read_arg(arg, index)
        if reading is not None:
            yield reading


def read_arg(arg: str, index: int = 0) -> Reading | None:
    """How vLLM reads ``arg`` (see the module's rules); None for a positional argument."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None  # a value, or `--` (the end of the options)
    if arg.startswith("-O") and arg != "-O":
        value = arg[3:] if arg[2] == "=" else arg[2:]
        return Reading(index, "-O", value, ("--optimization-level",))
    written, eq, value = arg.partition("=")
    name = written
    if name.startswith("--"):
        head, dot, tail = name[2:].partition(".")
        name = "--" + head.replace("_", "-") + dot + tail
    if "." in name:
        # `--name.key`: its value becomes a JSON argument of `--name`, given on its own.
        key = name.removesuffix("+").split(".", 1)[0]
        glued, _, matches = _resolve(key)
        flag = written.removesuffix("+").split(".", 1)[0]
        return Reading(index, flag[:2] if glued else flag, None, matches)
    glued, explicit, matches = _resolve(name + eq + value)
    return Reading(index, arg[:2] if glued else written, explicit, matches)


def _resolve(token: str) -> tuple[bool, str | None, tuple[str, ...]]:
    """argparse's reading of ``token`` (already rewritten by vLLM): whether it is a
    one-character option with its value glued on, the value in the token, and the option
    strings it matches."""
    table = vllm_options()
    if token in table:
        return False, None, (token,)
    if token == "--":
        return False, None, ()  # `--.key`: no name, so no option
    name, eq, value = token.partition("=")
    explicit = value if eq else None
    if eq and name in table:
        return False, explicit, (name,)
    prefixed = tuple(s for s in table if s.startswith(name))
    if name.startswith("--"):
        return False, explicit, prefixed
    short = token[:2]
    if short in table:
        # `-n4`: the one-character option, the rest its value; an option that the token
        # starts as well makes it ambiguous.
        longer = tuple(s for s in prefixed if s != short)
        if not longer:
            return True, token[2:], (short,)
        return False, explicit, (short, *longer)
    return False, explicit, prefixed


def refusal(
    reading: Reading, option: VllmOption, where: str, remedy: str = "remove it here"
) -> str:
    """Why ``reading`` may not be in extra_args: it would set ``option``, which ``where`` (a
    config key) sets; then ``remedy``. Names the flag as written, never its value."""
    flag, name = reading.flag, option.name
    if len(reading.matches) > 1:
        shown = ", ".join(reading.matches[:4]) + (", ..." if len(reading.matches) > 4 else "")
        return (
            f"{flag} is an abbreviation of {shown} (vLLM refuses it as ambiguous), and {name} "
            f"is set from {where}: write the option you mean in full"
        )
    if flag in option.strings:
        return f"{flag} is set from {where}; {remedy}"
    return (
        f"{flag} is read by vLLM as {name} (it takes _ for - and any unambiguous prefix), "
        f"which is set from {where}; {remedy}"
    )


def overriding(
    args: Iterable[str], guarded: Mapping[str, str]
) -> Iterator[tuple[Reading, VllmOption, str]]:
    """Each argument vLLM may read as an option whose dest is a key of ``guarded`` (dest ->
    the config key that sets it), with that option and key."""
    for reading in read_args(args):
        for option in reading.options:
            if option.dest in guarded:
                yield reading, option, guarded[option.dest]
                break


def option_values(args: Sequence[str], dest: str) -> list[str]:
    """The values given to the option ``dest`` in ``args`` (read as vLLM reads them), in order:
    in the same argument, else the next one."""
    values = []
    for reading in read_args(args):
        option = reading.option
        if option is None or option.dest != dest:
            continue
        if reading.value is not None:
            values.append(reading.value)
        elif reading.index + 1 < len(args):
            values.append(args[reading.index + 1])
        else:
            values.append("")
    return values
