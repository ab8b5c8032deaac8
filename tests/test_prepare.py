"""The locked prepare step: entries published whole, found again, never half written."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import datapipe
from datapipe import manifest as manifest_module
from datapipe.cache import Cache, fingerprint
from datapipe.datamodules.mnist import RECIPE
from datapipe.errors import CacheError, FormatError, LockTimeoutError
from datapipe.formats.idx import encode_idx
from datapipe.prepare import MANIFEST, find_prepared, prepare_split
from datapipe.stages.download import FetchOptions


def _entries(cache: Cache):
    return sorted(p for p in (cache.prepared / "mnist" / "1").glob("*") if p.is_dir())


def test_entry_holds_data_and_manifest_and_is_found_again(fake_mnist, tmp_path):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    prepared, worked = prepare_split(RECIPE, "test", cache, options)
    assert worked
    assert sorted(os.listdir(prepared.path)) == [MANIFEST, "test.arrow"]
    manifest = json.loads((prepared.path / MANIFEST).read_text())
    assert manifest["rows"] == 100 and manifest["split"] == "test"
    assert manifest["columns"]["image"] == {"dtype": "uint8", "shape": [1, 28, 28]}
    assert manifest["sources"][0]["verified"] is False
    assert manifest["stages"]["clean"]["type"] == "IDXClean"
    again, worked = prepare_split(RECIPE, "test", cache, options)
    assert not worked and again.path == prepared.path
    assert find_prepared(RECIPE, "test", cache, FetchOptions(verify=False)).path == prepared.path
    # Data from unverified files is never what a verifying module finds.
    assert find_prepared(RECIPE, "test", cache, FetchOptions()) is None


def test_fingerprint_changes_with_data_version_and_stage_config(fake_mnist, tmp_path):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    base, _ = prepare_split(RECIPE, "test", cache, options)
    bumped, _ = prepare_split(dataclasses.replace(RECIPE, version="2"), "test", cache, options)
    other_clean = dataclasses.replace(
        RECIPE, clean=dataclasses.replace(RECIPE.clean, num_classes=11))
    reconfigured, _ = prepare_split(other_clean, "test", cache, options)
    assert len({base.fingerprint, bumped.fingerprint, reconfigured.fingerprint}) == 3

    other = tmp_path / "other"
    other.mkdir()
    for name, data in fake_mnist.files.items():
        (other / name).write_bytes(data)
    (other / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.zeros(100, np.uint8))))
    changed, _ = prepare_split(RECIPE, "test", cache, FetchOptions(source=str(other),
                                                                   verify=False))
    assert changed.fingerprint != base.fingerprint


def test_a_crash_before_the_manifest_leaves_nothing_trusted(fake_mnist, tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)

    def crash(path, obj, compact=False):
        raise KeyboardInterrupt  # as if killed between publishing data and manifest

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(manifest_module, "write_json_atomic", crash)
        prepare_split(RECIPE, "test", cache, options)
    [entry] = _entries(cache)
    assert not (entry / MANIFEST).exists()
    assert find_prepared(RECIPE, "test", cache, options) is None

    (entry.parent / f".tmp-{entry.name}-99999-deadbeef").mkdir()  # a killed run's temporary
    prepared, worked = prepare_split(RECIPE, "test", cache, options)
    assert worked and prepared.path == entry and (entry / MANIFEST).exists()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_malformed_source_fails_and_publishes_nothing(fake_mnist, tmp_path):
    (fake_mnist.folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"\x08\x03" + bytes(100)))
    cache = Cache(tmp_path)
    with pytest.raises(FormatError, match="t10k-images-idx3-ubyte.gz: bad IDX magic"):
        prepare_split(RECIPE, "test", cache,
                      FetchOptions(source=str(fake_mnist.folder), verify=False))
    assert _entries(cache) == []


def test_labels_out_of_range_are_rejected(fake_mnist, tmp_path):
    (fake_mnist.folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.full(100, 12, np.uint8))))
    with pytest.raises(FormatError, match=r"labels must lie in \[0, 10\), found 12..12"):
        prepare_split(RECIPE, "test", Cache(tmp_path),
                      FetchOptions(source=str(fake_mnist.folder), verify=False))


def test_checksum_mismatch_from_source_is_refused(fake_mnist, tmp_path):
    with pytest.raises(datapipe.ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        prepare_split(RECIPE, "test", Cache(tmp_path), FetchOptions(source=str(fake_mnist.folder)))
    assert _entries(Cache(tmp_path)) == []


def test_unwritable_cache_is_one_clear_error(fake_mnist, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="choose a writable one with --cache-dir"):
        prepare_split(RECIPE, "test", Cache(blocker / "cache"),
                      FetchOptions(source=str(fake_mnist.folder), verify=False))


def test_force_rebuilds_the_entry(fake_mnist, tmp_path):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    first, _ = prepare_split(RECIPE, "test", cache, options)
    rebuilt, worked = prepare_split(RECIPE, "test", cache, options, force=True)
    assert worked and rebuilt.fingerprint == first.fingerprint
    assert rebuilt.manifest["created_at"] >= first.manifest["created_at"]


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from datapipe.cache import Cache
    with Cache(Path(sys.argv[1])).lock(sys.argv[2], what="a test"):
        print("held", flush=True)
        time.sleep(30)
""")


def test_lock_timeout_names_the_holder(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "k"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("DATAPIPE_LOCK_TIMEOUT", "0.5")
        with pytest.raises(LockTimeoutError, match=rf"held by pid {holder.pid} on .* since"):
            with cache.lock("k", what="the prepare of something"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with cache.lock("k", what="after the holder died"):  # flock dies with its process
        pass


def test_soft_lock_of_a_dead_process_is_broken(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("DATAPIPE_LOCK", "soft")
    monkeypatch.setenv("DATAPIPE_LOCK_TIMEOUT", "5")
    cache = Cache(tmp_path)
    cache.locks.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (cache.locks / "k.lock").write_text("")
    (cache.locks / "k.lock.holder").write_text(json.dumps(
        {"pid": int(dead), "host": socket.gethostname(), "since": "earlier"}))
    with cache.lock("k", what="x"):
        assert (cache.locks / "k.lock").exists()
    assert not (cache.locks / "k.lock").exists()


def test_canonical_fingerprint_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
