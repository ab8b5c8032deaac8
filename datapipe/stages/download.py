"""The download stage: fetch source files from mirrors or a local folder, and verify them.

A :class:`Download` declares the files a recipe needs (:class:`Resource`: a file name
with its md5 and/or sha256 and size) and the recipe's mirrors. :meth:`Download.fetch`
puts each file into the cache, trying mirrors in order, or takes it in place from
``--source DIR``. Run-time choices (extra mirrors, --no-verify, quiet) travel in
:class:`FetchOptions` and are no part of any fingerprint.

Where files go, under ``<cache>/downloads/``::

    <algo>-<checksum>/<filename>              bytes that match the recipe's checksum
    <algo>-<checksum>/<filename>.json         its sidecar, written last; no sidecar, no trust
    <algo>-<checksum>/<filename>.partial      an interrupted download, resumed next time
    <algo>-<checksum>.unverified/<filename>   bytes kept with --no-verify despite a mismatch
    unchecked-<16 hex>/<filename>             a resource that declares no checksum; the hex
                                              is a fingerprint of its file name, size and
                                              the recipe's mirrors (see Download.folder_key)
    .source-digests/<16 hex>.json             memo of --source files' digests, by stat

A verified look-up never sees the ``.unverified`` folder, so a file kept with
--no-verify can never pass for a verified one. This module imports neither torch nor
pyarrow: it runs on the CLI's fast path.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import logging
import os
import socket
import sys
import time
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datapipe.cache import (
    HEX_PATTERN,
    Cache,
    check_algorithm,
    check_file_name,
    check_hex,
    ensure_dir,
    file_digest,
    fingerprint,
    fsync_path,
    now_iso,
    read_json,
    refuse_link,
    remove_stale_temporaries,
    write_error,
    write_json_atomic,
)
from datapipe.errors import (
    CacheError,
    ChecksumError,
    ConfigError,
    DownloadError,
    UnverifiedDataWarning,
)
from datapipe.stages.base import Stage
from datapipe.stages.source_layout import (
    Form,
    Found,
    check_subfolder,
    describe,
    find,
    form_from,
    judge,
)

log = logging.getLogger("datapipe")

MIRRORS_ENV = "DATAPIPE_MIRRORS"
TIMEOUT_ENV = "DATAPIPE_TIMEOUT"  # seconds a mirror may stay silent (default 30)
DEFAULT_TIMEOUT = 30.0
# A mirror that trickles is as useless as a silent one, and never trips the timeout: a
# transfer slower than MIN_RATE bytes/s over a window of RATE_WINDOW seconds, or still
# running RATE_WINDOW seconds after the time its expected size takes at MIN_RATE, is
# abandoned for the next mirror. 1 KiB/s is far below any link worth waiting for.
MIN_RATE_ENV = "DATAPIPE_MIN_RATE"
DEFAULT_MIN_RATE = 1024.0
RATE_WINDOW_ENV = "DATAPIPE_RATE_WINDOW"
DEFAULT_RATE_WINDOW = 60.0
# The most bytes taken for a file whose size the recipe does not declare (and, with
# --no-verify, the declared size caps it): above ImageNet's 138 GB train archive.
MAX_DOWNLOAD_ENV = "DATAPIPE_MAX_DOWNLOAD"
DEFAULT_MAX_DOWNLOAD = 512 << 30
SUGGESTION = "use --mirror URL to add a mirror, or --source DIR with the files downloaded by hand"
PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".json"
UNVERIFIED_SUFFIX = ".unverified"
SOURCE_DIGESTS = ".source-digests"
CHUNK = 1 << 20
PROGRESS_HASH_BYTES = 256 << 20  # --source files this large are hashed with a progress bar
SNIFF_BYTES = 512
USER_AGENT = "datapipe"
URL_SCHEMES = ("http", "https", "file", "ftp")
HTML_NAMES = (".html", ".htm", ".xhtml")
GZIP_NAMES = (".gz", ".tgz")
GZIP_MAGIC = b"\x1f\x8b"
# A --source file changed less than this long ago may change again without its stat
# changing (coarse timestamps), so its digest is not memoized ("racy git").
RACY_SECONDS = 2.0
_HEX_LENGTHS = {"md5": 32, "sha256": 64}


# ------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class Resource:
    """One source file: its name (also its name on every mirror), checksums and size."""

    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    # Other forms a --source folder may hold it in (decompressed, extracted), with the
    # digests recorded from the official files; see datapipe.stages.source_layout.
    forms: tuple[Form, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "forms", tuple(form_from(f) for f in _as_tuple(self.forms)))
        name = self.filename
        if (not isinstance(name, str) or name in ("", ".", "..")
                or any(c in name for c in "/\\\0")):
            raise ConfigError(f"resource file name {name!r} must be a plain file name "
                              f"(no folders)")
        for algorithm in _HEX_LENGTHS:
            value = getattr(self, algorithm)
            if value is None:
                continue
            hexdigest = str(value).strip().lower()
            if len(hexdigest) != _HEX_LENGTHS[algorithm] or not _is_hex(hexdigest):
                raise ConfigError(f"{algorithm} of {name} must be {_HEX_LENGTHS[algorithm]} "
                                  f"hex digits, got {value!r}")
            object.__setattr__(self, algorithm, hexdigest)
        if self.size is not None and (isinstance(self.size, bool)
                                      or not isinstance(self.size, int) or self.size < 0):
            raise ConfigError(f"size of {name} must be a number of bytes, got {self.size!r}")

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hexdigest) of the strongest declared checksum, or None."""
        if self.sha256:
            return ("sha256", self.sha256)
        if self.md5:
            return ("md5", self.md5)
        return None

    @property
    def key(self) -> str | None:
        """``<algo>-<hex>``: the downloads/ folder of the verified file; None if unchecked."""
        checksum = self.checksum
        return f"{checksum[0]}-{checksum[1]}" if checksum else None


