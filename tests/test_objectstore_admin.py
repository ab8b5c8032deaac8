"""`datapipe cache ls/rm`, `verify` and `info` on an s3:// cache root, against a real S3
server (moto) on 127.0.0.1; the client is never mocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import s3_server
from s3_server import FaultyProxy, needs_s3

from datapipe.cache_admin import human_bytes
from datapipe.cli import main
from datapipe.errors import CacheError
from datapipe.integrity import DamagedChunk, FileDigests, check_stream, digest_file
from datapipe.manifest import DIGEST_KEY, manifest_digest

pytestmark = needs_s3

server, bucket = s3_server.server, s3_server.bucket  # the fixtures (see s3_server.py)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def url(bucket):
    return f"s3://{bucket}/p"


@pytest.fixture
def published(server, bucket, url, fake_mnist, tmp_path, monkeypatch, capsys):
    """mnist's train and test prepared from the fake files (unverified) into the local
    cache tmp/preparer and published to ``url``; DATAPIPE_CACHE then points elsewhere."""
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "preparer"))
    code, out, err = cli(capsys, "prepare", "mnist", "--quiet", "--no-verify", "--source",
                         fake_mnist.folder, "--cache-dir", url)
    assert code == 0 and out.count(", published") == 2, err
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "elsewhere"))
    return url


def keys(server, bucket, prefix="p/"):
    found = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in found)


def manifests(server, bucket):
    return [k for k in keys(server, bucket) if k.endswith("/manifest.json")]


def objects(server, bucket):
    return [k for k in keys(server, bucket) if "/objects/" in k]


def read_manifest(server, bucket, key):
    return json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def put(server, bucket, key, data: bytes):
    server.client().put_object(Bucket=bucket, Key=key, Body=data)


def resealed(manifest):
    """``manifest`` with its digest made to match again (what a forger would do)."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: manifest_digest(body)}


