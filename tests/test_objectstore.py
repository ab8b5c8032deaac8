"""Prepared data on object storage, against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import pickle
import threading

import pytest
import s3_server
from s3_server import CREDENTIALS, entry_parts_of, needs_s3, published_mnist

from datapipe.cache import Cache
from datapipe.datamodules.mnist import RECIPE
from datapipe.errors import CacheError, ConfigError
from datapipe.manifest import MANIFEST, trusted
from datapipe.prepare import prepare_split
from datapipe.remote import reader as reader_module
from datapipe.remote.publish import ALREADY, PUBLISHED, publish
from datapipe.remote.reader import RemoteCache, entry_bytes, parse_size
from datapipe.remote.store import StoreURL, is_remote, open_store
from datapipe.stages.download import FetchOptions

s3 = needs_s3


server, bucket = s3_server.server, s3_server.bucket  # the fixtures (see s3_server.py)


@pytest.fixture
def prepared(fake_mnist, tmp_path):
    """A local cache with mnist's test split prepared from the fake files (unverified)."""
    cache = Cache(tmp_path / "preparer")
    entry, _ = prepare_split(RECIPE, "test", cache,
                             FetchOptions(source=str(fake_mnist.folder), verify=False))
    return entry



# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize("url, parts", [
    ("s3://data", ("data", ())),
    ("s3://data/team/mnist", ("data", ("team", "mnist"))),
    ("s3://my.bucket-1/a/", ("my.bucket-1", ("a",))),
])
def test_a_store_url_is_a_bucket_and_plain_prefix_names(url, parts):
    parsed = StoreURL.parse(url)
    assert (parsed.bucket, parsed.prefix) == parts and is_remote(url)


@pytest.mark.parametrize("url", [
    "s3://", "s3://Data", "s3://ab", "s3://data/../etc", "s3://data/.hidden", "s3://data/a b",
    "gs://data/x", "file:///etc", "s3://a..b/x",
])
def test_a_malformed_store_url_is_one_line(url):
    with pytest.raises(ConfigError) as e:
        StoreURL.parse(url)
    assert "\n" not in str(e.value)


def test_a_folder_is_not_remote():
    assert not is_remote("/tmp/cache") and not is_remote(None) and not is_remote("cache")


@pytest.mark.parametrize("text, size", [("20GB", 20 * 10**9), ("512MiB", 512 << 20),
                                        (1000, 1000), ("1.5 k", 1500), (None, None)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "-5", 0, True, "5 parsecs"])
def test_a_bad_size_is_one_line(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


# ------------------------------------------------------------------ publishing


@s3
def test_publish_puts_content_addressed_objects_then_the_manifest(server, bucket, prepared):
    store = open_store(f"s3://{bucket}/team", server.storage_options())
    assert publish(store, prepared) == PUBLISHED
    parts = entry_parts_of(prepared)
    names = store.list_names(*parts)
    assert names == sorted([MANIFEST, "objects"])
    sha = prepared.manifest["files"]["test.arrow"]["sha256"]
    assert store.list_names(*parts, "objects") == [sha]
    assert store.fs.cat_file(store.key(*parts, MANIFEST)) == (prepared.path / MANIFEST).read_bytes()
    assert publish(store, prepared) == ALREADY


@s3
def test_the_manifest_is_created_at_most_once(server, bucket):
    store = open_store(f"s3://{bucket}", server.storage_options())
    key = store.key("x.json")
    results = []
    barrier = threading.Barrier(8)

    def create(i):
        barrier.wait()
        results.append((store.create(key, f"writer {i}".encode()), i))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for created, i in results if created]
    assert len(winners) == 1
    assert store.fs.cat_file(key) == f"writer {winners[0]}".encode()


@s3
def test_a_publisher_killed_before_the_manifest_leaves_nothing_a_reader_uses(
        server, bucket, prepared, tmp_path, monkeypatch):
    store = open_store(f"s3://{bucket}", server.storage_options())
    monkeypatch.setattr(type(store), "create", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        publish(store, prepared)
    monkeypatch.undo()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    reader = RemoteCache(store, Cache(tmp_path / "reader"))
    assert reader.manifest(entry_parts_of(prepared)) is None  # data objects, no manifest: no entry
    with pytest.raises(CacheError, match="has no entry"):
        reader.fetch(entry_parts_of(prepared))
    assert publish(store, prepared) == PUBLISHED  # the objects there are reused
    assert reader.fetch(entry_parts_of(prepared)).rows == 100


@s3
def test_damaged_local_bytes_are_never_published(server, bucket, prepared):
    store = open_store(f"s3://{bucket}", server.storage_options())
    data = prepared.path / "test.arrow"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="damaged"):
        publish(store, prepared)
    assert not store.exists(store.key(*entry_parts_of(prepared), MANIFEST))