def _positive_env(name: str, default: float, unit: str) -> float:
    """$``name`` as a positive finite number, else ``default``; ConfigError if it is not one."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"${name}={raw!r} is not a positive number of {unit}")
    return value


def default_timeout() -> float:
    """The socket timeout of a request: $DATAPIPE_TIMEOUT seconds, else DEFAULT_TIMEOUT."""
    return _positive_env(TIMEOUT_ENV, DEFAULT_TIMEOUT, "seconds")


def default_min_rate() -> float:
    """Bytes per second below which a transfer is abandoned: $DATAPIPE_MIN_RATE, else 1024."""
    return _positive_env(MIN_RATE_ENV, DEFAULT_MIN_RATE, "bytes per second")


def default_rate_window() -> float:
    """Seconds over which the minimum rate is judged: $DATAPIPE_RATE_WINDOW, else 60."""
    return _positive_env(RATE_WINDOW_ENV, DEFAULT_RATE_WINDOW, "seconds")


def default_max_download() -> int:
    """Bytes taken at most for a file of undeclared size: $DATAPIPE_MAX_DOWNLOAD, else 512 GiB."""
    return int(_positive_env(MAX_DOWNLOAD_ENV, DEFAULT_MAX_DOWNLOAD, "bytes"))


def lock_key(folder_key: str) -> str:
    """The cache lock guarding the downloads/ folder ``folder_key`` (see Download.folder_key)."""
    return f"download-{folder_key}"


@dataclass(frozen=True)
class FetchOptions:
    """Run-time options of a fetch; no part of any fingerprint.

    ``timeout`` defaults to $DATAPIPE_TIMEOUT (seconds), else 30: how long a mirror may
    stay silent, connecting or mid-body, before the next one is tried. ``min_rate`` and
    ``rate_window`` ($DATAPIPE_MIN_RATE, $DATAPIPE_RATE_WINDOW) abandon a mirror that
    trickles; ``max_bytes`` ($DATAPIPE_MAX_DOWNLOAD) caps a file of undeclared size.
    """

    mirrors: tuple[str, ...] = ()  # the user's base URLs (--mirror), tried first
    source: str | None = None  # --source DIR: take the files from there, no network
    verify: bool = True  # False is --no-verify
    quiet: bool | None = None  # None: a progress bar only when stderr is a terminal
    # Socket timeout of each request, in seconds: $DATAPIPE_TIMEOUT, else 30.
    timeout: float = field(default_factory=default_timeout)
    # A transfer below min_rate bytes/s over rate_window seconds is abandoned.
    min_rate: float = field(default_factory=default_min_rate)
    rate_window: float = field(default_factory=default_rate_window)
    # Bytes taken at most when the recipe declares no size.
    max_bytes: int = field(default_factory=default_max_download)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrors", _as_tuple(self.mirrors))


@dataclass(frozen=True)
class LocalFile:
    """A source file on disk and what is known about its bytes."""

    filename: str
    path: Path
    algorithm: str  # of ``checksum``
    # The actual checksum of the bytes on disk; for a decompressed or extracted form
    # verified against its recorded digests, the published file's (same data, same
    # fingerprint), and for an unverified extracted folder a sha256 of its files' md5s.
    checksum: str
    expected: str | None  # the recipe's checksum (same algorithm), None if it declares none
    verified: bool  # checksum == expected
    origin: str  # the URL it came from, or its --source path


# ------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class Download(Stage):
    """Fetch the recipe's resources into ``<cache>/downloads``, or take them from a folder."""

    kind: ClassVar[str] = "download"

    resources: tuple[Resource, ...]
    mirrors: tuple[str, ...] = ()  # the recipe's base URLs, tried after the user's
    # Folders under --source DIR searched after DIR itself (torchvision's MNIST/raw).
    source_folders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        resources = tuple(r if isinstance(r, Resource) else Resource(**r)
                          for r in _as_tuple(self.resources))
        names = [r.filename for r in resources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"resource(s) declared twice: {', '.join(duplicates)}")
        object.__setattr__(self, "resources", resources)
        object.__setattr__(self, "mirrors", _as_tuple(self.mirrors))
        object.__setattr__(self, "source_folders",
                           tuple(check_subfolder(f) for f in _as_tuple(self.source_folders)))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Download:
        """The stage whose :meth:`config` is ``config``."""
        resources = ({k: v for k, v in r.items() if k != "type"}
                     for r in config.get("resources", ()))
        return cls(resources=tuple(Resource(**r) for r in resources),
                   mirrors=tuple(config.get("mirrors", ())),
                   source_folders=tuple(config.get("source_folders", ())))

    def resource(self, filename: str) -> Resource:
        """The declared resource named ``filename``."""
        for r in self.resources:
            if r.filename == filename:
                return r
        known = ", ".join(r.filename for r in self.resources) or "none"
        raise ConfigError(f"{filename!r} is not a resource of this recipe (known: {known})")

    def folder_key(self, resource: Resource) -> str:
        """The downloads/ subfolder (and lock name) of ``resource``.

        ``resource.key`` when it declares a checksum; otherwise ``unchecked-<16 hex>``, a
        fingerprint of its name, size and the recipe's mirrors (not the user's: those
        are run-time options), so two recipes' unchecked ``data.csv`` do not collide.
        """
        if resource.key is not None:
            return resource.key
        ident = {"filename": resource.filename, "size": resource.size,
                 "mirrors": list(self.mirrors)}
        return f"unchecked-{fingerprint(ident)}"

    def cached(self, filename: str, cache: Cache, verify: bool = True) -> LocalFile | None:
        """The cached copy of ``filename``, or None; never touches the network.

        ``verify=True`` returns only bytes that match the recipe's checksum (or, for a
        resource that declares none, the one copy kept); ``verify=False`` prefers such
        a copy, else one kept with --no-verify.
        """
        r = self.resource(filename)
        folder = cache.under("downloads", self.folder_key(r))
        if r.checksum is None:
            # Verifying, a copy kept by --no-verify with another size than declared is no hit.
            return _read_entry(folder / filename, r, want_verified=False,
                               want_size=r.size if verify else None)
        hit = _read_entry(folder / filename, r, want_verified=True)
        if hit is not None or verify:
            return hit
        return _read_entry(_unverified_folder(folder) / filename, r, want_verified=False)

    def fetch(self, filenames: Iterable[str] | str | None, cache: Cache,
              options: FetchOptions | None = None) -> dict[str, LocalFile]:
        """Make each named file (all when ``filenames`` is None) available locally.

        Returns file name -> :class:`LocalFile`. Raises DownloadError when a file
        cannot be had from any mirror or is missing from ``options.source``, and
        ChecksumError when a --source file does not match (unless verify is off).
        """
        options = options or FetchOptions()
        resources = self._select(filenames)
        if options.source is not None:
            return _take_from_source(resources, Path(options.source), cache, options,
                                     self.source_folders)
        return {r.filename: self._fetch_one(r, cache, options) for r in resources}

    def at_source(self, filename: str, folder: str | os.PathLike) -> Found | None:
        """Where ``filename``, or a declared form of it, is under --source ``folder``."""
        r = self.resource(filename)
        return find(Path(folder).expanduser().absolute(), r.filename, r.forms,
                    self.source_folders)

    def source_identity(self, filename: str, folder: str | os.PathLike,
                        cache: Cache) -> tuple[str, str] | None:
        """(algorithm, hex) the file at --source ``folder`` would be prepared as; None if absent.

        What :meth:`fetch` records for it, without its warnings or refusals.
        """
        found = self.at_source(filename, folder)
        if found is None:
            return None
        entry, _, _ = _judge_source(self.resource(filename), found, cache, None)
        return entry.algorithm, entry.checksum

    def urls(self, filename: str, options: FetchOptions | None = None) -> list[str]:
        """The URLs tried for ``filename``, in order: --mirror, $DATAPIPE_MIRRORS, recipe's."""
        options = options or FetchOptions()
        env = os.environ.get(MIRRORS_ENV, "").split()
        bases = _unique(_base_url(b) for b in (*options.mirrors, *env, *self.mirrors) if b)
        return [b + urllib.parse.quote(filename) for b in bases]

    # -------------------------------------------------------------- internals

    def _select(self, filenames: Iterable[str] | str | None) -> list[Resource]:
        if filenames is None:
            return list(self.resources)
        if isinstance(filenames, str):
            filenames = [filenames]
        return [self.resource(name) for name in _unique(filenames)]

    def _fetch_one(self, r: Resource, cache: Cache, options: FetchOptions) -> LocalFile:
        hit = self.cached(r.filename, cache, verify=options.verify)
        if hit is not None:
            log.debug("%s is cached at %s", r.filename, hit.path)
            return hit
        key = self.folder_key(r)
        with cache.lock(lock_key(key), what=f"download of {r.filename}"):
            # Another process may have fetched it while this one waited for the lock.
            hit = self.cached(r.filename, cache, verify=options.verify)
            if hit is not None:
                return hit
            final = ensure_dir(cache.under("downloads", key)) / r.filename
            for folder in (final.parent, _unverified_folder(final.parent)):
                remove_stale_temporaries(folder)  # left by a killed `datapipe cache rm`
            remove_stale_temporaries(_sidecar(final))
            remove_stale_temporaries(_sidecar(_unverified_folder(final.parent) / r.filename))
            return _download(r, final, self.urls(r.filename, options), options)


