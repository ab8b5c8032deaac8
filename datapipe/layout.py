"""The cache's layout: what every file, folder and lock of the cache is called.

Every path under a cache root and every lock key is made here and nowhere else. The
functions are pure: checked names in, relative parts (a tuple of plain names) out;
nothing here touches a disk. ``Cache.path(parts)`` (``datapipe.cache``) joins parts to
a local path under the root, refusing links and anything that leads outside it;
``key(parts)`` joins them with ``/``, the shape an object store (an fsspec URL as the
root) takes them in, so one layout serves both.

The cache on disk (``<...>``: checked names; the functions that make each)::

    downloads/                                              DOWNLOADS
      <algo>-<hex>/<file>                  verified bytes   download_file(key, file)
      <algo>-<hex>/<file>.json             its sidecar,     sidecar(key, file)
                                           written last
      <algo>-<hex>/<file>.partial          an interrupted   partial(key, file)
                                           download
      <algo>-<hex>.unverified/<file>       kept with        download_file(key, file,
                                           --no-verify          verified=False)
      unchecked-<16 hex>/<file>            a resource with  unchecked_key(ident)
                                           no checksum
      .source-digests/<16 hex>.json        --source digests source_digest_memo(memo_id)
                                           memo, by stat
    prepared/                                               PREPARED
      <name>/<version>/<fp>/               an entry         entry(name, version, fp)
        manifest.json                      written last     manifest(name, version, fp)
        manifest.json.corrupt              set aside        set_aside(MANIFEST)
        <split>.arrow                      its data (the save stage names it)
        <split>-00007-of-01000.arrow       or its shards    shard_name(split, 7, 1000)
      <name>/<version>/.work-<fp>/         shards of an     work_folder(name, version, fp)
                                           unfinished
                                           sharded prepare
        plan.json                          its tasks        SHARD_PLAN
        <split>-00007-of-01000.arrow       a finished shard shard_name(split, 7, 1000)
        <split>-00007-of-01000.json        and its summary  shard_summary_name(shard)
    on an object store (the root an fsspec URL), an entry's data files are objects
    named by content, under the same entry; its manifest is the same file:
      <name>/<version>/<fp>/objects/<sha256>   a data file  stored_object(name, version,
                                                               fp, sha256)
      <name>/<version>/<fp>/parts/part-00001-of-00003.json    part_record(name, version,
                                           one machine's part     fp, 1, 3)
                                           of a sharded prepare,
                                           written last (removed
                                           once the entry is)
    splits/                                                 SPLITS
      <name>/<plan-id>.json                a split plan     plan_file(name, plan_id)
      <name>/<plan-id>.json.corrupt        moved aside      set_aside(plan file name)
    locks/                                                  LOCKS
      <lock key>.lock                      a lock file      lock_file(lock_key)
      <lock key>.lock.holder               who holds it     holder_name(lock file name)
    any of the above, as
      .tmp-<final>-<pid>-<token>           a temporary      temporary_name(final, ...)
                                           sibling of it

Lock keys (file names under ``locks/``), one per thing that is written::

    prepare-<name>-<version>-<fp>          entry <fp>: prepare, verify,   prepare_lock(...)
                                           set aside, cache rm
    prepare-<name>-<version>-<fp>-shard-00007   one shard of it           shard_lock(..., 7)
    download-<folder key>                  downloads/<folder key> and     download_lock(key)
                                           its .unverified twin
    splits-<name>-<plan-id>                a split plan                   plan_lock(name, id)

A name is never a path. What may name a part (``check_name``, ``check_file_name``,
``check_hex``) is decided here too: names come from users and from files read back
(manifests, sidecars, plans), so each is matched against a strict pattern before it
names anything; the hidden names (``.work-``, ``.tmp-``, ``.source-digests``) are made
only by this module, never taken from outside. tests/test_layout.py pins the table.

Standard library only: every command's fast path runs through it.
"""

from __future__ import annotations

import re

from datapipe.errors import CacheError

Parts = tuple[str, ...]

# The four folders under the root.
DOWNLOADS, PREPARED, SPLITS, LOCKS = "downloads", "prepared", "splits", "locks"

