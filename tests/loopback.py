"""A loopback HTTP mirror for tests: in-memory files on 127.0.0.1, with faults on demand.

    with MirrorServer({"a.bin": data}, modes={"b.gz": "html"}) as mirror:
        urlopen(mirror.url + "a.bin")
        assert mirror.requests["a.bin"] == 1

Modes, per server (``mode=``) or per file (``modes={name: mode}``):

    ok           the file, honouring ``Range: bytes=N-`` (206) unless ``ranges=False``
    http500/404/503   that status, no file
    html         status 200, Content-Type text/html, a login page instead of the file
    truncated    the right Content-Length, half the body, then a clean close
    wrong-bytes  the same length with other bytes (the first two kept: a gzip magic survives)
    drop         the right Content-Length, half the body, then a reset connection
    slow         sleeps ``delay`` seconds, then serves as "ok"

Nothing here talks to anything but 127.0.0.1, and nothing is logged.
"""

from __future__ import annotations

import collections
import http.server
import socket
import socketserver
import struct
import threading
import time
import urllib.parse

MODES = ("ok", "http500", "http404", "http503", "html", "truncated", "wrong-bytes", "drop",
         "slow")
STATUS_MODES = {"http500": 500, "http404": 404, "http503": 503}
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n"
             b"<body><p>Please sign in to download this file.</p></body></html>\n")


class LockedCounter(collections.Counter):
    """A Counter whose :meth:`add` may be called from many threads at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def add(self, key) -> None:
        with self._lock:
            self[key] += 1


class MirrorServer:
    """An HTTP server on 127.0.0.1 (a free port) serving ``files`` at ``/<prefix>/<name>``.

    The status and html modes answer every path, served file or not; other paths get
    404. ``requests`` counts the GETs of each file name under the prefix (served or
    not, whatever the mode),
    ``range_requests`` the GETs that carried a Range header, and ``range_headers``
    lists those headers in order.
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, prefix: str = "",
                 mode: str = "ok", modes: dict[str, str] | None = None, ranges: bool = True,
                 delay: float = 0.5):
        self.files = dict(files or {})
        self.prefix = prefix.strip("/")
        self.mode = mode
        self.modes = dict(modes or {})
        self.ranges = ranges
        self.delay = delay
        for m in (mode, *self.modes.values()):
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
        self.requests: LockedCounter = LockedCounter()
        self.range_requests = 0
        self.range_headers: list[str] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> MirrorServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.mirror = self
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"mirror-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        """The port it listens on (kept after :meth:`stop`, for assertions)."""
        if self._port is None:
            raise RuntimeError("the mirror was never started")
        return self._port

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT/``, whatever the prefix."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def url(self) -> str:
        """The base URL of the files, ending with ``/`` (includes the prefix)."""
        return self.root + (urllib.parse.quote(self.prefix) + "/" if self.prefix else "")

    def url_for(self, name: str) -> str:
        return self.url + urllib.parse.quote(name)

    # -------------------------------------------------------------- behaviour

    def mode_of(self, name: str) -> str:
        return self.modes.get(name, self.mode)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.range_requests = 0
            self.range_headers.clear()

    def _name_of(self, raw_path: str) -> str | None:
        """The file name a request path asks for (served or not); None for no file name."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).lstrip("/")
        if self.prefix:
            head = self.prefix + "/"
            if not path.startswith(head):
                return None
            path = path[len(head):]
        return path if path and not path.endswith("/") else None

    def _record(self, name: str | None, range_header: str | None) -> None:
        if name is not None:
            self.requests.add(name)
        if range_header is not None:
            with self._lock:
                self.range_requests += 1
                self.range_headers.append(range_header)


_refusing: socket.socket | None = None


def refused_url() -> str:
    """``http://127.0.0.1:PORT/`` where nothing listens: every connection is refused.

    The port stays bound (never listening) for the life of the process, so nothing else
    can start listening there, and every call returns the same URL.
    """
    global _refusing
    if _refusing is None:
        _refusing = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _refusing.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{_refusing.getsockname()[1]}/"


def corrupt(data: bytes) -> bytes:
    """Other bytes of the same length; the first two stay, so a gzip magic number survives."""
    if len(data) <= 2:
        return bytes(b ^ 0xFF for b in data)
    return data[:2] + bytes(b ^ 0xFF for b in data[2:])


# ------------------------------------------------------------------ the server


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mirror: MirrorServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which may wait on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        # Clients that time out or hang up mid-body are what the tests are about.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection
    server_version = "loopback-mirror"
    sys_version = ""

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        mirror: MirrorServer = self.server.mirror
        name = mirror._name_of(self.path)
        range_header = self.headers.get("Range")
        mirror._record(name, range_header)
        mode = mirror.mode_of(name) if name else mirror.mode
        if mode == "slow":
            time.sleep(mirror.delay)
        # A broken mirror is broken for every path, served file or not.
        if mode in STATUS_MODES:
            self._send_page(STATUS_MODES[mode], b"mirror failure\n", "text/plain")
            return
        if mode == "html":
            self._send_page(200, HTML_PAGE, "text/html; charset=utf-8")
            return
        if name not in mirror.files:
            self._send_page(404, b"no such file\n", "text/plain")
            return
        data = mirror.files[name]
        if mode == "wrong-bytes":
            data = corrupt(data)
        self._send_file(data, range_header if mirror.ranges else None, mode, mirror.ranges)

    def _send_page(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, data: bytes, range_header: str | None, mode: str,
                   ranges: bool) -> None:
        span = _parse_range(range_header, len(data)) if range_header else None
        if span == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if span is None:
            body, status = data, 200
        else:
            start, end = span
            body, status = data[start:end + 1], 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if ranges else "none")
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if mode not in ("truncated", "drop"):
            self.wfile.write(body)
            return
        self.wfile.write(body[:len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        if mode == "drop":
            # Linger 0: closing the socket sends a reset instead of an orderly FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))


def _parse_range(header: str, size: int):
    """(start, end) inclusive for ``bytes=N-`` / ``bytes=N-M``; "unsatisfiable"; or None."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # not understood: serve the whole file, as RFC 9110 allows
    first, _, last = spec.strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end
