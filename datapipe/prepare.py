"""The locked prepare step: download -> clean -> save for one split of a recipe.

A prepared split is a folder ``prepared/<name>/<version>/<fingerprint>/`` holding
``<split>.arrow`` and ``manifest.json``, the manifest written last. The fingerprint
is a hash of the recipe name and version, the split, the checksums of the source
files and the configs of the stages that shape the bytes (clean, save); so a
second prepare of the same thing is a look-up of one JSON file, with no network,
no hashing of data and no import of pyarrow. The manifest (``datapipe.manifest``)
is written last and records the digests of every data file.

A recipe whose clean stage writes shards (``write_shard``: ImageNet) is prepared
in many files by many processes and machines, resumably: ``datapipe.prepare_sharded``
writes them, once this module has found the entry and fetched its sources
(``prepare_split`` for the whole split, ``prepare_shards`` for one part of it).

No torch here: ``datapipe prepare`` runs through this module.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe import layout
from datapipe.cache import (
    Cache,
    file_digest,
    fingerprint,
    publish_dir,
    remove_stale_temporaries,
)
from datapipe.errors import CacheError, DatapipeError, DownloadError, FormatError
from datapipe.integrity import digest_file
from datapipe.manifest import (  # noqa: F401  (MANIFEST, PreparedSplit: re-exported)
    MANIFEST,
    PreparedSplit,
    manifest_path,
    prepare_lock_key,
    trusted,
    trusted_or_upgraded,
    write_manifest,
)
from datapipe.prepare_sharded import (  # noqa: F401  (re-exported: the public names)
    ShardProgress,
    check_part,
    is_sharded,
    prepare_sharded,
    shard_file_name,
    vanished,
    work_dir,
)
from datapipe.stages.download import (
    FetchOptions,
    LocalFile,
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
    return cache.path(layout.version_folder(recipe.name, recipe.version))


def _entry_dir(cache: Cache, recipe: Recipe, fp: str) -> Path:
    return cache.path(layout.entry(recipe.name, recipe.version, fp))


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
    for found_manifest in _version_dir(cache, recipe).glob(f"*/{MANIFEST}"):
        if found_manifest.parent.is_symlink():  # never followed (see cache.refuse_link)
            continue
        entry = trusted(found_manifest.parent)
        if entry is None or entry.manifest.get("split") != split:
            continue
        made_from = sorted(
            [s["filename"], s["algorithm"], s["checksum"]] for s in entry.manifest["sources"]
        )
        if split_fingerprint(recipe, split, made_from) == entry.fingerprint:
            found.append(entry)
    # created_at has one-second resolution; the manifest's mtime breaks ties.
    return max(found, default=None, key=lambda e: (
        e.manifest["created_at"], manifest_path(e.path).stat().st_mtime_ns))


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
    folder = layout.verified_twin(found.path.parent.name)
    with cache.lock(layout.download_lock(folder),
                    what=f"removal of damaged download {found.path}"):
        with contextlib.suppress(FileNotFoundError):
            if file_digest(found.path, found.algorithm) == found.checksum:
                return  # replaced by a whole copy meanwhile
        for doomed in (found.path.with_name(layout.sidecar_name(found.filename)), found.path):
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
        progress = prepare_sharded(recipe, split, cache, local, fp, options, part=(1, 0),
                                   force=force, processes=processes)
        assert progress.prepared is not None  # a whole run publishes or raises
        return progress.prepared, progress.worked
    with cache.lock(layout.prepare_lock(recipe.name, recipe.version, fp),
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
            raise vanished(recipe, split, e) from None
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
    the entry (``datapipe.prepare_sharded``). ``force`` writes this part's shards again.
    """
    check_part(recipe, num_shards, shard_index)
    options = options or FetchOptions()
    if not force and (existing := find_prepared(recipe, split, cache, options)) is not None:
        total = len(existing.data_files)
        return ShardProgress(split, existing.fingerprint, work_dir(cache, recipe,
                             existing.fingerprint), total, total, 0, existing)
    local = _fetch(recipe, split, recipe.clean.files_for(split), cache, options)
    known = {name: (f.algorithm, f.checksum) for name, f in local.items()}
    fp = split_fingerprint(recipe, split, _checksum_list(known))
    return prepare_sharded(recipe, split, cache, local, fp, options,
                           part=(num_shards, shard_index), force=force, processes=processes)
