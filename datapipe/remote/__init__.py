"""Prepared data on object storage: a cache root that is a URL (``s3://bucket/prefix``).

``store`` parses and opens such a root, ``publish`` puts a prepared entry there keeping
the local guarantees (manifest last, racing publishers harmless), ``reader`` streams
entries into a bounded local cache, verifying each file on arrival. See
docs/object-storage.md. Nothing here is imported by datapipe's start-up: fsspec, s3fs
and botocore load only when a store is opened.
"""

from __future__ import annotations

from datapipe.remote.store import is_remote

__all__ = ["is_remote"]
