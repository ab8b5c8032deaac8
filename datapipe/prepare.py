"""The locked prepare step: download -> clean -> save for one split of a recipe.

A prepared split is a folder ``prepared/<name>/<version>/<fingerprint>/`` holding
``<split>.arrow`` and ``manifest.json``, the manifest written last. The fingerprint
is a hash of the recipe name and version, the split, the checksums of the source
files and the configs of the stages that shape the bytes (clean, save); so a
second prepare of the same thing is a look-up of one JSON file, with no network,
no hashing of data and no import of pyarrow. The manifest (``datapipe.manifest``)
is written last and records the digests of every data file.

A recipe whose clean stage writes shards (``write_shard``: ImageNet) is prepared
in many files by many processes, resumably; see "Sharded splits" below.

No torch here: ``datapipe prepare`` runs through this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.cache import (
    Cache,
    check_hex,
    check_name,
    ensure_dir,
    file_digest,
    fingerprint,
    fsync_path,
    publish_dir,
    read_json,
    refuse_link,
    remove_stale_temporaries,
    temporary_sibling,
    write_json_atomic,
)
from datapipe.errors import CacheError, ConfigError, DatapipeError, DownloadError, FormatError
from datapipe.integrity import FileDigests, digest_file
from datapipe.manifest import (  # noqa: F401  (MANIFEST, PreparedSplit: re-exported)
    MANIFEST,
    PreparedSplit,
    prepare_lock_key,
    trusted,
    trusted_or_upgraded,
    write_manifest,
)
from datapipe.stages.download import (
    SIDECAR_SUFFIX,
    UNVERIFIED_SUFFIX,
    FetchOptions,
    LocalFile,
    _progress,
    lock_key,
)

if TYPE_CHECKING:
    from datapipe.recipe import Recipe

log = logging.getLogger("datapipe")

def split_fingerprint(recipe: Recipe, split: str, checksums: list[list[str]]) -> str:
    """The fingerprint of ``split`` made from files with these [name, algo, checksum]."""
    return fingerprint({
        "recipe": recipe.name,
        "version": recipe.version,
        "split": split,
        "sources": checksums,
        "clean": recipe.clean.config(),
        "save": recipe.save.config(),
    })


def _version_dir(cache: Cache, recipe: Recipe) -> Path:
    """``prepared/<name>/<version>``, from checked parts, never through a link."""
    return cache.under("prepared", check_name(recipe.name, "recipe name"),
                       check_name(recipe.version, "recipe version"))


def _entry_dir(cache: Cache, recipe: Recipe, fp: str) -> Path:
    return refuse_link(_version_dir(cache, recipe) / check_hex(fp, "fingerprint"))


def _known_checksums(
    recipe: Recipe, split: str, cache: Cache, options: FetchOptions
) -> dict[str, tuple[str, str]] | None:
    """Checksums of the split's files known without network: file -> (algo, hex).

    With verification on, the recipe's declared checksums are the answer (a file
    that is used will have exactly those bytes). Otherwise, and for resources
    without a declared checksum, the actual checksums of files already on disk.
    None when some file would have to be fetched first.
    """
    known: dict[str, tuple[str, str]] = {}
    for name in recipe.clean.files_for(split):
        declared = recipe.download.resource(name).checksum
        if options.verify and declared is not None:
            known[name] = declared
            continue
        if options.source is not None:
            identity = recipe.download.source_identity(name, options.source, cache)
            if identity is None:
                return None
            known[name] = identity
            continue
        local = recipe.download.cached(name, cache, verify=options.verify)
        if local is None:
            return None
        known[name] = (local.algorithm, local.checksum)
    return known


def _checksum_list(known: dict[str, tuple[str, str]]) -> list[list[str]]:
    return [[name, algo, digest] for name, (algo, digest) in sorted(known.items())]


def expected_fingerprints(recipe: Recipe, cache: Cache) -> set[str]:
    """Fingerprints of the entries a prepare of ``recipe`` would write now (no network):
    from its declared checksums, and from the files its download cache holds.

    ``datapipe cache rm`` takes their prepare locks, so it waits for a prepare that has
    not published anything yet.
    """
    found = set()
    for split in recipe.splits():
        for verify in (True, False):
            try:
                known = _known_checksums(recipe, split, cache, FetchOptions(verify=verify))
            except CacheError:  # a download folder that is a link: nothing known from it
                continue
            if known is not None:
                found.add(split_fingerprint(recipe, split, _checksum_list(known)))
    return found


def _newest_unverified(recipe: Recipe, split: str, cache: Cache) -> PreparedSplit | None:
    """The most recent entry of ``split`` made by this recipe from unverified files.

    Such entries (``--no-verify``, ``--source``) cannot be found from declared
    checksums; a module that accepts unverified data takes the newest one whose
    fingerprint matches this recipe's stages.
    """
    found = []
    for manifest_path in _version_dir(cache, recipe).glob(f"*/{MANIFEST}"):
        if manifest_path.parent.is_symlink():  # never followed (see cache.refuse_link)
            continue
        entry = trusted(manifest_path.parent)
        if entry is None or entry.manifest.get("split") != split:
            continue
        made_from = sorted(
            [s["filename"], s["algorithm"], s["checksum"]] for s in entry.manifest["sources"]
        )
        if split_fingerprint(recipe, split, made_from) == entry.fingerprint:
            found.append(entry)
    # created_at has one-second resolution; the manifest's mtime breaks ties.
    return max(found, default=None, key=lambda e: (
        e.manifest["created_at"], (e.path / MANIFEST).stat().st_mtime_ns))


def find_prepared(
    recipe: Recipe, split: str, cache: Cache, options: FetchOptions | None = None
) -> PreparedSplit | None:
    """The published entry for ``split``, if there is one; never touches the network.

    With verification on, only the entry made from the recipe's declared files.
    Without, that entry if it exists, else the one made from the files at hand
    (``--source``, the download cache), else the newest unverified entry.
    """
    options = options or FetchOptions()
    verified = _known_checksums(recipe, split, cache, FetchOptions(verify=True))
    if verified is not None:
        entry = trusted(_entry_dir(cache, recipe, split_fingerprint(
            recipe, split, _checksum_list(verified))))
        if entry is not None or options.verify:
            return entry
    elif options.verify:
        return None
    known = _known_checksums(recipe, split, cache, options)
    if known is not None:  # the files are at hand: only their own entry will do
        return trusted(_entry_dir(cache, recipe, split_fingerprint(
            recipe, split, _checksum_list(known))))
    return _newest_unverified(recipe, split, cache)


def fetch_whole(recipe: Recipe, files: Sequence[str], cache: Cache,
                options: FetchOptions) -> dict[str, LocalFile]:
    """Fetch ``files`` and re-hash each cached download before a prepare reads it.

    A download is trusted on its sidecar and size when it is found; a prepare reads
    every byte of it anyway, so one more pass makes sure no damaged source becomes a
    prepared entry (whose digests would then vouch for the damage). A damaged one is
    removed, as ``datapipe verify`` does, and fetched again once. Files taken from
    ``--source`` are the user's own, hashed when taken.
    """
    local = recipe.download.fetch(files, cache, options)
    for name, found in sorted(local.items()):
        if cache.downloads not in found.path.parents:
            continue
        try:
            if file_digest(found.path, found.algorithm) == found.checksum:
                continue
        except FileNotFoundError:  # removed meanwhile (cache rm): fetched again under the lock
            continue
        _remove_damaged_download(cache, found)
        local[name] = again = recipe.download.fetch([name], cache, options)[name]
        if file_digest(again.path, again.algorithm) != again.checksum:
            raise CacheError(f"{again.path} does not match the {again.algorithm} recorded "
                             f"when it was downloaded, twice; check the disk under "
                             f"{cache.root}")
    return local


def _remove_damaged_download(cache: Cache, found: LocalFile) -> None:
    folder = found.path.parent.name.removesuffix(UNVERIFIED_SUFFIX)
    with cache.lock(lock_key(folder), what=f"removal of damaged download {found.path}"):
        with contextlib.suppress(FileNotFoundError):
            if file_digest(found.path, found.algorithm) == found.checksum:
                return  # replaced by a whole copy meanwhile
        for doomed in (found.path.with_name(found.filename + SIDECAR_SUFFIX), found.path):
            with contextlib.suppress(FileNotFoundError):
                doomed.unlink()  # the sidecar first: no trust, then no bytes
    log.warning("%s was damaged (its %s differs from the one recorded when it was "
                "downloaded); removed, fetching it again", found.path, found.algorithm)


def unverified_hint(recipe: Recipe, split: str, cache: Cache,
                    options: FetchOptions | None = None) -> str:
    """``"; an unverified copy ... is in the cache: ..."`` when verified data of ``split``
    is wanted and an entry made from unverified files exists, else ``""``.

    Such a copy is never used unless asked for; this names it and the switch that does.
    """
    if options is not None and not options.verify:
        return ""
    try:
        entry = _newest_unverified(recipe, split, cache)
    except (OSError, CacheError):
        return ""
    if entry is None or entry.verified:
        return ""
    return (f"; an unverified copy of {recipe.name} {split} is in the cache ({entry.path}, "
            f"prepared {entry.manifest.get('created_at', 'earlier')} from files whose checksums "
            f"differ from the recipe's); to use it, pass --no-verify (verify=False in Python)")


def _splits_at_source(recipe: Recipe, folder: Path) -> list[str]:
    """The recipe's source splits whose files are all in ``folder``."""
    return [s for s in recipe.splits()
            if all(recipe.download.at_source(name, folder) is not None
                   for name in recipe.clean.files_for(s))]


