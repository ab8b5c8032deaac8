"""The ``datapipe`` command: prepare, list and describe datasets; train and test models.

    datapipe prepare mnist [--split test] [--mirror URL]... [--source DIR] [--no-verify]
    datapipe list ['*mnist*']
    datapipe info mnist [--json] [--plot mnist.png]
    datapipe info --ckpt last.ckpt [mnist]   # a checkpoint's card; with a name: still cached?
    datapipe verify mnist                 # re-hash every cached entry against its manifest
    datapipe cache ls | datapipe cache rm mnist [--version V] [--all]
    datapipe train --data mnist --model lenet --epochs 3
    datapipe train --data mnist --model lenet --folds 5 --stratify   # cross-validation
    datapipe cv-report runs               # gather folds run as separate jobs (--fold I)
    datapipe test --data mnist --ckpt runs/logs/version_0/checkpoints/last.ckpt

Errors a user can cause end in one line on stderr and exit status 2 (``--debug``
shows the traceback). prepare, list and info never import torch; train and test do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

from datapipe.errors import ConfigError, DatapipeError, UnverifiedDataWarning

log = logging.getLogger("datapipe")


class _UsageError(Exception):
    """argparse's complaint, carried to main() instead of exiting from inside it."""


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and default not in (
                None, False, [], argparse.SUPPRESS) and not isinstance(default, bool)):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        # --help and --version end here: main() returns the status instead of exiting.
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


