"""A prepared entry's manifest: how it is written, read and trusted, in one place.

``prepared/<name>/<version>/<fingerprint>/manifest.json`` is written last, when every
data file of the entry is in place. It records what was made (split, rows, columns,
statistics), from what (sources and their checksums), by which stages, and for every
data file its size, sha256 and chunk digests (``datapipe.integrity``). It also carries
``digest``: the sha256 of its own canonical JSON without that field, so an edited
manifest (``rows: 5``) is refused like a damaged data file.

A reader trusts an entry only if its manifest is whole and describes it (``trusted``):
the digest matches; format, recipe, version and fingerprint name this folder; every
value that will name a file is a plain file name (never a path, so the manifest cannot
point outside its entry) and every data file is a regular file inside the entry with
the recorded size. That costs one small read and one stat per file. The bytes are
checked by the readers of the data files (the load stages) as they first touch them,
against the digests this manifest promised (``Promise``); a reader that finds damage
sets the entry aside as ``datapipe verify`` does (``set_aside``: the manifest becomes
``manifest.json.corrupt``), so the next prepare rebuilds it.

Entries written before manifests carried digests (format ``datapipe.prepared/1``) are
not trusted as they are: nothing says their bytes are whole. They did record each data
file's sha256, so the next prepare reads them once against it and, when every file
matches, gives them this format's manifest (``upgrade``) instead of rebuilding them:
seconds for MNIST, a few minutes instead of hours for ImageNet.

No torch and no pyarrow here: ``datapipe prepare``, ``list``, ``info`` and ``verify``
run through this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datapipe import layout
from datapipe.cache import (
    Cache,
    canonical_json,
    check_algorithm,
    check_file_name,
    check_hex,
    check_name,
    inside,
    now_iso,
    read_json,
    write_json_atomic,
)
from datapipe.errors import CacheError
from datapipe.integrity import DamagedChunk, FileDigests, check_file, digest_file, digests_of

if TYPE_CHECKING:
    from datapipe.recipe import Recipe
    from datapipe.stages.download import LocalFile

log = logging.getLogger("datapipe")

MANIFEST = layout.MANIFEST
MANIFEST_FORMAT = "datapipe.prepared/2"
OLDER_FORMATS = ("datapipe.prepared/1",)  # no digests: not trusted until upgraded
CORRUPT_SUFFIX = layout.CORRUPT_SUFFIX  # manifest.json -> manifest.json.corrupt: set aside
DIGEST_KEY = "digest"
SET_ASIDE_TIMEOUT = 10.0  # seconds a reader waits for the entry's lock to set it aside

TRUSTED, MISSING, OUTDATED, CORRUPT = "trusted", "missing", "outdated", "corrupt"


prepare_lock_key = layout.prepare_lock  # the name callers know it by


def entry_lock(entry: Path, what: str, timeout: float | None = None):
    """The prepare lock of the entry folder ``<root>/prepared/<name>/<version>/<fp>``."""
    cache = Cache(entry.parents[layout.ENTRY_DEPTH - 1])
    name, version, fp = entry.parts[-3:]
    return cache.lock(layout.prepare_lock(name, version, fp), what=what, timeout=timeout)


def manifest_path(entry: Path) -> Path:
    """The manifest of the entry folder ``entry``."""
    return entry / MANIFEST


def set_aside_path(entry: Path) -> Path:
    """Where ``set_aside`` moves the manifest of ``entry``."""
    return entry / layout.set_aside(MANIFEST)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The sha256 of the canonical JSON of ``manifest`` without its ``digest`` field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# ------------------------------------------------------------------ writing


def _source_record(local: LocalFile) -> dict[str, Any]:
    return {
        "filename": local.filename,
        "algorithm": local.algorithm,
        "checksum": local.checksum,
        "expected": local.expected,
        "verified": local.verified,
        "origin": local.origin,
    }


def write_manifest(recipe: Recipe, split: str, fp: str, entry: Path,
                   local: Mapping[str, LocalFile], started: float, *,
                   files: Mapping[str, FileDigests], **fields: Any) -> dict[str, Any]:
    """Write ``entry``'s manifest, last: what was made, from what, by which stages.

    ``files`` are the digests of the data files (``integrity.digest_file``), taken as
    they were written; ``fields`` the rest (rows, data_file, shards, columns, ...).
    """
    manifest = manifest_record(recipe, split, fp, local, started, files=files, **fields)
    write_json_atomic(manifest_path(entry), manifest)  # the bytes manifest_bytes gives
    return manifest


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as ``write_manifest`` writes it, byte for byte (for an object store)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def manifest_record(recipe: Recipe, split: str, fp: str, local: Mapping[str, LocalFile],
                    started: float, *, files: Mapping[str, FileDigests],
                    **fields: Any) -> dict[str, Any]:
    """The manifest ``write_manifest`` writes, with its digest, written nowhere."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": recipe.name,
        "version": recipe.version,
        "split": split,
        "fingerprint": fp,
        **fields,
        "files": {name: digests.record() for name, digests in sorted(files.items())},
        "sources": [_source_record(local[name]) for name in sorted(local)],
        "stages": {stage.kind: stage.config()
                   for stage in (recipe.download, recipe.clean, recipe.save)},
        "created_at": now_iso(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    return manifest


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class PreparedSplit:
    """A published split: its folder and its (checked) manifest."""

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

    @property
    def data_files(self) -> list[Path]:
        """Every data file, in row order: the shards of a sharded split, else data_file."""
        shards = self.manifest.get("shards")
        return [self.path / name for name in shards] if shards else [self.data_file]

    def check(self) -> None:
        """Read every data file once against its chunk digests: for readers that hand the
        files to code of their own (``datasets``). Damage: set aside, one-line CacheError."""
        promise = self.promise()
        for path in self.data_files:
            try:
                check_file(path, promise.digests(path))
            except DamagedChunk as e:
                raise promise.damaged(str(e)) from None

    def promise(self) -> Promise:
        """What this manifest promises about the data files, for their readers to check."""
        return Promise(
            entry=self.path, recipe=self.manifest["recipe"],
            label=f"{self.manifest['recipe']} {self.manifest['version']} {self.split} "
                  f"({self.fingerprint})",
            digest=self.manifest[DIGEST_KEY], rows=self.rows,
            files=digests_of(self.manifest["files"]))


@dataclass(frozen=True)
class Promise:
    """What a trusted manifest promised about its entry's data files (picklable: workers
    get it with the paths and check what they read against it)."""

    entry: Path
    recipe: str
    label: str  # "mnist 1 train (86e2138a6d342c2a)"
    digest: str  # the manifest's digest: set aside only the manifest that promised this
    rows: int
    files: Mapping[str, FileDigests]

    def digests(self, path: str | os.PathLike) -> FileDigests:
        """The digests of data file ``path`` of this entry."""
        name = os.path.basename(path)
        if Path(path).parent != self.entry or name not in self.files:
            raise CacheError(f"{path} is not a data file of prepared {self.label}")
        return self.files[name]

    def damaged(self, problem: str) -> CacheError:
        """Set the entry aside and return the one-line error a reader raises for ``problem``."""
        try:
            with entry_lock(self.entry, f"setting aside {self.label}", SET_ASIDE_TIMEOUT):
                current = read_json(manifest_path(self.entry))
                # Only the manifest that promised these bytes: a rebuilt entry is not touched.
                if isinstance(current, dict) and current.get(DIGEST_KEY) == self.digest:
                    set_aside(self.entry)
            outcome = "it is set aside and the next prepare rebuilds it"
        except (CacheError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            outcome = f"it could not be set aside ({reason})"
        return CacheError(f"prepared {self.label} is damaged: {problem}; {outcome}: run "
                          f"`datapipe verify {self.recipe}`, then `datapipe prepare "
                          f"{self.recipe}`")


def set_aside(entry: Path) -> None:
    """Stop trusting ``entry`` (the caller holds its lock); its files stay for inspection."""
    os.replace(manifest_path(entry), set_aside_path(entry))


def _check_sources(sources: object) -> None:
    if not isinstance(sources, list):
        raise CacheError("the manifest lists no sources")
    for source in sources:
        if not isinstance(source, dict):
            raise CacheError("a source record of the manifest is not an object")
        check_file_name(source.get("filename"), "source file name")
        check_algorithm(source.get("algorithm"))
        check_hex(source.get("checksum"), "source checksum")
        if source.get("expected") is not None:
            check_hex(source.get("expected"), "expected source checksum")
        if not isinstance(source.get("verified"), bool):
            raise CacheError(f"source {source['filename']}: 'verified' is not true or false")


def _check_files(entry: Path, manifest: dict[str, Any]) -> None:
    """Data files: plain names, all listed, regular files inside the entry, of their size."""
    files = digests_of(manifest.get("files"))
    data_file = check_file_name(manifest.get("data_file"), "data file name")
    shards = manifest.get("shards")
    if shards is None:
        named = [data_file]
    elif not isinstance(shards, list) or not shards or shards[0] != data_file:
        raise CacheError("the manifest's shards do not start with its data_file")
    else:
        named = [check_file_name(s, "shard file name") for s in shards]
    if sorted(named) != sorted(files) or len(set(named)) != len(named):
        raise CacheError("the manifest's data files and file records disagree")
    for name, digests in files.items():
        path = inside(entry, entry / name)
        try:
            st = path.lstat()
        except OSError:
            raise CacheError(f"{name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"{name} is not a regular file")
        if st.st_size != digests.size:
            raise CacheError(f"{name} has {st.st_size} bytes, the manifest says "
                             f"{digests.size}")


def _problem(entry: Path, manifest: object) -> tuple[str, str]:
    """(OUTDATED or CORRUPT, why) of a manifest that cannot be trusted; (TRUSTED, "")."""
    if not isinstance(manifest, dict):
        return CORRUPT, "manifest.json is not a readable datapipe manifest"
    if manifest.get("format") in OLDER_FORMATS:
        return OUTDATED, "written by an older datapipe, without digests"
    if manifest.get("format") != MANIFEST_FORMAT:
        return CORRUPT, "manifest.json is not a readable datapipe manifest"
    if not isinstance(manifest.get(DIGEST_KEY), str):
        return CORRUPT, "the manifest carries no digest of its content"
    if manifest_digest(manifest) != manifest[DIGEST_KEY]:
        return CORRUPT, "the manifest does not match its digest (edited or damaged)"
    for key, want in (("recipe", entry.parent.parent.name), ("version", entry.parent.name),
                      ("fingerprint", entry.name)):
        if manifest.get(key) != want:
            return CORRUPT, f"the manifest names {key} {manifest.get(key)!r}, its folder {want!r}"
    rows = manifest.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return CORRUPT, f"the manifest's row count {rows!r} is not a count"
    try:
        check_name(manifest["recipe"], "recipe name")
        check_file_name(manifest.get("split"), "split name")
        _check_sources(manifest.get("sources"))
        _check_files(entry, manifest)
    except CacheError as e:
        return CORRUPT, str(e)
    return TRUSTED, ""


def inspect(entry: Path) -> tuple[str, str, PreparedSplit | None]:
    """(state, why, entry) of a prepared entry folder: TRUSTED with the entry; MISSING
    (no manifest: a killed prepare, or set aside), OUTDATED or CORRUPT with the reason."""
    path = manifest_path(entry)
    if entry.is_symlink():
        return CORRUPT, "the entry folder is a symbolic link", None
    if not path.exists():
        return MISSING, "", None
    manifest = read_json(path)
    state, why = _problem(entry, manifest)
    if state != TRUSTED:
        return state, why, None
    return TRUSTED, "", PreparedSplit(entry, manifest)  # type: ignore[arg-type]


_told: set[tuple[str, str]] = set()


def trusted(entry: Path) -> PreparedSplit | None:
    """The entry if its manifest is whole and describes it; else None (never served).

    A refused manifest is logged once per process, with what to do.
    """
    state, why, prepared = inspect(entry)
    if state in (OUTDATED, CORRUPT) and (str(entry), why) not in _told:
        _told.add((str(entry), why))
        log.warning("not using prepared entry %s: %s; `datapipe prepare %s` rebuilds it",
                    entry, why, entry.parent.parent.name)
    return prepared


def upgrade(entry: Path) -> PreparedSplit | None:
    """An entry of an older format, read once against the sha256 its manifest recorded for
    each data file and given this format's manifest; None if it is no such entry or any
    file differs (then the caller rebuilds it). The caller holds the entry's lock.

    What the old manifest said beyond the files is kept, and checked as any manifest is
    (``inspect``) once rewritten; the row count is checked by the readers, as always.
    """
    state, _, _ = inspect(entry)
    if state != OUTDATED:
        return None
    old = read_json(manifest_path(entry))
    files = old.get("files") if isinstance(old, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    digests: dict[str, FileDigests] = {}
    try:
        for name, record in files.items():
            check_file_name(name, "data file name")
            want = check_hex(record.get("sha256") if isinstance(record, dict) else None,
                             f"sha256 of {name}")
            path = inside(entry, entry / name)
            if not stat.S_ISREG(path.lstat().st_mode):
                return None
            digests[name] = digest_file(path, name)
            if digests[name].sha256 != want or digests[name].size != record.get("bytes"):
                log.warning("not upgrading prepared entry %s: %s differs from the sha256 "
                            "its manifest recorded; it is rebuilt", entry, name)
                return None
    except (CacheError, OSError):
        return None
    manifest = {k: v for k, v in old.items() if k != DIGEST_KEY}
    manifest.update(format=MANIFEST_FORMAT, upgraded_from=old["format"],
                    files={name: d.record() for name, d in sorted(digests.items())})
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    write_json_atomic(manifest_path(entry), manifest)
    upgraded = trusted(entry)
    if upgraded is not None:
        log.info("upgraded prepared entry %s to %s after checking its files", entry,
                 MANIFEST_FORMAT)
    return upgraded


def trusted_or_upgraded(entry: Path) -> PreparedSplit | None:
    """``trusted(entry)``, else the entry upgraded from an older format (lock held)."""
    return trusted(entry) or upgrade(entry)


def read_set_aside(entry: Path) -> dict[str, Any] | None:
    """The manifest of an entry set aside as corrupt (for ``cache ls``), if readable."""
    manifest = read_json(set_aside_path(entry))
    return manifest if isinstance(manifest, dict) else None


def read_unchecked(entry: Path) -> dict[str, Any] | None:
    """The manifest of ``entry`` as it is, if readable, NOT checked: only for reports and
    for finding what an entry names (``verify``, ``cache rm``); never to serve data."""
    manifest = read_json(manifest_path(entry))
    return manifest if isinstance(manifest, dict) else None


__all__ = ["MANIFEST", "MANIFEST_FORMAT", "CORRUPT_SUFFIX", "PreparedSplit", "Promise",
           "prepare_lock_key", "entry_lock", "manifest_digest", "write_manifest", "inspect",
           "trusted", "upgrade", "trusted_or_upgraded", "set_aside", "read_set_aside",
           "read_unchecked", "manifest_path", "set_aside_path"]