# ------------------------------------------------------------------ network


class _MirrorFailed(Exception):
    """One mirror could not serve the file; ``reason`` is one line for the user.

    ``resumable``: the bytes in the .partial are still good (the transfer stopped
    early), so a later attempt may continue them with a Range request.
    """

    def __init__(self, reason: str, resumable: bool = True):
        reason = " ".join(reason.split())  # it ends up inside a one-line error
        super().__init__(reason)
        self.reason = reason
        self.resumable = resumable


class _StartOver(Exception):
    """The .partial cannot be continued from this mirror; discard it and start over."""


@dataclass
class _Body:
    """What one transfer left in the .partial."""

    checksum: str
    size: int
    resumed: bool
    head: bytes  # the file's first SNIFF_BYTES
    content_type: str | None


def _download(r: Resource, final: Path, urls: list[str], options: FetchOptions) -> LocalFile:
    """Fetch ``r`` into ``final`` from the first mirror that serves it; the lock is held."""
    if not urls:
        raise DownloadError(f"no mirror is known for {r.filename}; {SUGGESTION}")
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    # Only a checksum tells spliced bytes apart, so a .partial is kept across mirrors only
    # when one is checked at the end; without any checksum a stale .partial (whose
    # origin is unknown) is never continued.
    keep_across_mirrors = options.verify and r.checksum is not None
    if r.checksum is None:
        _unlink(partial)
    failures: list[tuple[str, str]] = []
    for url in urls:
        try:
            body = _from_mirror(url, partial, r, options)
        except _MirrorFailed as e:
            log.info("could not fetch %s from %s: %s", r.filename, url, e.reason)
            failures.append((url, e.reason))
            if not (e.resumable and keep_across_mirrors):
                _unlink(partial)
            continue
        # The failed mirrors are warned about once another one served the file; when all
        # fail, the DownloadError lists them, and a warning per mirror would only repeat it.
        for failed, reason in failures:
            log.warning("mirror %s failed for %s: %s", failed, r.filename, reason)
        log.info("fetched %s from %s", r.filename, url)
        return _publish(r, final, partial, body, url)
    tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
    raise DownloadError(f"could not download {r.filename}: {tried}; {SUGGESTION}")