class _Exit(Exception):
    """argparse finished the command itself (--help, --version) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


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
    parser.add_argument("--version", action="version", version=f"datapipe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    p = sub.add_parser("prepare", help="download, verify, parse and cache a dataset")
    p.add_argument("name", help="recipe name (see `datapipe list`)")
    p.add_argument("--split", action="append", metavar="S",
                   help="prepare only the source splits this spec names, e.g. test or "
                        "'train[:10%%]' (repeatable; default: all)")
    _add_cache_dir(p)
    _add_recipe_options(p)
    _add_fetch_options(p)
    p.add_argument("--force", action="store_true",
                   help="rebuild the prepared data even if it is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--num-shards", type=_int_from(1), metavar="N",
                   help="share a sharded prepare (imagenet) among N machines with one cache "
                        "folder or object store (s3://); the run that completes the set "
                        "publishes the data")
    p.add_argument("--shard-index", type=_int_from(0), metavar="I",
                   help="with --num-shards: the part (0..N-1) this machine writes")

    p = sub.add_parser("list", help="list the registered recipes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard")

    p = sub.add_parser("info", help="the data card: splits, transforms, normalization, "
                                    "preparation")
    p.add_argument("name", nargs="?", help="recipe name (may be left out with --ckpt)")
    _add_cache_dir(p)
    _add_recipe_options(p)
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--source", metavar="DIR|NAME",
                   help="the files, folder or dataset the recipe reads (e.g. the folder of "
                        "image-folder, the dataset of hf)")
    p.add_argument("--ckpt", metavar="PATH",
                   help="print the data card stored in a checkpoint; with NAME, also say "
                        "whether the cached data still matches it (exit status 1 if not)")
    p.add_argument("--plot", metavar="PNG",
                   help="also write a PNG: sample images per class and the class histogram "
                        "of each split")

    p = sub.add_parser("train", help="train a model from the zoo on a recipe's data")
    p.add_argument("--data", required=True, metavar="NAME", help="recipe name")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="model name (mlp, lenet, resnet18, ...)")
    p.add_argument("--epochs", type=_int_from(1), default=None, metavar="N",
                   help="epochs to train (default 10 unless --max-steps)")
    p.add_argument("--max-steps", type=_int_from(1), default=-1, metavar="N",
                   help="stop after N optimizer steps (default: no limit)")
    p.add_argument("--batch-size", type=_int_from(1), default=None, metavar="B",
                   help="samples per batch (default: the recipe's)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, metavar="LR",
                   help="learning rate")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"),
                   help="adam, adamw or sgd")
    p.add_argument("--precision", default="32", help="32, bf16-mixed or 16-mixed")
    p.add_argument("--devices", type=_int_from(1), default=1, metavar="N",
                   help="processes/devices; N > 1 relaunches under torchrun")
    p.add_argument("--num-workers", type=_int_from(0), default=None, metavar="N",
                   help="DataLoader worker processes (default: the recipe's)")
    p.add_argument("--val-split", type=_count_or_fraction, default=None, metavar="N|F",
                   help="validation samples carved from train: a count or a fraction "
                        "(default: the recipe's)")
    p.add_argument("--stratify", action="store_true",
                   help="carve the validation split (or the folds) so every class keeps "
                        "its share")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation: train a fresh model on each fold (fold I "
                        "as validation, the rest as train) under ROOT_DIR/fold-I, then "
                        "print a table with mean and std")
    p.add_argument("--fold", type=int, default=None, metavar="I",
                   help="with --folds: run only fold I (0..K-1), e.g. one job per fold; "
                        "`datapipe cv-report ROOT_DIR` gathers them")
    p.add_argument("--ckpt-path", metavar="last|PATH",
                   help="continue from a checkpoint (last: the newest under --root-dir)")
    _add_cache_dir(p)
    _add_recipe_options(p)
    _add_fetch_options(p)
    p.add_argument("--root-dir", type=_folder, metavar="DIR", default="runs",
                   help="where checkpoints and metrics.csv go")
    p.add_argument("--seed", type=_seed, default=42, metavar="S",
                   help="seeds the model's initial weights, the split and the batch order")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("test", help="evaluate a checkpoint on a recipe's test split")
    p.add_argument("--data", required=True, metavar="NAME", help="recipe name")
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file")
    p.add_argument("--batch-size", type=_int_from(1), default=None, metavar="B")
    _add_cache_dir(p)
    _add_recipe_options(p)
    _add_fetch_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("cv-report", help="gather the folds of a cross-validation run as "
                                         "separate jobs: a table with mean and std")
    p.add_argument("root", metavar="ROOT", help="the --root-dir the folds were trained with")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("verify", help="re-check cached data against its recorded checksums; "
                                      "corrupt entries stop being used")
    p.add_argument("name", nargs="?", help="recipe name (default: everything in the cache)")
    _add_cache_dir(p)

    p = sub.add_parser("cache", help="list or remove what the cache holds")
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True,
                               parser_class=_Parser)
    a = actions.add_parser("ls", help="prepared entries, downloads and leftovers")
    a.add_argument("name", nargs="?", help="only this recipe's entries")
    _add_cache_dir(a)
    a.add_argument("--json", action="store_true", help="print the listing as JSON")
    a = actions.add_parser("rm", help="remove a recipe's prepared entries (under the prepare "
                                      "lock)")
    a.add_argument("name", help="recipe name")
    a.add_argument("--version", metavar="V", help="only entries of this recipe version "
                                                   "(split indices are then kept)")
    a.add_argument("--all", action="store_true",
                   help="also remove its downloaded source files")
    _add_cache_dir(a)
    return parser


def _count_or_fraction(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction")
    return value


def _int_from(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is less than {low}")
        return value

    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return value


def _seed(text: str) -> int:
    from datapipe.datamodule import MAX_SEED

    value = _int_from(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; a seed lies in "
                                         f"0..{MAX_SEED}")
    return value


def _mirror(text: str) -> str:
    from datapipe.stages.download import check_mirror

    try:
        return check_mirror(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _folder(text: str) -> str:
    """A folder that exists or can be made: not a file."""
    from pathlib import Path

    path = Path(text).expanduser()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} is not a folder ({parent} is a file)")
            break
    return text


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache root: a folder, or s3://bucket/prefix read through the local "
                        "cache (default: $DATAPIPE_CACHE, else ./cache)")


def _version() -> str:
    from datapipe import __version__

    return __version__


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--option", action="append", type=_recipe_option, default=[],
                   metavar="KEY=VALUE", dest="options",
                   help="a keyword of the recipe's DataModule, e.g. -o labels=coarse or "
                        "-o val_split=0.1 (repeatable; VALUE is read as a number, "
                        "true/false, none, or else text)")


def _recipe_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` as (key, value): an int, a float, a bool, None or the text itself.

    Only literals: nothing is evaluated.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. labels=coarse)")
    return key, _literal(raw.strip())


def _literal(raw: str) -> object:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if kind is int or math.isfinite(value):
            return value
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]  # quoted: text, even if it reads as a number
    return raw


def _with_recipe_options(args: argparse.Namespace, overrides: dict) -> dict:
    """``overrides`` plus the ``-o KEY=VALUE`` options; a key given both ways is refused."""
    merged = dict(overrides)
    for key, value in getattr(args, "options", None) or []:
        if merged.get(key) is not None:
            raise ConfigError(f"-o {key}=... repeats what another option of this command "
                              f"already sets; give {key} once")
        merged[key] = value
    return merged


def _add_fetch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", action="append", type=_mirror, default=[], metavar="URL",
                   help="base URL to try before the recipe's mirrors (repeatable; "
                        "also $DATAPIPE_MIRRORS)")
    p.add_argument("--source", metavar="DIR",
                   help="take the files from DIR instead of downloading, as published or as "
                        "torchvision leaves them (MNIST/raw, cifar-10-batches-py, an ImageNet "
                        "root); still verified where official digests exist")
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

    dm = load(args.name, **_with_recipe_options(args, _data_options(args)))
    if (args.num_shards is None) != (args.shard_index is None):
        raise ConfigError("give --num-shards N and --shard-index I together")
    for split in _source_splits(dm, args.split):
        started = time.perf_counter()
        if args.num_shards is not None:
            _prepare_part(dm, split, args)
            continue
        if dm.remote is not None and not args.force and _already_published(dm, split):
            continue
        prepared, worked = prepare_split(dm.recipe, split, dm.cache, dm.fetch_options,
                                         force=args.force)
        status = (f"prepared in {time.perf_counter() - started:.1f}s" if worked
                  else "already prepared")
        if dm.remote is not None:
            from datapipe.remote.sync import publish_split

            status += f", {publish_split(dm.remote, prepared, force=args.force)}"
        note = "" if prepared.verified else "  (UNVERIFIED sources)"
        print(f"{dm.name} {split}: {prepared.rows} rows, fingerprint {prepared.fingerprint}, "
              f"{status}{note}")
    print(f"cache: {dm.remote.store.url if dm.remote else dm.cache.root}")
    return 0


def _already_published(dm, split: str) -> bool:
    """Print and return True if the object store holds ``split`` already (nothing fetched)."""
    from datapipe.remote.sync import find_split

    parts = find_split(dm.remote, dm.recipe, split, dm.fetch_options)
    manifest = dm.remote.manifest(parts) if parts is not None else None
    if manifest is None:
        return False
    verified = all(s.get("verified") is True for s in manifest.get("sources", []))
    note = "" if verified else "  (UNVERIFIED sources)"
    print(f"{dm.name} {split}: {manifest.get('rows')} rows, fingerprint {parts[-1]}, already "
          f"published{note}")
    return True


def _prepare_part(dm, split: str, args: argparse.Namespace) -> None:
    """One machine's part of a sharded prepare (--num-shards N --shard-index I)."""
    if dm.remote is not None:
        _prepare_remote_part(dm, split, args)
        return
    from datapipe.prepare import prepare_shards

    progress = prepare_shards(dm.recipe, split, dm.cache, dm.fetch_options, force=args.force,
                              num_shards=args.num_shards, shard_index=args.shard_index)
    head = f"{dm.name} {split}: part {args.shard_index} of {args.num_shards} wrote " \
           f"{progress.written} shard(s)"
    if progress.prepared is None:
        print(f"{head}; {progress.done} of {progress.total} shards are in {progress.work}; "
              f"the run that writes the last one publishes them")
    else:
        print(f"{head}; {progress.prepared.rows} rows, fingerprint {progress.fingerprint}, "
              f"{'published' if progress.published else 'already prepared'}")