def _fetch_failed(e: DatapipeError, recipe: Recipe, split: str, cache: Cache,
                  options: FetchOptions) -> DatapipeError:
    """``e`` with what else the user can do: the splits ``--source`` does hold, or the
    unverified copy already in the cache."""
    hint = unverified_hint(recipe, split, cache, options)
    if options.source is not None:
        present = [s for s in _splits_at_source(recipe, Path(options.source).expanduser())
                   if s != split]
        if present:
            hint += (f"; the folder holds the files of {', '.join(present)}: prepare only "
                     f"{'that split' if len(present) == 1 else 'those splits'} with "
                     + " ".join(f"--split {s}" for s in present))
    if not hint:
        return e
    return type(e)(f"{e}{hint}")


def _fetch(recipe: Recipe, split: str, files: Sequence[str], cache: Cache,
           options: FetchOptions) -> dict[str, LocalFile]:
    """The split's source files (downloaded or from --source); a failure says what to try."""
    try:
        return fetch_whole(recipe, files, cache, options)
    except DownloadError as e:
        raise _fetch_failed(e, recipe, split, cache, options) from None


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x C x H x W images, scaled to [0, 1]."""
    channels = images.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(images), 4096):  # bounded memory for large splits
        chunk = images[start:start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _statistics(columns: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    images = columns.get("image")
    if images is not None and images.ndim == 4 and len(images):
        stats["mean"], stats["std"] = _channel_stats(images)
    labels = columns.get("label")
    if labels is not None and len(labels):
        stats["class_counts"] = np.bincount(labels, minlength=num_classes).tolist()
    return stats


def _check_dims(recipe: Recipe, split: str, columns: dict[str, np.ndarray]) -> None:
    """Images must have the shape the recipe declares: models are sized from it."""
    images = columns.get("image")
    dims = tuple(recipe.info.dims or ())
    if images is not None and dims and tuple(images.shape[1:]) != dims:
        shape = "x".join(map(str, images.shape[1:]))
        files = ", ".join(recipe.clean.files_for(split))
        raise FormatError(f"{recipe.name} {split} ({files}): images are {shape} but the recipe "
                          f"declares {'x'.join(map(str, dims))}; are these the right files?")


def _still_at_hand(recipe: Recipe, split: str, local: dict[str, LocalFile], cache: Cache,
                   options: FetchOptions) -> dict[str, LocalFile]:
    """``local``, with any file removed since it was fetched (``datapipe cache rm --all``
    between the download and the prepare lock) fetched again; the prepare lock is held.

    ``cache rm`` holds the prepare locks of the entries it knows the recipe would make
    while it removes downloads, so once this check passes under that lock the files stay.
    """
    missing = [name for name, f in local.items() if not f.path.is_file()]
    if not missing:
        return local
    log.info("%s %s: %s went away meanwhile; fetching again", recipe.name, split,
             ", ".join(missing))
    again = {**local, **recipe.download.fetch(missing, cache, options)}
    if any((again[n].algorithm, again[n].checksum) != (local[n].algorithm, local[n].checksum)
           for n in missing):
        raise CacheError(f"the source files of {recipe.name} {split} changed while it was being "
                         f"prepared (a `datapipe cache rm` meanwhile?); run the prepare again")
    return again


def _vanished(recipe: Recipe, split: str, e: FileNotFoundError) -> CacheError:
    """The one line for a source file that vanished while it was being read."""
    return CacheError(f"{e.filename or 'a source file'} of {recipe.name} {split} vanished while "
                      f"it was being read (a `datapipe cache rm` meanwhile?); run the prepare "
                      f"again")


def prepare_split(
    recipe: Recipe,
    split: str,
    cache: Cache,
    options: FetchOptions | None = None,
    force: bool = False,
    processes: int | None = None,
) -> tuple[PreparedSplit, bool]:
    """Make sure ``split`` of ``recipe`` is prepared; return it and whether work was done.

    Safe to call from many processes at once: the work happens under the entry's
    lock, and a process that waited finds the entry published by another.
    ``force`` rebuilds the entry (verified downloads are reused). A sharded recipe
    writes its shards with ``processes`` worker processes (default: every core) and
    continues from the shards a killed run left.
    """
    options = options or FetchOptions()
    files = recipe.clean.files_for(split)
    if not force and (existing := find_prepared(recipe, split, cache, options)) is not None:
        return existing, False

    local = _fetch(recipe, split, files, cache, options)
    known = {name: (f.algorithm, f.checksum) for name, f in local.items()}
    fp = split_fingerprint(recipe, split, _checksum_list(known))
    entry = _entry_dir(cache, recipe, fp)
    if is_sharded(recipe):
        progress = _prepare_sharded(recipe, split, cache, local, fp, options, part=(1, 0),
                                    force=force, processes=processes)
        assert progress.prepared is not None  # a whole run publishes or raises
        return progress.prepared, progress.worked
    with cache.lock(prepare_lock_key(recipe.name, recipe.version, fp),
                    what=f"prepare of {recipe.name} {split} ({fp})"):
        if not force and (existing := trusted_or_upgraded(entry)) is not None:
            return existing, False  # another process finished it while we waited
        remove_stale_temporaries(entry)
        if entry.exists():  # published data without a manifest: a killed run, or --force
            shutil.rmtree(entry)
        started = time.perf_counter()
        local = _still_at_hand(recipe, split, local, cache, options)
        try:
            columns = recipe.clean(split, {name: f.path for name, f in local.items()})
        except FileNotFoundError as e:
            raise _vanished(recipe, split, e) from None
        _check_dims(recipe, split, columns)
        with publish_dir(entry) as tmp:
            data_path = recipe.save(columns, tmp, split)
            data_file = data_path.name
            digests = digest_file(data_path)  # read back once: what is on disk is recorded
        manifest = write_manifest(
            recipe, split, fp, entry, local, started,
            rows=int(len(next(iter(columns.values())))),
            data_file=data_file,
            files={data_file: digests},
            columns=recipe.save.describe(columns),
            statistics=_statistics(columns, len(recipe.info.classes)),
        )
    log.debug("prepared %s %s: %d rows in %s", recipe.name, split, manifest["rows"], entry)
    return PreparedSplit(entry, manifest), True


# ------------------------------------------------------------------ sharded splits
#
# A clean stage with ``write_shard`` (ImageNet's) turns a split into many Arrow files
# instead of one set of columns. It offers three methods, all of JSON in and out:
#
#   shard_plan(split, files) -> [task, ...]      what each shard holds; a task may say
#                                                 its source "bytes" (for the progress bar)
#   write_shard(split, files, task, path) -> summary   write one shard; "rows" at least
#   finish(split, files, summaries) -> {...}     manifest fields: columns, statistics, ...
#
# This module runs them on all cores and keeps the work across kills, in a folder next
# to the entry it will become:
#
#   prepared/<name>/<version>/.work-<fingerprint>/
#       plan.json                      the tasks, written once (they follow from the
#                                      fingerprint: same sources, same stage configs)
#       <split>-00007-of-01000.arrow   a finished shard, renamed into place whole
#       <split>-00007-of-01000.json    its summary (size, digests, rows), written after
#                                      it: a shard without one is written again
#       .tmp-...                       a shard being written (or left by a kill)
#
# Each shard is written under its own lock, so a rerun after a kill, another process,
# or other machines (``--num-shards N --shard-index I``) share the work without
# writing a shard twice at once. The run that sees the last shard land publishes,
# under the entry's lock: the shards are hard-linked into a temporary sibling of the
# entry, renamed into place, the manifest written last, and only then is the work
# folder removed. A reader never sees an entry without its manifest, and a kill at
# any point loses at most the shards being written.

WORK_PREFIX = ".work-"
SHARD_PLAN = "plan.json"


def is_sharded(recipe: Recipe) -> bool:
    """Whether the recipe's clean stage writes shards (see the protocol above)."""
    return callable(getattr(recipe.clean, "write_shard", None))


