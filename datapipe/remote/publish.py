"""Publish a prepared entry to an object store, keeping the local cache's guarantees.

An entry ``prepared/<name>/<version>/<fp>/`` becomes, under the store's root::

    prepared/<name>/<version>/<fp>/objects/<sha256>     each data file, named by content
    prepared/<name>/<version>/<fp>/manifest.json        the manifest, byte for byte, last

* **A reader never sees a half entry.** It trusts an entry only through its manifest,
  and the manifest is created after every data object it names is in place with the
  recorded size. S3 makes a PUT (and a completed multipart upload) visible whole or not
  at all, so a data object never exists half written; a killed upload leaves at most an
  unfinished multipart upload, which no listing or GET shows (a bucket lifecycle rule
  aborts those). That is why no temporary key is renamed into place: S3 has no rename,
  and the server-side copy it would take doubles the write for nothing.
* **Two publishers racing are harmless.** Data objects are named by their sha256, so two
  publishers write the same bytes to the same key; the manifest is created with a
  conditional PUT (``If-None-Match: *``), so exactly one manifest wins and the other
  publisher finds it and stops. The winner's objects are all in place before its
  manifest, whatever the loser did.
* **Nothing damaged is published.** Each data file is read against its chunk digests
  before it is uploaded, so a flipped byte on the preparing machine never reaches the
  store with a manifest vouching for it.

A publisher killed part way leaves data objects and no manifest; the next publish of
that entry uploads only what is missing.
"""

from __future__ import annotations

import logging

from datapipe import layout
from datapipe.errors import CacheError
from datapipe.integrity import DamagedChunk, check_file
from datapipe.manifest import PreparedSplit, manifest_path
from datapipe.remote.store import Store

log = logging.getLogger("datapipe")

PUBLISHED, ALREADY = "published", "already published"


def object_key(store: Store, parts: layout.Parts, sha256: str) -> str:
    """The key of the data object with this sha256 in the entry ``parts``."""
    return store.key(*layout.stored_object(*parts[1:], sha256))


def publish(store: Store, entry: PreparedSplit, force: bool = False) -> str:
    """Put the trusted local ``entry`` into ``store``; PUBLISHED, or ALREADY if a manifest
    for it was there (a racing or earlier publisher's: the data is the same).

    ``force`` uploads every data object again and replaces the manifest: the repair of a
    store entry whose objects were damaged there (the key names the content, so a reader
    of the old manifest gets the same bytes).
    """
    manifest = entry.manifest
    parts = layout.entry(manifest["recipe"], manifest["version"], entry.fingerprint)
    manifest_key = store.key(*layout.manifest(*parts[1:]))
    if not force and store.exists(manifest_key):
        return ALREADY
    promise = entry.promise()
    for path in entry.data_files:
        digests = promise.digests(path)
        key = object_key(store, parts, digests.sha256)
        if not force and store.size(key) == digests.size:
            continue  # content-addressed: an earlier or racing publisher put these bytes
        try:
            check_file(path, digests)
        except DamagedChunk as e:
            raise promise.damaged(str(e)) from None
        store.put_file(path, key)
        if store.size(key) != digests.size:
            raise CacheError(f"object store {store.url}: {store.where(key)} does not have "
                             f"the {digests.size} bytes uploaded; publish again")
    data = manifest_path(entry.path).read_bytes()
    if force:
        store.remove(manifest_key)
    if not store.create(manifest_key, data):
        log.info("%s was published meanwhile by another process", store.where(manifest_key))
        return ALREADY
    log.info("published %s to %s", promise.label, store.where(store.key(*parts)))
    return PUBLISHED