def _prepare_remote_part(dm, split: str, args: argparse.Namespace) -> None:
    """One machine's part of a sharded prepare into an object store."""
    from datapipe.remote.parts import prepare_part

    p = prepare_part(dm.remote, dm.recipe, split, dm.fetch_options, force=args.force,
                     num_shards=args.num_shards, shard_index=args.shard_index)
    head = f"{dm.name} {split}: part {p.shard_index} of {p.num_shards} wrote {p.written} " \
           f"shard(s), uploaded {p.uploaded}"
    if p.status is not None:
        print(f"{head}; {p.rows} rows, fingerprint {p.fingerprint}, {p.status}")
        return
    others = "".join(f"; the store also holds {n} of {of} part(s) of {split} under "
                     f"fingerprint {fp} (other files or options: they never join this set)"
                     for fp, n, of in p.elsewhere)
    print(f"{head}; parts {', '.join(map(str, p.present))} of {p.num_shards} are in "
          f"{p.where} (missing: "
          f"{', '.join(map(str, p.missing))}); the run that completes the set publishes"
          f"{others}")


def _cmd_list(args: argparse.Namespace) -> int:
    from datapipe.registry import list_recipes

    for name in list_recipes(args.pattern):
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from datapipe.card import data_card, format_card
    from datapipe.registry import load

    if args.name is None and args.ckpt is None:
        raise ConfigError("give a recipe name, or --ckpt PATH to read a checkpoint's card")
    if args.name is None and args.plot:
        raise ConfigError("--plot needs a recipe name: datapipe info NAME --plot out.png")
    saved = None
    if args.ckpt is not None:
        from datapipe.trainer import checkpoint

        saved = checkpoint.data_card(args.ckpt)
        if args.name is None:
            print(json.dumps(saved, indent=2) if args.json
                  else f"checkpoint {args.ckpt}\n\n{format_card(saved)}")
            return 0
    # Describe whatever is prepared; the card marks data from unverified files.
    options = {"cache_dir": args.cache_dir, "verify": False}
    if args.source is not None:
        options["source"] = args.source
    if saved is not None:  # the checkpoint's split specs and seed, so split ids compare
        from datapipe.card import split_options

        options.update(split_options(saved))
    dm = load(args.name, **_with_recipe_options(args, options))
    if dm.remote is not None:
        _fetch_for_card(dm)
    card = data_card(dm)
    if args.plot:
        from datapipe.plot import plot_card

        written = plot_card(dm, args.plot)
        if not args.json:
            print(f"plot: {written}")
    if saved is None:
        print(json.dumps(card, indent=2) if args.json else format_card(card))
        return 0
    from datapipe.card import compare_cards

    differences = compare_cards(saved, card)
    if args.json:
        print(json.dumps({"checkpoint": args.ckpt, "card": saved, "cache": card,
                          "matches": not differences, "differences": differences}, indent=2))
    else:
        print(f"checkpoint {args.ckpt}\n\n{format_card(saved)}\n")
        if differences:
            print(f"the cache {dm.cache.root} does NOT hold the data this checkpoint saw:")
            print("\n".join(f"  {d}" for d in differences))
        else:
            print(f"the cache {dm.cache.root} holds the data this checkpoint saw "
                  f"(same fingerprints and split id)")
    return 1 if differences else 0


