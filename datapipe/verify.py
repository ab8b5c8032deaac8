"""Re-check cache entries against the checksums recorded when they were written.

    datapipe verify mnist     # every prepared entry of mnist and the downloads it uses
    datapipe verify           # everything in the cache

A prepared entry's manifest lists each of its files with its sha256 and size; a
download's sidecar records the size and checksum of its bytes (and, in a verified
folder, the recipe's checksum they matched). Readers trust an entry on its manifest or
sidecar and a size check, without re-reading the bytes, because that is what keeps a
second ``prepare`` and every DataLoader start fast. ``verify`` is the full re-read: it
finds flipped bits, files edited or replaced by hand, and bad disks.

What happens to a corrupt entry, so that it is never served again:

* a prepared entry loses its manifest (renamed ``manifest.json.corrupt``, left in the
  folder for inspection): readers stop trusting it at once, and the next ``prepare``
  of it removes the folder and rebuilds it, as after a killed run;
* a download loses its sidecar and its bytes: the next fetch downloads it again.

Both happen under the lock that prepare and download take for that entry, after a
second check made under the lock (a process may have rebuilt it meanwhile). An entry
without a manifest (a prepare that was killed) is reported INCOMPLETE: it is never
used and needs no action. No torch here: ``datapipe verify`` stays fast to start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from datapipe.cache import TMP_PREFIX, Cache, check_name, read_json
from datapipe.errors import CacheError
from datapipe.prepare import MANIFEST, MANIFEST_FORMAT, prepare_lock_key
from datapipe.stages.download import (
    PARTIAL_SUFFIX,
    SIDECAR_SUFFIX,
    SOURCE_DIGESTS,
    UNVERIFIED_SUFFIX,
    lock_key,
)

OK, CORRUPT, INCOMPLETE = "OK", "CORRUPT", "INCOMPLETE"
CORRUPT_SUFFIX = ".corrupt"  # manifest.json -> manifest.json.corrupt
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Check:
    """The verdict on one cache entry."""

    kind: str  # "prepared" or "download"
    label: str  # "mnist 1 test 86e2138a6d342c2a" or "md5-9fb6.../t10k-images-idx3-ubyte.gz"
    path: Path
    status: str  # OK, CORRUPT or INCOMPLETE
    detail: str = ""
    still_trusted: bool = False  # CORRUPT, but the cache could not be changed (read-only)

    def line(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.status:<10}  {self.kind:<8}  {self.label}{detail}"


# ------------------------------------------------------------------ prepared entries


def prepared_entries(cache: Cache, name: str | None = None) -> Iterator[tuple[str, str, Path]]:
    """(recipe, version, folder) of every published entry folder, temporaries left out."""
    names = [cache.under("prepared", check_name(name))] if name is not None \
        else _subfolders(cache.prepared)
    for recipe_dir in names:
        for version_dir in _subfolders(recipe_dir):
            for entry in _subfolders(version_dir):
                yield recipe_dir.name, version_dir.name, entry


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir()
                      if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    except OSError:
        return []


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _short(hexdigest: Any) -> str:
    return f"{str(hexdigest)[:12]}..." if isinstance(hexdigest, str) else repr(hexdigest)


def _prepared_problem(recipe: str, version: str, entry: Path) -> tuple[str, str]:
    """(status, detail) of one prepared entry folder."""
    manifest_path = entry / MANIFEST
    if not manifest_path.exists():
        if manifest_path.with_name(MANIFEST + CORRUPT_SUFFIX).exists():
            return INCOMPLETE, ("marked corrupt by an earlier verify; never used, the next "
                                "prepare rebuilds it")
        return INCOMPLETE, ("no manifest (an interrupted prepare); never used, the next "
                            "prepare rebuilds it")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return CORRUPT, "manifest.json is not a readable datapipe manifest"
    for key, want in (("recipe", recipe), ("version", version), ("fingerprint", entry.name)):
        if manifest.get(key) != want:
            return CORRUPT, f"the manifest names {key} {manifest.get(key)!r}, its folder {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return CORRUPT, "the manifest lists no files"
    for filename, record in sorted(files.items()):
        path = entry / filename
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            return CORRUPT, f"the manifest has no sha256 for {filename}"
        try:
            size = path.stat().st_size
        except OSError:
            return CORRUPT, f"{filename} is missing"
        if size != record.get("bytes"):
            return CORRUPT, f"{filename} has {size} bytes, the manifest says {record.get('bytes')}"
        try:
            actual = _digest(path, "sha256")
        except OSError as e:
            return CORRUPT, f"{filename} cannot be read ({e.strerror or e})"
        if actual != record["sha256"]:
            return CORRUPT, (f"{filename} has sha256 {_short(actual)}, the manifest says "
                             f"{_short(record['sha256'])}")
    return OK, f"{manifest.get('split')}, {manifest.get('rows')} rows"


def _quarantine_prepared(cache: Cache, recipe: str, version: str, entry: Path) -> Check:
    """Re-check ``entry`` under its prepare lock; if still corrupt, stop trusting it."""
    label = f"{recipe} {version} {entry.name}"
    with cache.lock(prepare_lock_key(recipe, version, entry.name),
                    what=f"verify of {recipe} {version} {entry.name}"):
        status, detail = _prepared_problem(recipe, version, entry)
        if status == CORRUPT:
            manifest = entry / MANIFEST
            os.replace(manifest, manifest.with_name(MANIFEST + CORRUPT_SUFFIX))
            detail += f"; no longer trusted, `datapipe prepare {recipe}` rebuilds it"
    return Check("prepared", label, entry, status, detail)


def _guarded(quarantine: Callable[[], Check], found: Check) -> Check:
    """Run ``quarantine``; if the cache cannot be changed (read-only, ...) say so."""
    try:
        return quarantine()
    except (CacheError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return dataclasses.replace(found, still_trusted=True,
                                   detail=f"{found.detail}; it could NOT be marked untrusted "
                                          f"({reason}): remove it by hand")


def verify_prepared(cache: Cache, name: str | None = None) -> list[Check]:
    """Check every prepared entry (of ``name``); corrupt ones are no longer trusted."""
    checks = []
    for recipe, version, entry in prepared_entries(cache, name):
        status, detail = _prepared_problem(recipe, version, entry)
        if status == CORRUPT:
            checks.append(_guarded(partial(_quarantine_prepared, cache, recipe, version, entry),
                                   Check("prepared", f"{recipe} {version} {entry.name}", entry,
                                         status, detail)))
        else:
            checks.append(Check("prepared", f"{recipe} {version} {entry.name}", entry,
                                status, detail))
    return checks


# ------------------------------------------------------------------ downloads


def download_sidecars(cache: Cache) -> Iterator[Path]:
    """Every download sidecar (``downloads/<folder>/<file>.json``), temporaries left out."""
    for folder in _subfolders(cache.downloads):
        if folder.name == SOURCE_DIGESTS:
            continue
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for sidecar in children:
            if (sidecar.name.endswith(SIDECAR_SUFFIX) and not sidecar.name.startswith(TMP_PREFIX)
                    and sidecar.is_file()):
                yield sidecar


def _download_problem(sidecar: Path) -> tuple[str, str]:
    path = sidecar.with_name(sidecar.name[:-len(SIDECAR_SUFFIX)])
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or not isinstance(meta.get("checksum"), str):
        return CORRUPT, "its sidecar is not readable"
    algorithm = meta.get("algorithm")
    if algorithm not in ("md5", "sha256"):
        return CORRUPT, f"its sidecar names no known checksum algorithm ({algorithm!r})"
    try:
        size = path.stat().st_size
    except OSError:
        return CORRUPT, "the file is missing"
    if size != meta.get("size"):
        return CORRUPT, f"it has {size} bytes, its sidecar says {meta.get('size')}"
    try:
        actual = _digest(path, algorithm)
    except OSError as e:
        return CORRUPT, f"it cannot be read ({e.strerror or e})"
    if actual != meta["checksum"]:
        return CORRUPT, (f"its {algorithm} is {_short(actual)}, its sidecar says "
                         f"{_short(meta['checksum'])}")
    folder = path.parent.name
    if folder.startswith(f"{algorithm}-") and not folder.endswith(UNVERIFIED_SUFFIX):
        # A verified folder is named after the recipe's checksum: the bytes must match it.
        if folder != f"{algorithm}-{actual}" or meta.get("expected") != actual:
            return CORRUPT, f"its {algorithm} {_short(actual)} is not the one its folder names"
    return OK, "verified" if meta.get("verified") else "kept unverified (--no-verify)"


def _download_lock(sidecar: Path) -> str:
    folder = sidecar.parent.name
    if folder.endswith(UNVERIFIED_SUFFIX):  # guarded by the lock of its verified folder
        folder = folder[:-len(UNVERIFIED_SUFFIX)]
    return lock_key(folder)


def _quarantine_download(cache: Cache, sidecar: Path, label: str) -> Check:
    path = sidecar.with_name(sidecar.name[:-len(SIDECAR_SUFFIX)])
    with cache.lock(_download_lock(sidecar), what=f"verify of {label}"):
        status, detail = _download_problem(sidecar) if sidecar.exists() else (OK, "replaced")
        if status == CORRUPT:
            for doomed in (sidecar, path):  # the sidecar first: no trust, then no bytes
                with contextlib.suppress(FileNotFoundError):
                    doomed.unlink()
            detail += "; removed, the next prepare downloads it again"
    return Check("download", label, path, status, detail)


def _sources_of(cache: Cache, name: str) -> set[tuple[str, str]]:
    """(file name, checksum) of every source that ``name``'s manifests record."""
    found = set()
    for _, _, entry in prepared_entries(cache, name):
        for manifest_path in (entry / MANIFEST, entry / (MANIFEST + CORRUPT_SUFFIX)):
            manifest = read_json(manifest_path)
            if not isinstance(manifest, dict):
                continue
            for source in manifest.get("sources") or ():
                if isinstance(source, dict):
                    found.add((str(source.get("filename")), str(source.get("checksum"))))
    return found


