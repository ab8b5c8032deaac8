"""Sharded prepare on many machines that share only an object store.

``datapipe prepare NAME --num-shards N --shard-index I --cache-dir s3://bucket/prefix`` on
N machines, each with its own local disk: each run writes the shards of its part
(shards I, I + N, ...) into its local cache (``datapipe.prepare_sharded``, resumable as
there), uploads them as the entry's content-addressed data objects, and then creates its
part record::

    prepared/<name>/<version>/<fp>/objects/<sha256>                  each shard's bytes
    prepared/<name>/<version>/<fp>/parts/part-00001-of-00003.json    part 1's record, last
    prepared/<name>/<version>/<fp>/manifest.json                     once every part is in

* **A part is whole or absent.** Its record (each shard's name, rows, summary and
  digests) is created after every object it names is in place with its size checked,
  with a conditional create (``If-None-Match``): a duplicate run of the same part finds
  the record there and leaves it. A killed run leaves objects and no record; no reader
  or assembler uses those, and the rerun uploads only the objects still missing.
* **The run that completes the set publishes.** After creating its record, a run lists
  the parts; if all N are there it reads them, checks each (same recipe, version,
  split, fingerprint and N; the shards of that part, named as the plan names them; digests
  that fit; each object present with the recorded size, by a HEAD), and creates the
  manifest, naming the parts' objects as the entry's data files. Nothing is downloaded
  or uploaded again. Two runs completing at once create one manifest between them; the
  other finds it and says so. The part records are removed after the manifest is in.
* **Parts never mix.** The records lie under the entry's fingerprint, so a machine that
  prepared other files or other options writes under another fingerprint (and is named
  in the progress line); a record that says another fingerprint or N, or does not fit
  what it claims, is refused in one line and nothing is published.

The manifest is the one a prepare on a single machine writes (``manifest_record``), so a
reader sees an ordinary published entry. ``prepare_part`` is the entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datapipe import layout
from datapipe.cache import now_iso
from datapipe.errors import CacheError, ConfigError
from datapipe.integrity import DamagedChunk, FileDigests, check_file
from datapipe.manifest import manifest_bytes, manifest_record
from datapipe.prepare import _checksum_list, _fetch, split_fingerprint
from datapipe.prepare_sharded import (
    check_part,
    remove_shard,
    shard_names,
    shard_summary,
    work_dir,
    write_part,
)
from datapipe.remote.publish import ALREADY, PUBLISHED, object_key
from datapipe.remote.reader import RemoteCache
from datapipe.remote.store import Store
from datapipe.stages.download import FetchOptions

if TYPE_CHECKING:
    from datapipe.recipe import Recipe

log = logging.getLogger("datapipe")

PART_FORMAT = "datapipe-part/1"
RECORD_LIMIT = 16 << 20  # bytes: a part of a thousand shards is well under 1 MiB
OTHER_FINGERPRINTS = 8  # other fingerprints looked at for the progress line


@dataclass(frozen=True)
class PartProgress:
    """Where a sharded prepare on an object store stands after one part's run."""

    split: str
    fingerprint: str
    num_shards: int
    shard_index: int
    present: tuple[int, ...] = ()  # the parts whose records are in the store
    written: int = 0  # shards written on this machine by this call
    uploaded: int = 0  # objects uploaded by this call
    status: str | None = None  # PUBLISHED, ALREADY (published, by any run), or None
    rows: int | None = None  # of the published entry
    where: str = ""  # the entry's URL
    elsewhere: tuple[tuple[str, int, int], ...] = field(default=())  # (fp, parts, of N)

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_shards) if i not in self.present)

    @property
    def published(self) -> bool:
        return self.status == PUBLISHED


