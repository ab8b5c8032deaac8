"""Sharded prepare: a split written as many Arrow files, by many processes and machines.

A clean stage with ``write_shard`` (ImageNet's) turns a split into many Arrow files
instead of one set of columns. It offers three methods, all of JSON in and out::

    shard_plan(split, files) -> [task, ...]      what each shard holds; a task may say
                                                 its source "bytes" (for the progress bar)
    write_shard(split, files, task, path) -> summary   write one shard; "rows" at least
    finish(split, files, summaries) -> {...}     manifest fields: columns, statistics, ...

This module runs them on all cores and keeps the work across kills, in a work folder
next to the entry it will become (``datapipe.layout``: ``work_folder``)::

    prepared/<name>/<version>/.work-<fingerprint>/
        plan.json                      the tasks, written once (they follow from the
                                       fingerprint: same sources, same stage configs)
        <split>-00007-of-01000.arrow   a finished shard, renamed into place whole
        <split>-00007-of-01000.json    its summary (size, digests, rows), written after
                                       it: a shard without one is written again
        .tmp-...                       a shard being written (or left by a kill)

Each shard is written under its own lock, so a rerun after a kill, another process,
or other machines (``--num-shards N --shard-index I``: part I holds shards I, I + N,
...) share the work without writing a shard twice at once. The run that sees the last
shard land completes the set: under the entry's lock, the shards are hard-linked into
a temporary sibling of the entry, renamed into place, the manifest written last, and
only then is the work folder removed. A reader never sees an entry without its
manifest, and a kill at any point loses at most the shards being written.

``datapipe.prepare`` finds the entry and fetches the sources (as for a whole split) and
hands them here; ``prepare_shards`` there is the public entry point. No torch here.
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

from datapipe import layout
from datapipe.cache import (
    Cache,
    ensure_dir,
    fsync_path,
    publish_dir,
    read_json,
    remove_stale_temporaries,
    temporary_sibling,
    write_json_atomic,
)
from datapipe.cores import available_cores
from datapipe.errors import CacheError, ConfigError
from datapipe.integrity import FileDigests, digest_file
from datapipe.manifest import PreparedSplit, trusted, trusted_or_upgraded, write_manifest
from datapipe.progress import progress
from datapipe.stages.download import FetchOptions, LocalFile

if TYPE_CHECKING:
    from datapipe.recipe import Recipe

log = logging.getLogger("datapipe")

shard_file_name = layout.shard_name  # ``train-00007-of-01000.arrow``: shard 7 of 1000


def is_sharded(recipe: Recipe) -> bool:
    """Whether the recipe's clean stage writes shards (see the protocol above)."""
    return callable(getattr(recipe.clean, "write_shard", None))


def work_dir(cache: Cache, recipe: Recipe, fp: str) -> Path:
    """The folder where the shards of entry ``fp`` are written before it is published."""
    return cache.path(layout.work_folder(recipe.name, recipe.version, fp))


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


def check_part(recipe: Recipe, num_shards: int, shard_index: int) -> None:
    """ConfigError unless ``recipe`` is sharded and part ``shard_index`` of ``num_shards``
    exists."""
    if not is_sharded(recipe):
        raise ConfigError(f"{recipe.name} is not prepared in shards; leave out --num-shards")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must lie in 0..{num_shards - 1} for --num-shards "
                          f"{num_shards}, got {shard_index}")


def vanished(recipe: Recipe, split: str, e: FileNotFoundError) -> CacheError:
    """The one line for a source file that vanished while it was being read."""
    return CacheError(f"{e.filename or 'a source file'} of {recipe.name} {split} vanished while "
                      f"it was being read (a `datapipe cache rm` meanwhile?); run the prepare "
                      f"again")


def prepare_sharded(recipe: Recipe, split: str, cache: Cache, local: dict[str, LocalFile],
                    fp: str, options: FetchOptions, *, part: tuple[int, int], force: bool,
                    processes: int | None) -> ShardProgress:
    """Write part ``part = (num_shards, shard_index)`` of entry ``fp`` of ``split`` from the
    fetched sources ``local``; complete the set and publish it when every shard is in.

    With one part (a whole run) the entry's lock is held throughout and an unfinished
    set is an error; a part of many returns its progress and leaves the rest to the
    other parts' runs.
    """
    entry = cache.path(layout.entry(recipe.name, recipe.version, fp))
    work = work_dir(cache, recipe, fp)
    key = layout.prepare_lock(recipe.name, recipe.version, fp)
    what = f"prepare of {recipe.name} {split} ({fp})"
    whole = part[0] == 1
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
        names, _, written = write_part(recipe, split, cache, local, fp, options, part=part,
                                       force=force, processes=processes)
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