def _from_mirror(url: str, partial: Path, r: Resource, options: FetchOptions) -> _Body:
    """Transfer ``url`` into ``partial`` and judge the bytes; raise _MirrorFailed if bad.

    A resumed file that does not match is downloaded once more from scratch: the
    earlier bytes may have come from a different mirror or version.
    """
    algorithm, expected = r.checksum or ("sha256", None)
    for attempt in (1, 2):
        try:
            body = _transfer(url, partial, r, algorithm, options)
        except _StartOver as e:
            _unlink(partial)
            if attempt == 2:
                raise _MirrorFailed(str(e), resumable=False) from None
            continue
        if expected is not None and body.checksum == expected:
            return body
        if body.resumed and attempt == 1:
            log.info("resumed %s does not match; downloading it again from %s", r.filename, url)
            _unlink(partial)
            continue
        problem = _sniff_problem(body.head, r.filename, body.content_type)
        if problem:
            raise _MirrorFailed(problem, resumable=False)
        if expected is not None and options.verify:
            raise _MirrorFailed(f"{algorithm} {body.checksum} does not match the expected "
                                f"{expected}", resumable=False)
        return body
    raise AssertionError("unreachable")


def _transfer(url: str, partial: Path, r: Resource, algorithm: str,
              options: FetchOptions) -> _Body:
    """One GET of ``url`` into ``partial``, continuing it with a Range request if it exists."""
    import http.client  # the network modules cost ~12 ms: only a real fetch pays it
    import urllib.error
    import urllib.request

    offset = _resumable_size(partial, r)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=options.timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _StartOver("the server cannot continue the partial file (HTTP 416)") from None
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}".strip()) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _MirrorFailed(_reason(e, options.timeout)) from None
    with response:
        status = response.getcode() or 200  # file: URLs have no status
        resumed = bool(offset) and status == 206
        if status == 206 and _content_range_start(response.headers) != (offset if resumed else 0):
            raise _StartOver("the server answered the Range request with other bytes")
        total = _announced_size(response.headers, offset if resumed else 0)
        content_type = response.headers.get("Content-Type")
        _check_announced_size(total, r, options.verify, response, content_type, resumed)
        cap = _size_cap(r, options)
        if total is not None and total > cap:
            raise _MirrorFailed(f"the server announces {total} bytes, more than the {cap} "
                                f"{_cap_source(r)}", resumable=False)
        return _stream(response, partial, r, algorithm, options,
                       offset if resumed else 0, total, content_type)


