"""The ``datapipe`` command: prepare, list and describe datasets; train and test models.

    datapipe prepare mnist [--split test] [--mirror URL]... [--source DIR] [--no-verify]
    datapipe list ['*mnist*']
    datapipe info mnist [--json]
    datapipe train --data mnist --model lenet --epochs 3
    datapipe test --data mnist --ckpt runs/logs/version_0/checkpoints/last.ckpt

Errors a user can cause end in one line on stderr and exit status 2 (``--debug``
shows the traceback). prepare, list and info never import torch; train and test do.
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
    _add_fetch_options(p)
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

    p = sub.add_parser("train", help="train a model from the zoo on a recipe's data")
    p.add_argument("--data", required=True, metavar="NAME", help="recipe name")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="model name (mlp, lenet, resnet18, ...)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="epochs to train (default 10 unless --max-steps)")
    p.add_argument("--max-steps", type=int, default=-1, metavar="N",
                   help="stop after N optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, metavar="B")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="learning rate")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    p.add_argument("--precision", default="32",
                   help="32, bf16-mixed or 16-mixed (default 32)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="processes/devices; N > 1 relaunches under torchrun")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="DataLoader worker processes")
    p.add_argument("--val-split", type=_count_or_fraction, default=None, metavar="N|F",
                   help="validation samples carved from train: a count or a fraction")
    p.add_argument("--ckpt-path", metavar="last|PATH",
                   help="continue from a checkpoint (last: the newest under --root-dir)")
    _add_cache_dir(p)
    _add_fetch_options(p)
    p.add_argument("--root-dir", metavar="DIR", default="runs",
                   help="where checkpoints and metrics.csv go (default ./runs)")
    p.add_argument("--seed", type=int, default=42, metavar="S")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("test", help="evaluate a checkpoint on a recipe's test split")
    p.add_argument("--data", required=True, metavar="NAME", help="recipe name")
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file")
    p.add_argument("--batch-size", type=int, default=None, metavar="B")
    _add_cache_dir(p)
    _add_fetch_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _count_or_fraction(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache root (default: $DATAPIPE_CACHE, else ./cache)")


def _add_fetch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="base URL to try before the recipe's mirrors (repeatable; "
                        "also $DATAPIPE_MIRRORS)")
    p.add_argument("--source", metavar="DIR",
                   help="take the files from DIR instead of downloading (still verified)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept files whose checksums differ from the recipe's (recorded "
                        "as unverified)")


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


def _data_options(args: argparse.Namespace) -> dict:
    """The DataModule keywords that the cache and fetch options of a command give."""
    return {"cache_dir": args.cache_dir, "mirrors": args.mirror, "source": args.source,
            "verify": not args.no_verify, "quiet": True if args.quiet else None}


def _cmd_prepare(args: argparse.Namespace) -> int:
    from datapipe.prepare import prepare_split
    from datapipe.registry import load

    dm = load(args.name, **_data_options(args))
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


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    if not metrics:
        return
    width = max(len(k) for k in metrics)
    print(title)
    for name in sorted(metrics):
        print(f"  {name.ljust(width)}  {metrics[name]:.4f}")


def _relaunch_under_torchrun(devices: int) -> int:
    """Run this same command in ``devices`` processes started by torchrun."""
    import os

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={devices}", "-m", "datapipe", *sys.argv[1:]]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    if args.devices > 1 and "WORLD_SIZE" not in os.environ:
        from datapipe.trainer.distributed import DistEnv
        from datapipe.trainer.trainer import _select_device

        # Fail here, in one process, if the devices are not there.
        _select_device("auto", args.devices, DistEnv(world_size=args.devices))
        return _relaunch_under_torchrun(args.devices)

    from datapipe.models import ImageClassifier
    from datapipe.registry import load
    from datapipe.trainer import ModelCheckpoint, Trainer

    overrides = {**_data_options(args), "seed": args.seed}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.val_split is not None:
        overrides["val_split"] = args.val_split
    dm = load(args.data, **overrides)
    model = ImageClassifier.from_datamodule(dm, model=args.model, lr=args.lr,
                                            optimizer=args.optimizer)
    has_val = dm.split_specs.get("val") not in (None, 0)
    checkpoint = ModelCheckpoint(monitor="val_loss" if has_val else None, save_last=True)
    max_epochs = args.epochs if args.epochs is not None else (10 if args.max_steps == -1 else -1)
    trainer = Trainer(max_epochs=max_epochs, max_steps=args.max_steps, precision=args.precision,
                      devices=args.devices, default_root_dir=args.root_dir, seed=args.seed,
                      callbacks=[checkpoint], enable_progress_bar=not args.quiet)
    trainer.fit(model, dm, ckpt_path=args.ckpt_path)
    if not trainer.is_global_zero:
        return 0
    final = {k: float(v) for k, v in trainer.callback_metrics.items()
             if k.startswith(("val_", "train_")) and not k.endswith(("_step", "_epoch"))}
    _print_metrics(f"after {trainer.current_epoch} epoch(s), {trainer.global_step} steps:",
                   final)
    print(f"checkpoints: {checkpoint.dirpath}")
    if trainer.logger is not None:
        print(f"metrics: {trainer.log_dir / 'metrics.csv'}")
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from datapipe.registry import load
    from datapipe.trainer import Trainer
    from datapipe.trainer import checkpoint as ckpt

    saved = ckpt.load(args.ckpt)
    module = ckpt.import_class(saved["module_class"])(**saved["hparams"])
    # Only the test split is needed: no train/val plan, so nothing else must be prepared.
    overrides = {**_data_options(args), "train_split": None, "val_split": None}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    dm = load(args.data, **overrides)
    trainer = Trainer(logger=False, enable_checkpointing=False,
                      enable_progress_bar=not args.quiet)
    [results] = trainer.test(module, dm, ckpt_path=args.ckpt)
    card = saved.get("data_card") or {}
    trained_on = card.get("recipe", {}).get("name", "unknown data")
    _print_metrics(f"{args.ckpt} (trained on {trained_on}) on {args.data} test:", results)
    return 0


COMMANDS = {"prepare": _cmd_prepare, "list": _cmd_list, "info": _cmd_info,
            "train": _cmd_train, "test": _cmd_test}


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