def _fetch_for_card(dm) -> None:
    """The card needs the data (labels): fetch the published splits into the local cache,
    as a load from the store does, and say so in one line."""
    from datapipe.remote.admin import fetch_published

    level = log.level
    log.setLevel(max(level, logging.WARNING))  # one line for all, not one per entry
    try:
        fetched = fetch_published(dm)
    finally:
        log.setLevel(level)
    if fetched:
        print(f"datapipe: fetched {dm.name} {', '.join(fetched)} from {dm.remote.store.url} "
              f"into the local cache {dm.cache.root}", file=sys.stderr)


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
        from datapipe.trainer.distributed import DistEnv, select_device

        # Fail here, in one process, if the devices are not there.
        select_device("auto", args.devices, DistEnv(world_size=args.devices))
        return _relaunch_under_torchrun(args.devices)

    if args.folds is not None or args.fold is not None:
        return _cmd_train_folds(args)
    from datapipe.models import ImageClassifier
    from datapipe.registry import load
    from datapipe.trainer import ModelCheckpoint, Trainer
    from datapipe.trainer.trainer import seed_everything

    overrides = {**_data_options(args), "seed": args.seed}
    if args.stratify:
        overrides["stratify"] = True
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.val_split is not None:
        overrides["val_split"] = args.val_split
    dm = load(args.data, **_augmented(args.data, _with_recipe_options(args, overrides)))
    seed_everything(args.seed)  # the model's initial weights too: a run repeats exactly
    model = ImageClassifier.from_datamodule(dm, model=args.model, lr=args.lr,
                                            optimizer=args.optimizer)
    has_val = dm.splits.has_val()
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


