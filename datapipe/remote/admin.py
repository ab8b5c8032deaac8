"""``datapipe cache ls``, ``cache rm`` and ``verify`` on an object-store cache root.

    datapipe cache ls [NAME] --cache-dir s3://bucket/prefix   # from the manifests alone
    datapipe cache rm NAME [--version V] --cache-dir s3://...  # manifest first, then objects
    datapipe verify [NAME] --cache-dir s3://...                # every object, streamed

* **Listing reads manifests only.** One listing per folder and one GET per manifest (at
  most ``MANIFEST_LIMIT`` bytes); no data object is downloaded, sizes are the ones the
  manifests record. A manifest that cannot be trusted (``reader._problem``, plus the
  names and counts it shows) is listed as corrupt with nothing of what it says; keys
  that are not names datapipe writes are skipped, never followed.
* **Removal takes the manifest first.** With the manifest gone no reader finds the
  entry, so no reader ever holds a manifest naming deleted objects; then its objects go.
  A ``rm`` killed between leaves objects without a manifest: never used, not listed as
  an entry (``cache ls`` counts them as leftovers), removed by the next ``rm`` and
  reused by the next publish of the same entry (their names are their sha256). A rm
  racing a publish of the same entry on another machine may leave that publisher's
  manifest naming objects the rm deleted: readers then refuse the entry in one line
  (an object is missing) and ``datapipe prepare NAME --force`` publishes it again.
* **Verification streams.** Each object's size is looked up first (a mismatch is found
  without reading), then its bytes are read by ranges of ``RANGE_BYTES`` and checked
  chunk by chunk against the manifest's digests (``integrity.check_stream``): memory
  stays bounded whatever the manifest claims. The bytes read pass through a temporary
  file (local disk the size of the largest object), memory-mapped to count the Arrow
  rows against the manifest's. Nothing in the
  store is changed: readers check every object on arrival anyway, so damage is never
  served; the fix is a publish with ``--force``.

Nothing here imports torch; s3fs loads only when a store is opened.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datapipe import layout
from datapipe.cache import HEX_PATTERN, NAME_PATTERN, check_file_name, check_name
from datapipe.errors import CacheError
from datapipe.integrity import DamagedChunk, FileDigests, arrow_rows, check_stream, digests_of
from datapipe.manifest import MANIFEST_FORMAT, _check_sources
from datapipe.remote import reader
from datapipe.remote.publish import object_key
from datapipe.remote.store import Store
from datapipe.verify import CORRUPT, INCOMPLETE, OK, Check

log = logging.getLogger("datapipe")

TRUSTED, DAMAGED = "trusted", "corrupt"
RANGE_BYTES = 8 << 20  # bytes per ranged GET while verifying (and at most held at once)


@dataclass(frozen=True)
class StoreEntry:
    """One published entry, as ``cache ls`` shows it (from its manifest alone)."""

    recipe: str
    version: str
    split: str | None
    fingerprint: str
    rows: int | None
    bytes: int | None  # what the manifest records of its data objects
    verified: bool | None
    state: str  # trusted, or corrupt (a manifest that cannot be trusted)
    created_at: str | None
    path: str  # the entry's URL
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Listing:
    entries: list[StoreEntry]
    leftovers: list[str]  # entry prefixes with objects and no manifest (killed publish/rm)
    leftover_bytes: int = 0  # what their objects hold, from the listings (nothing read)
    # entry prefixes of a sharded prepare still under way: (url, parts in, parts in all)
    unfinished: list[tuple[str, int, int]] = field(default_factory=list)


# ------------------------------------------------------------------ walking the store


def _names(store: Store, *parts: str, pattern=NAME_PATTERN) -> list[str]:
    """The names under ``parts`` that datapipe could have written; anything else is
    skipped (a hostile or foreign key is never followed)."""
    return [n for n in store.list_names(*parts) if pattern.fullmatch(n) and ".." not in n]


def entry_prefixes(store: Store, name: str | None = None,
                   version: str | None = None) -> list[layout.Parts]:
    """The entry keys ``prepared/<name>/<version>/<fp>`` the store holds (of ``name``)."""
    names = [check_name(name)] if name is not None else _names(store, layout.PREPARED)
    found = []
    for recipe in names:
        versions = [check_name(version, "recipe version")] if version is not None \
            else _names(store, *layout.recipe_folder(recipe))
        for v in versions:
            for fp in _names(store, *layout.version_folder(recipe, v), pattern=HEX_PATTERN):
                found.append(layout.entry(recipe, v, fp))
    return found


def _manifest(store: Store, parts: layout.Parts) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") if the entry's manifest can be trusted; (None, why) if not."""
    key = store.key(*layout.manifest(*parts[1:]))
    size = store.size(key)
    if size is not None and size > reader.MANIFEST_LIMIT:
        return None, f"it has {size} bytes, more than any datapipe manifest"
    data = store.read(key, reader.MANIFEST_LIMIT) if size is not None else None
    if data is None:
        return None, "no manifest"
    try:
        manifest = json.loads(data)
    except ValueError:
        return None, "not a datapipe manifest with a digest"
    problem = reader._problem(manifest, parts)
    if problem:
        return None, problem
    try:
        if manifest.get("format") != MANIFEST_FORMAT:
            raise CacheError(f"its format is not {MANIFEST_FORMAT}")
        check_file_name(manifest.get("split"), "split name")
        rows = manifest.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise CacheError("its row count is not a count")
        _check_sources(manifest.get("sources"))
        if not isinstance(manifest.get("created_at"), str) or \
                not manifest["created_at"].isprintable() or len(manifest["created_at"]) > 64:
            raise CacheError("its creation time is not a time")
    except CacheError as e:
        return None, str(e)
    return manifest, ""


