"""The on-disk cache: its root, fingerprints, locks and atomic publishing.

What everything under the root is called is ``datapipe.layout``'s (its docstring is the
picture of the cache on disk); ``Cache.path`` turns its relative parts into a local path.

Two rules keep every entry whole, whatever dies when:

* everything is written into a temporary sibling named ``.tmp-<final>-<pid>-<token>``,
  fsynced and renamed into place, and the entry's manifest is written last; a reader
  trusts only entries whose manifest exists;
* every download and every prepare of one entry happens under a ``filelock`` lock
  with a finite timeout, and the work is looked for again once the lock is held.

This module imports neither torch nor pyarrow: the prepare, list and info paths run
through it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from datapipe import layout
from datapipe.errors import CacheError, ConfigError, LockTimeoutError
from datapipe.layout import (  # noqa: F401  (re-exported: what may name a part)
    ALGORITHMS,
    FILE_NAME_PATTERN,
    HEX_PATTERN,
    NAME_PATTERN,
    TMP_PREFIX,
    check_algorithm,
    check_file_name,
    check_hex,
    check_name,
)

log = logging.getLogger("datapipe")

CACHE_ENV = "DATAPIPE_CACHE"
LOCK_MODE_ENV = "DATAPIPE_LOCK"
LOCK_TIMEOUT_ENV = "DATAPIPE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 3600.0  # seconds; a prepare of a large dataset can hold it long
# A soft lock file with no owner record at all that has not changed for this long was
# left by a process killed between creating it and recording itself (see
# _break_stale_soft_lock); a live holder records itself within microseconds.
STALE_RECORDLESS_SECONDS = 10.0

def refuse_link(path: Path) -> Path:
    """``path`` unless it is a symbolic link; else CacheError.

    datapipe never follows a link inside its cache: one may lead outside it, and a
    folder reached through one is not what the cache wrote. ``datapipe cache rm``
    removes such a link itself, never what it points to.
    """
    if path.is_symlink():
        raise CacheError(f"{path} is a symbolic link, which datapipe never follows inside its "
                         f"cache; remove the link (`datapipe cache rm` removes the link only)")
    return path


def inside(root: Path, path: Path) -> Path:
    """``path`` if it lies under ``root`` after resolving links; else CacheError.

    The last line of defence: every path built from a name or from a value read back from
    a file goes through it before it is opened, renamed or deleted.
    """
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise CacheError(f"{path} leads outside the cache {root}; refusing to touch it")
    return path


def resolve_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else $DATAPIPE_CACHE, else ./cache."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "cache"
    if not isinstance(chosen, (str, os.PathLike)) or not os.fspath(chosen):
        raise ConfigError(f"cache_dir={chosen!r} is not a folder path")
    if isinstance(chosen, str) and "://" in chosen:  # datapipe.remote reads those
        raise ConfigError(f"cache_dir={chosen!r} is an object store, which a local cache "
                          f"cannot be; give a local folder here (loads, `datapipe prepare`, "
                          f"`info`, `verify` and `cache ls/rm` take the store itself)")
    return Path(chosen).expanduser().absolute()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(obj: Any, length: int = 16) -> str:
    """A short sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents), turning permission problems into a CacheError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(
            f"cannot create cache directory {path}: {e.strerror or e}; "
            f"choose a writable one with --cache-dir or ${CACHE_ENV}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheError(
            f"cache directory {path} is not writable; "
            f"choose a writable one with --cache-dir or ${CACHE_ENV}"
        )
    return path


# --------------------------------------------------------------------------- locks


def lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):  # nan, inf and negatives: every wait has a bound
        raise CacheError(f"${LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds (finite, "
                         f"0 or more)")
    return value


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(layout.holder_name(lock_path.name))


