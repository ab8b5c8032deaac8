"""The command-line reference (docs/cli.md), generated from the argparse definitions.

    python -m datapipe.cli_reference docs/cli.md     # regenerate after changing cli.py

Every command and subcommand with its usage, its arguments and their help, so the
reference cannot say anything the parser does not; tests/test_docs.py fails when
the committed file drifts from what this prints.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from datapipe.cli import build_parser

COMMAND = "python -m datapipe.cli_reference docs/cli.md"
WIDTH = 88  # of the usage lines; fixed, so the output does not depend on the terminal


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _expand(action: argparse.Action, prog: str) -> str:
    """The action's help with argparse's %(...)s and %% expanded, as --help shows it."""
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def _signature(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(
            action.nargs, name)
    value = ""
    if action.nargs != 0:
        value = " " + (action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices
            else action.dest.upper()))
    return ", ".join(f"{option}{value}" for option in action.option_strings)


def _notes(action: argparse.Action) -> str:
    notes = []
    if action.choices is not None and action.option_strings and action.metavar:
        notes.append(f"one of {', '.join(map(str, action.choices))}")
    if action.required and action.option_strings:
        notes.append("required")
    if (isinstance(action, (argparse._AppendAction, argparse._AppendConstAction))
            and "repeatable" not in (action.help or "")):
        notes.append("repeatable")
    default = action.default
    if (action.option_strings and default not in (None, False, [], argparse.SUPPRESS)
            and action.nargs != 0 and "default" not in (action.help or "")):
        notes.append(f"default {default}")
    return f" ({'; '.join(notes)})" if notes else ""


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = functools.partial(argparse.HelpFormatter, width=WIDTH)
    saved, parser.formatter_class = parser.formatter_class, formatter
    try:
        return parser.format_usage().strip()
    finally:
        parser.formatter_class = saved


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(parser: argparse.ArgumentParser, title: str, summary: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{title}`", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ".", ""]
    lines += ["```", _usage(parser), "```", ""]
    rows = [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help is not argparse.SUPPRESS]
    if rows:
        lines += ["| argument | what it does |", "| --- | --- |"]
        lines += [f"| `{_cell(_signature(a))}` | {_cell(_expand(a, parser.prog) + _notes(a))} |"
                  for a in rows]
        lines.append("")
    for name, help_text, sub in _subcommands(parser):
        lines += _section(sub, f"{title} {name}", help_text, min(level + 1, 3))
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown reference of ``parser`` (default: the ``datapipe`` command's)."""
    parser = parser or build_parser()
    lines = [
        "# The `datapipe` command",
        "",
        f"<!-- Generated from datapipe/cli.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        (parser.description or "").strip(),
        "",
        "Commands: " + ", ".join(f"[`{name}`](#datapipe-{name})"
                                 for name, _, _ in _subcommands(parser)) + ".",
        "Errors a user can cause end in one line on stderr and exit status 2; `--debug` "
        "shows the traceback.",
        "",
    ]
    lines += _section(parser, "datapipe", "", 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the reference to the file named in ``argv`` (default: standard output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