MANIFEST = "manifest.json"
OBJECTS = "objects"  # an entry's content-addressed data objects on an object store
PARTS = "parts"  # the part records of a sharded prepare on an object store
CORRUPT_SUFFIX = ".corrupt"  # manifest.json -> manifest.json.corrupt: set aside
SIDECAR_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
UNVERIFIED_SUFFIX = ".unverified"
UNCHECKED_PREFIX = "unchecked-"
SOURCE_DIGESTS = ".source-digests"
WORK_PREFIX = ".work-"
SHARD_PLAN = "plan.json"
PLAN_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
HOLDER_SUFFIX = ".holder"
TMP_PREFIX = ".tmp-"

# What may name a folder or file under the cache root. Names come from users (a dataset
# name on the command line) and from files we read back (manifests, sidecars, split
# plans), so each is matched against a strict pattern before it names anything on disk:
# never a path, never "..", never hidden, never empty.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")  # recipes, versions
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")  # files we write or fetch
HEX_PATTERN = re.compile(r"[0-9a-f]{8,128}")  # fingerprints, split ids, digests
ALGORITHMS = ("md5", "sha256")  # download checksums we compute
_PART_RECORD = re.compile(r"part-(\d{5})-of-(\d{5})\.json")
_TEMPORARY = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<final>.+)-\d+-[0-9a-f]+$")


# ------------------------------------------------------------------ names


def check_name(name: object, what: str = "dataset name") -> str:
    """``name`` if it is a plain name (lowercase letters, digits, ``-_.``); else CacheError.

    A name is never a path: ``/abs/dir``, ``../..``, ``a/b`` and ``.hidden`` are refused,
    so nothing a user types can make the cache touch a folder outside its root.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        lower = name.lower() if isinstance(name, str) else ""
        example = lower if NAME_PATTERN.fullmatch(lower) and ".." not in lower else "mnist"
        raise CacheError(f"{what} {name!r} is not a plain name (lowercase letters, digits, "
                         f"'-', '_' and '.'; never a path); give the name, for example "
                         f"{example}")
    return name


def check_file_name(name: object, what: str = "file name") -> str:
    """``name`` if it is a plain file name (no folder, not hidden); else CacheError."""
    if not isinstance(name, str) or not FILE_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise CacheError(f"{what} {name!r} is not a plain file name")
    return name


def check_hex(value: object, what: str = "digest") -> str:
    """``value`` if it is lowercase hex of a plausible length; else CacheError."""
    if not isinstance(value, str) or not HEX_PATTERN.fullmatch(value):
        raise CacheError(f"{what} {value!r} is not a hex digest")
    return value


def check_algorithm(value: object) -> str:
    """``value`` if it is a checksum algorithm datapipe uses; else CacheError."""
    if value not in ALGORITHMS:
        raise CacheError(f"checksum algorithm {value!r} is not one of {', '.join(ALGORITHMS)}")
    return value  # type: ignore[return-value]


def key(parts: Parts) -> str:
    """``a/b/c``: the parts as one object-store key (relative to the root)."""
    return "/".join(parts)


# ------------------------------------------------------------------ downloads


def checked_key(algorithm: str, checksum: str) -> str:
    """``<algo>-<hex>``: the downloads/ folder of bytes with this declared checksum."""
    return f"{check_algorithm(algorithm)}-{check_hex(checksum, 'checksum')}"


def unchecked_key(ident: str) -> str:
    """``unchecked-<hex>``: the downloads/ folder of a resource declaring no checksum;
    ``ident`` is a fingerprint of what the resource is (see Download.folder_key)."""
    return f"{UNCHECKED_PREFIX}{check_hex(ident, 'resource fingerprint')}"


def download_folder(folder_key: str, verified: bool = True) -> Parts:
    """``downloads/<key>``, or its ``.unverified`` twin (kept with --no-verify)."""
    folder = check_file_name(folder_key, "download folder")
    return DOWNLOADS, folder if verified else unverified_twin(folder)


def download_file(folder_key: str, filename: str, verified: bool = True) -> Parts:
    """``downloads/<key>/<file>`` (``verified=False``: in the ``.unverified`` twin)."""
    return (*download_folder(folder_key, verified),
            check_file_name(filename, "download file name"))


def sidecar(folder_key: str, filename: str, verified: bool = True) -> Parts:
    """``downloads/<key>/<file>.json``: what is known of the file; written last."""
    *folder, name = download_file(folder_key, filename, verified)
    return (*folder, sidecar_name(name))


def partial(folder_key: str, filename: str) -> Parts:
    """``downloads/<key>/<file>.partial``: an interrupted download, continued next time."""
    *folder, name = download_file(folder_key, filename)
    return (*folder, partial_name(name))


def sidecar_name(filename: str) -> str:
    return filename + SIDECAR_SUFFIX


def partial_name(filename: str) -> str:
    return filename + PARTIAL_SUFFIX


def sidecar_of(name: str) -> str | None:
    """The file a sidecar named ``name`` describes; None if ``name`` is no sidecar name."""
    if not name.endswith(SIDECAR_SUFFIX) or name.startswith(TMP_PREFIX):
        return None
    return name[:-len(SIDECAR_SUFFIX)]


def is_unverified_folder(folder_name: str) -> bool:
    return folder_name.endswith(UNVERIFIED_SUFFIX)


def unverified_twin(folder_key: str) -> str:
    """``<key>.unverified``: where bytes kept with --no-verify despite a mismatch go."""
    return folder_key + UNVERIFIED_SUFFIX


def verified_twin(folder_name: str) -> str:
    """The download folder key of ``folder_name`` (itself, or the verified folder of an
    ``.unverified`` twin: the two share one lock)."""
    return folder_name.removesuffix(UNVERIFIED_SUFFIX)


def source_digest_memo(memo_id: str) -> Parts:
    """``downloads/.source-digests/<id>.json``: a --source file's digest, memoized by stat."""
    return DOWNLOADS, SOURCE_DIGESTS, f"{check_hex(memo_id, 'memo id')}.json"