@s3
def test_a_missing_bucket_is_one_line(server, monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CacheError, match="does not exist") as e:
        open_store("s3://no-such-bucket/x", server.storage_options())
    assert "\n" not in str(e.value)


def test_an_unreachable_endpoint_is_one_line(monkeypatch):
    pytest.importorskip("s3fs")
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("datapipe.remote.store.RETRIES", 1)
    monkeypatch.setattr("datapipe.remote.store.CONNECT_TIMEOUT", 2.0)
    with pytest.raises(CacheError, match="reachable") as e:
        open_store("s3://data/x")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ reading


@s3
def test_a_reader_fetches_an_entry_verified_into_the_same_layout(server, bucket, prepared,
                                                                  tmp_path):
    store = open_store(f"s3://{bucket}/p", server.storage_options())
    publish(store, prepared)
    local = Cache(tmp_path / "reader")
    got = RemoteCache(store, local).fetch(entry_parts_of(prepared))
    assert got.path == local.root / prepared.path.relative_to(prepared.path.parents[3])
    assert trusted(got.path) is not None
    for name in ("test.arrow", MANIFEST):
        assert (got.path / name).read_bytes() == (prepared.path / name).read_bytes()
    assert not [p for p in got.path.parent.iterdir() if p.name.startswith(".tmp-")]



@s3
def test_the_local_cache_keeps_within_its_limit_least_recently_used_out(
        server, bucket, fake_mnist, tmp_path):
    store, entries = published_mnist(server, bucket, fake_mnist, tmp_path)
    sizes = [entry.manifest["files"][entry.data_file.name]["bytes"] for entry in entries]
    reader = RemoteCache(store, Cache(tmp_path / "reader"), limit=max(sizes) + 10)
    test = reader.fetch(entry_parts_of(entries[0]))
    assert trusted(test.path) is not None
    reader.release(test)  # the run that used it is over
    train = reader.fetch(entry_parts_of(entries[1]))  # over the limit: test, the older, goes
    assert not test.path.exists() and trusted(train.path) is not None
    reader.release()
    test = reader.fetch(entry_parts_of(entries[0]))  # fetched again; now train is the older
    assert not train.path.exists() and trusted(test.path) is not None


@s3
def test_an_entry_in_use_is_never_evicted_and_one_evicted_meanwhile_is_fetched_again(
        server, bucket, fake_mnist, tmp_path, caplog):
    """Two readers sharing one local cache (two DataModules, two processes on a node):
    an entry one of them uses stays whatever the other's limit says, until released."""
    store, entries = published_mnist(server, bucket, fake_mnist, tmp_path)
    limit = max(entry_bytes(e) for e in entries) + 10
    shared = Cache(tmp_path / "node")
    a, b = RemoteCache(store, shared, limit), RemoteCache(store, shared, limit)
    test = a.fetch(entry_parts_of(entries[0]))
    with caplog.at_level("WARNING", logger="datapipe"):
        train = b.fetch(entry_parts_of(entries[1]))  # over the limit, but a is reading test
    assert trusted(test.path) is not None and trusted(train.path) is not None
    assert "over its limit" in caplog.text
    copy = pickle.loads(pickle.dumps(a))  # a spawned process, a pickled job: it claims too
    assert set(copy._claims) == set(a._claims) == {test.path}
    a.release()
    assert b.evict() == [] and trusted(test.path) is not None  # the copy still reads it
    copy.release()

    assert b.evict() == [test.path]  # released by both, least recently used: out
    assert not test.path.exists() and trusted(train.path) is not None

    # a found its entry, then b moved it away before a claimed it: a notices, fetches again.
    found = a.fetch(entry_parts_of(entries[0]))
    a.release()
    assert b._remove(found)
    assert not a.claim(found)
    again = a.fetch(entry_parts_of(entries[0]))
    assert again.path == found.path and trusted(again.path) is not None
    assert again.path in a._claims