def _stream(response: Any, partial: Path, r: Resource, algorithm: str, options: FetchOptions,
            offset: int, total: int | None, content_type: str | None) -> _Body:
    """Append the response body to ``partial`` (truncated to ``offset``), hashing as it goes."""
    import http.client

    hasher = hashlib.new(algorithm)
    head = _hash_prefix(partial, offset, hasher) if offset else b""
    size = offset
    read = getattr(response, "read1", response.read)  # read1: keep what came before a reset
    limit = r.size if options.verify else None
    cap = _size_cap(r, options)
    pace = _Pace(options, r.size)
    try:
        with open(partial, "r+b" if offset else "wb") as f, \
                _progress(r.filename, total or r.size, offset, options.quiet) as bar:
            f.truncate(offset)
            f.seek(offset)
            while True:
                try:
                    chunk = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _MirrorFailed(f"{_reason(e, options.timeout)} after {size} bytes"
                                        ) from None
                if not chunk:
                    break
                f.write(chunk)
                hasher.update(chunk)
                if len(head) < SNIFF_BYTES:
                    head += chunk[:SNIFF_BYTES - len(head)]
                size += len(chunk)
                bar.update(len(chunk))
                if size > cap:
                    raise _MirrorFailed(f"sent more than the {cap} {_cap_source(r)}",
                                        resumable=False)
                pace.check(size - offset)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # the disk, not the network: no other mirror will help
        raise write_error(e, partial) from None
    # Fewer bytes than announced is a broken transfer; fewer than declared is one too,
    # unless the user turned verification (of size and checksum alike) off.
    for expected_size in (total, limit):
        if expected_size is not None and size < expected_size:
            raise _MirrorFailed(f"truncated: got {size} of {expected_size} bytes")
    return _Body(hasher.hexdigest(), size, bool(offset), head, content_type)


def _size_cap(r: Resource, options: FetchOptions) -> int:
    """The most bytes taken for ``r``: its declared size, verified or not, else the cap."""
    return r.size if r.size is not None else options.max_bytes


def _cap_source(r: Resource) -> str:
    if r.size is not None:
        return "bytes the recipe declares"
    return f"bytes taken for a file of undeclared size (${MAX_DOWNLOAD_ENV})"