def prepare_part(remote: RemoteCache, recipe: Recipe, split: str,
                 options: FetchOptions | None = None, *, num_shards: int, shard_index: int,
                 force: bool = False, processes: int | None = None) -> PartProgress:
    """Prepare part ``shard_index`` of ``num_shards`` of a sharded ``split`` into the store
    of ``remote`` (through its local cache); publish the entry if this completes the set.

    ``force`` writes and uploads this part's shards again, replaces its record (and the
    records of another N, which otherwise refuse the run), and replaces the manifest
    when the set it completes is published already.
    """
    check_part(recipe, num_shards, shard_index)
    options = options or FetchOptions()
    store = remote.store
    started = time.perf_counter()
    if not force and (found := _published(remote, recipe, split, options)) is not None:
        parts, manifest = found
        return PartProgress(split, parts[-1], num_shards, shard_index, status=ALREADY,
                            rows=manifest.get("rows"), where=store.where(store.key(*parts)))
    cache = remote.local
    local = _fetch(recipe, split, recipe.clean.files_for(split), cache, options)
    known = {name: (f.algorithm, f.checksum) for name, f in local.items()}
    fp = split_fingerprint(recipe, split, _checksum_list(known))
    entry = layout.entry(recipe.name, recipe.version, fp)
    where = store.where(store.key(*entry))
    base = PartProgress(split, fp, num_shards, shard_index, where=where)
    manifest_key = store.key(*layout.manifest(*entry[1:]))
    if not force and store.exists(manifest_key):
        return _already(remote, base, entry)
    present = _present(store, recipe, split, entry, num_shards, force)
    written = uploaded = 0
    work = work_dir(cache, recipe, fp)
    if not force and shard_index in present:  # a duplicate run: the part is in already
        names = shard_names(recipe, split, cache, local, fp)
        for i in range(shard_index, len(names), num_shards):  # left by a killed cleanup
            remove_shard(work, names[i])
        _remove_if_only_the_plan(work)
    else:
        names, mine, written = write_part(recipe, split, cache, local, fp, options,
                                          part=(num_shards, shard_index), force=force,
                                          processes=processes)
        summaries = [shard_summary(work, names[i]) for i in mine]
        if any(s is None for s in summaries):  # write_part wrote every one, or raised
            raise CacheError(f"{recipe.name} {split}: the shards of part {shard_index} in "
                             f"{work} are not all finished; run the prepare again")
        uploaded = _upload(store, entry, work, summaries, force)
        record = {"format": PART_FORMAT, "recipe": recipe.name, "version": recipe.version,
                  "split": split, "fingerprint": fp, "num_shards": num_shards,
                  "shard_index": shard_index, "total_shards": len(names),
                  "shards": summaries, "created_at": now_iso()}
        key = store.key(*layout.part_record(*entry[1:], shard_index, num_shards))
        if force:
            store.remove(key)
        if not store.create(key, json.dumps(record, sort_keys=True).encode()):
            log.info("%s was there already (a duplicate run of part %d); kept it",
                     store.where(key), shard_index)
        for i in mine:  # the store holds them now; the local copy was only the way there
            remove_shard(work, names[i])
        _remove_if_only_the_plan(work)
        present = _present(store, recipe, split, entry, num_shards, force=False)
    base = PartProgress(split, fp, num_shards, shard_index, tuple(sorted(present)), written,
                        uploaded, where=where)
    if len(present) < num_shards:
        if not force and store.exists(manifest_key):  # completed meanwhile, records gone
            return _already(remote, base, entry)
        return dataclasses.replace(base, elsewhere=_elsewhere(store, recipe, split, fp))
    return _assemble(remote, recipe, split, local, entry, names, base, started, force)


# ------------------------------------------------------------------ looking


def _published(remote: RemoteCache, recipe: Recipe, split: str,
               options: FetchOptions) -> tuple[layout.Parts, dict[str, Any]] | None:
    """The store's published entry of ``split`` found without fetching anything."""
    from datapipe.remote.sync import find_split

    parts = find_split(remote, recipe, split, options)
    manifest = remote.manifest(parts) if parts is not None else None
    return (parts, manifest) if manifest is not None else None


def _already(remote: RemoteCache, base: PartProgress, entry: layout.Parts) -> PartProgress:
    manifest = remote.manifest(entry) or {}
    return dataclasses.replace(base, status=ALREADY, rows=manifest.get("rows"),
                               present=tuple(range(base.num_shards)))