def _describe_holder(lock_path: Path) -> str:
    try:
        info = json.loads(_holder_path(lock_path).read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "an unknown process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _break_stale_soft_lock(lock_path: Path) -> bool:
    """Remove a soft lock left by a dead process; True if removed.

    filelock's own soft lock records its owner inside the lock file and breaks a dead
    owner's lock itself, atomically; that is left to it. This handles the lock files it
    will not judge, those with no owner record (an older filelock, or a holder killed
    between creating the file and writing its record): such a file is stale when our
    ``.holder`` record names a dead process on this host, or when there is no record at
    all and the file has not changed for STALE_RECORDLESS_SECONDS. The file is removed
    only if it is still the very file judged (same inode and mtime), and the holder
    record goes first, so a process that raced in is never mistaken for the dead one.
    """
    try:
        before = lock_path.stat()
        if lock_path.read_bytes().strip():
            return False  # an owner record: filelock judges it
    except OSError:
        return False
    holder = _holder_path(lock_path)
    try:
        info = json.loads(holder.read_text())
    except FileNotFoundError:
        info = None
    except (OSError, ValueError):
        return False
    if info is None:
        if time.time() - before.st_mtime < STALE_RECORDLESS_SECONDS:
            return False
        why = f"with no holder recorded for over {STALE_RECORDLESS_SECONDS:g}s"
    else:
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            return False
        if info.get("host") != socket.gethostname() or _pid_alive(pid):
            return False
        why = f"by dead pid {pid}"
    try:
        after = lock_path.stat()
    except OSError:
        return False
    if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
        return False
    with contextlib.suppress(FileNotFoundError):
        holder.unlink()
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    log.warning("removed a stale lock %s left %s", lock_path, why)
    return True


@contextlib.contextmanager
def locked(lock_path: Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` while the block runs.

    ``what`` names the work being protected; it appears in the message logged while
    waiting and in the LockTimeoutError raised after ``timeout`` seconds (default
    $DATAPIPE_LOCK_TIMEOUT, else one hour). ``DATAPIPE_LOCK=soft`` uses a lock file
    instead of flock, for filesystems without it (``flock`` or unset: flock; anything
    else is an error); a soft lock left by a dead process on this host is broken.
    """
    timeout = lock_timeout() if timeout is None else timeout
    ensure_dir(lock_path.parent)
    mode = os.environ.get(LOCK_MODE_ENV, "").strip().lower()
    if mode not in ("", "flock", "soft"):  # a typo must not silently mean flock on NFS
        raise CacheError(f"${LOCK_MODE_ENV}={mode!r} is not a lock mode; use soft (for "
                         f"filesystems without flock) or flock (the default)")
    soft = mode == "soft"
    lock = filelock.SoftFileLock(str(lock_path)) if soft else filelock.FileLock(str(lock_path))
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            lock.acquire(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            break
        except filelock.Timeout:
            if soft and _break_stale_soft_lock(lock_path):
                continue
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"timed out after {timeout:g}s waiting for the lock on {what} "
                    f"({lock_path}), held by {_describe_holder(lock_path)}; "
                    f"wait for it, or remove the lock file if that process is gone "
                    f"(${LOCK_TIMEOUT_ENV} sets the timeout)"
                ) from None
            if not told:
                log.info("waiting for the lock on %s, held by %s (lock file %s; giving up "
                         "after %gs, $%s)", what, _describe_holder(lock_path), lock_path,
                         timeout, LOCK_TIMEOUT_ENV)
                told = True
        except PermissionError as e:
            raise CacheError(
                f"cannot create lock file {lock_path}: {e.strerror or e}; "
                f"choose a writable cache with --cache-dir or ${CACHE_ENV}"
            ) from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
        with contextlib.suppress(OSError):
            _holder_path(lock_path).write_text(json.dumps(holder))
        yield
    finally:
        with contextlib.suppress(OSError):
            _holder_path(lock_path).unlink()
        lock.release()


# ------------------------------------------------------------------ atomic writes


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories where the OS allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(final: Path) -> Path:
    """A fresh temporary path next to ``final``, named after it, this pid and a token."""
    return final.with_name(layout.temporary_name(final.name, os.getpid(), secrets.token_hex(4)))


def remove_stale_temporaries(final: Path) -> int:
    """Remove temporaries left next to ``final`` by killed processes.

    Call it only while holding the lock for ``final``: then no live process can be
    writing one of them. Returns how many were removed.
    """
    removed = 0
    if not final.parent.is_dir():
        return 0
    for tmp in final.parent.glob(layout.temporaries_of(final.name)):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        removed += 1
    if removed:
        log.info("removed %d temporary leftover(s) of %s", removed, final.name)
    return removed


def write_error(e: OSError, path: Path) -> CacheError:
    """The CacheError for a failed write of ``path`` (disk full, permissions, ...)."""
    return CacheError(
        f"could not write {path}: {e.strerror or e}; free space or choose another cache "
        f"with --cache-dir or ${CACHE_ENV}"
    )


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block succeeds.

    On any error the temporary is removed and ``final`` is untouched. An existing
    ``final`` is replaced (callers hold the entry's lock).
    """
    tmp = temporary_sibling(final)
    for attempt in range(3):
        ensure_dir(final.parent)
        try:
            tmp.mkdir()
            break
        except FileNotFoundError as e:  # a `cache rm` took the empty parent away meanwhile
            if attempt == 2:
                raise write_error(e, final) from None
        except OSError as e:
            raise write_error(e, final) from None
    try:
        yield tmp
    except OSError as e:  # writing into the temporary failed: disk full, I/O error, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        for child in tmp.rglob("*"):
            if child.is_file():
                fsync_path(child)
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, final) from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename."""
    ensure_dir(path.parent)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(e, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, obj: Any, compact: bool = False) -> None:
    """Write ``obj`` as JSON atomically; ``compact`` for large files (much faster)."""
    text = canonical_json(obj) if compact else json.dumps(obj, indent=2, sort_keys=True)
    write_bytes_atomic(path, (text + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The JSON at ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class Cache:
    """A cache root and the places under it."""

    root: Path

    @classmethod
    def at(cls, cache_dir: str | os.PathLike | None = None) -> Cache:
        return cls(resolve_root(cache_dir))

    @property
    def downloads(self) -> Path:
        return self.root / layout.DOWNLOADS

    @property
    def prepared(self) -> Path:
        return self.root / layout.PREPARED

    @property
    def splits(self) -> Path:
        return self.root / layout.SPLITS

    @property
    def locks(self) -> Path:
        return self.root / layout.LOCKS

    def path(self, parts: layout.Parts, link_ok: bool = False) -> Path:
        """The local path of ``parts`` (made by ``datapipe.layout``), checked to stay in the
        root.

        No part may be a symbolic link (see refuse_link); with ``link_ok`` the last may,
        for a caller that removes the link itself and never looks through it.
        """
        path = self.root
        for i, part in enumerate(parts):
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise CacheError(f"cache path part {part!r} is not a plain file name")
            path = path / part
            if not (link_ok and i == len(parts) - 1):
                refuse_link(path)
        inside(self.root, path.parent if link_ok and parts else path)
        return path

    def lock(self, key: str, what: str, timeout: float | None = None):
        """The lock named ``key`` (a lock key of ``datapipe.layout``) guarding ``what``."""
        return locked(self.path(layout.lock_file(key)), what, timeout)
