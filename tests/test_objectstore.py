"""Prepared data on object storage, against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from datapipe.cache import Cache
from datapipe.datamodules.mnist import RECIPE
from datapipe.errors import CacheError, ConfigError
from datapipe.layout import entry as entry_parts
from datapipe.manifest import MANIFEST, trusted
from datapipe.prepare import prepare_split
from datapipe.remote.publish import ALREADY, PUBLISHED, object_key, publish
from datapipe.remote.reader import RemoteCache, parse_size
from datapipe.remote.store import StoreURL, is_remote, open_store
from datapipe.stages.download import FetchOptions
from tests.s3_server import CREDENTIALS, FaultyProxy, S3Server, needs_s3

s3 = needs_s3
_buckets = itertools.count()


@pytest.fixture(scope="module")
def server():
    if needs_s3.args[0]:
        pytest.skip(needs_s3.kwargs["reason"])
    with S3Server() as running:
        yield running


@pytest.fixture
def bucket(server, monkeypatch, request):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"bucket-{next(_buckets)}"
    server.make_bucket(name)
    return name


@pytest.fixture
def prepared(fake_mnist, tmp_path):
    """A local cache with mnist's test split prepared from the fake files (unverified)."""
    cache = Cache(tmp_path / "preparer")
    entry, _ = prepare_split(RECIPE, "test", cache,
                             FetchOptions(source=str(fake_mnist.folder), verify=False))
    return entry


def _parts(entry):
    return entry_parts(entry.manifest["recipe"], entry.manifest["version"], entry.fingerprint)


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
    parts = _parts(prepared)
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
    assert reader.manifest(_parts(prepared)) is None  # data objects, no manifest: no entry
    with pytest.raises(CacheError, match="has no entry"):
        reader.fetch(_parts(prepared))
    assert publish(store, prepared) == PUBLISHED  # the objects there are reused
    assert reader.fetch(_parts(prepared)).rows == 100


@s3
def test_damaged_local_bytes_are_never_published(server, bucket, prepared):
    store = open_store(f"s3://{bucket}", server.storage_options())
    data = prepared.path / "test.arrow"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="damaged"):
        publish(store, prepared)
    assert not store.exists(store.key(*_parts(prepared), MANIFEST))


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
    got = RemoteCache(store, local).fetch(_parts(prepared))
    assert got.path == local.root / prepared.path.relative_to(prepared.path.parents[3])
    assert trusted(got.path) is not None
    for name in ("test.arrow", MANIFEST):
        assert (got.path / name).read_bytes() == (prepared.path / name).read_bytes()
    assert not [p for p in got.path.parent.iterdir() if p.name.startswith(".tmp-")]


@s3
def test_an_object_damaged_in_the_store_is_refused_and_nothing_is_left(
        server, bucket, prepared, tmp_path):
    store = open_store(f"s3://{bucket}", server.storage_options())
    publish(store, prepared)
    digests = prepared.promise().digests(prepared.data_file)
    key = object_key(store, _parts(prepared), digests.sha256)
    raw = bytearray(store.fs.cat_file(key))
    raw[100] ^= 0xFF
    store.fs.pipe_file(key, bytes(raw))
    local = Cache(tmp_path / "reader")
    with pytest.raises(CacheError, match="could not be fetched whole.*damaged") as e:
        RemoteCache(store, local).fetch(_parts(prepared))
    assert "\n" not in str(e.value)
    entry = local.root / prepared.path.relative_to(prepared.path.parents[3])
    assert not entry.exists() and not list(entry.parent.glob(".tmp-*"))


