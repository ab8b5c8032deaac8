"""An object-store cache root: its URL, its keys and the one place that talks to it.

``s3://bucket/prefix`` names a cache root whose keys mirror the local cache's layout
(``prefix/prepared/<name>/<version>/<fingerprint>/manifest.json``; see publish.py for the
data objects). The endpoint comes from ``storage_options`` (``endpoint_url``), else
$DATAPIPE_S3_ENDPOINT, else $AWS_ENDPOINT_URL, else AWS itself; credentials the way
boto finds them. Every part of a key is a plain name (cache.check_file_name), as every
part of a local path is, so nothing read back from a manifest can name another key.

Every call is bounded: connect and read timeouts and a fixed number of retries (boto's
"standard" mode retries 500s, 503s, throttling and dropped connections with backoff),
and any failure that remains becomes one CacheError naming the root and what to do.
fsspec and s3fs are imported when a store is opened, never at datapipe's start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from datapipe.cache import check_file_name
from datapipe.errors import CacheError, ConfigError

ENDPOINT_ENV = "DATAPIPE_S3_ENDPOINT"
AWS_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
PROTOCOLS = ("s3",)  # where a conditional create (If-None-Match) is known to hold
CONNECT_TIMEOUT = 10.0  # seconds per connection attempt
READ_TIMEOUT = 60.0  # seconds without a byte before a request is retried
RETRIES = 5  # attempts per request (boto "standard" mode, exponential backoff)
# S3's bucket rules (3-63 characters, lowercase letters, digits, '.', '-').
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_PATTERN = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.DOTALL)


def is_remote(cache_dir: object) -> bool:
    """True if ``cache_dir`` is an object-store URL (``s3://...``), not a folder."""
    return isinstance(cache_dir, str) and _URL_PATTERN.fullmatch(cache_dir) is not None


@dataclass(frozen=True)
class StoreURL:
    """A parsed object-store root: protocol, bucket and prefix parts (all checked)."""

    protocol: str
    bucket: str
    prefix: tuple[str, ...]

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """The parts of ``s3://bucket/some/prefix``; ConfigError in one line if malformed."""
        match = _URL_PATTERN.fullmatch(url) if isinstance(url, str) else None
        if match is None:
            raise ConfigError(f"cache_dir={url!r} is not an object-store URL such as "
                              f"s3://bucket/prefix")
        protocol, rest = match.groups()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"cache_dir={url!r}: object store {protocol}:// is not "
                              f"supported; use {' or '.join(p + '://' for p in PROTOCOLS)} "
                              f"(any S3-compatible server, with {ENDPOINT_ENV})")
        bucket, _, prefix = rest.strip("/").partition("/")
        if not BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"cache_dir={url!r}: {bucket!r} is not a bucket name "
                              f"(3-63 lowercase letters, digits, '.' and '-')")
        parts = tuple(p for p in prefix.split("/") if p) if prefix else ()
        try:
            for part in parts:
                check_file_name(part, "prefix part")
        except CacheError as e:
            raise ConfigError(f"cache_dir={url!r}: {e}; a prefix is plain names "
                              f"separated by '/'") from None
        return cls(protocol, bucket, parts)

    def __str__(self) -> str:
        return f"{self.protocol}://" + "/".join((self.bucket, *self.prefix))