def listing(capsys, url, *more):
    code, out, err = cli(capsys, "cache", "ls", *more, "--cache-dir", url, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ cache ls


def test_ls_lists_what_prepare_published_from_the_manifests_alone(server, bucket, published,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
    with FaultyProxy(server.url) as proxy:  # sees every GET the listing makes
        monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", proxy.url)
        code, out, err = cli(capsys, "cache", "ls", "--cache-dir", published)
        found = listing(capsys, published)
        assert listing(capsys, published, "mnist")["entries"] == found["entries"]
        assert listing(capsys, published, "cifar10")["entries"] == []
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["recipe", "version", "split", "fingerprint", "rows", "size",
                                "sources", "state", "created"]
    assert sorted(ln.split()[2] for ln in lines[1:3]) == ["test", "train"]
    assert all("UNVERIFIED" in ln and "trusted" in ln for ln in lines[1:3])
    assert lines[-1] == f"cache: {published}"
    entries = {e["split"]: e for e in found["entries"]}
    local = tmp_path / "preparer" / "prepared" / "mnist" / "1"
    for e in entries.values():
        manifest = json.loads((local / e["fingerprint"] / "manifest.json").read_text())
        assert e["split"] == manifest["split"]
        assert e["rows"] == manifest["rows"] and e["verified"] is False
        assert e["bytes"] == sum(r["bytes"] for r in manifest["files"].values())
        assert e["created_at"] == manifest["created_at"] and e["state"] == "trusted"
        assert e["path"] == f"{published}/prepared/mnist/1/{e['fingerprint']}"
    assert found["cache"] == published and found["leftovers"] == []
    # Manifests were read; not one data object was downloaded, nothing was cached locally.
    assert proxy.paths and not [p for p in proxy.paths if "/objects/" in p]
    assert any(p.endswith("/manifest.json") for p in proxy.paths)
    assert not (tmp_path / "elsewhere").exists()


def test_ls_of_an_empty_store_says_so(server, bucket, url, monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", url)
    assert code == 0 and out.splitlines() == ["no published entries", f"cache: {url}"]


def test_datapipe_cache_naming_the_store_is_the_root_too(server, published, monkeypatch,
                                                        capsys):
    monkeypatch.setenv("DATAPIPE_CACHE", published)
    assert len(listing(capsys, published)["entries"]) == 2
    code, out, _ = cli(capsys, "cache", "ls")
    assert code == 0 and out.splitlines()[-1] == f"cache: {published}"


# ------------------------------------------------------------------ cache rm


def test_rm_takes_the_manifest_first_and_a_killed_rm_leaves_only_unused_objects(
        server, bucket, published, fake_mnist, tmp_path, monkeypatch, capsys):
    import datapipe
    from datapipe.errors import NotPreparedError
    from datapipe.remote import admin

    before = objects(server, bucket)
    assert len(before) == 2 and len(manifests(server, bucket)) == 2
    splits = {e["fingerprint"]: e["split"] for e in listing(capsys, published)["entries"]}

    def killed(store, keys):
        raise KeyboardInterrupt  # the rm dies after a manifest, before its objects

    monkeypatch.setattr(admin, "delete_objects", killed)
    code, _, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 130, err
    monkeypatch.setattr(admin, "delete_objects", _real_delete)
    # The first entry lost its manifest; its objects, and the other entry, are all there.
    [left] = manifests(server, bucket)
    assert objects(server, bucket) == before
    found = listing(capsys, published)
    [kept] = found["entries"]
    assert kept["fingerprint"] in left and len(found["leftovers"]) == 1
    [lost] = [fp for fp in splits if fp != kept["fingerprint"]]
    assert found["leftovers"] == [f"{published}/prepared/mnist/1/{lost}"]
    lost_bytes = sum(o["Size"] for o in server.client().list_objects_v2(
        Bucket=bucket, Prefix=f"p/prepared/mnist/1/{lost}/objects/")["Contents"])
    assert lost_bytes > 0 and found["leftover_bytes"] == lost_bytes
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", published)
    assert lost not in out and "leftovers of killed" in out
    assert f"leftovers of killed publishes or removals: 1, {human_bytes(lost_bytes)} (" in out
    code, out, _ = cli(capsys, "verify", "--cache-dir", published)
    assert code == 0 and "INCOMPLETE" in out and "1 OK, 0 CORRUPT, 1 INCOMPLETE" in out
    reader = datapipe.load("mnist", cache_dir=published, local_cache=tmp_path / "reader",
                           verify=False)
    with pytest.raises(NotPreparedError):  # no manifest: no entry, whatever objects are there
        reader.setup("fit" if splits[lost] == "train" else "test")

    # A republish reuses the objects left behind and makes the entries whole again.
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "preparer"))
    code, out, err = cli(capsys, "prepare", "mnist", "--quiet", "--no-verify", "--source",
                         fake_mnist.folder, "--cache-dir", published)
    assert code == 0 and out.count(", published") == 1 and "already published" in out, err
    assert len(listing(capsys, published)["entries"]) == 2
    assert objects(server, bucket) == before

    # A whole rm then leaves nothing of the entries.
    code, out, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 0, err
    assert out.startswith(f"removed from {published}: 2 prepared entries of mnist") \
        and "2 object(s)" in out
    assert keys(server, bucket) == []
    code, out, _ = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 0 and out.strip() == f"nothing of mnist is in {published}"


def _real_delete(store, keys):
    store.remove_many(keys)


def test_rm_of_leftovers_only_removes_them(server, bucket, published, monkeypatch, capsys):
    for key in manifests(server, bucket):  # as a killed rm leaves the store
        server.client().delete_object(Bucket=bucket, Key=key)
    code, out, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 0 and "0 prepared entries" in out and "2 leftover(s)" in out, err
    assert keys(server, bucket) == []


def test_rm_of_one_version_leaves_the_others(server, bucket, published, capsys):
    other = [k.replace("/mnist/1/", "/mnist/2/") for k in keys(server, bucket)]
    for key in other:  # a second version's keys (contents do not matter to rm)
        put(server, bucket, key, b"x")
    code, out, err = cli(capsys, "cache", "rm", "mnist", "--version", "2", "--cache-dir",
                         published)
    assert code == 0, err
    assert not [k for k in keys(server, bucket) if "/mnist/2/" in k]
    assert len(manifests(server, bucket)) == 2


@pytest.mark.parametrize("argv, message", [
    (["cache", "rm", "../p"], "is not a plain name"),
    (["cache", "rm", "p/prepared"], "is not a plain name"),
    (["cache", "rm", "mnist", "--version", "../1"], "is not a plain name"),
    (["cache", "rm", "mnist", "--version", "1/../.."], "is not a plain name"),
    (["cache", "rm", "mnist", "--all"], "never published"),
    (["cache", "ls", "Mnist"], "is not a plain name"),
    (["verify", "../mnist"], "is not a plain name"),
])
def test_names_that_are_not_names_are_refused_and_nothing_goes(server, bucket, published,
                                                               argv, message, capsys):
    before = keys(server, bucket)
    code, out, err = cli(capsys, *argv, "--cache-dir", published)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert keys(server, bucket) == before


def test_the_api_refuses_paths_as_names_with_a_datapipe_error(server, bucket, published):
    from datapipe.remote.admin import list_store, remove_from_store, verify_store
    from datapipe.remote.store import open_store

    store = open_store(published, server.storage_options())
    for call in (lambda: remove_from_store(store, "../x"),
                 lambda: remove_from_store(store, "mnist", "../.."),
                 lambda: list_store(store, "a/b"), lambda: verify_store(store, ".hidden")):
        with pytest.raises(CacheError, match="not a plain name"):
            call()
    assert len(manifests(server, bucket)) == 2


# ------------------------------------------------------------------ verify


def test_verify_streams_every_object_and_names_each_damaged_or_missing_one(
        server, bucket, published, fake_mnist, tmp_path, monkeypatch, capsys):
    code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 0, err
    assert out.splitlines()[-1] == f"2 entries checked in {published}: 2 OK, 0 CORRUPT"
    entries = {e["split"]: e for e in listing(capsys, published)["entries"]}
    objs = {split: next(k for k in objects(server, bucket) if e["fingerprint"] in k)
            for split, e in entries.items()}
    damaged = server.client().get_object(Bucket=bucket, Key=objs["train"])["Body"].read()
    flipped = bytearray(damaged)
    flipped[len(flipped) // 2] ^= 0x55  # other bytes of the same size
    put(server, bucket, objs["train"], bytes(flipped))
    server.client().delete_object(Bucket=bucket, Key=objs["test"])

    code, out, err = cli(capsys, "verify", "--cache-dir", published)
    assert code == 2
    bad = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert len(bad) == 2
    assert any("train.arrow" in ln and "does not match its digest" in ln for ln in bad)
    assert any("test.arrow" in ln and "the object is missing" in ln for ln in bad)
    assert out.splitlines()[-1] == f"2 entries checked in {published}: 2 CORRUPT"
    assert err.count("\n") == 1 and "2 damaged or missing" in err
    assert f"datapipe prepare mnist --force --cache-dir {published}" in err
    assert not (tmp_path / "elsewhere").exists()  # nothing kept locally

    # A truncated object is found by its size alone.
    put(server, bucket, objs["train"], damaged[:-7])
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 2 and f"has {len(damaged) - 7} bytes, the manifest says" in out

    # What the error says to do repairs it.
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "preparer"))
    code, _, err = cli(capsys, "prepare", "mnist", "--force", "--quiet", "--no-verify",
                       "--source", fake_mnist.folder, "--cache-dir", published)
    assert code == 0, err
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 0 and "2 OK, 0 CORRUPT" in out