def _augmented(name: str, overrides: dict) -> dict:
    """``overrides`` asking for the dataset's train-time augmentation, unless they say.

    A DataModule augments only when asked (lightning-bolts' default); training from the
    command line asks for the crop and flip a prebuilt dataset declares (``-o
    augment=false`` turns them off).
    """
    from datapipe.registry import get_factory

    if getattr(get_factory(name), "augmentation", ()) and "augment" not in overrides:
        return {**overrides, "augment": True}
    return overrides


def _cmd_train_folds(args: argparse.Namespace) -> int:
    """``datapipe train --folds K [--fold I]``: cross-validation, one fresh model per fold."""
    from datapipe.cv import cross_validate
    from datapipe.models import ImageClassifier
    from datapipe.trainer import ModelCheckpoint
    from datapipe.trainer.trainer import seed_everything

    if args.folds is None:
        raise ConfigError("--fold I needs --folds K (the number of folds)")
    if args.val_split is not None:
        raise ConfigError("--val-split and --folds are alternatives: with --folds K each fold "
                          "in turn is the validation split")
    overrides = {**_data_options(args), "seed": args.seed}
    for key in ("batch_size", "num_workers"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)

    def model(dm):
        seed_everything(args.seed)  # each fold's model starts from the same seeded weights
        return ImageClassifier.from_datamodule(dm, model=args.model, lr=args.lr,
                                               optimizer=args.optimizer)

    max_epochs = args.epochs if args.epochs is not None else (10 if args.max_steps == -1 else -1)
    trainer_kwargs = dict(max_epochs=max_epochs, max_steps=args.max_steps,
                          precision=args.precision, devices=args.devices, seed=args.seed,
                          callbacks=[ModelCheckpoint(monitor="val_loss", save_last=True)],
                          enable_progress_bar=not args.quiet)
    report = cross_validate(model, args.data, args.folds, fold=args.fold,
                            stratify=True if args.stratify else None, root_dir=args.root_dir,
                            trainer_kwargs=trainer_kwargs, ckpt_path=args.ckpt_path,
                            **_augmented(args.data, _with_recipe_options(args, overrides)))
    if report is not None:
        print(report.table())
        print(f"runs: {args.root_dir}/fold-<I> (checkpoints, metrics.csv, fold.json)")
    return 0


def _cmd_cv_report(args: argparse.Namespace) -> int:
    from datapipe.cv import gather

    report = gather(args.root)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from datapipe.registry import load
    from datapipe.trainer import Trainer
    from datapipe.trainer import checkpoint as ckpt
    from datapipe.trainer.module import build_from_checkpoint, saved_class

    # Read once, without running anything in it; the class comes from the registry.
    saved = ckpt.load(args.ckpt)
    module = build_from_checkpoint(saved_class(saved, args.ckpt), saved, args.ckpt)
    # Only the test split is needed: no train/val plan, so nothing else must be prepared.
    overrides = {**_data_options(args), "train_split": None, "val_split": None}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    dm = load(args.data, **_with_recipe_options(args, overrides))
    card = saved.get("data_card") or {}
    _normalize_as_trained(dm, card)
    trainer = Trainer(logger=False, enable_checkpointing=False,
                      enable_progress_bar=not args.quiet)
    [results] = trainer.test(module, dm)  # the weights are in already
    recipe = card.get("recipe")
    trained_on = recipe.get("name") if isinstance(recipe, dict) else None
    trained_on = trained_on if isinstance(trained_on, str) else "unknown data"
    _print_metrics(f"{args.ckpt} (trained on {trained_on}) on {args.data} test:", results)
    return 0


def _normalize_as_trained(dm, card) -> None:
    """Normalize with the mean/std the model was trained with (its data card), not with
    statistics computed from whatever splits this cache holds (a partial cache: test's)."""
    import dataclasses

    norm = card.get("normalization") if isinstance(card, dict) else None
    transform = dm.recipe.transform
    if not transform.normalize or transform.mean is not None or not isinstance(norm, dict) \
            or norm.get("mean") is None:
        return
    mean, std = norm.get("mean"), norm.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*mean, *std))):
        raise ConfigError("the checkpoint's data card records no usable normalization "
                          f"(mean {mean!r}, std {std!r}); it is not a checkpoint datapipe wrote")
    dm.recipe = dataclasses.replace(dm.recipe, transform=dataclasses.replace(
        transform, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std)))