def _present(store: Store, recipe: Recipe, split: str, entry: layout.Parts, num_shards: int,
             force: bool) -> set[int]:
    """The parts of ``num_shards`` whose records the store holds for ``entry``.

    Records of another N refuse the run in one line (``force`` removes them instead):
    parts of different N hold different shards and never make a set together.
    """
    found: dict[int, set[int]] = {}
    for name in store.list_names(*layout.parts_folder(*entry[1:])):
        part = layout.part_of(name)
        if part is not None:
            found.setdefault(part[1], set()).add(part[0])
    others = sorted(n for n in found if n != num_shards)
    if others and force:
        for n in others:
            for i in sorted(found[n]):
                store.remove(store.key(*layout.part_record(*entry[1:], i, n)))
        log.warning("%s %s: removed the records of %s part(s) made with --num-shards %s "
                    "(--force)", recipe.name, split, sum(len(found[n]) for n in others),
                    ", ".join(map(str, others)))
    elif others:
        n = others[0]
        raise ConfigError(
            f"{recipe.name} {split}: the object store holds {len(found[n])} part(s) of this "
            f"entry ({entry[-1]}) made with --num-shards {n}, not {num_shards}; run every "
            f"part with --num-shards {n}, or start over with --force on every part")
    return found.get(num_shards, set())


def _elsewhere(store: Store, recipe: Recipe, split: str,
               fp: str) -> tuple[tuple[str, int, int], ...]:
    """Parts of ``split`` under other fingerprints: machines that prepared other files or
    options, whose parts never join this set. (fp, parts present, of N), a few at most."""
    found = []
    names = [n for n in store.list_names(*layout.version_folder(recipe.name, recipe.version))
             if n != fp]
    for other in names[:OTHER_FINGERPRINTS]:
        try:
            entry = layout.entry(recipe.name, recipe.version, other)
        except CacheError:
            continue
        parts = [p for n in store.list_names(*layout.parts_folder(*entry[1:]))
                 if (p := layout.part_of(n)) is not None]
        if not parts:
            continue
        index, count = parts[0]
        record = _read_record(store, store.key(*layout.part_record(*entry[1:], index, count)))
        if isinstance(record, dict) and record.get("split") == split:
            found.append((other, sum(1 for p in parts if p[1] == count), count))
    return tuple(found)


# ------------------------------------------------------------------ one part


def _upload(store: Store, entry: layout.Parts, work: Path, summaries: Sequence[dict[str, Any]],
            force: bool) -> int:
    """Upload the shards of this part as the entry's objects; how many were uploaded.

    An object already there with the shard's size holds its bytes (the key is their
    sha256: a killed run's, or a duplicate run's); ``force`` uploads every one again.
    Each shard is read against its digests first: nothing damaged is uploaded.
    """
    uploaded = 0
    for summary in summaries:
        digests = FileDigests.of_record(summary["file"], summary)
        key = object_key(store, entry, digests.sha256)
        if not force and store.size(key) == digests.size:
            continue
        path = work / digests.name
        try:
            check_file(path, digests)
        except DamagedChunk as e:
            raise CacheError(f"{path} is damaged ({e.detail}); run this part again with "
                             f"--force to write it again") from None
        store.put_file(path, key)
        if store.size(key) != digests.size:
            raise CacheError(f"object store {store.url}: {store.where(key)} does not have "
                             f"the {digests.size} bytes uploaded; run this part again")
        uploaded += 1
    return uploaded


def _remove_if_only_the_plan(work: Path) -> None:
    """Remove the local work folder once it holds nothing but the shard plan."""
    with contextlib.suppress(OSError):
        if {p.name for p in work.iterdir()} <= {layout.SHARD_PLAN}:
            (work / layout.SHARD_PLAN).unlink(missing_ok=True)
            work.rmdir()


# ------------------------------------------------------------------ the set


def _read_record(store: Store, key: str) -> object:
    """The parsed part record at ``key``; None if absent, refused if oversized."""
    size = store.size(key)
    if size is None:
        return None
    if size > RECORD_LIMIT:
        raise CacheError(f"object store {store.url}: {store.where(key)} has {size} bytes, "
                         f"more than the {RECORD_LIMIT} a part record may have; remove it "
                         f"and run that part again")
    data = store.read(key, RECORD_LIMIT)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return "not JSON"