def shard_file_name(split: str, index: int, count: int) -> str:
    """``train-00007-of-01000.arrow``: shard ``index`` of ``count``."""
    return f"{split}-{index:05d}-of-{count:05d}.arrow"


def work_dir(cache: Cache, recipe: Recipe, fp: str) -> Path:
    """The folder where the shards of entry ``fp`` are written before it is published."""
    return refuse_link(_version_dir(cache, recipe) / f"{WORK_PREFIX}{check_hex(fp)}")


@dataclass(frozen=True)
class ShardProgress:
    """Where a sharded split stands after a (partial) prepare."""

    split: str
    fingerprint: str
    work: Path
    total: int  # shards of the split
    done: int  # finished, by any run
    written: int  # written by this call
    prepared: PreparedSplit | None  # the published entry, once every shard is in
    published: bool = False  # by this call

    @property
    def worked(self) -> bool:
        return self.written > 0 or self.published


def prepare_shards(
    recipe: Recipe,
    split: str,
    cache: Cache,
    options: FetchOptions | None = None,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    force: bool = False,
    processes: int | None = None,
) -> ShardProgress:
    """Write part ``shard_index`` of ``num_shards`` of a sharded split; publish when whole.

    Part I holds shards I, I + N, I + 2N, ... Runs of the parts may go on at once on
    machines sharing the cache folder; whichever sees the last shard land publishes
    the entry. ``force`` writes this part's shards again.
    """
    if not is_sharded(recipe):
        raise ConfigError(f"{recipe.name} is not prepared in shards; leave out --num-shards")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must lie in 0..{num_shards - 1} for --num-shards "
                          f"{num_shards}, got {shard_index}")
    options = options or FetchOptions()
    if not force and (existing := find_prepared(recipe, split, cache, options)) is not None:
        total = len(existing.data_files)
        return ShardProgress(split, existing.fingerprint, work_dir(cache, recipe,
                             existing.fingerprint), total, total, 0, existing)
    local = _fetch(recipe, split, recipe.clean.files_for(split), cache, options)
    known = {name: (f.algorithm, f.checksum) for name, f in local.items()}
    fp = split_fingerprint(recipe, split, _checksum_list(known))
    return _prepare_sharded(recipe, split, cache, local, fp, options,
                            part=(num_shards, shard_index), force=force, processes=processes)


