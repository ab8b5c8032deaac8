"""Chunk digests of prepared files: recorded when a file is written, checked where it is read.

A prepared data file is cut into chunks of ``CHUNK_BYTES``; the manifest records the
digest of each (see ``FileDigests``). A reader checks a chunk the first time its process
touches it (``ChunkChecker``): an in-memory split (MNIST, CIFAR) is checked in one pass
when the load stage maps the file, a JPEG shard chunk by chunk as rows are first read.
So a flipped byte on disk is found before it reaches a batch, for the price of one
hash pass over the bytes actually used.

The hash is xxh3_64 (the ``xxhash`` package, which ``datasets`` already depends on).
Measured here (Xeon with SHA-NI, Python 3.11, 1 MiB blocks, one core): sha256 1.1-1.2
GB/s, blake2b 0.9 GB/s, md5 0.7 GB/s, blake3 5.3 GB/s (one thread), xxh3_64 11-12 GB/s.
At sha256's speed the check would cost about a third of an MNIST first epoch and, per
DataLoader worker, a second read of every JPEG shard it touches; at xxh3's it is a few
percent. The digests guard against damage (bad disks, flipped bits, truncation, a file
edited by hand), not against someone able to rewrite the cache: they could rewrite the
manifest as well. The manifest's own digest and the downloads' checksums stay sha256.

No torch, no pyarrow at import: the prepare and verify paths use this module.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from datapipe.cache import check_file_name, check_hex
from datapipe.errors import CacheError

CHUNK_HASH = "xxh3_64"
CHUNK_BYTES = 1 << 20  # a JPEG shard row touches one or two chunks; ~1 digest per MiB
_CHUNK_DIGEST = re.compile(r"[0-9a-f]{16}")
_MIN_CHUNK, _MAX_CHUNK = 1 << 12, 1 << 30


def chunk_digest(data: Any) -> str:
    """The digest of one chunk (bytes, memoryview or a contiguous uint8 array)."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class FileDigests:
    """What a manifest records of one data file: its size, sha256 and chunk digests."""

    name: str
    size: int
    sha256: str
    chunk_bytes: int
    chunks: tuple[str, ...]

    @classmethod
    def of_record(cls, name: object, record: object) -> FileDigests:
        """The digests a manifest's ``files[name]`` records, validated; else CacheError.

        A manifest written before chunk digests existed has none: CacheError too.
        """
        check_file_name(name, "data file name")
        if not isinstance(record, dict):
            raise CacheError(f"the manifest's record of {name} is not an object")
        size, chunk_bytes, chunks = (record.get(k) for k in ("bytes", "chunk_bytes", "chunks"))
        if not _is_int(size) or size < 0:
            raise CacheError(f"the manifest records no size for {name}")
        check_hex(record.get("sha256"), f"sha256 of {name}")
        if record.get("chunk_hash") != CHUNK_HASH or not _is_int(chunk_bytes) \
                or not _MIN_CHUNK <= chunk_bytes <= _MAX_CHUNK or not isinstance(chunks, list):
            raise CacheError(f"the manifest records no {CHUNK_HASH} chunk digests for {name}")
        if len(chunks) != math.ceil(size / chunk_bytes) or not all(
                isinstance(c, str) and _CHUNK_DIGEST.fullmatch(c) for c in chunks):
            raise CacheError(f"the manifest's chunk digests of {name} do not fit its "
                             f"{size} bytes")
        return cls(name, size, record["sha256"], chunk_bytes, tuple(chunks))  # type: ignore

    def record(self) -> dict[str, Any]:
        return {"bytes": self.size, "sha256": self.sha256, "chunk_hash": CHUNK_HASH,
                "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def digest_file(path: str | os.PathLike, name: str | None = None,
                chunk_bytes: int | None = None) -> FileDigests:
    """Read a file once: its size, sha256 and chunk digests (what the manifest records)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    whole = hashlib.sha256()
    chunks, size = [], 0
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            whole.update(block)
            chunks.append(chunk_digest(block))
            size += len(block)
    return FileDigests(name or os.path.basename(path), size, whole.hexdigest(), chunk_bytes,
                       tuple(chunks))


class DamagedChunk(Exception):
    """A chunk of a data file does not match its recorded digest (readers turn this into
    a CacheError naming the entry; see ``datapipe.manifest.Promise.damaged``)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