def test_verify_counts_the_rows_of_the_objects_against_the_manifest(
        server, bucket, published, capsys):
    """A manifest resealed with another row count (its digest fits, its objects are
    whole) is found by parsing the objects, as the local verify parses its files."""
    _, manifest = _forge(server, bucket, published, which="test")
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 0 and f"test, {manifest['rows']} rows" in out
    _forge(server, bucket, published, which="test", rows=manifest["rows"] + 1)
    code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 2
    [bad] = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert (f"its data objects hold {manifest['rows']} rows, the manifest says "
            f"{manifest['rows'] + 1}") in bad
    assert "1 OK, 1 CORRUPT" in out


def test_verify_refuses_an_object_that_matches_forged_digests_but_is_no_arrow_file(
        server, bucket, published, tmp_path, capsys):
    """Bytes whose digests a resealed manifest records still have to parse: a batch
    header claiming a huge body is read from a memory map, never allocated."""
    key, manifest = _forge(server, bucket, published, which="test")
    name, _ = _record(manifest)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xff\xff\xff" + (1 << 30).to_bytes(4, "little") + b"x" * 5000)
    digests = digest_file(garbage, name)
    prefix = key.rsplit("/", 1)[0]
    put(server, bucket, f"{prefix}/objects/{digests.sha256}", garbage.read_bytes())
    _forge(server, bucket, published, which="test", files={name: digests.record()})
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", published)
    assert code == 2
    [bad] = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert f"{name} (objects/{digests.sha256[:12]}...): not a readable Arrow file" in bad