def _recipe_in_cache(name: str | None, cache):
    """The recipe registered as ``name`` (None without a name); an unknown name, or one
    whose recipe needs arguments (image-folder's root), is None when the cache holds
    something under that plain name (entries of a recipe whose file is not loaded can
    still be checked and removed), else the error."""
    from datapipe import layout
    from datapipe.cache import check_name
    from datapipe.errors import DatapipeError
    from datapipe.registry import load

    if name is None:
        return None
    check_name(name)
    try:
        return load(name, cache_dir=cache.root).recipe
    except DatapipeError:
        if any(os.path.lexists(cache.path(parts, link_ok=True))
               for parts in (layout.recipe_folder(name), layout.plan_folder(name))):
            return None
        raise


def _resource_folders(recipe) -> set[str]:
    """downloads/ folders of ``recipe``'s resources (none without a recipe)."""
    if recipe is None:
        return set()
    return {recipe.download.folder_key(r) for r in recipe.download.resources}


def _cmd_verify(args: argparse.Namespace) -> int:
    from datapipe.cache import Cache
    from datapipe.errors import CacheError
    from datapipe.verify import CORRUPT, INCOMPLETE, LINK, OK, verify

    if _store_root(args.cache_dir):
        return _verify_store(args)
    cache = Cache.at(args.cache_dir)
    checks = verify(cache, args.name, _resource_folders(_recipe_in_cache(args.name, cache)))
    what = args.name or "any recipe"
    if not checks:
        print(f"nothing of {what} is in the cache {cache.root}")
        return 0
    for check in checks:
        print(check.line())
    counts = {s: sum(c.status == s for c in checks) for s in (OK, CORRUPT, INCOMPLETE, LINK)}
    print(f"{len(checks)} checked in {cache.root}: " +
          ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == CORRUPT))
    if counts[LINK] and not counts[CORRUPT]:
        raise CacheError(f"{counts[LINK]} symbolic link(s) found in the cache, never followed: "
                         f"remove {', '.join(str(c.path) for c in checks if c.status == LINK)} "
                         f"by hand (`datapipe cache rm NAME` removes links only)")
    if counts[CORRUPT]:
        names = sorted({c.label.split()[0] for c in checks
                        if c.status == CORRUPT and c.kind == "prepared"} | (
            {args.name} if args.name else set()))
        again = " and ".join(f"`datapipe prepare {n}`" for n in names) or "the next prepare"
        stuck = [c for c in checks if c.still_trusted]
        if stuck:
            raise CacheError(f"{counts[CORRUPT]} corrupt cache entr"
                             f"{'y' if counts[CORRUPT] == 1 else 'ies'} found, {len(stuck)} "
                             f"of them still in use because the cache cannot be changed: "
                             f"remove {', '.join(str(c.path) for c in stuck)} by hand, then "
                             f"run {again}")
        linked = f"; {counts[LINK]} symbolic link(s) to remove by hand" if counts[LINK] else ""
        raise CacheError(f"{counts[CORRUPT]} corrupt cache entr"
                         f"{'y' if counts[CORRUPT] == 1 else 'ies'} found and no longer "
                         f"trusted; {again} rebuilds what is needed (check the disk if "
                         f"this happens again){linked}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from datapipe import cache_admin
    from datapipe.cache import Cache

    if _store_root(args.cache_dir):
        return _cache_store(args)
    cache = Cache.at(args.cache_dir)
    if args.cache_command == "rm":
        from datapipe.prepare import expected_fingerprints

        recipe = _recipe_in_cache(args.name, cache)  # an unknown name: an error
        made = [(recipe.version, fp) for fp in expected_fingerprints(recipe, cache)] \
            if recipe is not None else []
        removal = cache_admin.remove(cache, args.name, args.version, downloads=args.all,
                                     download_folders=_resource_folders(recipe),
                                     fingerprints=made)
        if not removal.count:
            version = f" version {args.version}" if args.version else ""
            print(f"nothing of {args.name}{version} is in the cache {cache.root}")
            return 0
        print(f"removed from {cache.root}: {len(removal.entries)} prepared entr"
              f"{'y' if len(removal.entries) == 1 else 'ies'}, {len(removal.splits)} split "
              f"plan(s), {len(removal.downloads)} download(s), "
              f"{len(removal.leftovers)} leftover(s) of {args.name} "
              f"({cache_admin.human_bytes(removal.bytes)})")
        return 0

    entries = cache_admin.list_entries(cache, args.name)
    totals = cache_admin.download_totals(cache)
    left = cache_admin.leftovers(cache)
    linked = cache_admin.links(cache, args.name,
                               _resource_folders(_recipe_in_cache(args.name, cache)))
    if args.json:
        print(json.dumps({"cache": str(cache.root),
                          "entries": [e.to_json() for e in entries],
                          "downloads": vars(totals),
                          "leftovers": [str(p) for p in left],
                          "links": [str(p) for p in linked]}, indent=2))
        return 0
    rows = [["recipe", "version", "split", "fingerprint", "rows", "size", "sources", "state",
             "path"]]
    for e in entries:
        sources = {True: "verified", False: "UNVERIFIED", None: "-"}[e.verified]
        rows.append([e.recipe, e.version, e.split or "-", e.fingerprint,
                     "-" if e.rows is None else str(e.rows), cache_admin.human_bytes(e.bytes),
                     sources, e.state, e.path])
    if entries:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    else:
        print(f"no prepared entries{f' of {args.name}' if args.name else ''}")
    print(f"downloads: {totals.files} file(s), {cache_admin.human_bytes(totals.bytes)}"
          + (f" ({totals.unverified} kept unverified)" if totals.unverified else ""))
    if left:
        print(f"leftovers of interrupted runs: {len(left)} (never used; the next prepare or "
              f"`datapipe cache rm` of their recipe removes them)")
    if linked:
        print(f"symbolic links, never followed: {len(linked)} (remove them by hand; "
              f"`datapipe cache rm` removes links only, never what they point to)")
        for path in linked:
            print(f"  {path}")
    work = cache_admin.work_folders(cache, args.name)
    if work:
        print(f"unfinished sharded prepares: {len(work)} "
              f"({cache_admin.human_bytes(sum(cache_admin.size_of(p) for p in work))}; "
              f"the next prepare resumes them)")
    print(f"cache: {cache.root}")
    return 0


def _store_root(cache_dir: str | None) -> str | None:
    """The object-store URL that --cache-dir (else $DATAPIPE_CACHE) names; None: a folder."""
    from datapipe.cache import CACHE_ENV
    from datapipe.remote.store import is_remote

    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV)
    return root if is_remote(root) else None


