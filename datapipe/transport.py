"""One GET of a URL into a file: resumed, capped, paced and hashed as the bytes arrive.

The download stage decides which URLs to try and what the bytes must be; this module
only moves them. :func:`transfer` continues a ``.partial`` file with a Range request
when there is one, takes at most a cap of bytes, abandons a mirror that stays silent
(:attr:`Limits.timeout`) or trickles (:class:`Pace`), and says why in one line
(:class:`MirrorFailed`). It knows file names (to tell an HTML error page from the file)
but nothing of recipes or of the cache. The network modules are imported only when a
transfer runs: the CLI's fast path never pays for them.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapipe.cache import write_error
from datapipe.errors import ConfigError
from datapipe.progress import progress

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
CHUNK = 1 << 20
SNIFF_BYTES = 512
USER_AGENT = "datapipe"
HTML_NAMES = (".html", ".htm", ".xhtml")
GZIP_NAMES = (".gz", ".tgz")
GZIP_MAGIC = b"\x1f\x8b"


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


@dataclass(frozen=True)
class Limits:
    """The bounds every transfer runs under (see the module's constants for the defaults)."""

    # Seconds a mirror may stay silent, connecting or mid-body: $DATAPIPE_TIMEOUT, else 30.
    timeout: float = field(default_factory=default_timeout)
    # A transfer below min_rate bytes/s over rate_window seconds is abandoned.
    min_rate: float = field(default_factory=default_min_rate)
    rate_window: float = field(default_factory=default_rate_window)
    # Bytes taken at most for a file of undeclared size.
    max_bytes: int = field(default_factory=default_max_download)
    quiet: bool | None = None  # None: a progress bar only when stderr is a terminal


@dataclass(frozen=True)
class Want:
    """What the caller knows of the file one transfer fetches."""

    name: str  # its file name: the progress bar's label, and what its first bytes must fit
    algorithm: str  # the digest computed while the bytes arrive
    size: int | None = None  # its declared size: caps the body and sets the deadline
    exact: bool = True  # refuse a body announced or sent with fewer or other bytes than size
    declared_by: str = "the declaration"  # who declared ``size``, for the messages


class MirrorFailed(Exception):
    """One mirror could not serve the file; ``reason`` is one line for the user.

    ``resumable``: the bytes in the .partial are still good (the transfer stopped
    early), so a later attempt may continue them with a Range request.
    """

    def __init__(self, reason: str, resumable: bool = True):
        reason = " ".join(reason.split())  # it ends up inside a one-line error
        super().__init__(reason)
        self.reason = reason
        self.resumable = resumable


class StartOver(Exception):
    """The .partial cannot be continued from this mirror; discard it and start over."""


@dataclass
class Body:
    """What one transfer left in the .partial."""

    checksum: str
    size: int
    resumed: bool
    head: bytes  # the file's first SNIFF_BYTES
    content_type: str | None


def transfer(url: str, partial: Path, want: Want, limits: Limits) -> Body:
    """One GET of ``url`` into ``partial``, continuing it with a Range request if it exists.

    Raises MirrorFailed when the mirror cannot serve the bytes, StartOver when the
    .partial cannot be continued from it.
    """
    import http.client  # the network modules cost ~12 ms: only a real fetch pays it
    import urllib.error
    import urllib.request

    offset = _resumable_size(partial, want)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=limits.timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise StartOver("the server cannot continue the partial file (HTTP 416)") from None
        raise MirrorFailed(f"HTTP {e.code} {e.reason}".strip()) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise MirrorFailed(_reason(e, limits.timeout)) from None
    with response:
        status = response.getcode() or 200  # file: URLs have no status
        resumed = bool(offset) and status == 206
        if status == 206 and _content_range_start(response.headers) != (offset if resumed else 0):
            raise StartOver("the server answered the Range request with other bytes")
        total = _announced_size(response.headers, offset if resumed else 0)
        content_type = response.headers.get("Content-Type")
        _check_announced_size(total, want, response, content_type, resumed)
        cap = _size_cap(want, limits)
        if total is not None and total > cap:
            raise MirrorFailed(f"the server announces {total} bytes, more than the {cap} "
                               f"{_cap_source(want)}", resumable=False)
        return _stream(response, partial, want, limits,
                       offset if resumed else 0, total, content_type)


def _stream(response: Any, partial: Path, want: Want, limits: Limits,
            offset: int, total: int | None, content_type: str | None) -> Body:
    """Append the response body to ``partial`` (truncated to ``offset``), hashing as it goes."""
    import http.client

    hasher = hashlib.new(want.algorithm)
    head = _hash_prefix(partial, offset, hasher) if offset else b""
    size = offset
    read = getattr(response, "read1", response.read)  # read1: keep what came before a reset
    limit = want.size if want.exact else None
    cap = _size_cap(want, limits)
    pace = Pace(limits, want.size)
    try:
        with open(partial, "r+b" if offset else "wb") as f, \
                progress(want.name, total or want.size, offset, limits.quiet) as bar:
            f.truncate(offset)
            f.seek(offset)
            while True:
                try:
                    chunk = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise MirrorFailed(f"{_reason(e, limits.timeout)} after {size} bytes"
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
                    raise MirrorFailed(f"sent more than the {cap} {_cap_source(want)}",
                                       resumable=False)
                pace.check(size - offset)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # the disk, not the network: no other mirror will help
        raise write_error(e, partial) from None
    # Fewer bytes than announced is a broken transfer; fewer than declared is one too,
    # unless the caller turned the size check (with verification) off.
    for expected_size in (total, limit):
        if expected_size is not None and size < expected_size:
            raise MirrorFailed(f"truncated: got {size} of {expected_size} bytes")
    return Body(hasher.hexdigest(), size, bool(offset), head, content_type)


def _size_cap(want: Want, limits: Limits) -> int:
    """The most bytes taken: the declared size, checked exactly or not, else the cap."""
    return want.size if want.size is not None else limits.max_bytes


def _cap_source(want: Want) -> str:
    if want.size is not None:
        return f"bytes {want.declared_by} declares"
    return f"bytes taken for a file of undeclared size (${MAX_DOWNLOAD_ENV})"


class Pace:
    """Abandons a transfer that trickles: below the minimum rate over a window, or late.

    The window restarts each time it is judged; the deadline is the time the expected
    size takes at the minimum rate, plus one window for the start.
    """

    def __init__(self, limits: Limits, expected: int | None) -> None:
        self.rate, self.window = limits.min_rate, limits.rate_window
        self.started = self.window_start = time.monotonic()
        self.window_bytes = 0
        self.deadline = None if expected is None else self.window + expected / self.rate

    def check(self, transferred: int) -> None:
        """Raise MirrorFailed when the transfer is too slow; ``transferred``: bytes so far."""
        now = time.monotonic()
        if self.deadline is not None and now - self.started > self.deadline:
            raise MirrorFailed(f"not done after {now - self.started:.0f} s, the deadline for "
                               f"its size at {self.rate:g} bytes/s (${MIN_RATE_ENV})")
        elapsed = now - self.window_start
        if elapsed < self.window:
            return
        got = transferred - self.window_bytes
        if got < self.rate * elapsed:
            raise MirrorFailed(f"too slow: {got} bytes in {elapsed:.0f} s, under "
                               f"{self.rate:g} bytes/s (${MIN_RATE_ENV}, ${RATE_WINDOW_ENV})")
        self.window_start, self.window_bytes = now, transferred


def _resumable_size(partial: Path, want: Want) -> int:
    """The size of a .partial worth continuing; 0 (and no .partial) when there is none."""
    try:
        size = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if want.size is not None and size >= want.size:
        # Complete or too long: whatever it holds, nothing is left to ask for.
        partial.unlink(missing_ok=True)
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
                raise StartOver("the partial file shrank while it was read")
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


def _check_announced_size(total: int | None, want: Want, response: Any,
                          content_type: str | None, resumed: bool) -> None:
    """Checking sizes, refuse before the body a file announced with another size than wanted.

    The reason names an HTML page when the first bytes show one: that is what the user
    can act on, more than a size. Without the check the size, like the checksum, is
    only warned about once the file is in.
    """
    if total is None or want.size is None or total == want.size or not want.exact:
        return
    import http.client

    head = b""
    if not resumed:
        with contextlib.suppress(OSError, http.client.HTTPException):
            head = response.read(SNIFF_BYTES)
    problem = sniff_problem(head, want.name, content_type) if head else None
    raise MirrorFailed(problem or f"the server announces {total} bytes, {want.declared_by} "
                                  f"expects {want.size}")


def sniff_problem(first_bytes: bytes, filename: str, content_type: str | None) -> str | None:
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