class _Pace:
    """Abandons a transfer that trickles: below the minimum rate over a window, or late.

    The window restarts each time it is judged; the deadline is the time the expected
    size takes at the minimum rate, plus one window for the start.
    """

    def __init__(self, options: FetchOptions, expected: int | None) -> None:
        self.rate, self.window = options.min_rate, options.rate_window
        self.started = self.window_start = time.monotonic()
        self.window_bytes = 0
        self.deadline = None if expected is None else self.window + expected / self.rate

    def check(self, transferred: int) -> None:
        """Raise _MirrorFailed when the transfer is too slow; ``transferred``: bytes so far."""
        now = time.monotonic()
        if self.deadline is not None and now - self.started > self.deadline:
            raise _MirrorFailed(f"not done after {now - self.started:.0f} s, the deadline for "
                                f"its size at {self.rate:g} bytes/s (${MIN_RATE_ENV})")
        elapsed = now - self.window_start
        if elapsed < self.window:
            return
        got = transferred - self.window_bytes
        if got < self.rate * elapsed:
            raise _MirrorFailed(f"too slow: {got} bytes in {elapsed:.0f} s, under "
                                f"{self.rate:g} bytes/s (${MIN_RATE_ENV}, ${RATE_WINDOW_ENV})")
        self.window_start, self.window_bytes = now, transferred


def _publish(r: Resource, final: Path, partial: Path, body: _Body, url: str) -> LocalFile:
    """Rename the judged .partial into place and write its sidecar last."""
    algorithm, expected = r.checksum or ("sha256", None)
    verified = expected is not None and body.checksum == expected
    target = final
    if expected is not None and not verified:
        warnings.warn(f"{r.filename}: {algorithm} is {body.checksum} but the recipe expects "
                      f"{expected}; keeping it unverified as asked (--no-verify)",
                      UnverifiedDataWarning, stacklevel=2)
        target = ensure_dir(_unverified_folder(final.parent)) / r.filename
    elif r.size is not None and body.size != r.size:  # unchecked, so only the size can differ
        warnings.warn(f"{r.filename} has {body.size} bytes but the recipe expects {r.size}; "
                      f"keeping it as asked (--no-verify)", UnverifiedDataWarning, stacklevel=2)
    sidecar = _sidecar(target)
    _unlink(sidecar)  # a sidecar must never describe other bytes than the file's
    try:
        os.replace(partial, target)
    except OSError as e:
        raise write_error(e, target) from None
    fsync_path(target.parent)
    entry = LocalFile(r.filename, target, algorithm, body.checksum, expected, verified, url)
    write_json_atomic(sidecar, {
        "filename": r.filename, "algorithm": algorithm, "checksum": body.checksum,
        "expected": expected, "verified": verified, "origin": url, "size": body.size,
        "fetched_at": now_iso(),
    })
    return entry


def _resumable_size(partial: Path, r: Resource) -> int:
    """The size of a .partial worth continuing; 0 (and no .partial) when there is none."""
    try:
        size = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if r.size is not None and size >= r.size:
        # Complete or too long: whatever it holds, nothing is left to ask for.
        _unlink(partial)
        return 0
    return size


def _hash_prefix(partial: Path, offset: int, hasher: Any) -> bytes:
    """Feed the first ``offset`` bytes of ``partial`` to ``hasher``; return its head."""
    head = b""
    with open(partial, "rb") as f:
        left = offset
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                raise _StartOver("the partial file shrank while it was read")
            hasher.update(block)
            if len(head) < SNIFF_BYTES:
                head += block[:SNIFF_BYTES - len(head)]
            left -= len(block)
    return head


def _content_range_start(headers: Any) -> int | None:
    """The first byte of a ``Content-Range: bytes START-END/TOTAL`` header."""
    value = (headers.get("Content-Range") or "").strip()
    unit, _, spec = value.partition(" ")
    try:
        return int(spec.split("-", 1)[0]) if unit.lower() == "bytes" else None
    except ValueError:
        return None


def _announced_size(headers: Any, offset: int) -> int | None:
    """The whole file's size as the response announces it, if it does."""
    total = (headers.get("Content-Range") or "").rpartition("/")[2].strip()
    if offset and total.isdigit():
        return int(total)
    length = (headers.get("Content-Length") or "").strip()
    return offset + int(length) if length.isdigit() else None


def _check_announced_size(total: int | None, r: Resource, verify: bool, response: Any,
                          content_type: str | None, resumed: bool) -> None:
    """Verifying, refuse before the body a file announced with another size than declared.

    The reason names an HTML page when the first bytes show one: that is what the user
    can act on, more than a size. Without verify the size, like the checksum, is only
    warned about once the file is in.
    """
    if total is None or r.size is None or total == r.size or not verify:
        return
    import http.client

    head = b""
    if not resumed:
        with contextlib.suppress(OSError, http.client.HTTPException):
            head = response.read(SNIFF_BYTES)
    problem = _sniff_problem(head, r.filename, content_type) if head else None
    raise _MirrorFailed(problem or f"the server announces {total} bytes, the recipe "
                                   f"expects {r.size}")