def write_part(recipe: Recipe, split: str, cache: Cache, local: dict[str, LocalFile],
               fp: str, options: FetchOptions, *, part: tuple[int, int], force: bool,
               processes: int | None) -> tuple[list[str], list[int], int]:
    """Write the shards of part ``part = (num_shards, shard_index)`` of entry ``fp`` into
    its work folder (those not finished already, or all of them with ``force``).

    Returns every shard's name (in row order), the indices of this part's shards, and
    how many this call wrote. Publishes nothing.
    """
    num_shards, shard_index = part
    work = work_dir(cache, recipe, fp)
    files = {name: f.path for name, f in local.items()}
    tasks = _shard_plan(recipe, split, files, work)
    names = [shard_file_name(split, i, len(tasks)) for i in range(len(tasks))]
    mine = list(range(shard_index, len(tasks), num_shards))
    todo = [i for i in mine if force or not _shard_done(work, names[i])]
    try:
        written = _write_shards(recipe, split, files, work, tasks, names, todo, cache,
                                fp, options, force, processes)
    except FileNotFoundError as e:  # raised in a worker, re-raised here with its name
        raise vanished(recipe, split, e) from None
    return names, mine, written


def shard_names(recipe: Recipe, split: str, cache: Cache, local: dict[str, LocalFile],
                fp: str) -> list[str]:
    """Every shard's name of entry ``fp`` (in row order), from its plan."""
    files = {name: f.path for name, f in local.items()}
    tasks = _shard_plan(recipe, split, files, work_dir(cache, recipe, fp))
    return [shard_file_name(split, i, len(tasks)) for i in range(len(tasks))]


def shard_summary(work: Path, name: str) -> dict[str, Any] | None:
    """The summary of the finished shard ``name`` in ``work`` (with its digests), if any."""
    if not _shard_done(work, name):
        return None
    summary = read_json(_summary_path(work / name))
    return {**summary, **_shard_digests(work / name, summary).record()}


def remove_shard(work: Path, name: str) -> None:
    """Remove a finished shard and its summary from ``work`` (the summary first)."""
    for path in (_summary_path(work / name), work / name):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _shard_plan(recipe: Recipe, split: str, files: Mapping[str, Path],
                work: Path) -> list[dict[str, Any]]:
    """The split's shard tasks: from the work folder, else from the clean stage (saved)."""
    saved = read_json(work / layout.SHARD_PLAN)
    if isinstance(saved, dict) and saved.get("split") == split and saved.get("tasks"):
        return saved["tasks"]
    tasks = recipe.clean.shard_plan(split, files)
    write_json_atomic(ensure_dir(work) / layout.SHARD_PLAN, {"split": split, "tasks": tasks},
                      compact=True)
    return tasks


def _summary_path(shard: Path) -> Path:
    return shard.with_name(layout.shard_summary_name(shard.name))


def _shard_done(work: Path, name: str) -> bool:
    """Whether shard ``name`` is finished: its summary exists and describes the file."""
    summary = read_json(_summary_path(work / name))
    try:
        return (isinstance(summary, dict) and summary.get("file") == name
                and (work / name).stat().st_size == summary["bytes"])
    except (OSError, KeyError):
        return False


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
                  cache: Cache, fp: str, options: FetchOptions, force: bool,
                  processes: int | None) -> int:
    """Write the shards ``todo`` on up to ``processes`` processes; return how many."""
    if not todo:
        return 0
    ensure_dir(work)
    jobs = [(recipe.clean, split, dict(files), tasks[i], work, names[i], cache.root,
             layout.shard_lock(recipe.name, recipe.version, fp, i), force) for i in todo]
    workers = min(len(jobs), processes or available_cores())
    total = sum(int(tasks[i].get("bytes", 0)) for i in todo) or None
    written = images = 0
    # Workers ignore SIGINT: Ctrl-C (sent to the whole process group) ends the prepare
    # here, in one place, whose ``finally`` terminates them; each would otherwise print
    # its own traceback. A terminated worker leaves only a temporary, cleaned next run.
    pool = _start_pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_write_one_shard, jobs) if pool else map(
            _write_one_shard, jobs)
        with progress(f"{recipe.name} {split}", total, 0, options.quiet) as bar:
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


def _start_pool(workers: int) -> Any:
    """A pool of ``workers`` processes that ignore SIGINT from their first instruction.

    A worker forked while SIGINT can be delivered may take a Ctrl-C inside the at-fork
    hooks that run before its initializer (filelock's, for one) and print a traceback
    there. So SIGINT is held back while the pool forks (a child inherits the mask); each
    worker ignores it, then lets it through, which discards one that arrived meanwhile;
    here a held-back Ctrl-C is delivered once the mask is restored.
    """
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: spawned workers, no fork hooks
        return _pool_context().Pool(workers, initializer=_ignore_sigint)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return _pool_context().Pool(workers, initializer=_ignore_sigint)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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
