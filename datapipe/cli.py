"""The ``datapipe`` command: prepare, list and describe datasets.

    datapipe prepare mnist [--split test] [--mirror URL]... [--source DIR] [--no-verify]
    datapipe list ['*mnist*']
    datapipe info mnist [--json]

Errors a user can cause end in one line on stderr and exit status 2 (``--debug``
shows the traceback). None of these paths imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence

from datapipe.errors import ConfigError, DatapipeError, UnverifiedDataWarning

log = logging.getLogger("datapipe")


class _UsageError(Exception):
    """argparse's complaint, carried to main() instead of exiting from inside it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="datapipe",
        description="Take any dataset from its source to batches on a device.",
    )
    parser.add_argument("--recipes", metavar="DIR", action="append", default=[],
                        help="load recipe files (*.py) from DIR (repeatable; "
                             "also $DATAPIPE_RECIPES)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    p = sub.add_parser("prepare", help="download, verify, parse and cache a dataset")
    p.add_argument("name", help="recipe name (see `datapipe list`)")
    p.add_argument("--split", action="append", metavar="S",
                   help="prepare only the source splits this spec names, e.g. test or "
                        "'train[:10%%]' (repeatable; default: all)")
    _add_cache_dir(p)
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="base URL to try before the recipe's mirrors (repeatable; "
                        "also $DATAPIPE_MIRRORS)")
    p.add_argument("--source", metavar="DIR",
                   help="take the files from DIR instead of downloading (still verified)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept files whose checksums differ from the recipe's (recorded "
                        "as unverified)")
    p.add_argument("--force", action="store_true",
                   help="rebuild the prepared data even if it is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    p = sub.add_parser("list", help="list the registered recipes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard")

    p = sub.add_parser("info", help="the data card: splits, transforms, normalization, "
                                    "preparation")
    p.add_argument("name", help="recipe name")
    _add_cache_dir(p)
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    return parser


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache root (default: $DATAPIPE_CACHE, else ./cache)")


def _source_splits(dm, specs: Sequence[str] | None) -> list[str]:
    from datapipe.splits import parse_split_spec

    available = dm.recipe.splits()
    if not specs:
        return list(available)
    wanted: list[str] = []
    for spec in specs:
        for term in parse_split_spec(spec):
            if term.split not in available:
                raise ConfigError(
                    f"{dm.name} has no split {term.split!r}; it has {', '.join(available)}"
                )
            if term.split not in wanted:
                wanted.append(term.split)
    return wanted


def _cmd_prepare(args: argparse.Namespace) -> int:
    from datapipe.prepare import prepare_split
    from datapipe.registry import load

    dm = load(args.name, cache_dir=args.cache_dir, mirrors=args.mirror, source=args.source,
              verify=not args.no_verify, quiet=True if args.quiet else None)
    for split in _source_splits(dm, args.split):
        started = time.perf_counter()
        prepared, worked = prepare_split(dm.recipe, split, dm.cache, dm.fetch_options,
                                         force=args.force)
        status = (f"prepared in {time.perf_counter() - started:.1f}s" if worked
                  else "already prepared")
        note = "" if prepared.verified else "  (UNVERIFIED sources)"
        print(f"{dm.name} {split}: {prepared.rows} rows, fingerprint {prepared.fingerprint}, "
              f"{status}{note}")
    print(f"cache: {dm.cache.root}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from datapipe.registry import list_recipes

    for name in list_recipes(args.pattern):
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from datapipe.card import data_card, format_card
    from datapipe.registry import load

    # Describe whatever is prepared; the card marks data from unverified files.
    dm = load(args.name, cache_dir=args.cache_dir, verify=False)
    card = data_card(dm)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return 0


COMMANDS = {"prepare": _cmd_prepare, "list": _cmd_list, "info": _cmd_info}


def _setup_output(quiet: bool) -> None:
    """Log lines and warnings on stderr as ``datapipe: ...``, one line each.

    Call inside ``warnings.catch_warnings()``, which restores the warning state.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("datapipe: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"datapipe: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("always", UnverifiedDataWarning)  # never hide unverified data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a user's error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        parser.print_usage(sys.stderr)
        print(e, file=sys.stderr)
        return 2
    saved = (list(log.handlers), log.level, log.propagate)
    with warnings.catch_warnings():
        _setup_output(getattr(args, "quiet", False))
        try:
            return _run(args)
        finally:
            log.handlers[:], log.level, log.propagate = saved


def _run(args: argparse.Namespace) -> int:
    try:
        from datapipe.registry import load_recipe_dir

        for folder in args.recipes:
            load_recipe_dir(folder)
        return COMMANDS[args.command](args)
    except DatapipeError as e:
        if args.debug:
            raise
        print(f"datapipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datapipe: interrupted; the cache holds no partial entry", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
