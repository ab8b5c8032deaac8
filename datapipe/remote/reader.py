"""Stream prepared entries from an object store into a bounded local cache.

The local cache is an ordinary datapipe cache folder (``local_cache=DIR``): an entry
fetched from the store lands at the same relative path it has there, so everything
downstream (split plans, loaders, ``datapipe verify``) reads it as it reads an entry
prepared on this machine, and later epochs and later runs read it locally.

* Only the entries asked for are fetched (a DataModule asks for the splits it uses).
* Each data object is checked against the chunk digests of its manifest as it arrives,
  before the entry becomes visible; a damaged or truncated one is fetched again (a few
  times, bounded), then refused in one line. The manifest itself is checked (its own
  digest, the names it gives, what it describes) before it names any file, and the
  whole entry once more by the local trust rules (``manifest.trusted``) once in place.
* An entry is assembled in a temporary sibling folder and renamed into place, manifest
  inside, under the same lock a local prepare of that entry holds: two readers sharing
  one local cache fetch it once, and a reader killed mid-download leaves only a
  temporary, which the next one removes under the lock.
* Beyond ``limit`` bytes the least recently used entries are removed (each under its
  lock, by renaming it away first, so a reader sees an entry whole or not at all).
* An entry a reader uses is claimed: its manifest held open with a shared ``flock``
  for as long as the reader (the DataModule's ``RemoteCache``) lives or until
  ``release()`` (a pickled or copied reader claims the same entries again). An
  evictor in any process takes an exclusive ``flock`` without
  waiting before it moves an entry and skips the entry when it cannot, so an entry in
  use is never removed under a run (its files stay for workers that map them later).
  A claim taken on an entry an evictor moved meanwhile is noticed (the manifest held is
  no longer the one at the entry's path) and the entry is fetched again. Where there is
  no ``flock`` (Windows), claims are not enforced and only the entry being fetched is
  kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from datapipe import layout
from datapipe.cache import (
    Cache,
    check_hex,
    publish_dir,
    remove_stale_temporaries,
    temporary_sibling,
)
from datapipe.errors import CacheError, ConfigError, LockTimeoutError
from datapipe.integrity import DamagedChunk, FileDigests, check_file, digests_of
from datapipe.manifest import (
    DIGEST_KEY,
    MANIFEST,
    PreparedSplit,
    manifest_digest,
    manifest_path,
    trusted,
)
from datapipe.remote.publish import object_key
from datapipe.remote.store import Store, transport_errors

try:
    import fcntl
except ImportError:  # Windows: no flock; claims are not enforced there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("datapipe")

MANIFEST_LIMIT = 64 << 20  # bytes: a manifest of a million shards stays far below
ATTEMPTS = 3  # fetches of one object before its damage is believed
FETCH_THREADS = 8  # objects fetched at once
EVICT_LOCK = "local-cache-evict"
EVICT_LOCK_TIMEOUT = 60.0  # seconds
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: object, what: str = "local_cache_limit") -> int | None:
    """Bytes from ``value``: an int, or text such as ``"20GB"``, ``"512MiB"``; None stays."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        unit = match.group(2).lower().rstrip("b")
        size = int(float(match.group(1)) * _UNITS[unit])
        if size > 0:
            return size
    raise ConfigError(f"{what}={value!r} is not a size; give bytes or text such as 20GB "
                      f"or 512MiB")


