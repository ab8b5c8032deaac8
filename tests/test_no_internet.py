"""The suite's own guard: nothing in a test reaches past loopback (see conftest.py)."""

from __future__ import annotations

import socket

import pytest

import datapipe
from datapipe.errors import DownloadError


def test_connections_past_loopback_are_refused_at_once():
    with pytest.raises(OSError, match="loopback only"):
        socket.create_connection(("192.0.2.1", 80), timeout=5)  # TEST-NET-1: never routed
    with pytest.raises(OSError, match="loopback only"):
        socket.socket().connect(("192.0.2.1", 80))
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)


def test_loopback_still_connects():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        socket.create_connection(server.getsockname(), timeout=5).close()
    finally:
        server.close()


def test_a_built_in_recipe_cannot_reach_its_real_mirrors(tmp_path):
    """MNIST's real mirrors are refused; the error still names each one."""
    dm = datapipe.load("mnist", cache_dir=tmp_path)
    with pytest.raises(DownloadError) as failed:
        dm.prepare_data()
    mirrors = datapipe.load("mnist").recipe.download.mirrors
    assert mirrors and all(m.split("/")[2] in str(failed.value) for m in mirrors)
