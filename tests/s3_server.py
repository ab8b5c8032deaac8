"""A real S3-compatible server on 127.0.0.1 for tests: moto's standalone server.

    with S3Server() as server:          # a free port; fake credentials in the env
        server.make_bucket("data")
        open_store("s3://data/prefix", server.storage_options())

The client is never mocked: s3fs talks HTTP to the server as it talks to AWS.
``FaultyProxy`` stands between a client and the server to inject what networks do:
HTTP 500s, a connection reset half way through a body, slow answers. ``restart()``
stops the server and starts it again on the same port (its objects survive: moto keeps
them in this process), which a reader sees as a server going away mid-read.

Skips the test cleanly (``needs_s3``) when moto or s3fs is not installed. Two fixtures,
bound by the modules that use them (``server, bucket = s3_server.server,
s3_server.bucket``): ``server``, one per module, and ``bucket``, a fresh bucket per test
with fake credentials in the environment.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import logging
import socket
import socketserver
import threading
import time

import pytest

try:
    import moto.server
    import s3fs  # noqa: F401
except ImportError:  # the s3 extra and moto[server] are in the dev extra
    moto = None

needs_s3 = pytest.mark.skipif(moto is None, reason="needs s3fs and moto[server] "
                              "(pip install 'datapipe[dev]')")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


_buckets = itertools.count()


@pytest.fixture(scope="module")
def server():
    if moto is None:
        pytest.skip("needs s3fs and moto[server] (pip install 'datapipe[dev]')")
    with S3Server() as running:
        yield running


@pytest.fixture
def bucket(server, monkeypatch) -> str:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"bucket-{next(_buckets)}"
    server.make_bucket(name)
    return name


def published_mnist(server, bucket, fake_mnist, tmp_path, splits=("test", "train")):
    """(store, entries): mnist's ``splits`` prepared from the fake files into
    tmp/preparer and published to ``s3://bucket``."""
    from datapipe.cache import Cache
    from datapipe.datamodules.mnist import RECIPE
    from datapipe.prepare import prepare_split
    from datapipe.remote.publish import publish
    from datapipe.remote.store import open_store
    from datapipe.stages.download import FetchOptions

    store = open_store(f"s3://{bucket}", server.storage_options())
    preparer = Cache(tmp_path / "preparer")
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    entries = [prepare_split(RECIPE, split, preparer, options)[0] for split in splits]
    for entry in entries:
        publish(store, entry)
    return store, entries


def entry_parts_of(entry) -> tuple[str, ...]:
    """The layout parts of a prepared entry (what ``RemoteCache.fetch`` takes)."""
    from datapipe.layout import entry as entry_parts

    return entry_parts(entry.manifest["recipe"], entry.manifest["version"], entry.fingerprint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's server in a thread on 127.0.0.1, with its objects kept across restarts."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1",
                                                      port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def storage_options(self, url: str | None = None) -> dict:
        return {"client_kwargs": {"endpoint_url": url or self.url}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream``, failing requests on demand.

    ``fail(n, mode, match)`` makes the next ``n`` GETs of object bodies whose path holds
    ``match`` (default: any) fail with ``mode``:
    ``http500`` (an S3 InternalError), ``drop`` (the right headers, half the body, then a
    reset) or ``slow`` (``delay`` seconds before answering). Everything else is passed
    through unchanged. ``requests`` counts the object GETs seen, ``failed`` those failed,
    ``paths`` lists the paths of those GETs.
    """

    def __init__(self, upstream: str, delay: float = 0.5) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.delay = delay
        self.requests = 0
        self.failed = 0
        self.paths: list[str] = []
        self._faults: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, n: int, mode: str, match: str = "") -> None:
        assert mode in ("http500", "drop", "slow")
        with self._lock:
            self._faults += [(mode, match)] * n

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            self.paths.append(path)
            for i, (mode, match) in enumerate(self._faults):
                if match in path:
                    del self._faults[i]
                    self.failed += 1
                    return mode
            return None

    def __enter__(self) -> FaultyProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                is_object_get = self.command == "GET" and "?" not in self.path.split("/")[-1]
                fault = proxy._next_fault(self.path) if is_object_get else None
                if fault == "http500":
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                               b"InternalError</Code><Message>injected</Message></Error>")
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", answer.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if fault == "drop" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