@dataclass
class RemoteCache:
    """An object-store cache root read through a local cache of at most ``limit`` bytes."""

    store: Store
    local: Cache
    limit: int | None = None
    # entry folder -> its manifest, held open with a shared flock while this reader uses it
    _claims: dict[Path, IO[bytes]] = field(default_factory=dict, init=False, repr=False,
                                           compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (a spawned process, a pickled job, a deepcopy) reads the same entries and
        # may outlive this reader: it claims them again itself (the paths travel).
        return {**self.__dict__, "_claims": list(self._claims)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        claimed = state.pop("_claims", [])
        self.__dict__.update(state, _claims={})
        for path in claimed:
            self._hold(Path(path))  # one moved meanwhile is fetched again on its lookup

    # -------------------------------------------------------------- finding

    def manifest(self, parts: tuple[str, ...]) -> dict[str, Any] | None:
        """The store's manifest of entry ``parts``, checked before it names anything;
        None if there is none. CacheError if it is there but cannot be trusted."""
        found = self._manifest(parts)
        return found[0] if found else None

    def _manifest(self, parts: tuple[str, ...]) -> tuple[dict[str, Any], bytes] | None:
        key = self.store.key(*layout.manifest(*parts[1:]))
        data = self.store.read(key, MANIFEST_LIMIT)
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError:
            manifest = None
        problem = _problem(manifest, parts)
        if problem:
            raise CacheError(f"object store {self.store.url}: {self.store.where(key)} is not "
                             f"a trustworthy datapipe manifest ({problem}); publish the entry "
                             f"again (`datapipe prepare {parts[1]} --force --cache-dir "
                             f"{self.store.url}`)")
        return manifest, data

    def find(self, name: str, version: str, split: str,
             fingerprints: Iterable[str]) -> tuple[str, ...] | None:
        """The entry of ``split`` among ``fingerprints`` that the store holds, if any."""
        for fp in sorted(fingerprints):
            parts = layout.entry(name, version, fp)
            manifest = self.manifest(parts)
            if manifest is not None and manifest.get("split") == split:
                return parts
        return None

    def fingerprints(self, name: str, version: str) -> list[str]:
        """Every fingerprint the store holds entries of (for unverified data)."""
        found = []
        for fp in self.store.list_names(*layout.version_folder(name, version)):
            with contextlib.suppress(CacheError):
                found.append(check_hex(fp, "fingerprint"))
        return found

    # -------------------------------------------------------------- fetching

    def entry_dir(self, parts: tuple[str, ...]) -> Path:
        return self.local.path(parts)

    def fetch(self, parts: tuple[str, ...]) -> PreparedSplit:
        """The local copy of the store's entry ``parts``, fetched and checked if absent,
        and claimed for this reader."""
        entry = self.entry_dir(parts)
        found = trusted(entry)
        if found is None or not self.claim(found):
            with self.local.lock(layout.prepare_lock(*parts[1:]),
                                 f"fetching {'/'.join(parts[1:])} from {self.store.url}"):
                found = trusted(entry)  # another reader sharing this cache fetched it
                if found is None:
                    found = self._fetch_locked(parts, entry)
                if not self.claim(found):  # no evictor moves it while we hold its lock
                    raise CacheError(f"the local cache {self.local.root}: {found.path} "
                                     f"changed while it was locked; run again")
        self.evict(keep={found.path})
        return found

    def claim(self, entry: PreparedSplit) -> bool:
        """Mark ``entry`` (in the local cache) in use by this reader, so that no evictor
        removes it until ``release``; a use, for least-recently-used order. False if it
        is gone or going (an evictor moved it since it was found): fetch it again."""
        if not self._hold(entry.path):
            return False
        touch(entry)
        return True

    def _hold(self, path: Path) -> bool:
        """Hold the manifest of the entry at ``path`` with a shared flock; False if the
        entry is gone or going."""
        if path in self._claims:
            return True
        try:
            held = open(manifest_path(path), "rb")  # held until release()
        except OSError:
            return False
        if fcntl is not None:
            try:
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
                now = os.stat(manifest_path(path))
                mine = os.fstat(held.fileno())
                moved = (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)
            except OSError:  # an evictor holds it now, or it has moved: on its way out
                moved = True
            if moved:
                held.close()
                return False
        self._claims[path] = held
        return True

    def release(self, entry: PreparedSplit | None = None) -> None:
        """Give up the claim on ``entry`` (default: every claim); evictors may take it."""
        for path in [entry.path] if entry is not None else list(self._claims):
            held = self._claims.pop(path, None)
            if held is not None:
                held.close()

    def _fetch_locked(self, parts: tuple[str, ...], entry: Path) -> PreparedSplit:
        found = self._manifest(parts)
        if found is None:
            raise CacheError(f"object store {self.store.url} has no entry "
                             f"{'/'.join(parts)}; run `datapipe prepare {parts[1]} "
                             f"--cache-dir {self.store.url}`")
        manifest, data = found
        remove_stale_temporaries(entry)  # a killed reader's folder (we hold the lock)
        files = digests_of(manifest["files"])
        with publish_dir(entry) as tmp:
            # Several objects at once: one S3 stream runs far below a node's bandwidth.
            with ThreadPoolExecutor(min(FETCH_THREADS, len(files))) as pool:
                for done in [pool.submit(self._fetch_object, parts, digests, tmp / name)
                             for name, digests in files.items()]:
                    done.result()  # the first failure, raised once the others finish
            manifest_path(tmp).write_bytes(data)  # byte for byte what was published
        prepared = trusted(entry)
        if prepared is None:  # the store's manifest passed its checks; the local rules refused
            shutil.rmtree(entry, ignore_errors=True)
            raise CacheError(f"object store {self.store.url}: entry {'/'.join(parts)} is "
                             f"not a trustworthy datapipe entry; publish it again")
        log.info("fetched %s from %s", "/".join(parts), self.store.url)
        return prepared

    def _fetch_object(self, parts: tuple[str, ...], digests: FileDigests, path: Path) -> None:
        key = object_key(self.store, parts, digests.sha256)
        problem = ""
        for attempt in range(ATTEMPTS):
            size = self.store.size(key)
            if size is None:
                problem = "the object is missing"
                break
            if size != digests.size:
                problem = f"the object has {size} bytes, the manifest says {digests.size}"
                break
            try:
                self.store.get_file(key, path)
                check_file(path, digests)
                return
            except DamagedChunk as e:
                problem = f"it arrived damaged: {e.detail}"
            except (CacheError, *transport_errors()) as e:
                problem = str(e)
            log.warning("fetching %s, attempt %d of %d: %s", self.store.where(key),
                        attempt + 1, ATTEMPTS, problem)
            with contextlib.suppress(OSError):
                path.unlink()
        raise CacheError(f"object store {self.store.url}: {digests.name} of "
                         f"{'/'.join(parts)} could not be fetched whole ({problem}); publish "
                         f"the entry again (`datapipe prepare {parts[1]} --force "
                         f"--cache-dir {self.store.url}`)")

    # -------------------------------------------------------------- the size limit

    def entries(self) -> list[PreparedSplit]:
        """The trusted entries of the local cache."""
        found = []
        for manifest in sorted(self.local.prepared.glob(f"*/*/*/{MANIFEST}")):
            if manifest.parent.is_symlink() or manifest.parent.name.startswith("."):
                continue
            entry = trusted(manifest.parent)
            if entry is not None:
                found.append(entry)
        return found

    def evict(self, keep: set[Path] = frozenset()) -> list[Path]:
        """Remove least recently used entries until the local cache holds ``limit`` bytes."""
        if self.limit is None:
            return []
        removed = []
        with self.local.lock(EVICT_LOCK, "the local cache's size limit", EVICT_LOCK_TIMEOUT):
            entries = self.entries()
            total = sum(entry_bytes(e) for e in entries)
            for entry in sorted(entries, key=last_used):
                if total <= self.limit:
                    break
                if entry.path in keep or not self._remove(entry):
                    continue
                total -= entry_bytes(entry)
                removed.append(entry.path)
            if total > self.limit:
                log.warning("the local cache %s holds %d bytes, over its limit of %d: the "
                            "entries in use are larger than the limit", self.local.root,
                            total, self.limit)
        return removed

    def _remove(self, entry: PreparedSplit) -> bool:
        parts = entry.path.relative_to(self.local.root).parts
        try:
            with self.local.lock(layout.prepare_lock(*parts[1:]), f"evicting {entry.path}", 0.0), \
                    _unclaimed(entry.path):
                away = temporary_sibling(entry.path)
                # Moved while exclusively held: a claim racing this finds the move.
                os.replace(entry.path, away)  # whole or gone, for any reader
            shutil.rmtree(away, ignore_errors=True)
        except (LockTimeoutError, OSError):
            return False  # in use by a reader, a fetch or a prepare: kept
        log.info("evicted %s from the local cache (least recently used)", entry.path)
        return True


@contextlib.contextmanager
def _unclaimed(entry: Path) -> Iterator[None]:
    """Held while an evictor moves ``entry``: an exclusive flock on its manifest, taken
    without waiting (OSError if a reader in any process claims it: the entry stays).
    Without flock nothing is held: an open file inside it would stop the move on Windows."""
    if fcntl is None:
        yield
        return
    with open(manifest_path(entry), "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def _problem(manifest: object, parts: tuple[str, ...]) -> str:
    """Why a store's manifest cannot be trusted before it names anything; "" if it can."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get(DIGEST_KEY), str):
        return "not a datapipe manifest with a digest"
    if manifest_digest(manifest) != manifest[DIGEST_KEY]:
        return "it does not match its digest (edited or damaged)"
    for key, want in zip(("recipe", "version", "fingerprint"), parts[1:], strict=True):
        if manifest.get(key) != want:
            return f"it names {key} {manifest.get(key)!r}, its key {want!r}"
    try:
        digests_of(manifest.get("files"))
    except CacheError as e:
        return str(e)
    return ""


def entry_bytes(entry: PreparedSplit) -> int:
    return sum(int(r["bytes"]) for r in entry.manifest["files"].values())


def touch(entry: PreparedSplit) -> None:
    """Record a use of ``entry`` (its manifest's mtime) for least-recently-used eviction."""
    with contextlib.suppress(OSError):
        os.utime(manifest_path(entry.path))


def last_used(entry: PreparedSplit) -> int:
    try:
        return manifest_path(entry.path).stat().st_mtime_ns
    except OSError:
        return 0