def _open_store_root(cache_dir: str | None):
    from datapipe.remote.store import open_store

    return open_store(_store_root(cache_dir))


def _verify_store(args: argparse.Namespace) -> int:
    """``datapipe verify [NAME] --cache-dir s3://...``: every object streamed and checked."""
    from datapipe.errors import CacheError
    from datapipe.remote.admin import verify_store
    from datapipe.verify import CORRUPT, INCOMPLETE, OK

    store = _open_store_root(args.cache_dir)
    checks = verify_store(store, args.name)
    if not checks:
        print(f"nothing of {args.name or 'any recipe'} is in {store.url}")
        return 0
    for check in checks:
        print(check.line())
    entries = len({c.label for c in checks})
    counts = {s: sum(c.status == s for c in checks) for s in (OK, CORRUPT, INCOMPLETE)}
    print(f"{entries} entr{'y' if entries == 1 else 'ies'} checked in {store.url}: " +
          ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == CORRUPT))
    if counts[CORRUPT]:
        names = sorted({c.label.split()[0] for c in checks if c.status == CORRUPT})
        again = " and ".join(f"`datapipe prepare {n} --force --cache-dir {store.url}`"
                             for n in names)
        raise CacheError(f"{counts[CORRUPT]} damaged or missing object(s) or manifest(s) in "
                         f"{store.url}; readers refuse them as they arrive, never serve them; "
                         f"{again} publishes them again")
    return 0