def _sniff_problem(first_bytes: bytes, filename: str, content_type: str | None) -> str | None:
    """Why these first bytes cannot be the start of ``filename``; None if they may be."""
    name = filename.lower()
    if not name.endswith(HTML_NAMES):
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media == "text/html":
            return "served an HTML page (Content-Type text/html), not the file"
        text = first_bytes[len(codecs.BOM_UTF8):] if first_bytes.startswith(
            codecs.BOM_UTF8) else first_bytes
        text = text.lstrip().lower()
        if text.startswith((b"<!doctype html", b"<html")):
            return "served an HTML page, not the file"
    if name.endswith(GZIP_NAMES) and first_bytes[:2] != GZIP_MAGIC:
        return f"not gzip data (starts with 0x{first_bytes[:4].hex() or 'nothing'})"
    return None


def _reason(e: BaseException, timeout: float) -> str:
    """One line for the user saying why a connection failed."""
    import http.client
    import urllib.error

    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        return _reason(e.reason, timeout)
    if isinstance(e, TimeoutError):  # socket.timeout too
        return f"timed out after {timeout:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(e, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, ValueError):
        return f"not a usable URL ({e})"
    text = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
    return " ".join(f"{type(e).__name__}: {text}".split())


@contextlib.contextmanager
def _progress(filename: str, total: int | None, initial: int,
              quiet: bool | None) -> Iterator[Any]:
    """A tqdm bar in bytes on stderr, disabled when quiet (or, if unset, off a terminal)."""
    from tqdm import tqdm  # only a fetch needs it

    show = quiet is False or (quiet is None and _stderr_is_tty())
    with tqdm(total=total, initial=initial, desc=filename, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not show) as bar:
        yield bar


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ --source


def _take_from_source(resources: list[Resource], folder: Path, cache: Cache,
                      options: FetchOptions, subfolders: tuple[str, ...] = ()
                      ) -> dict[str, LocalFile]:
    """The files in ``folder`` (or its ``subfolders``), used in place, in any declared form,
    after checking every one is there."""
    folder = folder.expanduser().absolute()
    if not folder.is_dir():
        raise DownloadError(f"--source {folder} is not a folder; give the folder that holds "
                            f"the files downloaded by hand")
    found = {r.filename: find(folder, r.filename, r.forms, subfolders) for r in resources}
    missing = [describe(r.filename, r.forms) for r in resources if found[r.filename] is None]
    if missing:
        where = f" (nor {', '.join(subfolders)} under it)" if subfolders else ""
        raise DownloadError(f"--source {folder}{where} lacks {', '.join(missing)}; put the "
                            f"file(s) there, or leave out --source to download them")
    return {r.filename: _source_file(r, found[r.filename], cache, options) for r in resources}


def _judge_source(r: Resource, found: Found, cache: Cache,
                  quiet: bool | None) -> tuple[LocalFile, str | None, bool]:
    """The LocalFile of ``found``, why it is not verified (None: verified or unchecked) and
    whether anything is recorded to check it against."""
    path = found.path
    if found.form is not None:
        verdict = judge(found, r.checksum,
                        lambda p, algorithm: source_digest(p, algorithm, cache, quiet))
        algorithm, checksum = verdict.identity
        recorded = getattr(found.form, "checksum", None)
        expected = r.checksum[1] if verdict.verified and r.checksum else (
            recorded[1] if recorded and recorded[0] == algorithm else None)
        origin = f"{path} ({found.how})"
        entry = LocalFile(r.filename, path, algorithm, checksum, expected, verdict.verified,
                          origin)
        return entry, verdict.mismatch, verdict.checkable
    algorithm, expected = r.checksum or ("sha256", None)
    actual = source_digest(path, algorithm, cache, quiet)
    verified = expected is not None and actual == expected
    entry = LocalFile(r.filename, path, algorithm, actual, expected, verified, str(path))
    if verified:
        return entry, None, True
    mismatch = None
    if expected is not None:
        mismatch = f"its {algorithm} is {actual} but the recipe expects {expected}"
    elif r.size is not None and path.stat().st_size != r.size:
        mismatch = f"it has {path.stat().st_size} bytes but the recipe expects {r.size}"
    return entry, mismatch, True


