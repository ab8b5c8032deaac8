"""The locked prepare step: download -> clean -> save for one split of a recipe.

A prepared split is a folder ``prepared/<name>/<version>/<fingerprint>/`` holding
``<split>.arrow`` and ``manifest.json``, the manifest written last. The fingerprint
is a hash of the recipe name and version, the split, the checksums of the source
files and the configs of the stages that shape the bytes (clean, save); so a
second prepare of the same thing is a look-up of one JSON file, with no network,
no hashing and no import of pyarrow.

No torch here: ``datapipe prepare`` runs through this module.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.cache import (
    Cache,
    file_digest,
    fingerprint,
    now_iso,
    publish_dir,
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
)
from datapipe.stages.download import FetchOptions, LocalFile, source_digest

if TYPE_CHECKING:
    from datapipe.recipe import Recipe

log = logging.getLogger("datapipe")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "datapipe.prepared/1"


@dataclass(frozen=True)
class PreparedSplit:
    """A published split: its folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def split(self) -> str:
        return self.manifest["split"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def data_file(self) -> Path:
        return self.path / self.manifest["data_file"]

    @property
    def verified(self) -> bool:
        return all(s["verified"] for s in self.manifest["sources"])


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


def _entry_dir(cache: Cache, recipe: Recipe, fp: str) -> Path:
    return cache.prepared / recipe.name / recipe.version / fp


def _trusted(entry: Path) -> PreparedSplit | None:
    manifest = read_json(entry / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return PreparedSplit(entry, manifest)


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
            path = Path(options.source) / name
            if not path.is_file():
                return None
            algo = declared[0] if declared else "sha256"
            known[name] = (algo, source_digest(path, algo, cache))
            continue
        local = recipe.download.cached(name, cache, verify=options.verify)
        if local is None:
            return None
        known[name] = (local.algorithm, local.checksum)
    return known


def _checksum_list(known: dict[str, tuple[str, str]]) -> list[list[str]]:
    return [[name, algo, digest] for name, (algo, digest) in sorted(known.items())]


def _newest_unverified(recipe: Recipe, split: str, cache: Cache) -> PreparedSplit | None:
    """The most recent entry of ``split`` made by this recipe from unverified files.

    Such entries (``--no-verify``, ``--source``) cannot be found from declared
    checksums; a module that accepts unverified data takes the newest one whose
    fingerprint matches this recipe's stages.
    """
    found = []
    for manifest_path in (cache.prepared / recipe.name / recipe.version).glob(f"*/{MANIFEST}"):
        entry = _trusted(manifest_path.parent)
        if entry is None or entry.manifest.get("split") != split:
            continue
        made_from = sorted(
            [s["filename"], s["algorithm"], s["checksum"]] for s in entry.manifest["sources"]
        )
        if split_fingerprint(recipe, split, made_from) == entry.fingerprint:
            found.append(entry)
    return max(found, key=lambda e: e.manifest["created_at"], default=None)


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
        entry = _trusted(_entry_dir(cache, recipe, split_fingerprint(
            recipe, split, _checksum_list(verified))))
        if entry is not None or options.verify:
            return entry
    elif options.verify:
        return None
    known = _known_checksums(recipe, split, cache, options)
    if known is not None:  # the files are at hand: only their own entry will do
        return _trusted(_entry_dir(cache, recipe, split_fingerprint(
            recipe, split, _checksum_list(known))))
    return _newest_unverified(recipe, split, cache)


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


def _source_record(local: LocalFile) -> dict[str, Any]:
    return {
        "filename": local.filename,
        "algorithm": local.algorithm,
        "checksum": local.checksum,
        "expected": local.expected,
        "verified": local.verified,
        "origin": local.origin,
    }


def prepare_split(
    recipe: Recipe,
    split: str,
    cache: Cache,
    options: FetchOptions | None = None,
    force: bool = False,
) -> tuple[PreparedSplit, bool]:
    """Make sure ``split`` of ``recipe`` is prepared; return it and whether work was done.

    Safe to call from many processes at once: the work happens under the entry's
    lock, and a process that waited finds the entry published by another.
    ``force`` rebuilds the entry (verified downloads are reused).
    """
    options = options or FetchOptions()
    files = recipe.clean.files_for(split)
    if not force and (existing := find_prepared(recipe, split, cache, options)) is not None:
        return existing, False

    local = recipe.download.fetch(files, cache, options)
    known = {name: (f.algorithm, f.checksum) for name, f in local.items()}
    fp = split_fingerprint(recipe, split, _checksum_list(known))
    entry = _entry_dir(cache, recipe, fp)
    with cache.lock(f"prepare-{recipe.name}-{recipe.version}-{fp}",
                    what=f"prepare of {recipe.name} {split} ({fp})"):
        if not force and (existing := _trusted(entry)) is not None:
            return existing, False  # another process finished it while we waited
        remove_stale_temporaries(entry)
        if entry.exists():  # published data without a manifest: a killed run, or --force
            shutil.rmtree(entry)
        started = time.perf_counter()
        columns = recipe.clean(split, {name: f.path for name, f in local.items()})
        with publish_dir(entry) as tmp:
            data_path = recipe.save(columns, tmp, split)
            data_file = data_path.name
            data_sha = file_digest(data_path)
            data_bytes = data_path.stat().st_size
        manifest = {
            "format": MANIFEST_FORMAT,
            "recipe": recipe.name,
            "version": recipe.version,
            "split": split,
            "fingerprint": fp,
            "rows": int(len(next(iter(columns.values())))),
            "data_file": data_file,
            "files": {data_file: {"sha256": data_sha, "bytes": data_bytes}},
            "columns": recipe.save.describe(columns),
            "statistics": _statistics(columns, len(recipe.info.classes)),
            "sources": [_source_record(local[name]) for name in sorted(local)],
            "stages": {stage.kind: stage.config()
                       for stage in (recipe.download, recipe.clean, recipe.save)},
            "created_at": now_iso(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(entry / MANIFEST, manifest)
    log.debug("prepared %s %s: %d rows in %s", recipe.name, split, manifest["rows"], entry)
    return PreparedSplit(entry, manifest), True