def _rows(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_record(record: object, recipe: Recipe, split: str, fp: str, index: int,
                  num_shards: int, names: Sequence[str]) -> list[dict[str, Any]]:
    """The shard summaries of part ``index``'s record, once it fits this set; else the
    reason it does not (ValueError)."""
    if not isinstance(record, dict) or record.get("format") != PART_FORMAT:
        raise ValueError("not a datapipe part record")
    claims = {"recipe": recipe.name, "version": recipe.version, "split": split,
              "fingerprint": fp, "num_shards": num_shards, "shard_index": index,
              "total_shards": len(names)}
    for name, expected in claims.items():
        if record.get(name) != expected:
            raise ValueError(f"it says {name} {record.get(name)!r}, this set has {expected!r}")
    shards = record.get("shards")
    mine = range(index, len(names), num_shards)
    if not isinstance(shards, list) or len(shards) != len(mine):
        raise ValueError(f"it lists {len(shards) if isinstance(shards, list) else 'no'} "
                         f"shards, part {index} of {num_shards} has {len(mine)}")
    for k, summary in zip(mine, shards, strict=True):
        if not isinstance(summary, dict) or summary.get("file") != names[k]:
            got = summary.get("file") if isinstance(summary, dict) else summary
            raise ValueError(f"it names shard {str(got)[:80]!r} where {names[k]} belongs")
        try:
            digests = FileDigests.of_record(names[k], summary)
        except CacheError as e:
            raise ValueError(str(e)) from None
        rows = _rows(summary.get("rows"))
        if rows is None or not 0 <= rows <= digests.size:  # a row takes a byte at least
            raise ValueError(f"{names[k]} has {summary.get('rows')!r} rows in "
                             f"{digests.size} bytes")
    return shards


def _assemble(remote: RemoteCache, recipe: Recipe, split: str, local: dict, entry: layout.Parts,
              names: Sequence[str], base: PartProgress, started: float,
              force: bool) -> PartProgress:
    """Every part is in: check each against ``names`` (the shards this machine's plan
    names), then create the manifest naming their objects."""
    store, fp, num_shards = remote.store, base.fingerprint, base.num_shards
    manifest_key = store.key(*layout.manifest(*entry[1:]))
    summaries: list[dict[str, Any] | None] = [None] * len(names)
    for index in range(num_shards):
        key = store.key(*layout.part_record(*entry[1:], index, num_shards))
        record = _read_record(store, key)
        if record is None:  # removed since the listing: a racing completer published
            if store.exists(manifest_key):
                return _already(remote, base, entry)
            raise CacheError(f"object store {store.url}: {store.where(key)} went away while "
                             f"the set was assembled; run part {index} again")
        try:
            shards = _check_record(record, recipe, split, fp, index, num_shards, names)
        except ValueError as e:
            raise CacheError(_refusal(store, key, recipe, index, num_shards, str(e))) from None
        for k, summary in zip(range(index, len(names), num_shards), shards, strict=True):
            summaries[k] = summary
    files = {}
    for k, summary in enumerate(summaries):
        digests = FileDigests.of_record(names[k], summary)
        size = store.size(object_key(store, entry, digests.sha256))
        if size != digests.size:
            index = k % num_shards
            have = "is missing" if size is None else f"has {size} bytes"
            raise CacheError(_refusal(store, store.key(*layout.part_record(
                *entry[1:], index, num_shards)), recipe, index, num_shards,
                f"the object of {names[k]} {have}, the record says {digests.size}"))
        files[names[k]] = digests
    try:
        extra = recipe.clean.finish(split, {n: f.path for n, f in local.items()}, summaries)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CacheError(f"{recipe.name} {split}: the part records of {base.where} do not "
                         f"describe their shards as this recipe does ({type(e).__name__}: "
                         f"{str(e)[:80]}); nothing was published; run every part again "
                         f"with --force") from None
    manifest = manifest_record(recipe, split, fp, local, started,
                               rows=sum(int(s["rows"]) for s in summaries),
                               data_file=names[0], shards=list(names), files=files, **extra)
    if force:
        store.remove(manifest_key)
    if not store.create(manifest_key, manifest_bytes(manifest)):
        log.info("%s was published meanwhile by another part's run", base.where)
        return _already(remote, base, entry)
    for index in range(num_shards):  # the entry is published: its records are done with
        with contextlib.suppress(CacheError):
            store.remove(store.key(*layout.part_record(*entry[1:], index, num_shards)))
    log.info("published %s %s (%s) to %s from %d parts", recipe.name, split, fp, base.where,
             num_shards)
    return dataclasses.replace(base, status=PUBLISHED, rows=manifest["rows"])


def _refusal(store: Store, key: str, recipe: Recipe, index: int, num_shards: int,
             problem: str) -> str:
    return (f"object store {store.url}: {store.where(key)} is refused ({problem}); nothing "
            f"was published; run that part again: `datapipe prepare {recipe.name} "
            f"--num-shards {num_shards} --shard-index {index} --force --cache-dir "
            f"{store.url}`")