class ChunkChecker:
    """Checks the chunks of one mapped data file, each the first time it is touched.

    ``data`` is the whole file as bytes-like (a memory map): hashing a chunk reads it
    from the page cache, which the reader is about to do anyway. Not shared between
    processes: each DataLoader worker checks what it touches itself.
    """

    def __init__(self, data: Any, digests: FileDigests) -> None:
        view = memoryview(data).cast("B")
        if len(view) != digests.size:
            raise DamagedChunk(digests.name, f"has {len(view)} bytes, the manifest says "
                               f"{digests.size}")
        self.view, self.digests = view, digests
        self.checked = np.zeros(len(digests.chunks), bool)

    def check_range(self, start: int, stop: int) -> None:
        """Check every chunk holding a byte of ``[start, stop)`` not checked yet."""
        if stop <= start:
            return
        size = self.digests.chunk_bytes
        self.check_chunks(range(max(0, start) // size, (min(stop, len(self.view)) - 1) // size + 1))

    def check_all(self) -> None:
        self.check_chunks(range(len(self.checked)))

    def check_chunks(self, chunks: Iterable[int]) -> None:
        size, view, checked = self.digests.chunk_bytes, self.view, self.checked
        for i in chunks:
            if checked[i]:
                continue
            if chunk_digest(view[i * size:(i + 1) * size]) != self.digests.chunks[i]:
                raise DamagedChunk(self.digests.name, f"chunk {i + 1} of {len(checked)} "
                                   f"(bytes {i * size}-{min((i + 1) * size, len(view)) - 1}) "
                                   f"does not match its digest")
            checked[i] = True


def check_file(path: str | os.PathLike, digests: FileDigests) -> None:
    """Check a whole file against its digests, reading it once; DamagedChunk if it differs.

    For readers that hand the file to code of their own (``datasets.Dataset.from_file``).
    """
    try:
        actual = digest_file(path, digests.name, digests.chunk_bytes)
    except OSError as e:
        raise DamagedChunk(digests.name, f"cannot be read ({e.strerror or e})") from None
    if actual.size != digests.size:
        raise DamagedChunk(digests.name, f"has {actual.size} bytes, the manifest says "
                           f"{digests.size}")
    for i, (got, want) in enumerate(zip(actual.chunks, digests.chunks, strict=True)):
        if got != want:
            raise DamagedChunk(digests.name, f"chunk {i + 1} of {len(digests.chunks)} does "
                               f"not match its digest")


STREAM_BLOCK = 1 << 20  # bytes held at once by check_stream, whatever the chunk size


def check_stream(read: Callable[[int, int], bytes], digests: FileDigests,
                 block: int = STREAM_BLOCK) -> None:
    """Check bytes read piece by piece against their digests; DamagedChunk if they differ.

    ``read(start, stop)`` returns the bytes ``[start, stop)`` (fewer at the end of what it
    has): an object in a store, read by ranges; the caller checks its size first. At
    most ``block`` bytes are held at once, whatever ``chunk_bytes`` the manifest records,
    and reading stops at the first chunk that differs.
    """
    whole = hashlib.sha256()
    size, count = digests.size, len(digests.chunks)
    for i, want in enumerate(digests.chunks):
        hasher = xxhash.xxh3_64()
        start = i * digests.chunk_bytes
        stop = min(start + digests.chunk_bytes, size)
        at = start
        while at < stop:
            data = read(at, min(at + block, stop))
            if not data:
                raise DamagedChunk(digests.name, f"ends after {at} bytes, the manifest says "
                                   f"{size}")
            hasher.update(data)
            whole.update(data)
            at += len(data)
        if hasher.hexdigest() != want:
            raise DamagedChunk(digests.name, f"chunk {i + 1} of {count} (bytes {start}-"
                               f"{stop - 1}) does not match its digest")
    if whole.hexdigest() != digests.sha256:
        raise DamagedChunk(digests.name, "its chunks match but its sha256 does not")


def arrow_rows(path: str | os.PathLike) -> int:
    """The number of rows of an Arrow IPC stream file (memory-mapped; no data copied)."""
    import pyarrow as pa

    with pa.memory_map(os.fspath(path), "r") as source:
        reader = pa.ipc.open_stream(source)
        return sum(batch.num_rows for batch in reader)


def digests_of(files: Mapping[str, Any]) -> dict[str, FileDigests]:
    """Validated FileDigests of a manifest's ``files``; CacheError on the first bad one."""
    if not isinstance(files, dict) or not files:
        raise CacheError("the manifest lists no data files")
    return {name: FileDigests.of_record(name, record) for name, record in files.items()}
