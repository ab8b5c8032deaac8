"""Chunk digests and manifest digests: what is recorded, what a reader checks, and when."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from datapipe import integrity
from datapipe.cache import Cache
from datapipe.datamodules.mnist import RECIPE
from datapipe.errors import CacheError
from datapipe.formats.jpeg_shards import ShardReader, write_jpeg_shard
from datapipe.integrity import ChunkChecker, DamagedChunk, FileDigests, digest_file
from datapipe.manifest import (
    CORRUPT,
    MANIFEST,
    OUTDATED,
    TRUSTED,
    Promise,
    inspect,
    manifest_digest,
    trusted,
)
from datapipe.prepare import find_prepared, prepare_split
from datapipe.stages.download import FetchOptions


def test_digest_file_records_size_sha256_and_one_digest_per_chunk(tmp_path):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    digests = digest_file(path, chunk_bytes=4096)
    assert digests.size == 10_000 and len(digests.chunks) == 3
    assert digests.chunks[2] == integrity.chunk_digest(data[8192:])
    assert FileDigests.of_record("f.bin", digests.record()) == digests


@pytest.mark.parametrize("bad", [
    {"chunks": None}, {"chunks": ["0" * 16]}, {"chunks": ["zz" * 8] * 3}, {"bytes": True},
    {"chunk_hash": "sha1"}, {"chunk_bytes": 7}, {"sha256": "../etc"},
])
def test_a_record_without_sound_chunk_digests_is_refused(bad, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(10_000))
    record = {**digest_file(path, chunk_bytes=4096).record(), **bad}
    with pytest.raises(CacheError):
        FileDigests.of_record("f.bin", record)
    with pytest.raises(CacheError, match="not a plain file name"):
        FileDigests.of_record("../f.bin", digest_file(path).record())


def test_a_checker_reads_each_chunk_once_and_only_those_touched(tmp_path):
    data = bytearray(np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8))
    (tmp_path / "f").write_bytes(data)
    digests = digest_file(tmp_path / "f", chunk_bytes=4096)
    data[30_000] ^= 1  # chunk 7 of 10 is damaged
    checker = ChunkChecker(data, digests)
    checker.check_range(5000, 9000)  # chunks 1 and 2
    assert checker.checked.nonzero()[0].tolist() == [1, 2]
    checker.check_range(100, 200)
    assert checker.checked.nonzero()[0].tolist() == [0, 1, 2]
    with pytest.raises(DamagedChunk, match="chunk 8 of 10"):
        checker.check_range(29_000, 31_000)
    with pytest.raises(DamagedChunk, match="has 39999 bytes"):
        ChunkChecker(data[:-1], digests)


def test_the_manifest_digest_covers_every_field_but_itself(fake_mnist, tmp_path):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    prepared, _ = prepare_split(RECIPE, "test", cache, options)
    manifest = json.loads((prepared.path / MANIFEST).read_text())
    assert manifest["digest"] == manifest_digest(manifest)
    assert inspect(prepared.path)[0] == TRUSTED
    record = manifest["files"]["test.arrow"]
    assert record["chunk_hash"] == "xxh3_64" and len(record["chunks"]) == 1
    for key, value in (("created_at", "yesterday"), ("statistics", {}), ("seconds", 0)):
        (prepared.path / MANIFEST).write_text(json.dumps({**manifest, key: value}))
        state, why, _ = inspect(prepared.path)
        assert state == CORRUPT and "does not match its digest" in why


def _as_older_format(entry) -> None:
    """Rewrite ``entry``'s manifest as datapipe.prepared/1 wrote it: sha256 and size only."""
    old = json.loads((entry / MANIFEST).read_text())
    old.pop("digest")
    old["format"] = "datapipe.prepared/1"
    old["files"] = {n: {"bytes": r["bytes"], "sha256": r["sha256"]}
                    for n, r in old["files"].items()}
    (entry / MANIFEST).write_text(json.dumps(old))