# ------------------------------------------------------------------ prepared entries


def recipe_folder(name: str) -> Parts:
    """``prepared/<name>``."""
    return PREPARED, check_name(name, "recipe name")


def version_folder(name: str, version: str) -> Parts:
    """``prepared/<name>/<version>``."""
    return (*recipe_folder(name), check_name(version, "recipe version"))


def entry(name: str, version: str, fp: str) -> Parts:
    """``prepared/<name>/<version>/<fp>``: a prepared entry (trusted once its manifest is)."""
    return (*version_folder(name, version), check_hex(fp, "fingerprint"))


ENTRY_DEPTH = 4  # entry() has four parts: the root is an entry folder's 4th parent


def manifest(name: str, version: str, fp: str) -> Parts:
    """``prepared/<name>/<version>/<fp>/manifest.json``."""
    return (*entry(name, version, fp), MANIFEST)


def stored_object(name: str, version: str, fp: str, sha256: str) -> Parts:
    """``prepared/<name>/<version>/<fp>/objects/<sha256>``: a data file of entry ``fp`` on
    an object store, named by its content so that racing publishers write the same bytes
    to the same key (datapipe.remote.publish)."""
    return (*entry(name, version, fp), OBJECTS, check_hex(sha256, "sha256"))


def parts_folder(name: str, version: str, fp: str) -> Parts:
    """``prepared/<name>/<version>/<fp>/parts``: on an object store, the records of the
    parts of a sharded prepare of entry ``fp`` not yet published (datapipe.remote.parts)."""
    return (*entry(name, version, fp), PARTS)


def part_record_name(index: int, count: int) -> str:
    """``part-00001-of-00003.json``: the record of part ``index`` of ``count``."""
    if not 0 <= index < count <= 99999:
        raise CacheError(f"part {index} of {count} is not a part of a sharded prepare")
    return f"part-{index:05d}-of-{count:05d}.json"


def part_record(name: str, version: str, fp: str, index: int, count: int) -> Parts:
    """``prepared/<name>/<version>/<fp>/parts/part-00001-of-00003.json``."""
    return (*parts_folder(name, version, fp), part_record_name(index, count))