def list_store(store: Store, name: str | None = None) -> Listing:
    """Every published entry (of ``name``), read from the manifests; leftovers apart."""
    entries, leftovers, unfinished = [], [], []
    leftover_bytes = 0
    for parts in entry_prefixes(store, name):
        url = store.where(store.key(*parts))
        names = store.list_names(*parts)
        if layout.MANIFEST not in names:
            records = _part_records(store, parts) if layout.PARTS in names else {}
            if records:  # parts arriving from the machines of a sharded prepare
                counts = {count for _, count in records.values()}
                unfinished.append((url, len(records), max(counts)))
            else:
                leftovers.append(url)
                leftover_bytes += sum(store.list_sizes(*parts, layout.OBJECTS).values())
            continue
        manifest, problem = _manifest(store, parts)
        recipe, version, fp = parts[1:]
        if manifest is None:
            entries.append(StoreEntry(recipe, version, None, fp, None, None, None, DAMAGED,
                                      None, url, problem))
            continue
        sources = manifest["sources"]
        entries.append(StoreEntry(
            recipe, version, manifest["split"], fp, manifest["rows"],
            sum(d.size for d in digests_of(manifest["files"]).values()),
            all(s["verified"] for s in sources) if sources else None, TRUSTED,
            manifest["created_at"], url))
    return Listing(entries, leftovers, leftover_bytes, unfinished)


# ------------------------------------------------------------------ removal


@dataclass
class StoreRemoval:
    entries: list[str]  # entries whose manifest was removed (and then their objects)
    leftovers: list[str]  # objects without a manifest (of a killed publish or rm)
    objects: int = 0
    bytes: int = 0
    skipped: int = 0  # keys under an entry that datapipe does not write: left alone

    @property
    def count(self) -> int:
        return len(self.entries) + len(self.leftovers)


def remove_from_store(store: Store, name: str, version: str | None = None) -> StoreRemoval:
    """Remove ``name``'s published entries (of ``version`` only, if given): each entry's
    manifest first, then its objects (see the module's docstring)."""
    check_name(name)
    if version is not None:
        check_name(version, "recipe version")
    removal = StoreRemoval([], [])
    for parts in entry_prefixes(store, name, version):
        url = store.where(store.key(*parts))
        names = store.list_names(*parts)
        if layout.MANIFEST in names:
            store.remove(store.key(*layout.manifest(*parts[1:])))  # no reader finds it now
            removal.entries.append(url)
        objects = store.list_sizes(*parts, layout.OBJECTS) if layout.OBJECTS in names else {}
        doomed = [n for n in sorted(objects) if HEX_PATTERN.fullmatch(n)]
        # The part records of a sharded prepare go too: left behind, they would name
        # objects removed here, and a later sharded prepare would refuse them.
        records = _part_records(store, parts) if layout.PARTS in names else {}
        removal.skipped += len(objects) - len(doomed) + len(
            set(names) - {layout.MANIFEST, layout.OBJECTS, layout.PARTS})
        if (doomed or records) and url not in removal.entries:
            removal.leftovers.append(url)
        delete_objects(store, [store.key(*layout.part_record(*parts[1:], *part))
                               for part in records.values()])
        delete_objects(store, [object_key(store, parts, n) for n in doomed])
        removal.objects += len(doomed)
        removal.bytes += sum(objects[n] for n in doomed)
    if removal.skipped:
        log.warning("left %d key(s) under %s/%s alone: not names datapipe writes",
                    removal.skipped, store.url, "/".join(layout.recipe_folder(name)))
    return removal