def _cache_store(args: argparse.Namespace) -> int:
    """``datapipe cache ls|rm --cache-dir s3://...``: from the manifests; rm manifest first."""
    from datapipe import cache_admin
    from datapipe.remote import admin

    if args.cache_command == "rm" and args.all:
        raise ConfigError("--all also removes downloaded source files, which are never "
                          "published to an object store; leave out --all")
    store = _open_store_root(args.cache_dir)
    if args.cache_command == "rm":
        removal = admin.remove_from_store(store, args.name, args.version)
        version = f" version {args.version}" if args.version else ""
        if not removal.count:
            print(f"nothing of {args.name}{version} is in {store.url}")
            return 0
        print(f"removed from {store.url}: {len(removal.entries)} prepared entr"
              f"{'y' if len(removal.entries) == 1 else 'ies'} of {args.name}{version} "
              f"(manifests first, then {removal.objects} object(s), "
              f"{cache_admin.human_bytes(removal.bytes)}), {len(removal.leftovers)} "
              f"leftover(s); copies in local caches stay (`datapipe cache rm {args.name}`)")
        return 0
    listing = admin.list_store(store, args.name)
    if args.json:
        print(json.dumps({"cache": str(store.url),
                          "entries": [e.to_json() for e in listing.entries],
                          "leftovers": listing.leftovers,
                          "leftover_bytes": listing.leftover_bytes,
                          "unfinished": [{"path": url, "parts": k, "of": n}
                                         for url, k, n in listing.unfinished]}, indent=2))
        return 0
    rows = [["recipe", "version", "split", "fingerprint", "rows", "size", "sources", "state",
             "created"]]
    for e in listing.entries:
        sources = {True: "verified", False: "UNVERIFIED", None: "-"}[e.verified]
        rows.append([e.recipe, e.version, e.split or "-", e.fingerprint,
                     "-" if e.rows is None else str(e.rows), cache_admin.human_bytes(e.bytes),
                     sources, e.state, e.created_at or "-"])
    if listing.entries:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    else:
        print(f"no published entries{f' of {args.name}' if args.name else ''}")
    corrupt = [e for e in listing.entries if e.state != admin.TRUSTED]
    for e in corrupt:
        print(f"corrupt: {e.path}: {e.problem}; readers refuse it; `datapipe cache rm "
              f"{e.recipe} --cache-dir {store.url}` removes it")
    for url, k, n in listing.unfinished:
        print(f"sharded prepare under way: {url}: {k} of {n} parts in; the run that "
              f"brings the last part publishes it")
    if listing.leftovers:
        print(f"leftovers of killed publishes or removals: {len(listing.leftovers)}, "
              f"{cache_admin.human_bytes(listing.leftover_bytes)} (objects "
              f"without a manifest, never used; the next publish of the entry reuses them, "
              f"`datapipe cache rm NAME` removes them)")
    print(f"cache: {store.url}")
    return 0


COMMANDS = {"prepare": _cmd_prepare, "list": _cmd_list, "info": _cmd_info,
            "train": _cmd_train, "test": _cmd_test, "verify": _cmd_verify,
            "cv-report": _cmd_cv_report,
            "cache": _cmd_cache}


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
    if not argv:  # an overview, as `git` gives: what there is to do
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        parser.print_usage(sys.stderr)
        print(e, file=sys.stderr)
        return 2
    except _Exit as e:
        return e.status
    saved = (list(log.handlers), log.level, log.propagate)
    with warnings.catch_warnings():
        _setup_output(getattr(args, "quiet", False))
        try:
            code = _run(args)
            sys.stdout.flush()  # here, where a reader that went away can be answered
            return code
        except BrokenPipeError:
            return _reader_went_away()
        finally:
            log.handlers[:], log.level, log.propagate = saved


def _reader_went_away() -> int:
    """The reader of stdout left (``datapipe cache ls | head -1``): stop quietly, as Unix
    tools do, with SIGPIPE's status; stdout goes to /dev/null so that the interpreter's
    last flush at exit does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no file (a test's capture)
        pass
    return 128 + 13  # SIGPIPE


def _check_names(args: argparse.Namespace) -> None:
    """Every dataset name a command takes is a plain name, never a path (before anything
    is read: a checkpoint, a recipe, the cache)."""
    from datapipe.cache import check_name

    for attribute in ("name", "data"):
        value = getattr(args, attribute, None)
        if value is not None:
            check_name(value)


def _run(args: argparse.Namespace) -> int:
    try:
        from datapipe.registry import load_recipe_dir

        for folder in args.recipes:
            load_recipe_dir(folder)
        _check_names(args)
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