@s3
@pytest.mark.skipif(reader_module.fcntl is None, reason="no flock on this platform")
def test_a_claim_racing_an_eviction_sees_the_move(server, bucket, fake_mnist, tmp_path,
                                                  monkeypatch):
    """The evictor moves the entry between the claim's open and its lock: the claim holds
    the moved manifest, sees it is not the one at the entry's path, and gives up."""
    store, [entry] = published_mnist(server, bucket, fake_mnist, tmp_path, splits=("test",))
    shared = Cache(tmp_path / "node")
    a, b = RemoteCache(store, shared, 1), RemoteCache(store, shared, 1)
    found = a.fetch(entry_parts_of(entry))
    a.release()
    real = reader_module.fcntl.flock

    def evicted_first(held, how):
        if how & reader_module.fcntl.LOCK_SH:
            monkeypatch.setattr(reader_module.fcntl, "flock", real)
            assert b._remove(found)  # takes LOCK_EX on the same file: a holds nothing yet
        return real(held, how)

    monkeypatch.setattr(reader_module.fcntl, "flock", evicted_first)
    assert not a.claim(found) and a._claims == {}
    assert not found.path.exists()


# ------------------------------------------------------------------ loading and prepare


@s3
def test_load_prepares_publishes_and_another_machine_streams_the_same_batches(
        server, bucket, fake_mnist, tmp_path, monkeypatch):
    import datapipe

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url = f"s3://{bucket}/datasets"
    options = dict(cache_dir=url, verify=False, batch_size=32, num_workers=0, val_split=100)
    first = datapipe.load("mnist", local_cache=tmp_path / "machine-a",
                          source=str(fake_mnist.folder), **options)
    first.prepare_data()
    first.setup("fit")
    store = first.remote.store
    fp = first.prepared["train"].fingerprint
    assert store.exists(store.key("prepared", "mnist", "1", fp, MANIFEST))

    # Another machine: nothing but the bucket in common, no --source.
    second = datapipe.load("mnist", local_cache=tmp_path / "machine-b",
                           local_cache_limit="1GB", **options)
    second.setup("fit")
    assert second.prepared["train"].path.is_relative_to(tmp_path / "machine-b")
    assert second.prepared["train"].fingerprint == fp
    assert not (tmp_path / "machine-b" / "downloads").exists()
    a = [batch for batch, _ in zip(first.train_dataloader(), range(3), strict=False)]
    b = [batch for batch, _ in zip(second.train_dataloader(), range(3), strict=False)]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert (xa == xb).all() and (ya == yb).all()
    assert first.plan.id == second.plan.id  # the same split, computed on each machine

    # Later runs read the local cache without contacting the store: this endpoint is dead.
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", "http://127.0.0.1:9")
    offline = datapipe.load("mnist", local_cache=tmp_path / "machine-b", **options)
    offline.setup("fit")
    assert offline.plan.id == first.plan.id and offline.remote.store._store is None
    # Found in the local cache, the split is claimed: no reader sharing it evicts it.
    assert offline.prepared["train"].path in offline.remote._claims
    assert first.prepared["train"].path in first.remote._claims  # prepared here, claimed


@s3
def test_a_store_without_the_split_is_a_one_line_not_prepared(server, bucket, tmp_path,
                                                              monkeypatch):
    import datapipe
    from datapipe.errors import NotPreparedError

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    dm = datapipe.load("mnist", cache_dir=f"s3://{bucket}", local_cache=tmp_path / "l",
                       verify=False)
    with pytest.raises(NotPreparedError, match=f"not prepared in s3://{bucket}"):
        dm.setup("fit")


def test_local_cache_without_a_store_is_refused(tmp_path):
    import datapipe

    with pytest.raises(ConfigError, match="object storage"):
        datapipe.load("mnist", cache_dir=tmp_path, local_cache=tmp_path / "x")


@s3
def test_cli_prepare_publishes_once_and_then_finds_it_published(server, bucket, fake_mnist,
                                                                 tmp_path, monkeypatch, capsys):
    from datapipe.cli import main

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "local"))
    argv = ["prepare", "mnist", "--quiet", "--no-verify", "--source", str(fake_mnist.folder),
            "--cache-dir", f"s3://{bucket}/p"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(", published") == 2 and f"cache: s3://{bucket}/p" in out
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "elsewhere"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("already published") == 2
    assert not (tmp_path / "elsewhere" / "prepared").exists()  # nothing fetched to say so


@pytest.mark.parametrize("argv, message", [
    (["prepare", "mnist", "--cache-dir", "s3://Bad_Bucket/x"], "is not a bucket name"),
    (["prepare", "mnist", "--cache-dir", "gs://bucket/x"], "is not supported"),
    (["cache", "ls", "--cache-dir", "s3://Bad_Bucket/x"], "is not a bucket name"),
    (["verify", "--cache-dir", "s3://data/../x"], "a prefix is plain names"),
    (["info", "mnist", "--cache-dir", "gs://bucket/x"], "is not supported"),
])
def test_cli_store_errors_are_one_line_exit_2(argv, message, capsys):
    from datapipe.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