def _prepare_sharded(recipe: Recipe, split: str, cache: Cache, local: dict[str, LocalFile],
                     fp: str, options: FetchOptions, *, part: tuple[int, int], force: bool,
                     processes: int | None) -> ShardProgress:
    num_shards, shard_index = part
    entry, work = _entry_dir(cache, recipe, fp), work_dir(cache, recipe, fp)
    files = {name: f.path for name, f in local.items()}
    key = prepare_lock_key(recipe.name, recipe.version, fp)
    what = f"prepare of {recipe.name} {split} ({fp})"
    whole = num_shards == 1
    started = time.perf_counter()
    # A whole run holds the entry's lock throughout, as an unsharded prepare does; the
    # parts of a split across machines take it only to publish.
    with cache.lock(key, what=what) if whole else contextlib.nullcontext():
        # Upgrading an older entry writes its manifest: only under the lock.
        look = trusted_or_upgraded if whole else trusted
        if not force and (existing := look(entry)) is not None:
            if whole and work.exists():  # killed after publishing, before the cleanup
                shutil.rmtree(work, ignore_errors=True)
            total = len(existing.data_files)
            return ShardProgress(split, fp, work, total, total, 0, existing)
        if force and whole and work.exists():
            shutil.rmtree(work)
        tasks = _shard_plan(recipe, split, files, work)
        names = [shard_file_name(split, i, len(tasks)) for i in range(len(tasks))]
        mine = range(shard_index, len(tasks), num_shards)
        todo = [i for i in mine if force or not _shard_done(work, names[i])]
        try:
            written = _write_shards(recipe, split, files, work, tasks, names, todo, cache,
                                    key, options, force, processes)
        except FileNotFoundError as e:  # raised in a worker, re-raised here with its name
            raise _vanished(recipe, split, e) from None
        done = sum(_shard_done(work, name) for name in names)
        if done < len(names):
            if whole:
                raise CacheError(f"{done} of {len(names)} shards of {recipe.name} {split} are "
                                 f"in {work}; run the prepare again to finish them")
            return ShardProgress(split, fp, work, len(names), done, written, None)
        with cache.lock(key, what=what) if not whole else contextlib.nullcontext():
            prepared, published = _publish_shards(recipe, split, local, fp, entry, work, names,
                                                  started, force)
    return ShardProgress(split, fp, work, len(names), done, written, prepared, published)