def _part_records(store: Store, parts: layout.Parts) -> dict[str, tuple[int, int]]:
    """The part records under entry ``parts`` by name: (index, count) of each."""
    found = {}
    for record in store.list_names(*parts, layout.PARTS):
        part = layout.part_of(record)
        if part is not None:
            found[record] = part
    return found


def delete_objects(store: Store, keys: list[str]) -> None:
    """Delete data objects (only ever after their manifest is gone)."""
    store.remove_many(keys)


# ------------------------------------------------------------------ verification


def _check_object(store: Store, parts: layout.Parts, digests: FileDigests) -> tuple[str, int]:
    """(why the object of ``digests`` is not what the manifest promised, "" if it is;
    the rows of the Arrow stream it holds).

    The ranges read for the digests are copied into a temporary file as they pass, so
    the rows are counted from the same bytes without a second download (the local
    ``verify`` parses each file too: bytes that match forged digests must still parse).
    The file is memory-mapped to count them, as the local ``verify`` does: only the
    Arrow metadata is read, whatever size the record batches claim.
    """
    key = object_key(store, parts, digests.sha256)
    size = store.size(key)
    if size is None:
        return "the object is missing", 0
    if size != digests.size:
        return f"the object has {size} bytes, the manifest says {digests.size}", 0
    with tempfile.TemporaryDirectory(prefix="datapipe-verify-") as folder:
        path = Path(folder) / "object"
        with path.open("wb") as copy:
            def read(start: int, stop: int) -> bytes:
                data = store.read_range(key, start, stop)
                copy.write(data)
                return data

            try:
                check_stream(read, digests, RANGE_BYTES)
            except DamagedChunk as e:
                return e.detail, 0
            except FileNotFoundError:
                return "the object is missing", 0
        try:
            return "", arrow_rows(path)
        except Exception as e:  # the bytes match their digests but do not parse: forged
            return f"not a readable Arrow file ({e})", 0


def verify_store(store: Store, name: str | None = None) -> list[Check]:
    """Check every published entry (of ``name``): its manifest, then each data object,
    streamed against its digests. One Check per entry that is OK, and one per damaged
    or missing object (or untrustworthy manifest); nothing in the store is changed."""
    checks = []
    for parts in entry_prefixes(store, name):
        recipe, version, fp = parts[1:]
        label = f"{recipe} {version} {fp}"
        url = store.where(store.key(*parts))
        if layout.MANIFEST not in store.list_names(*parts):
            checks.append(Check("prepared", label, url, INCOMPLETE,  # type: ignore[arg-type]
                                "objects without a manifest (a killed publish or rm); never "
                                "used, the next publish or `datapipe cache rm` handles them"))
            continue
        manifest, problem = _manifest(store, parts)
        if manifest is None:
            checks.append(Check("prepared", label, url, CORRUPT,  # type: ignore[arg-type]
                                f"the manifest cannot be trusted ({problem})"))
            continue
        bad = rows = 0
        for digests in digests_of(manifest["files"]).values():
            problem, held = _check_object(store, parts, digests)
            rows += held
            if problem:
                bad += 1
                where = store.where(object_key(store, parts, digests.sha256))
                checks.append(Check("prepared", label, where, CORRUPT,  # type: ignore
                                    f"{digests.name} (objects/{digests.sha256[:12]}...): "
                                    f"{problem}"))
        if not bad and rows != manifest["rows"]:
            checks.append(Check("prepared", label, url, CORRUPT,  # type: ignore[arg-type]
                                f"its data objects hold {rows} rows, the manifest says "
                                f"{manifest['rows']}"))
        elif not bad:
            checks.append(Check("prepared", label, url, OK,  # type: ignore[arg-type]
                                f"{manifest['split']}, {manifest['rows']} rows, "
                                f"{len(manifest['files'])} object(s)"))
    return checks


# ------------------------------------------------------------------ info


def fetch_published(dm) -> list[str]:
    """Fetch into ``dm``'s local cache the published splits of its recipe that it lacks
    (what the data card describes); the splits fetched."""
    from datapipe.prepare import find_prepared
    from datapipe.remote.sync import fetch_split

    fetched = []
    for split in dm.recipe.splits():
        if find_prepared(dm.recipe, split, dm.cache, dm.fetch_options) is not None:
            continue
        if fetch_split(dm.remote, dm.recipe, split, dm.fetch_options) is not None:
            fetched.append(split)
    return fetched


__all__ = ["StoreEntry", "Listing", "StoreRemoval", "list_store", "remove_from_store",
           "verify_store", "fetch_published", "entry_prefixes"]
