"""The digests of ``--source`` files, memoized in the cache by each file's stat.

Hashing a folder of hand-downloaded files (ImageNet's train archive alone is 138 GB) on every
``datapipe prepare --source DIR`` would cost minutes each time; a memo under
``<cache>/downloads/.source-digests/<16 hex>.json`` keeps each digest as long as the
file's stat says it is the same file. This module imports neither torch nor pyarrow.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from datapipe import layout
from datapipe.cache import (
    HEX_PATTERN,
    Cache,
    file_digest,
    fingerprint,
    read_json,
    write_json_atomic,
)
from datapipe.errors import CacheError
from datapipe.progress import progress

log = logging.getLogger("datapipe")

CHUNK = 1 << 20
PROGRESS_HASH_BYTES = 256 << 20  # --source files this large are hashed with a progress bar
# A --source file changed less than this long ago may change again without its stat
# changing (coarse timestamps), so its digest is not memoized ("racy git").
RACY_SECONDS = 2.0


def source_digest(path: Path, algorithm: str, cache: Cache, quiet: bool | None = None) -> str:
    """The digest of a --source file, memoized in the cache by its stat.

    A memo is written only for files left untouched for RACY_SECONDS, and is trusted
    only while path, size, mtime, ctime, inode and device are all unchanged. Hashing
    a large file shows a progress bar (unless ``quiet``; see ``datapipe.progress``).
    """
    before = path.stat()
    memo = cache.root.joinpath(*layout.source_digest_memo(fingerprint([str(path), algorithm])))
    signature = _stat_signature(path, before)
    record = read_json(memo)
    if (isinstance(record, dict) and record.get("stat") == signature
            and record.get("algorithm") == algorithm and isinstance(record.get("checksum"), str)
            and HEX_PATTERN.fullmatch(record["checksum"])):
        return record["checksum"]
    digest = _digest_with_progress(path, algorithm, before.st_size, quiet)
    settled = time.time() - max(before.st_mtime, before.st_ctime) > RACY_SECONDS
    if settled and _stat_signature(path, path.stat()) == signature:
        with contextlib.suppress(CacheError, OSError):
            write_json_atomic(memo, {"path": str(path), "algorithm": algorithm,
                                     "checksum": digest, "stat": signature})
    return digest


def _digest_with_progress(path: Path, algorithm: str, size: int, quiet: bool | None) -> str:
    if size < PROGRESS_HASH_BYTES:
        return file_digest(path, algorithm)
    log.info("checking the %s of %s (%.1f GiB); once: the result is memoized", algorithm,
             path.name, size / 2**30)
    h = hashlib.new(algorithm)
    with open(path, "rb") as f, progress(f"{algorithm} {path.name}", size, 0, quiet) as bar:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stat_signature(path: Path, st: os.stat_result) -> dict[str, Any]:
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "dev": st.st_dev}