def verify_downloads(cache: Cache, name: str | None = None,
                     folders: Iterable[str] = ()) -> list[Check]:
    """Check the downloads of ``name`` (all when None); corrupt ones are removed.

    A download belongs to ``name`` when its folder is one of ``folders`` (the recipe's
    resource folders, see Download.folder_key; their ``.unverified`` twins too) or one
    of ``name``'s manifests records it as a source.
    """
    folders = set(folders)
    sources = _sources_of(cache, name) if name is not None else set()
    checks = []
    for sidecar in download_sidecars(cache):
        folder = sidecar.parent.name
        filename = sidecar.name[:-len(SIDECAR_SUFFIX)]
        if name is not None:
            base = folder[:-len(UNVERIFIED_SUFFIX)] if folder.endswith(UNVERIFIED_SUFFIX) \
                else folder
            meta = read_json(sidecar)
            checksum = str(meta.get("checksum")) if isinstance(meta, dict) else None
            if base not in folders and (filename, checksum) not in sources:
                continue
        label = f"{folder}/{filename}"
        status, detail = _download_problem(sidecar)
        if status == CORRUPT:
            checks.append(_guarded(partial(_quarantine_download, cache, sidecar, label),
                                   Check("download", label, sidecar.with_name(filename),
                                         status, detail)))
        else:
            checks.append(Check("download", label, sidecar.with_name(filename), status, detail))
    return checks


def leftovers(cache: Cache) -> list[Path]:
    """Temporaries and partial downloads left by interrupted runs (never trusted)."""
    found: list[Path] = []
    for top in (cache.prepared, cache.downloads, cache.splits):
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for child in (*dirnames, *filenames):
                if child.startswith(TMP_PREFIX) or child.endswith(PARTIAL_SUFFIX):
                    found.append(Path(dirpath) / child)
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
    return sorted(found)


def verify(cache: Cache, name: str | None = None, folders: Iterable[str] = ()) -> list[Check]:
    """Check the prepared entries and downloads of ``name`` (all when None)."""
    if name is not None:
        check_name(name)
    return [*verify_prepared(cache, name), *verify_downloads(cache, name, folders)]