def _shard_plan(recipe: Recipe, split: str, files: Mapping[str, Path],
                work: Path) -> list[dict[str, Any]]:
    """The split's shard tasks: from the work folder, else from the clean stage (saved)."""
    saved = read_json(work / SHARD_PLAN)
    if isinstance(saved, dict) and saved.get("split") == split and saved.get("tasks"):
        return saved["tasks"]
    tasks = recipe.clean.shard_plan(split, files)
    write_json_atomic(ensure_dir(work) / SHARD_PLAN, {"split": split, "tasks": tasks},
                      compact=True)
    return tasks


def _summary_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def _shard_done(work: Path, name: str) -> bool:
    """Whether shard ``name`` is finished: its summary exists and describes the file."""
    summary = read_json(_summary_path(work / name))
    try:
        return (isinstance(summary, dict) and summary.get("file") == name
                and (work / name).stat().st_size == summary["bytes"])
    except (OSError, KeyError):
        return False


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool_context() -> Any:
    """fork where it is safe and fast (Linux, no CUDA context to inherit), else spawn."""
    import multiprocessing

    torch = sys.modules.get("torch")
    cuda_started = torch is not None and torch.cuda.is_initialized()
    if sys.platform == "linux" and not cuda_started:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _write_shards(recipe: Recipe, split: str, files: Mapping[str, Path], work: Path,
                  tasks: Sequence[dict[str, Any]], names: Sequence[str], todo: Sequence[int],
                  cache: Cache, key: str, options: FetchOptions, force: bool,
                  processes: int | None) -> int:
    """Write the shards ``todo`` on up to ``processes`` processes; return how many."""
    if not todo:
        return 0
    ensure_dir(work)
    jobs = [(recipe.clean, split, dict(files), tasks[i], work, names[i], cache.root,
             f"{key}-shard-{i:05d}", force) for i in todo]
    workers = min(len(jobs), processes or _available_cores())
    total = sum(int(tasks[i].get("bytes", 0)) for i in todo) or None
    written = images = 0
    # Workers ignore SIGINT: Ctrl-C (sent to the whole process group) ends the prepare
    # here, in one place, whose ``finally`` terminates them; each would otherwise print
    # its own traceback. A terminated worker leaves only a temporary, cleaned next run.
    pool = _pool_context().Pool(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        results = pool.imap_unordered(_write_one_shard, jobs) if pool else map(
            _write_one_shard, jobs)
        with _progress(f"{recipe.name} {split}", total, 0, options.quiet) as bar:
            for source_bytes, rows, wrote in results:
                written += wrote
                images += rows
                bar.update(source_bytes)
                bar.set_postfix_str(f"{images} images", refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    log.info("%s %s: wrote %d shard(s), %d images, into %s", recipe.name, split, written,
             images, work)
    return written


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_one_shard(job: tuple) -> tuple[int, int, bool]:
    """Write one shard under its lock (in a worker); (source bytes, rows, written)."""
    clean, split, files, task, work, name, root, key, force = job
    final = work / name
    summary_path = _summary_path(final)
    with Cache(root).lock(key, what=f"shard {name} in {work}"):
        if not force and _shard_done(work, name):  # another run wrote it meanwhile
            return int(task.get("bytes", 0)), int(read_json(summary_path)["rows"]), False
        remove_stale_temporaries(final)
        remove_stale_temporaries(summary_path)
        with contextlib.suppress(FileNotFoundError):
            summary_path.unlink()  # the summary never describes other bytes than the file
        tmp = temporary_sibling(final)
        try:
            summary = dict(clean.write_shard(split, files, task, tmp))
            fsync_path(tmp)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_path(work)
        digests = digest_file(final)
        summary.update(file=name, **digests.record())
        write_json_atomic(summary_path, summary)
    return int(task.get("bytes", 0)), int(summary["rows"]), True


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (same filesystem: instant, and the work folder keeps its copy), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _shard_digests(path: Path, summary: dict[str, Any]) -> FileDigests:
    """The digests its writer recorded for a finished shard (read again if it recorded none:
    a shard written by an older datapipe, left in a work folder)."""
    try:
        return FileDigests.of_record(path.name, summary)
    except CacheError:
        return digest_file(path)


def _publish_shards(recipe: Recipe, split: str, local: dict[str, LocalFile], fp: str,
                    entry: Path, work: Path, names: Sequence[str], started: float,
                    force: bool) -> tuple[PreparedSplit, bool]:
    """Publish the finished shards as entry ``fp``; the entry's lock is held."""
    if not force and (existing := trusted_or_upgraded(entry)) is not None:
        return existing, False  # another part's run published it
    summaries = [read_json(_summary_path(work / name)) for name in names]
    extra = recipe.clean.finish(split, {name: f.path for name, f in local.items()}, summaries)
    remove_stale_temporaries(entry)
    if entry.exists():  # published shards without a manifest: a killed publish, or --force
        shutil.rmtree(entry)
    with publish_dir(entry) as tmp:
        for name in names:
            _link_or_copy(work / name, tmp / name)
    manifest = write_manifest(
        recipe, split, fp, entry, local, started,
        rows=sum(int(s["rows"]) for s in summaries),
        data_file=names[0],
        shards=list(names),
        files={name: _shard_digests(work / name, summary)
               for name, summary in zip(names, summaries, strict=True)},
        **extra,
    )
    shutil.rmtree(work, ignore_errors=True)
    log.debug("published %s %s: %d rows in %d shards at %s", recipe.name, split,
              manifest["rows"], len(names), entry)
    return PreparedSplit(entry, manifest), True