def part_of(record_name: str) -> tuple[int, int] | None:
    """(index, count) of a part record named ``record_name``; None if it is none."""
    match = _PART_RECORD.fullmatch(record_name)
    if match is None:
        return None
    index, count = int(match[1]), int(match[2])
    return (index, count) if 0 <= index < count else None


def set_aside(file_name: str) -> str:
    """``<file>.corrupt``: the name a manifest or split plan is moved to when refused."""
    return file_name + CORRUPT_SUFFIX


def work_folder(name: str, version: str, fp: str) -> Parts:
    """``prepared/<name>/<version>/.work-<fp>``: shards written before entry ``fp`` is."""
    return (*version_folder(name, version), WORK_PREFIX + check_hex(fp, "fingerprint"))


def work_fingerprint(folder_name: str) -> str | None:
    """The fingerprint of a work folder named ``folder_name``; None if it is none."""
    return folder_name[len(WORK_PREFIX):] if folder_name.startswith(WORK_PREFIX) else None


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00007-of-01000.arrow``: shard ``index`` of ``count``."""
    return f"{split}-{index:05d}-of-{count:05d}.arrow"


def shard_summary_name(shard: str) -> str:
    """``train-00007-of-01000.json``: a finished shard's summary, written after it."""
    stem, dot, _ = shard.rpartition(".")
    return f"{stem if dot else shard}.json"


# ------------------------------------------------------------------ split plans


def plan_folder(name: str) -> Parts:
    """``splits/<name>``."""
    return SPLITS, check_name(name)


def plan_file(name: str, plan_id: str) -> Parts:
    """``splits/<name>/<plan-id>.json``."""
    return (*plan_folder(name), f"{check_hex(plan_id, 'split plan id')}{PLAN_SUFFIX}")


def plan_id_of(file_name: str) -> str:
    """The plan id a file of ``splits/<name>/`` is named after (unchecked)."""
    return file_name.removesuffix(PLAN_SUFFIX)


# ------------------------------------------------------------------ locks


def lock_file(lock_key: str) -> Parts:
    """``locks/<key>.lock``."""
    return LOCKS, f"{check_file_name(lock_key, 'lock name')}{LOCK_SUFFIX}"


def holder_name(lock_file_name: str) -> str:
    """``<key>.lock.holder``: who holds the lock (pid, host, since), beside its file."""
    return lock_file_name + HOLDER_SUFFIX


def prepare_lock(name: str, version: str, fp: str) -> str:
    """The lock held while the entry ``prepared/<name>/<version>/<fp>`` is written.

    Whatever changes an entry (prepare, ``datapipe verify`` or a reader setting it
    aside, ``datapipe cache rm``) holds this lock.
    """
    return f"prepare-{name}-{version}-{fp}"


def shard_lock(name: str, version: str, fp: str, index: int) -> str:
    """The lock held while shard ``index`` of entry ``fp`` is written."""
    return f"{prepare_lock(name, version, fp)}-shard-{index:05d}"


def download_lock(folder_key: str) -> str:
    """The lock guarding ``downloads/<folder_key>`` and its ``.unverified`` twin."""
    return f"download-{folder_key}"


def plan_lock(name: str, plan_id: str) -> str:
    """The lock held while the split plan ``splits/<name>/<plan-id>.json`` is written."""
    return f"splits-{name}-{plan_id}"


# ------------------------------------------------------------------ temporaries


def temporary_name(final: str, pid: int, token: str) -> str:
    """``.tmp-<final>-<pid>-<token>``: where ``final`` is written before its rename."""
    return f"{TMP_PREFIX}{final}-{pid}-{token}"


def temporaries_of(final: str) -> str:
    """The glob pattern of the temporaries of ``final`` (left by killed processes)."""
    return f"{TMP_PREFIX}{final}-*"


def is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def temporary_target(name: str) -> str | None:
    """The final name a temporary named ``name`` was written for; None if it is none."""
    match = _TEMPORARY.match(name)
    return match["final"] if match else None
