"""Re-check cache entries against the checksums recorded when they were written.

    datapipe verify mnist     # every prepared entry of mnist and the downloads it uses
    datapipe verify           # everything in the cache

A prepared entry's manifest carries a digest of its own content and lists each data
file with its size, sha256 and chunk digests (``datapipe.manifest``); a download's
sidecar records the size and checksum of its bytes (and, in a verified folder, the
recipe's checksum they matched). Readers check a prepared file's chunks as they first
touch them (``datapipe.integrity``), so damage is never served; ``verify`` re-reads
everything at once: every chunk of every entry, the manifest's digest and the row
count of the Arrow files, and every download. It finds flipped bits, files edited or
replaced by hand, and bad disks before a reader stumbles on them.

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
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from datapipe import layout
from datapipe.cache import Cache, check_hex, check_name, file_digest, read_json
from datapipe.errors import CacheError
from datapipe.integrity import DamagedChunk, arrow_rows, check_file
from datapipe.manifest import (  # noqa: F401  (CORRUPT_SUFFIX: re-exported)
    CORRUPT_SUFFIX,
    MISSING,
    OUTDATED,
    entry_lock,
    inspect,
    manifest_path,
    read_set_aside,
    read_unchecked,
    set_aside,
    set_aside_path,
)
from datapipe.splits import verify_plans

OK, CORRUPT, INCOMPLETE, LINK = "OK", "CORRUPT", "INCOMPLETE", "LINK"
LINK_DETAIL = ("a symbolic link, which datapipe never follows inside its cache; remove it by "
               "hand (`datapipe cache rm` removes the link only)")


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
    if name is not None:  # a link here is never walked, only reported (see links)
        top = cache.path(layout.recipe_folder(check_name(name)), link_ok=True)
        names = [] if top.is_symlink() else [top]
    else:
        names = _subfolders(cache.prepared)
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


def _short(hexdigest: Any) -> str:
    return f"{str(hexdigest)[:12]}..." if isinstance(hexdigest, str) else repr(hexdigest)


def _prepared_problem(recipe: str, version: str, entry: Path) -> tuple[str, str]:
    """(status, detail) of one prepared entry folder: its manifest, every chunk, its rows."""
    state, why, prepared = inspect(entry)
    if state == MISSING:
        if set_aside_path(entry).exists():
            return INCOMPLETE, ("marked corrupt by an earlier verify; never used, the next "
                                "prepare rebuilds it")
        return INCOMPLETE, ("no manifest (an interrupted prepare); never used, the next "
                            "prepare rebuilds it")
    if state == OUTDATED:
        return INCOMPLETE, f"{why}; never used, the next prepare rebuilds it"
    if prepared is None:
        return CORRUPT, why
    promise = prepared.promise()
    rows = 0
    for path in prepared.data_files:
        try:
            check_file(path, promise.digests(path))
            rows += arrow_rows(path)
        except DamagedChunk as e:
            return CORRUPT, str(e)
        except Exception as e:  # the bytes match their digests but do not parse: forged
            return CORRUPT, f"{path.name} is not a readable Arrow file ({e})"
    if rows != prepared.rows:
        return CORRUPT, f"its data files hold {rows} rows, the manifest says {prepared.rows}"
    return OK, f"{prepared.split}, {rows} rows"


def _quarantine_prepared(cache: Cache, recipe: str, version: str, entry: Path) -> Check:
    """Re-check ``entry`` under its prepare lock; if still corrupt, stop trusting it."""
    label = f"{recipe} {version} {entry.name}"
    with entry_lock(entry, what=f"verify of {label}"):
        status, detail = _prepared_problem(recipe, version, entry)
        if status == CORRUPT:
            if manifest_path(entry).exists():
                set_aside(entry)
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
        if folder.name == layout.SOURCE_DIGESTS:
            continue
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for sidecar in children:
            if layout.sidecar_of(sidecar.name) is not None and sidecar.is_file():
                yield sidecar


def described(sidecar: Path) -> Path:
    """The download file the sidecar ``sidecar`` describes."""
    return sidecar.with_name(layout.sidecar_of(sidecar.name))


def _download_problem(sidecar: Path) -> tuple[str, str]:
    path = described(sidecar)
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or not isinstance(meta.get("checksum"), str):
        return CORRUPT, "its sidecar is not readable"
    try:
        check_hex(meta["checksum"], "checksum")
    except CacheError as e:
        return CORRUPT, f"its sidecar's {e}"
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
        actual = file_digest(path, algorithm)
    except OSError as e:
        return CORRUPT, f"it cannot be read ({e.strerror or e})"
    if actual != meta["checksum"]:
        return CORRUPT, (f"its {algorithm} is {_short(actual)}, its sidecar says "
                         f"{_short(meta['checksum'])}")
    folder = path.parent.name
    if folder.startswith(f"{algorithm}-") and not layout.is_unverified_folder(folder):
        # A verified folder is named after the recipe's checksum: the bytes must match it.
        if folder != layout.checked_key(algorithm, actual) or meta.get("expected") != actual:
            return CORRUPT, f"its {algorithm} {_short(actual)} is not the one its folder names"
    return OK, "verified" if meta.get("verified") else "kept unverified (--no-verify)"


def _download_lock(sidecar: Path) -> str:
    # An .unverified twin is guarded by the lock of its verified folder.
    return layout.download_lock(layout.verified_twin(sidecar.parent.name))


def _quarantine_download(cache: Cache, sidecar: Path, label: str) -> Check:
    path = described(sidecar)
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
        for manifest in (read_unchecked(entry), read_set_aside(entry)):
            if manifest is None:
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
        filename = layout.sidecar_of(sidecar.name)
        if name is not None:
            base = layout.verified_twin(folder)
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
                if layout.is_temporary(child) or child.endswith(layout.PARTIAL_SUFFIX):
                    found.append(Path(dirpath) / child)
            dirnames[:] = [d for d in dirnames if not layout.is_temporary(d)]
    return sorted(found)


def _named(path: Path) -> list[Path]:
    """The children of ``path`` that datapipe may have written, links included."""
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def links(cache: Cache, name: str | None = None, folders: Iterable[str] = ()) -> list[Path]:
    """Symbolic links where the cache keeps its folders (of ``name``; all when None).

    Never followed (they may lead outside the cache); every walk above skips them, so
    they are listed here for verify and ``cache ls`` to report: prepared/<name>, its
    versions and entries, splits/<name> and download folders (with ``name``: those of
    ``folders`` and their ``.unverified`` twins).
    """
    found: list[Path] = []
    if name is not None:
        check_name(name)
        recipes = [cache.path(layout.recipe_folder(name), link_ok=True)]
        splits = [cache.path(layout.plan_folder(name), link_ok=True)]
        downloads = [cache.path(layout.download_folder(folder, verified), link_ok=True)
                     for folder in sorted(set(folders)) for verified in (True, False)]
    else:
        recipes, splits, downloads = (_named(cache.prepared), _named(cache.splits),
                                      _named(cache.downloads))
    for recipe_dir in recipes:
        if recipe_dir.is_symlink():
            found.append(recipe_dir)
            continue
        for version_dir in _named(recipe_dir) if recipe_dir.is_dir() else ():
            if version_dir.is_symlink():
                found.append(version_dir)
            elif version_dir.is_dir():
                found += (entry for entry in _named(version_dir) if entry.is_symlink())
    found += (p for p in (*splits, *downloads) if p.is_symlink())
    return sorted(found)


def verify(cache: Cache, name: str | None = None, folders: Iterable[str] = ()) -> list[Check]:
    """Check the prepared entries, downloads and split plans of ``name`` (all when None)."""
    if name is not None:
        check_name(name)
    return [*verify_prepared(cache, name), *verify_downloads(cache, name, folders),
            *(Check("splits", *c) for c in verify_plans(cache, name)),
            *(Check("link", str(p.relative_to(cache.root)), p, LINK, LINK_DETAIL)
              for p in links(cache, name, folders))]
