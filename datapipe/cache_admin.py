"""What the cache holds, and taking it out: ``datapipe cache ls`` and ``datapipe cache rm``.

    datapipe cache ls [NAME]                     # prepared entries, downloads, leftovers
    datapipe cache rm NAME [--version V] [--all]

Removing an entry takes the lock a prepare of it takes (so does removing the shards
of an unfinished sharded prepare: do not remove those while parts of it still run on
other machines), so it never pulls an entry
from under a prepare that is writing it (and a prepare never finds half of one). The
entry is first renamed to a temporary name, which no reader trusts, then deleted: a
reader sees it whole or not at all, and a ``rm`` killed midway leaves only a
temporary, swept by the next ``rm`` or prepare of it. A process that has the files
memory-mapped keeps reading them (they go when it closes them). Lock files stay: with
flock, removing one a process waits on would let a third one in beside it.

No torch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datapipe.cache import TMP_PREFIX, Cache, read_json, temporary_sibling
from datapipe.prepare import MANIFEST, WORK_PREFIX, _trusted, prepare_lock_key
from datapipe.stages.download import UNVERIFIED_SUFFIX, lock_key
from datapipe.verify import CORRUPT_SUFFIX, download_sidecars, leftovers, prepared_entries

TRUSTED, INCOMPLETE, QUARANTINED = "trusted", "incomplete", "corrupt"
_TMP_ENTRY = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<fp>.+)-\d+-[0-9a-f]+$")


@dataclass(frozen=True)
class Entry:
    """One prepared entry folder, as ``cache ls`` shows it."""

    recipe: str
    version: str
    split: str | None
    fingerprint: str
    rows: int | None
    bytes: int
    verified: bool | None  # whether every source matched the recipe's checksums
    state: str  # trusted, incomplete (no manifest) or corrupt (marked by verify)
    created_at: str | None
    path: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def size_of(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def work_folders(cache: Cache, name: str | None = None) -> list[Path]:
    """Folders of shards of sharded prepares not yet published (kept to be resumed)."""
    pattern = f"{name if name is not None else '*'}/*/{WORK_PREFIX}*"
    return sorted(p for p in cache.prepared.glob(pattern) if p.is_dir())


def list_entries(cache: Cache, name: str | None = None) -> list[Entry]:
    """Every prepared entry folder (of ``name``), trusted or not."""
    found = []
    for recipe, version, folder in prepared_entries(cache, name):
        trusted = _trusted(folder)
        manifest = trusted.manifest if trusted is not None else None
        state = TRUSTED
        if manifest is None:
            corrupt = read_json(folder / (MANIFEST + CORRUPT_SUFFIX))
            state = QUARANTINED if corrupt is not None or (folder / MANIFEST).exists() \
                else INCOMPLETE
            manifest = corrupt if isinstance(corrupt, dict) else {}
        sources = manifest.get("sources")
        found.append(Entry(
            recipe=recipe, version=version, split=manifest.get("split"),
            fingerprint=folder.name, rows=manifest.get("rows"), bytes=size_of(folder),
            verified=(all(bool(s.get("verified")) for s in sources)
                      if isinstance(sources, list) and sources else None),
            state=state, created_at=manifest.get("created_at"), path=str(folder)))
    return found


@dataclass(frozen=True)
class DownloadTotals:
    files: int
    bytes: int
    unverified: int  # files kept with --no-verify despite a checksum mismatch


def download_totals(cache: Cache) -> DownloadTotals:
    files = size = unverified = 0
    for sidecar in download_sidecars(cache):
        path = sidecar.with_name(sidecar.name[:-len(".json")])
        with contextlib.suppress(OSError):
            size += path.stat().st_size
            files += 1
            unverified += sidecar.parent.name.endswith(UNVERIFIED_SUFFIX)
    return DownloadTotals(files, size, unverified)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # not reached


# ------------------------------------------------------------------ removal


@dataclass
class Removal:
    """What ``remove`` took out."""

    entries: list[str]
    splits: list[str]
    downloads: list[str]  # one per downloaded resource (its folder and .unverified twin)
    leftovers: list[str]
    bytes: int = 0

    @property
    def count(self) -> int:
        return len(self.entries) + len(self.splits) + len(self.downloads) + len(self.leftovers)


def _delete(path: Path) -> int:
    """Rename ``path`` to a temporary sibling (no reader trusts it), then delete it."""
    size = size_of(path)
    doomed = path
    if not path.name.startswith(TMP_PREFIX):
        doomed = temporary_sibling(path)
        os.replace(path, doomed)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed)
    else:
        doomed.unlink()
    return size


def _rmdir_if_empty(*folders: Path) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove_prepared(cache: Cache, name: str, version: str | None, removal: Removal) -> None:
    versions = [cache.prepared / name / version] if version is not None else [
        p for p in sorted((cache.prepared / name).glob("*")) if p.is_dir()
        and not p.name.startswith(".")]
    for version_dir in versions:
        if not version_dir.is_dir():
            continue
        for child in sorted(version_dir.iterdir()):
            if child.name.startswith(TMP_PREFIX):
                match = _TMP_ENTRY.match(child.name)
                fp, bucket = (match["fp"] if match else None), removal.leftovers
            elif child.name.startswith(WORK_PREFIX):  # shards of an unfinished prepare
                fp, bucket = child.name[len(WORK_PREFIX):], removal.leftovers
            elif child.is_dir():
                fp, bucket = child.name, removal.entries
            else:
                continue
            if fp is None:
                continue
            with cache.lock(prepare_lock_key(name, version_dir.name, fp),
                            what=f"removal of {name} {version_dir.name} {fp}"):
                if child.exists():
                    removal.bytes += _delete(child)
                    bucket.append(str(child))
        _rmdir_if_empty(version_dir)
    _rmdir_if_empty(cache.prepared / name)


def _remove_splits(cache: Cache, name: str, removal: Removal) -> None:
    folder = cache.splits / name
    if not folder.is_dir():
        return
    for child in sorted(folder.iterdir()):
        plan_id = child.name.removesuffix(".json")
        if child.name.startswith(TMP_PREFIX):
            match = re.match(rf"^{re.escape(TMP_PREFIX)}(?P<id>.+)\.json-\d+-[0-9a-f]+$",
                             child.name)
            plan_id = match["id"] if match else plan_id
        with cache.lock(f"splits-{name}-{plan_id}", what=f"removal of splits of {name}"):
            if child.exists():
                removal.bytes += _delete(child)
                removal.splits.append(str(child))
    _rmdir_if_empty(folder)


def _remove_downloads(cache: Cache, folders: Iterable[str], removal: Removal) -> None:
    for key in sorted(set(folders)):
        with cache.lock(lock_key(key), what=f"removal of downloads/{key}"):
            found = False
            for folder in (cache.downloads / key, cache.downloads / (key + UNVERIFIED_SUFFIX)):
                if folder.exists():
                    removal.bytes += _delete(folder)
                    found = True
            if found:
                removal.downloads.append(str(cache.downloads / key))


def source_folders(cache: Cache, name: str) -> set[str]:
    """downloads/ folders that ``name``'s manifests record as sources (verified ones)."""
    found = set()
    for _, _, entry in prepared_entries(cache, name):
        for manifest_name in (MANIFEST, MANIFEST + CORRUPT_SUFFIX):
            manifest = read_json(entry / manifest_name)
            if not isinstance(manifest, dict):
                continue
            for source in manifest.get("sources") or ():
                if isinstance(source, dict) and source.get("expected"):
                    found.add(f"{source.get('algorithm')}-{source.get('expected')}")
    return found


def remove(cache: Cache, name: str, version: str | None = None, *,
           downloads: bool = False, download_folders: Iterable[str] = ()) -> Removal:
    """Remove ``name``'s prepared entries (of ``version`` only, if given).

    Without ``version`` its split indices go too. ``downloads`` also removes its
    downloaded source files: the ``download_folders`` given (the recipe's resource
    folders, see Download.folder_key) and those its manifests record; another recipe
    that declares the same files downloads them again when it needs them.
    """
    removal = Removal([], [], [], [])
    folders = set(download_folders) | source_folders(cache, name) if downloads else set()
    _remove_prepared(cache, name, version, removal)
    if version is None:
        _remove_splits(cache, name, removal)
    if downloads:
        _remove_downloads(cache, folders, removal)
    return removal


__all__ = ["Entry", "DownloadTotals", "Removal", "list_entries", "download_totals", "remove",
           "human_bytes", "leftovers", "source_folders", "work_folders", "size_of"]
