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
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datapipe import layout
from datapipe.cache import (
    HEX_PATTERN,
    NAME_PATTERN,
    Cache,
    check_hex,
    check_name,
    temporary_sibling,
)
from datapipe.errors import CacheError
from datapipe.manifest import (
    inspect,
    manifest_path,
    read_set_aside,
    read_unchecked,
    set_aside_path,
)
from datapipe.verify import (
    described,
    download_sidecars,
    leftovers,
    links,
    prepared_entries,
)

log = logging.getLogger("datapipe")

TRUSTED, INCOMPLETE, QUARANTINED = "trusted", "incomplete", "corrupt"


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
    """Bytes under ``path`` (a file or a folder; a link counts itself, never its target)."""
    if path.is_symlink():
        return path.lstat().st_size
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
    pattern = f"{check_name(name) if name is not None else '*'}/*/{layout.WORK_PREFIX}*"
    return sorted(p for p in cache.prepared.glob(pattern) if p.is_dir() and not p.is_symlink())


def list_entries(cache: Cache, name: str | None = None) -> list[Entry]:
    """Every prepared entry folder (of ``name``), trusted or not."""
    found = []
    for recipe, version, folder in prepared_entries(cache, name):
        trusted = inspect(folder)[2]  # quietly: the listing shows the state itself
        manifest = trusted.manifest if trusted is not None else None
        state = TRUSTED
        if manifest is None:
            corrupt = read_set_aside(folder)
            state = QUARANTINED if corrupt is not None or manifest_path(folder).exists() \
                else INCOMPLETE
            manifest = corrupt or {}
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
        with contextlib.suppress(OSError):
            size += described(sidecar).stat().st_size
            files += 1
            unverified += layout.is_unverified_folder(sidecar.parent.name)
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
    """Rename ``path`` to a temporary sibling (no reader trusts it), then delete it.

    A symbolic link is removed itself, never what it points to.
    """
    size = size_of(path)
    doomed = path
    if not layout.is_temporary(path.name):
        doomed = temporary_sibling(path)
        os.replace(path, doomed)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed)
    else:
        doomed.unlink()
    return size


def _remove_link(path: Path, removal: Removal) -> bool:
    """If ``path`` is a symbolic link, remove the link itself (a leftover); True if it was."""
    if not path.is_symlink():
        return False
    log.warning("removed the symbolic link %s (datapipe never follows links in its cache; "
                "what it pointed to is untouched)", path)
    removal.bytes += _delete(path)
    removal.leftovers.append(str(path))
    return True


def _rmdir_if_empty(*folders: Path) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _held(cache: Cache, key: str, what: str, held: set[str]):
    """The lock ``key``, unless this removal holds it already (see remove)."""
    return contextlib.nullcontext() if key in held else cache.lock(key, what=what)


def _remove_prepared(cache: Cache, name: str, version: str | None, removal: Removal,
                     held: set[str]) -> None:
    top = cache.path(layout.recipe_folder(name), link_ok=True)
    if _remove_link(top, removal) or not top.is_dir():
        return
    if version is not None:
        versions = [cache.path(layout.version_folder(name, version), link_ok=True)]
    else:
        versions = [p for p in sorted(top.iterdir()) if not p.name.startswith(".")]
    for version_dir in versions:
        if _remove_link(version_dir, removal) or not version_dir.is_dir() \
                or not NAME_PATTERN.fullmatch(version_dir.name):
            continue
        for child in sorted(version_dir.iterdir()):
            if layout.is_temporary(child.name):
                fp, bucket = layout.temporary_target(child.name), removal.leftovers
            elif (work := layout.work_fingerprint(child.name)) is not None:
                fp, bucket = work, removal.leftovers  # shards of an unfinished prepare
            elif child.is_dir() or child.is_symlink():
                fp, bucket = child.name, removal.entries
            else:
                continue
            if fp is None or not HEX_PATTERN.fullmatch(fp):
                continue  # not a folder datapipe writes: left alone
            key = layout.prepare_lock(name, version_dir.name, fp)
            with _held(cache, key, f"removal of {name} {version_dir.name} {fp}", held):
                if child.is_symlink():
                    _remove_link(child, removal)
                elif child.exists():
                    removal.bytes += _delete(child)
                    bucket.append(str(child))
        _rmdir_if_empty(version_dir)
    _rmdir_if_empty(top)