def test_verify_of_nothing_says_so(server, bucket, url, monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", url)
    assert code == 0 and out.strip() == f"nothing of mnist is in {url}"


def test_check_stream_holds_at_most_a_block_whatever_the_chunk_size(tmp_path):
    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    path = tmp_path / "f"
    path.write_bytes(data)
    digests = digest_file(path, "f", chunk_bytes=1 << 30)  # one chunk of up to 1 GiB
    asked = []

    def read(start, stop):
        asked.append(stop - start)
        return data[start:stop]

    check_stream(read, digests, block=1 << 16)
    assert max(asked) <= 1 << 16 and sum(asked) == len(data)
    wrong = FileDigests("f", digests.size, digests.sha256, digests.chunk_bytes,
                        ("0" * 16,))
    with pytest.raises(DamagedChunk, match="chunk 1 of 1"):
        check_stream(read, wrong, block=1 << 16)
    with pytest.raises(DamagedChunk, match="ends after"):
        check_stream(lambda a, b: data[a:min(b, 1000)], digests, block=1 << 16)


# ------------------------------------------------------------------ info


def test_info_fetches_and_shows_the_card_of_a_local_prepare_of_the_same_files(
        server, bucket, url, fake_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    local = tmp_path / "local"
    code, _, err = cli(capsys, "prepare", "mnist", "--quiet", "--no-verify", "--source",
                       fake_mnist.folder, "--cache-dir", local)
    assert code == 0, err
    code, card_text, _ = cli(capsys, "info", "mnist", "--cache-dir", local)
    code, card_json, _ = cli(capsys, "info", "mnist", "--json", "--cache-dir", local)
    # Published from that same local cache (the same manifests, byte for byte).
    monkeypatch.setenv("DATAPIPE_CACHE", str(local))
    code, out, err = cli(capsys, "prepare", "mnist", "--quiet", "--no-verify", "--source",
                         fake_mnist.folder, "--cache-dir", url)
    assert code == 0 and out.count(", published") == 2, err

    fresh = tmp_path / "fresh"  # another machine's default local cache
    monkeypatch.setenv("DATAPIPE_CACHE", str(fresh))
    code, out, err = cli(capsys, "info", "mnist", "--cache-dir", url)
    assert code == 0, err
    assert err.splitlines()[0] == (f"datapipe: fetched mnist train, test from {url} into the "
                                   f"local cache {fresh}")
    assert "fetched" not in "".join(err.splitlines()[1:])  # one line for all the fetches
    assert out.replace(str(fresh), "ROOT") == card_text.replace(str(local), "ROOT")
    code, out, err = cli(capsys, "info", "mnist", "--json", "--cache-dir", url)
    assert code == 0 and "fetched" not in err  # in the local cache now: nothing fetched
    assert json.loads(out.replace(str(fresh), "ROOT")) == \
        json.loads(card_json.replace(str(local), "ROOT"))


def test_info_of_an_unpublished_recipe_fetches_nothing(server, bucket, url, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    code, out, err = cli(capsys, "info", "mnist", "--json", "--cache-dir", url)
    assert code == 0 and "fetched" not in err, err
    card = json.loads(out)
    assert card["prepared"] == {"train": None, "test": None} and card["splits"]["id"] is None


# ------------------------------------------------------------------ hostile stores


def _forge(server, bucket, published, which="test", **changes):
    """Rewrite the published manifest of split ``which`` with ``changes``, resealed."""
    key = next(k for k in manifests(server, bucket)
               if read_manifest(server, bucket, k)["split"] == which)
    manifest = read_manifest(server, bucket, key)
    manifest.update(changes)
    put(server, bucket, key, json.dumps(resealed(manifest)).encode())
    return key, manifest


def _record(manifest):
    [(name, record)] = manifest["files"].items()
    return name, record


def test_a_manifest_naming_paths_is_listed_corrupt_verified_corrupt_and_refused(
        server, bucket, published, tmp_path, capsys):
    import datapipe

    key = next(k for k in manifests(server, bucket)
               if read_manifest(server, bucket, k)["split"] == "train")
    manifest = read_manifest(server, bucket, key)
    name, record = _record(manifest)
    forged = resealed({**manifest, "files": {"../../../escaped": record},
                       "data_file": "../../../escaped"})
    put(server, bucket, key, json.dumps(forged).encode())
    put(server, bucket, "p/escaped", b"bystander")

    entries = listing(capsys, published)["entries"]
    [bad] = [e for e in entries if e["state"] != "trusted"]
    assert bad["split"] is None and "not a plain file name" in bad["problem"]
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", published)
    assert f"corrupt: {published}/prepared/mnist/1/{bad['fingerprint']}" in out
    code, out, err = cli(capsys, "verify", "--cache-dir", published)
    assert code == 2 and "the manifest cannot be trusted" in out and "1 OK, 1 CORRUPT" in out
    reader = datapipe.load("mnist", cache_dir=published, local_cache=tmp_path / "reader",
                           verify=False)
    with pytest.raises(CacheError, match="not a trustworthy") as e:
        reader.setup("fit")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "reader").rglob("escaped"))
    code, out, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 0, err
    assert keys(server, bucket) == ["p/escaped"]  # the bystander is untouched


def test_huge_sizes_are_found_without_reading_them(server, bucket, published, monkeypatch,
                                                   capsys):
    key = next(iter(manifests(server, bucket)))
    manifest = read_manifest(server, bucket, key)
    name, record = _record(manifest)
    tera = 1 << 40
    _, forged = _forge(server, bucket, published, which=manifest["split"],
                       files={name: {**record, "bytes": tera, "chunk_bytes": 1 << 30,
                                     "chunks": ["0" * 16] * 1024}})
    with FaultyProxy(server.url) as proxy:
        monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", proxy.url)
        entries = {e["split"]: e for e in listing(capsys, published)["entries"]}
        code, out, err = cli(capsys, "verify", "--cache-dir", published)
    assert entries[manifest["split"]]["bytes"] == tera  # what it claims, shown as claimed
    assert entries[manifest["split"]]["state"] == "trusted"
    assert code == 2 and f"the manifest says {tera}" in out
    sha = record["sha256"]
    assert not [p for p in proxy.paths if sha in p]  # never downloaded: the size told
    # A size its chunks cannot cover is refused as the manifest's own damage.
    _forge(server, bucket, published, which=manifest["split"],
           files={name: {**record, "bytes": 10**30}})
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    entries = {e["fingerprint"]: e for e in listing(capsys, published)["entries"]}
    assert entries[forged["fingerprint"]]["state"] == "corrupt"
    assert "do not fit" in entries[forged["fingerprint"]]["problem"]


def test_an_oversized_manifest_is_never_read(server, bucket, published, monkeypatch, capsys):
    from datapipe.remote import reader

    monkeypatch.setattr(reader, "MANIFEST_LIMIT", 100)
    with FaultyProxy(server.url) as proxy:
        monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", proxy.url)
        entries = listing(capsys, published)["entries"]
        code, out, _ = cli(capsys, "verify", "--cache-dir", published)
    assert [e["state"] for e in entries] == ["corrupt", "corrupt"]
    assert all("more than any datapipe manifest" in e["problem"] for e in entries)
    assert code == 2 and not [p for p in proxy.paths if p.endswith("manifest.json")]


@pytest.mark.parametrize("changes, problem", [
    ({"split": "\x1b[2J\x1b[31mowned"}, "not a plain file name"),
    ({"rows": -5}, "row count"),
    ({"recipe": "cifar10"}, "names recipe"),
    ({"created_at": "\x1b]0;title\x07"}, "not a time"),
    ({"sources": [{"filename": "../x"}]}, "not a plain file name"),
])
def test_a_forged_manifest_shows_nothing_of_what_it_says(server, bucket, published, changes,
                                                        problem, capsys):
    _forge(server, bucket, published, **changes)
    entries = listing(capsys, published)["entries"]
    [bad] = [e for e in entries if e["state"] == "corrupt"]
    assert problem in bad["problem"] and bad["split"] is None and bad["rows"] is None
    code, out, err = cli(capsys, "cache", "ls", "--cache-dir", published)
    assert code == 0 and "\x1b" not in out and "\x07" not in out


@pytest.mark.parametrize("garbage", [b"", b"not json", b"[1, 2]", b'{"digest": 5}',
                                     b"\xff\xfe\x00"])
def test_a_manifest_that_is_no_manifest_is_listed_corrupt(server, bucket, published,
                                                          garbage, capsys):
    put(server, bucket, next(iter(manifests(server, bucket))), garbage)
    states = sorted(e["state"] for e in listing(capsys, published)["entries"])
    assert states == ["corrupt", "trusted"]
    code, out, _ = cli(capsys, "verify", "--cache-dir", published)
    assert code == 2 and "1 OK, 1 CORRUPT" in out


def test_keys_datapipe_does_not_write_are_skipped_and_left_alone(server, bucket, published,
                                                                 capsys):
    fp = sorted(k.split("/")[4] for k in manifests(server, bucket))[0]
    foreign = ["p/prepared/MNIST/1/abcdef0123456789/manifest.json",
               "p/prepared/mnist/1/not-hex/manifest.json",
               "p/prepared/.hidden/1/abcdef0123456789/manifest.json",
               "p/prepared/mnist/-1/abcdef0123456789/manifest.json",
               f"p/prepared/mnist/1/{fp}/objects/README.txt",
               f"p/prepared/mnist/1/{fp}/notes.txt",
               "p/prepared/readme"]
    for key in foreign:
        put(server, bucket, key, b"{}")
    entries = listing(capsys, published)["entries"]
    assert sorted(e["state"] for e in entries) == ["trusted", "trusted"]
    code, out, _ = cli(capsys, "verify", "--cache-dir", published)
    assert code == 0 and "2 OK" in out
    code, out, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", published)
    assert code == 0 and "left 2 key(s)" in err, err
    assert keys(server, bucket) == sorted(foreign)


# ------------------------------------------------------------------ start-up and errors


def test_store_commands_never_import_torch(server, bucket, published, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from datapipe.cli import main
        url = {published!r}
        assert main(['cache', 'ls', '--cache-dir', url]) == 0
        assert main(['verify', 'mnist', '--cache-dir', url]) == 0
        assert main(['info', 'mnist', '--cache-dir', url]) == 0
        assert main(['cache', 'rm', 'mnist', '--cache-dir', url]) == 0
        print('HEAVY', [m for m in ('torch', 'torchvision', 'datasets') if m in sys.modules])
        print('S3FS', 's3fs' in sys.modules)
    """)
    env = {**__import__("os").environ, **s3_server.CREDENTIALS,
           "DATAPIPE_S3_ENDPOINT": server.url, "DATAPIPE_CACHE": str(tmp_path / "sub")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "S3FS True" in done.stdout


@pytest.mark.parametrize("argv", [["cache", "ls"], ["cache", "rm", "mnist"],
                                  ["verify", "mnist"], ["info", "mnist"]])
def test_an_unreachable_store_is_one_line_exit_2(argv, monkeypatch, capsys):
    for key, value in s3_server.CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("datapipe.remote.store.RETRIES", 1)
    monkeypatch.setattr("datapipe.remote.store.CONNECT_TIMEOUT", 2.0)
    code, _, err = cli(capsys, *argv, "--cache-dir", "s3://data/x")
    assert code == 2 and "reachable" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["cache", "ls"], ["verify"], ["cache", "rm", "mnist"]])
def test_a_missing_bucket_is_one_line_exit_2(server, argv, monkeypatch, capsys):
    for key, value in s3_server.CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    code, _, err = cli(capsys, *argv, "--cache-dir", "s3://no-such-bucket/x")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1, err


def test_a_store_cache_env_leaves_the_local_cache_at_dot_cache(server, bucket, published,
                                                              tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATAPIPE_CACHE", published)
    code, out, err = cli(capsys, "info", "mnist")
    assert code == 0 and f"into the local cache {tmp_path / 'cache'}" in err, err