def _source_file(r: Resource, found: Found, cache: Cache, options: FetchOptions) -> LocalFile:
    entry, mismatch, checkable = _judge_source(r, found, cache, options.quiet)
    path = found.path
    if entry.verified:
        return entry
    if found.form is not None:
        if mismatch and options.verify:
            remedy = ("replace it with the right file, or pass --no-verify if you trust it"
                      if checkable else "pass --no-verify (verify=False) to use it unverified, "
                      f"or give {r.filename} itself")
            raise ChecksumError(f"{path} ({found.how} {r.filename}): {mismatch}; {remedy}")
        warnings.warn(f"{r.filename}: using {path} ({found.how}) unverified as asked "
                      f"(--no-verify): {mismatch}", UnverifiedDataWarning, stacklevel=3)
        return entry
    head = _read_head(path)
    problem = _sniff_problem(head, r.filename, None)
    if mismatch and options.verify:
        hint = f" (it is {problem.replace('served ', '')})" if problem else ""
        raise ChecksumError(f"{path}: {mismatch}{hint}; replace it with the right file, or "
                            f"pass --no-verify if you trust it")
    if problem:
        raise DownloadError(f"{path} is {problem.replace('served ', '')}; replace it with "
                            f"the right file")
    if mismatch:
        warnings.warn(f"{r.filename}: {mismatch}; using it unverified as asked (--no-verify)",
                      UnverifiedDataWarning, stacklevel=2)
    return entry


def source_digest(path: Path, algorithm: str, cache: Cache, quiet: bool | None = None) -> str:
    """The digest of a --source file, memoized in the cache by its stat.

    A memo is written only for files left untouched for RACY_SECONDS, and is trusted
    only while path, size, mtime, ctime, inode and device are all unchanged. Hashing
    a large file shows a progress bar (unless ``quiet``; see ``_progress``).
    """
    before = path.stat()
    memo = cache.downloads / SOURCE_DIGESTS / f"{fingerprint([str(path), algorithm])}.json"
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
    with open(path, "rb") as f, _progress(f"{algorithm} {path.name}", size, 0, quiet) as bar:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stat_signature(path: Path, st: os.stat_result) -> dict[str, Any]:
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


# ------------------------------------------------------------------ cache entries


def _read_entry(path: Path, r: Resource, want_verified: bool,
                want_size: int | None = None) -> LocalFile | None:
    """The entry at ``path`` if its sidecar exists and agrees with the file and ``r``."""
    meta = read_json(_sidecar(path))
    if not isinstance(meta, dict):
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    try:  # values read back name files and go into fingerprints: a bad one is no trust
        check_file_name(meta.get("filename"))
        check_algorithm(meta.get("algorithm"))
        check_hex(meta.get("checksum"), "checksum")
    except CacheError:
        return None
    algorithm, expected = r.checksum or ("sha256", None)
    if (meta.get("filename") != r.filename or meta.get("size") != size
            or meta.get("algorithm") != algorithm or meta.get("expected") != expected
            or not isinstance(meta.get("checksum"), str)
            or (want_size is not None and size != want_size)):
        return None
    verified = expected is not None and meta["checksum"] == expected
    if want_verified and not verified:
        return None
    return LocalFile(r.filename, path, algorithm, meta["checksum"], expected, verified,
                     str(meta.get("origin", "")))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _unverified_folder(folder: Path) -> Path:
    return refuse_link(folder.with_name(folder.name + UNVERIFIED_SUFFIX))


# ------------------------------------------------------------------ small helpers


def check_mirror(base: object) -> str:
    """``base`` if it is a usable mirror (a URL or a folder path); else ConfigError."""
    if not isinstance(base, str) or not base.strip() or not base.strip().isprintable():
        raise ConfigError(f"mirror {base!r} is not a URL or a folder path")
    try:
        parts = urllib.parse.urlsplit(base.strip())
        parts.port  # noqa: B018 -- parsed lazily: an out-of-range port raises here
    except ValueError as e:
        raise ConfigError(f"mirror {base!r} is not a well-formed URL ({e})") from None
    if parts.scheme.lower() in ("http", "https", "ftp") and not parts.hostname:
        raise ConfigError(f"mirror {base!r} names no host")
    return base


def _base_url(base: str) -> str:
    """A mirror base URL ending in ``/``; a plain folder path becomes a file: URL."""
    base = check_mirror(base).strip()
    if urllib.parse.urlsplit(base).scheme.lower() not in URL_SCHEMES:
        base = Path(base).expanduser().absolute().as_uri()
    return base if base.endswith("/") else base + "/"


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, dict)):
        return (value,)
    return tuple(value)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