def _remove_splits(cache: Cache, name: str, removal: Removal) -> None:
    folder = cache.path(layout.plan_folder(name), link_ok=True)
    if _remove_link(folder, removal) or not folder.is_dir():
        return
    for child in sorted(folder.iterdir()):
        plan_id = layout.plan_id_of(child.name)
        if layout.is_temporary(child.name):
            target = layout.temporary_target(child.name) or ""
            if target.endswith(layout.PLAN_SUFFIX):
                plan_id = layout.plan_id_of(target)
        if not HEX_PATTERN.fullmatch(plan_id):
            continue  # not a file datapipe writes: left alone
        with cache.lock(layout.plan_lock(name, plan_id), what=f"removal of splits of {name}"):
            if _remove_link(child, removal):
                continue
            if child.exists():
                removal.bytes += _delete(child)
                removal.splits.append(str(child))
    _rmdir_if_empty(folder)


def _remove_downloads(cache: Cache, folders: Iterable[str], removal: Removal) -> None:
    for key in sorted(set(folders)):
        with cache.lock(layout.download_lock(key), what=f"removal of downloads/{key}"):
            found = False
            for verified in (True, False):
                folder = cache.path(layout.download_folder(key, verified), link_ok=True)
                if _remove_link(folder, removal):
                    continue
                if folder.exists():
                    removal.bytes += _delete(folder)
                    found = True
                for left in sorted(folder.parent.glob(layout.temporaries_of(folder.name))):
                    removal.bytes += _delete(left)  # of a killed `cache rm`
                    removal.leftovers.append(str(left))
            if found:
                removal.downloads.append(str(cache.root.joinpath(*layout.download_folder(key))))


def source_folders(cache: Cache, name: str) -> set[str]:
    """downloads/ folders that ``name``'s manifests record as sources (verified ones).

    Each is made of the recorded algorithm and checksum, checked first: a manifest that
    records anything else is corrupt, and what it names is never touched.
    """
    found = set()
    for _, _, entry in prepared_entries(cache, name):
        for path, manifest in ((manifest_path(entry), read_unchecked(entry)),
                               (set_aside_path(entry), read_set_aside(entry))):
            if manifest is None:
                continue
            for source in manifest.get("sources") or ():
                if not isinstance(source, dict) or not source.get("expected"):
                    continue
                try:
                    found.add(layout.checked_key(source.get("algorithm"),
                                                 source.get("expected")))
                except CacheError as e:
                    log.warning("%s is corrupt (%s); the source it names is left alone",
                                path, e)
    return found


def remove(cache: Cache, name: str, version: str | None = None, *,
           downloads: bool = False, download_folders: Iterable[str] = (),
           fingerprints: Iterable[tuple[str, str]] = ()) -> Removal:
    """Remove ``name``'s prepared entries (of ``version`` only, if given).

    Without ``version`` its split indices go too. ``downloads`` also removes its
    downloaded source files: the ``download_folders`` given (the recipe's resource
    folders, see Download.folder_key) and those its manifests record; another recipe
    that declares the same files downloads them again when it needs them.

    ``fingerprints`` are (version, fingerprint) of the entries a prepare of the recipe
    would write now (prepare.expected_fingerprints): their prepare locks are held from
    first to last, so a prepare of one that runs now finishes before anything goes, and
    no download it is about to read is removed under it. Symbolic links met on the way
    are removed themselves, never followed.
    """
    check_name(name)
    if version is not None:
        check_name(version, "recipe version")
    removal = Removal([], [], [], [])
    with contextlib.ExitStack() as stack:
        held: set[str] = set()
        for v, fp in sorted(set(fingerprints)):
            if version is None or v == version:
                key = layout.prepare_lock(name, check_name(v, "recipe version"), check_hex(fp))
                stack.enter_context(cache.lock(key, what=f"removal of {name} {v} {fp}"))
                held.add(key)
        top = cache.path(layout.recipe_folder(name), link_ok=True)
        folders = set(download_folders) if downloads else set()
        if downloads and not top.is_symlink():
            folders |= source_folders(cache, name)
        _remove_prepared(cache, name, version, removal, held)
        if version is None:
            _remove_splits(cache, name, removal)
        if downloads:
            _remove_downloads(cache, folders, removal)
    return removal


__all__ = ["Entry", "DownloadTotals", "Removal", "list_entries", "download_totals", "remove",
           "human_bytes", "leftovers", "links", "source_folders", "work_folders", "size_of"]