@s3
@pytest.mark.parametrize("edit", ["rows", "data_file", "digest"])
def test_an_edited_manifest_in_the_store_is_refused_before_it_names_a_file(
        server, bucket, prepared, tmp_path, edit):
    store = open_store(f"s3://{bucket}", server.storage_options())
    publish(store, prepared)
    key = store.key(*_parts(prepared), MANIFEST)
    manifest = json.loads(store.fs.cat_file(key))
    if edit == "rows":
        manifest["rows"] = 5
    elif edit == "data_file":
        manifest["files"] = {"../../../../evil": manifest["files"]["test.arrow"]}
    else:
        manifest["digest"] = "0" * 64
    store.fs.pipe_file(key, json.dumps(manifest).encode())
    local = Cache(tmp_path / "reader")
    with pytest.raises(CacheError, match="not a trustworthy"):
        RemoteCache(store, local).fetch(_parts(prepared))
    assert not list((tmp_path / "reader").rglob("*.arrow"))
    assert not (tmp_path / "evil").exists()


@s3
def test_the_local_cache_keeps_within_its_limit_least_recently_used_out(
        server, bucket, fake_mnist, tmp_path):
    store = open_store(f"s3://{bucket}", server.storage_options())
    preparer = Cache(tmp_path / "preparer")
    options = FetchOptions(source=str(fake_mnist.folder), verify=False)
    entries = [prepare_split(RECIPE, split, preparer, options)[0] for split in ("test", "train")]
    for entry in entries:
        publish(store, entry)
    sizes = [entry.manifest["files"][entry.data_file.name]["bytes"] for entry in entries]
    reader = RemoteCache(store, Cache(tmp_path / "reader"), limit=max(sizes) + 10)
    test = reader.fetch(_parts(entries[0]))
    assert trusted(test.path) is not None
    train = reader.fetch(_parts(entries[1]))  # over the limit: test, the older, goes
    assert not test.path.exists() and trusted(train.path) is not None
    test = reader.fetch(_parts(entries[0]))  # fetched again; now train is the older
    assert not train.path.exists() and trusted(test.path) is not None


# ------------------------------------------------------------------ faults


@s3
@pytest.mark.parametrize("mode", ["http500", "drop", "slow"])
def test_a_flaky_server_is_retried_and_the_entry_arrives_whole(
        server, bucket, prepared, tmp_path, mode):
    store = open_store(f"s3://{bucket}", server.storage_options())
    publish(store, prepared)
    with FaultyProxy(server.url, delay=0.3) as proxy:
        flaky = open_store(f"s3://{bucket}", server.storage_options(proxy.url))
        proxy.fail(2, mode)
        got = RemoteCache(flaky, Cache(tmp_path / "reader")).fetch(_parts(prepared))
        assert proxy.failed == 2
    assert (got.data_file).read_bytes() == prepared.data_file.read_bytes()


@s3
def test_a_server_down_for_good_is_one_line_and_leaves_nothing(server, bucket, prepared,
                                                               tmp_path, monkeypatch):
    store = open_store(f"s3://{bucket}", server.storage_options())
    publish(store, prepared)
    monkeypatch.setattr("datapipe.remote.store.RETRIES", 2)  # bounded; fewer to keep it quick
    with FaultyProxy(server.url) as proxy:
        flaky = open_store(f"s3://{bucket}", server.storage_options(proxy.url))
        proxy.fail(100, "http500")
        local = Cache(tmp_path / "reader")
        with pytest.raises(CacheError) as e:
            RemoteCache(flaky, local).fetch(_parts(prepared))
    assert "\n" not in str(e.value)
    assert not list(local.root.rglob("*.arrow"))


@s3
def test_a_server_restart_mid_read_is_survived(server, bucket, prepared, tmp_path):
    store = open_store(f"s3://{bucket}", server.storage_options())
    publish(store, prepared)
    reader = RemoteCache(store, Cache(tmp_path / "reader"))
    real_get = store.get_file

    def get_during_restart(key, path):
        server.restart(down_for=0.5)
        store.get_file = real_get
        return real_get(key, path)

    store.get_file = get_during_restart
    got = reader.fetch(_parts(prepared))
    assert got.data_file.read_bytes() == prepared.data_file.read_bytes()