@dataclass
class Store:
    """An opened object-store root: keys under it and the few calls datapipe makes."""

    url: StoreURL
    fs: Any = field(repr=False)

    def key(self, *parts: str) -> str:
        """``bucket/prefix/part/...``, each part a plain name (never a path)."""
        for part in parts:
            check_file_name(part, "object key part")
        return "/".join((self.url.bucket, *self.url.prefix, *parts))

    def where(self, key: str) -> str:
        return f"{self.url.protocol}://{key}"

    @contextmanager
    def calling(self, what: str) -> Iterator[None]:
        """Turn what a failed call raises into one CacheError saying what was done where."""
        try:
            yield
        except (FileExistsError, FileNotFoundError):
            raise
        except transport_errors() as e:
            raise CacheError(f"object store {self.url}: {what} failed ({describe(e)}); "
                             f"check that the endpoint is reachable and the credentials "
                             f"may read and write the bucket (${ENDPOINT_ENV})") from None

    # -------------------------------------------------------------- calls

    def exists(self, key: str) -> bool:
        with self.calling(f"looking up {self.where(key)}"):
            try:
                self.fs.info(key)
                return True
            except FileNotFoundError:
                return False

    def size(self, key: str) -> int | None:
        """The size of the object ``key``, or None when there is none."""
        with self.calling(f"looking up {self.where(key)}"):
            try:
                return int(self.fs.info(key)["size"])
            except FileNotFoundError:
                return None

    def read(self, key: str, limit: int) -> bytes | None:
        """The bytes of a small object (at most ``limit``), or None when there is none."""
        size = self.size(key)
        if size is None:
            return None
        if size > limit:
            raise CacheError(f"object store {self.url}: {self.where(key)} has {size} bytes, "
                             f"more than the {limit} a datapipe manifest may have")
        with self.calling(f"reading {self.where(key)}"):
            try:
                return self.fs.cat_file(key)
            except FileNotFoundError:
                return None

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` to ``key`` only if no object is there (If-None-Match: '*').

        True if this call created it, False if one was there already. The server decides
        atomically, so of two racing writers exactly one creates it.
        """
        with self.calling(f"writing {self.where(key)}"):
            try:
                self.fs.pipe_file(key, data, mode="create")
                return True
            except FileExistsError:
                return False

    def put_file(self, path: str | os.PathLike, key: str) -> None:
        """Upload a local file; on S3 the object appears whole or not at all."""
        with self.calling(f"uploading {os.fspath(path)} to {self.where(key)}"):
            self.fs.put_file(os.fspath(path), key)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download ``key`` to the local file ``path`` (FileNotFoundError if absent)."""
        with self.calling(f"downloading {self.where(key)}"):
            self.fs.get_file(key, os.fspath(path))

    def list_names(self, *parts: str) -> list[str]:
        """The names directly under ``parts`` (folders and objects); [] when none."""
        key = self.key(*parts)
        with self.calling(f"listing {self.where(key)}"):
            try:
                found = self.fs.ls(key, detail=False, refresh=True)
            except FileNotFoundError:
                return []
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in found})

    def list_sizes(self, *parts: str) -> dict[str, int]:
        """The objects directly under ``parts`` (not folders) and their sizes; {} when none."""
        key = self.key(*parts)
        with self.calling(f"listing {self.where(key)}"):
            try:
                found = self.fs.ls(key, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
        return {str(info["name"]).rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
                for info in found if info.get("type") != "directory"}

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        """The bytes ``[start, stop)`` of the object ``key`` (one ranged GET, bounded)."""
        with self.calling(f"reading {self.where(key)}"):
            return self.fs.cat_file(key, start=start, end=stop)

    def remove_many(self, keys: list[str]) -> None:
        """Delete these objects (in batches of up to 1,000 a request); absent ones are fine."""
        if keys:
            with self.calling(f"removing {len(keys)} object(s) under {self.where(keys[0])}"):
                try:
                    self.fs.rm(keys)
                except FileNotFoundError:
                    pass

    def remove(self, key: str) -> None:
        with self.calling(f"removing {self.where(key)}"):
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass


def endpoint(storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The endpoint URL: storage_options, else $DATAPIPE_S3_ENDPOINT, else $AWS_ENDPOINT_URL."""
    options = dict(storage_options or {})
    given = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url")
    return given or os.environ.get(ENDPOINT_ENV) or os.environ.get(AWS_ENDPOINT_ENV) or None


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open the object-store root ``url``; one-line errors if s3fs is missing or it is
    unreachable. The bucket must exist (datapipe never creates buckets)."""
    parsed = StoreURL.parse(url)
    try:
        import s3fs
    except ImportError:
        raise ConfigError(f"cache_dir={url!r} needs the s3 extra: pip install "
                          f"'datapipe[s3]' (s3fs)") from None
    options = dict(storage_options or {})
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    chosen = endpoint({**options, "client_kwargs": client_kwargs})
    options.pop("endpoint_url", None)
    if chosen:
        client_kwargs["endpoint_url"] = chosen
    config_kwargs = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                     "retries": {"max_attempts": RETRIES, "mode": "standard"},
                     **(options.pop("config_kwargs", None) or {})}
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs,
                           skip_instance_cache=True, **options)
    store = Store(parsed, fs)
    with store.calling(f"opening bucket {parsed.bucket}"):
        try:
            fs.info(parsed.bucket)
        except FileNotFoundError:
            raise CacheError(f"object store {parsed}: bucket {parsed.bucket!r} does not "
                             f"exist (or these credentials cannot see it); create it, or "
                             f"check the endpoint ({chosen or 'AWS'})") from None
    return store


class LazyStore:
    """A store opened on first use: a load whose local cache holds everything it needs
    never contacts the store (nor pays for an S3 client), and works offline."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = StoreURL.parse(url)  # a malformed URL is refused at once
        self._opening = (url, dict(storage_options or {}))
        self._store: Store | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._store is None:
            self._store = open_store(*self._opening)
        return getattr(self._store, name)


def transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed request may raise through fsspec: OSError and boto's own errors."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def describe(e: BaseException) -> str:
    """A short one-line reason for a failed request."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
