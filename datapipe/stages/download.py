"""The download stage: fetch source files from mirrors or a local folder, and verify them.

A :class:`Download` declares the files a recipe needs (:class:`Resource`: a file name
with its md5 and/or sha256 and size) and the recipe's mirrors. :meth:`Download.fetch`
puts each file into the cache, trying mirrors in order, or takes it in place from
``--source DIR``. Run-time choices (extra mirrors, --no-verify, quiet) travel in
:class:`FetchOptions` and are no part of any fingerprint.

Files go under ``<cache>/downloads/``, each in a folder named after the checksum the
recipe declares (``<algo>-<hex>``; ``unchecked-<16 hex>`` for a resource that declares
none, see Download.folder_key), with a sidecar written last (no sidecar, no trust), a
``.partial`` while it is transferred and an ``.unverified`` twin folder for bytes kept
with --no-verify despite a mismatch; :mod:`datapipe.layout` names them all.

A verified look-up never sees the ``.unverified`` folder, so a file kept with
--no-verify can never pass for a verified one. The bytes move in
:mod:`datapipe.transport` (one GET, resumed, capped and paced); the digests of
--source files are memoized by :mod:`datapipe.source_digests`. This module imports
neither torch nor pyarrow: it runs on the CLI's fast path.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datapipe import layout
from datapipe.cache import (
    Cache,
    check_algorithm,
    check_file_name,
    check_hex,
    ensure_dir,
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
from datapipe.source_digests import source_digest
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
from datapipe.transport import (
    SNIFF_BYTES,
    Body,
    Limits,
    MirrorFailed,
    StartOver,
    Want,
    default_max_download,
    default_min_rate,
    default_rate_window,
    default_timeout,
    sniff_problem,
    transfer,
)

log = logging.getLogger("datapipe")

MIRRORS_ENV = "DATAPIPE_MIRRORS"
SUGGESTION = "use --mirror URL to add a mirror, or --source DIR with the files downloaded by hand"
URL_SCHEMES = ("http", "https", "file", "ftp")
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
        return layout.checked_key(*checksum) if checksum else None


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

    @property
    def limits(self) -> Limits:
        """The bounds of each transfer (see :mod:`datapipe.transport`)."""
        return Limits(timeout=self.timeout, min_rate=self.min_rate,
                      rate_window=self.rate_window, max_bytes=self.max_bytes, quiet=self.quiet)


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
        return layout.unchecked_key(fingerprint(ident))

    def cached(self, filename: str, cache: Cache, verify: bool = True) -> LocalFile | None:
        """The cached copy of ``filename``, or None; never touches the network.

        ``verify=True`` returns only bytes that match the recipe's checksum (or, for a
        resource that declares none, the one copy kept); ``verify=False`` prefers such
        a copy, else one kept with --no-verify.
        """
        r = self.resource(filename)
        folder = cache.path(layout.download_folder(self.folder_key(r)))
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
        with cache.lock(layout.download_lock(key), what=f"download of {r.filename}"):
            # Another process may have fetched it while this one waited for the lock.
            hit = self.cached(r.filename, cache, verify=options.verify)
            if hit is not None:
                return hit
            final = ensure_dir(cache.path(layout.download_folder(key))) / r.filename
            for folder in (final.parent, _unverified_folder(final.parent)):
                remove_stale_temporaries(folder)  # left by a killed `datapipe cache rm`
            remove_stale_temporaries(_sidecar(final))
            remove_stale_temporaries(_sidecar(_unverified_folder(final.parent) / r.filename))
            return _download(r, final, self.urls(r.filename, options), options)


# ------------------------------------------------------------------ mirrors


def _download(r: Resource, final: Path, urls: list[str], options: FetchOptions) -> LocalFile:
    """Fetch ``r`` into ``final`` from the first mirror that serves it; the lock is held."""
    if not urls:
        raise DownloadError(f"no mirror is known for {r.filename}; {SUGGESTION}")
    partial = final.with_name(layout.partial_name(final.name))
    # Only a checksum tells spliced bytes apart, so a .partial is kept across mirrors only
    # when one is checked at the end; without any checksum a stale .partial (whose
    # origin is unknown) is never continued.
    keep_across_mirrors = options.verify and r.checksum is not None
    if r.checksum is None:
        partial.unlink(missing_ok=True)
    failures: list[tuple[str, str]] = []
    for url in urls:
        try:
            body = _from_mirror(url, partial, r, options)
        except MirrorFailed as e:
            log.info("could not fetch %s from %s: %s", r.filename, url, e.reason)
            failures.append((url, e.reason))
            if not (e.resumable and keep_across_mirrors):
                partial.unlink(missing_ok=True)
            continue
        # The failed mirrors are warned about once another one served the file; when all
        # fail, the DownloadError lists them, and a warning per mirror would only repeat it.
        for failed, reason in failures:
            log.warning("mirror %s failed for %s: %s", failed, r.filename, reason)
        log.info("fetched %s from %s", r.filename, url)
        return _publish(r, final, partial, body, url)
    tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
    raise DownloadError(f"could not download {r.filename}: {tried}; {SUGGESTION}")


def _from_mirror(url: str, partial: Path, r: Resource, options: FetchOptions) -> Body:
    """Transfer ``url`` into ``partial`` and judge the bytes; raise MirrorFailed if bad.

    A resumed file that does not match is downloaded once more from scratch: the
    earlier bytes may have come from a different mirror or version.
    """
    algorithm, expected = r.checksum or ("sha256", None)
    want = Want(r.filename, algorithm, r.size, exact=options.verify, declared_by="the recipe")
    for attempt in (1, 2):
        try:
            body = transfer(url, partial, want, options.limits)
        except StartOver as e:
            partial.unlink(missing_ok=True)
            if attempt == 2:
                raise MirrorFailed(str(e), resumable=False) from None
            continue
        if expected is not None and body.checksum == expected:
            return body
        if body.resumed and attempt == 1:
            log.info("resumed %s does not match; downloading it again from %s", r.filename, url)
            partial.unlink(missing_ok=True)
            continue
        problem = sniff_problem(body.head, r.filename, body.content_type)
        if problem:
            raise MirrorFailed(problem, resumable=False)
        if expected is not None and options.verify:
            raise MirrorFailed(f"{algorithm} {body.checksum} does not match the expected "
                               f"{expected}", resumable=False)
        return body
    raise AssertionError("unreachable")


def _publish(r: Resource, final: Path, partial: Path, body: Body, url: str) -> LocalFile:
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
    sidecar.unlink(missing_ok=True)  # a sidecar must never describe other bytes than the file's
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
    problem = sniff_problem(head, r.filename, None)
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
    return path.with_name(layout.sidecar_name(path.name))


def _unverified_folder(folder: Path) -> Path:
    return refuse_link(folder.with_name(layout.unverified_twin(folder.name)))


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