def test_an_entry_of_an_older_datapipe_is_upgraded_by_the_next_prepare(fake_mnist, tmp_path):
    """Without digests nothing vouches for its bytes: readers pass it by; the next prepare
    reads it once against the sha256 it recorded and upgrades it instead of rebuilding."""
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    prepared, _ = prepare_split(RECIPE, "test", cache, options)
    data = prepared.path / "test.arrow"
    written = data.stat().st_mtime_ns, data.stat().st_ino
    _as_older_format(prepared.path)
    assert inspect(prepared.path)[:2] == (OUTDATED, "written by an older datapipe, "
                                                    "without digests")
    assert trusted(prepared.path) is None
    assert find_prepared(RECIPE, "test", cache, options) is None
    again, worked = prepare_split(RECIPE, "test", cache, options)
    assert not worked and again.path == prepared.path and inspect(again.path)[0] == TRUSTED
    assert (data.stat().st_mtime_ns, data.stat().st_ino) == written  # not rebuilt
    manifest = json.loads((again.path / MANIFEST).read_text())
    assert manifest["upgraded_from"] == "datapipe.prepared/1"
    assert manifest["files"]["test.arrow"] == digest_file(data).record()


def test_an_older_entry_whose_bytes_differ_is_rebuilt_not_upgraded(fake_mnist, tmp_path):
    cache = Cache(tmp_path)
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    prepared, _ = prepare_split(RECIPE, "test", cache, options)
    data = prepared.path / "test.arrow"
    good = data.read_bytes()
    _as_older_format(prepared.path)
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    again, worked = prepare_split(RECIPE, "test", cache, options)
    assert worked and inspect(again.path)[0] == TRUSTED
    assert data.read_bytes() == good
    assert "upgraded_from" not in json.loads((again.path / MANIFEST).read_text())


def _shard_entry(tmp_path, rows: int = 40, size: int = 3000):
    """A JPEG-shard-format file of random 'images' in an entry folder, and its promise."""
    entry = tmp_path / "prepared" / "shards" / "1" / "0123456789abcdef"
    entry.mkdir(parents=True)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(rows)]
    path = entry / "val-00000-of-00001.arrow"
    write_jpeg_shard([(f"{i:03d}.JPEG", images[i], i % 3, 8, 8) for i in range(rows)], path)
    promise = Promise(entry=entry, recipe="shards", label="shards 1 val", digest="0" * 64,
                      rows=rows, files={path.name: digest_file(path, chunk_bytes=4096)})
    return path, images, promise


def test_a_shard_reader_checks_the_metadata_on_open_and_each_image_when_read(tmp_path):
    path, images, promise = _shard_entry(tmp_path)
    reader = ShardReader([path], promise)
    assert reader.image(5).tobytes() == images[5]
    [(checker, start)] = reader._checkers
    touched = int(checker.checked.sum())
    assert 0 < touched < len(checker.checked) // 2  # metadata + the chunks of row 5
    reader.image(5)
    assert int(checker.checked.sum()) == touched  # once per process
    clone = pickle.loads(pickle.dumps(reader))  # a worker starts over, with the promise
    assert clone._checkers is None and clone.promise == promise


def test_a_damaged_image_is_refused_when_first_read_and_the_rest_still_served(tmp_path):
    path, images, promise = _shard_entry(tmp_path)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(images[30])
    data[at + 10] ^= 0x40
    path.write_bytes(bytes(data))
    reader = ShardReader([path], promise)
    assert reader.image(2).tobytes() == images[2]  # far from the damage
    with pytest.raises(CacheError, match=r"prepared shards 1 val is damaged: val-00000-of-00001"
                                         r"\.arrow: chunk \d+ of \d+ .*datapipe verify shards"):
        reader.image(30)


def test_a_shard_with_a_wrong_row_count_is_refused(tmp_path):
    path, _, promise = _shard_entry(tmp_path)
    forged = Promise(**{**promise.__dict__, "rows": promise.rows + 1})
    with pytest.raises(CacheError, match="its shards hold 40 rows, the manifest says 41"):
        ShardReader([path], forged).column("label")


def test_to_hf_refuses_a_damaged_file_before_datasets_reads_it(fake_mnist, tmp_path):
    import datapipe

    dm = datapipe.load("mnist", cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                       val_split=0)
    dm.prepare_data()
    data = dm._find("test").data_file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="is damaged: test.arrow: chunk 1 of 1"):
        dm.to_hf("test")
    assert (data.parent / (MANIFEST + ".corrupt")).exists()
