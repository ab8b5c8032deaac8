"""Sharded prepare on machines sharing only an object store (a real moto server on 127.0.0.1).

Each "machine" is its own local cache folder; nothing but the bucket is shared. The data is
a format-exact miniature of the ImageNet archives (tests/imagenet_fixture.py), whose train
split is prepared in three shards (one per class).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import s3_server
from s3_server import needs_s3

pytest.importorskip("scipy")

from imagenet_fixture import make_fake_imagenet, recipe_for  # noqa: E402

from datapipe import layout  # noqa: E402
from datapipe.cache import Cache  # noqa: E402
from datapipe.cli import main  # noqa: E402
from datapipe.errors import CacheError, ConfigError  # noqa: E402
from datapipe.formats.jpeg_shards import shard_paths  # noqa: E402
from datapipe.manifest import MANIFEST, manifest_bytes  # noqa: E402
from datapipe.prepare import prepare_split  # noqa: E402
from datapipe.remote import parts as parts_module  # noqa: E402
from datapipe.remote.parts import prepare_part  # noqa: E402
from datapipe.remote.publish import ALREADY, PUBLISHED  # noqa: E402
from datapipe.remote.store import Store  # noqa: E402
from datapipe.remote.sync import fetch_split, open_remote  # noqa: E402
from datapipe.stages.download import FetchOptions  # noqa: E402

pytestmark = needs_s3
server, bucket = s3_server.server, s3_server.bucket  # the fixtures (see s3_server.py)
TESTS = Path(__file__).resolve().parent
VOLATILE = ("created_at", "seconds", "digest")  # what differs between two prepares


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"))


@pytest.fixture(scope="module")
def recipe(fake):
    return recipe_for(fake.folder, val_shard_size=4)


@pytest.fixture(scope="module")
def single(fake, recipe, tmp_path_factory):
    """The train split prepared on one machine, into a local cache."""
    cache = Cache.at(tmp_path_factory.mktemp("single"))
    return prepare_split(recipe, "train", cache, FetchOptions(source=str(fake.folder)),
                         processes=1)[0]


def options(fake) -> FetchOptions:
    return FetchOptions(source=str(fake.folder))


def machine(server, bucket, tmp_path, name):
    """A machine: its own local cache folder, the shared bucket."""
    return open_remote(f"s3://{bucket}/team", local_cache=tmp_path / name,
                       storage_options=server.storage_options())


def part(remote, recipe, fake, index, num_shards=3, **kwargs):
    return prepare_part(remote, recipe, "train", options(fake), num_shards=num_shards,
                        shard_index=index, processes=1, **kwargs)


def rows_of(prepared) -> dict[str, tuple]:
    """name -> (label, height, width, jpeg bytes) of every row of a prepared split."""
    import pyarrow as pa

    out = {}
    for path in shard_paths(prepared):
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all().to_pydict()
        for i, name in enumerate(table["name"]):
            out[name] = (table["label"][i], table["height"][i], table["width"][i],
                         table["image"][i])
    return out


def stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def entry_of(recipe, fp):
    return layout.entry(recipe.name, recipe.version, fp)


def record_key(store, recipe, fp, index, count=3):
    return store.key(*layout.part_record(recipe.name, recipe.version, fp, index, count))


def manifest_key(store, recipe, fp):
    return store.key(*layout.manifest(recipe.name, recipe.version, fp))


# ------------------------------------------------------------------ the set


def test_three_machines_publish_one_entry_a_fresh_reader_loads_as_a_single_prepare(
        server, bucket, fake, recipe, single, tmp_path):
    machines = [machine(server, bucket, tmp_path, f"machine-{i}") for i in range(3)]
    first = part(machines[0], recipe, fake, 0)
    assert (first.present, first.missing, first.status) == ((0,), (1, 2), None)
    assert (first.written, first.uploaded) == (1, 1)
    store, fp = machines[0].store, first.fingerprint
    assert fp == single.fingerprint
    assert not store.exists(manifest_key(store, recipe, fp))  # no entry yet
    assert fetch_split(machines[0], recipe, "train", options(fake)) is None
    # The part's shards went to the store; the machine's local copy is gone.
    assert not (machines[0].local.path(layout.work_folder(recipe.name, recipe.version, fp))
                ).exists()

    second = part(machines[2], recipe, fake, 2)
    assert (second.present, second.missing, second.status) == ((0, 2), (1,), None)
    last = part(machines[1], recipe, fake, 1)
    assert last.status == PUBLISHED and last.rows == single.rows
    assert last.uploaded == 1  # its own shard only: nothing was fetched or uploaded again

    # One ordinary entry: the manifest and the objects, the part records gone.
    entry = entry_of(recipe, fp)
    assert store.list_names(*entry) == sorted([MANIFEST, "objects"])
    assert len(store.list_names(*entry, "objects")) == 3
    from datapipe.remote.admin import list_store

    listing = list_store(store)  # `datapipe cache ls` on the store: one entry, nothing else
    assert len(listing.entries) == 1 and listing.leftovers == []

    reader = machine(server, bucket, tmp_path, "reader")
    got = fetch_split(reader, recipe, "train", options(fake))
    assert got is not None and got.path.is_relative_to(tmp_path / "reader")
    assert stable(got.manifest) == stable(single.manifest)
    assert manifest_bytes(single.manifest) == (single.path / MANIFEST).read_bytes()
    assert rows_of(got) == rows_of(single)

    again = part(machines[0], recipe, fake, 0)  # anywhere, any part: nothing to do
    assert again.status == ALREADY and (again.written, again.uploaded) == (0, 0)
    # --force as a local sharded prepare has it: this part again; the entry stays until
    # every part ran again.
    forced = part(machines[0], recipe, fake, 0, force=True)
    assert (forced.written, forced.uploaded, forced.present, forced.status) == \
        (1, 1, (0,), None)
    assert store.exists(manifest_key(store, recipe, fp))


def test_a_duplicate_run_of_a_part_is_harmless(server, bucket, fake, recipe, tmp_path,
                                               monkeypatch):
    a, b = (machine(server, bucket, tmp_path, name) for name in ("a", "b"))
    first = part(a, recipe, fake, 0)
    key = record_key(a.store, recipe, first.fingerprint, 0)
    record = a.store.fs.cat_file(key)
    again = part(b, recipe, fake, 0)  # another machine, the part in already: no work
    assert (again.written, again.uploaded, again.present) == (0, 0, (0,))
    # Two runs of one part at once: the second finds the record created after its work.
    real, calls = parts_module._present, []

    def before_the_other_ran(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs) - ({0} if len(calls) == 1 else set())

    monkeypatch.setattr(parts_module, "_present", before_the_other_ran)
    racing = part(machine(server, bucket, tmp_path, "c"), recipe, fake, 0)
    monkeypatch.undo()
    assert (racing.written, racing.uploaded, racing.present) == (1, 0, (0,))  # same key
    assert a.store.fs.cat_file(key) == record  # the first record stands
    assert part(b, recipe, fake, 1).status is None
    assert part(a, recipe, fake, 2).status == PUBLISHED


def test_two_runs_completing_the_set_at_once_publish_one_manifest(
        server, bucket, fake, recipe, tmp_path, monkeypatch):
    part(machine(server, bucket, tmp_path, "a"), recipe, fake, 0)
    # Both create their records before either lists the parts: both see the set whole.
    barrier = threading.Barrier(2, timeout=60)
    real = Store.create

    def create(self, key, data):
        created = real(self, key, data)
        if "/parts/" in key:
            barrier.wait()
        return created

    monkeypatch.setattr(Store, "create", create)
    manifests = []
    real_assemble = parts_module._assemble
    monkeypatch.setattr(parts_module, "_assemble",
                        lambda *a, **k: manifests.append(1) or real_assemble(*a, **k))
    results = {}

    def run(index):
        try:
            results[index] = part(machine(server, bucket, tmp_path, f"m{index}"), recipe,
                                  fake, index)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            results[index] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(manifests) == 2  # both assembled the set
    assert sorted(r.status for r in results.values()) == [ALREADY, PUBLISHED], results
    assert all(r.rows == 18 for r in results.values())


# ------------------------------------------------------------------ parts that do not fit


def test_parts_of_another_fingerprint_never_join_the_set(server, bucket, fake, recipe,
                                                         tmp_path):
    other = recipe_for(fake.folder, val_shard_size=4, quality=80)  # other options
    a, b = (machine(server, bucket, tmp_path, name) for name in ("a", "b"))
    theirs = part(a, other, fake, 0)
    mine = part(b, recipe, fake, 1)
    assert theirs.fingerprint != mine.fingerprint and mine.present == (1,)
    assert mine.elsewhere == ((theirs.fingerprint, 1, 3),)  # named in the progress line
    store = a.store
    # Their record copied into this set's place: refused, nothing published.
    store.fs.pipe_file(record_key(store, recipe, mine.fingerprint, 0),
                       store.fs.cat_file(record_key(store, recipe, theirs.fingerprint, 0)))
    with pytest.raises(CacheError, match="refused .*fingerprint") as e:
        part(b, recipe, fake, 2)
    assert "\n" not in str(e.value) and "--shard-index 0 --force" in str(e.value)
    assert not store.exists(manifest_key(store, recipe, mine.fingerprint))
    part(a, recipe, fake, 0, force=True)  # the part run again replaces it
    assert part(b, recipe, fake, 2).status == ALREADY  # published by that run
    assert store.exists(manifest_key(store, recipe, mine.fingerprint))


def test_parts_of_another_num_shards_are_refused_and_force_starts_over(
        server, bucket, fake, recipe, tmp_path):
    a = machine(server, bucket, tmp_path, "a")
    part(a, recipe, fake, 0, num_shards=2)
    with pytest.raises(ConfigError, match="--num-shards 2, not 3") as e:
        part(a, recipe, fake, 1)
    assert "\n" not in str(e.value)
    started = part(a, recipe, fake, 1, force=True)
    assert started.present == (1,) and started.status is None
    store = a.store
    assert store.list_names(*layout.parts_folder(*entry_of(recipe, started.fingerprint)[1:])) \
        == ["part-00001-of-00003.json"]


def test_the_cli_says_where_a_set_stands_and_refuses_in_one_line(
        server, bucket, fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url = f"s3://{bucket}/cli"
    argv = ["prepare", "imagenet", "--source", str(fake.folder), "--no-verify", "--quiet",
            "--cache-dir", url, "--split", "train"]

    def run(index, num_shards=3, *extra):
        monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / f"machine-{index}"))
        code = main([*argv, "--num-shards", str(num_shards), "--shard-index", str(index),
                     *extra])
        return code, capsys.readouterr()

    code, out = run(1)
    assert code == 0
    assert "part 1 of 3 wrote 1 shard(s), uploaded 1; parts 1 of 3 are in " \
           f"{url}/prepared/imagenet/" in out.out
    assert "(missing: 0, 2); the run that completes the set publishes" in out.out
    assert main(["cache", "ls", "--cache-dir", url]) == 0
    listed = capsys.readouterr().out
    assert "sharded prepare under way: " in listed and ": 1 of 3 parts in;" in listed
    assert "leftovers" not in listed and "no published entries" in listed
    code, out = run(0, 2)
    errors = [line for line in out.err.splitlines() if "warning: " not in line]  # --no-verify
    assert code == 2 and len(errors) == 1 and "--num-shards 3, not 2" in errors[0]
    assert run(0)[0] == 0
    code, out = run(2)
    assert code == 0 and "part 2 of 3 wrote 1 shard(s), uploaded 1; 18 rows" in out.out
    assert out.out.rstrip().endswith(f"published\ncache: {url}")
    code, out = run(2)
    assert code == 0 and "already published" in out.out


def test_rm_of_an_unfinished_set_takes_its_part_records_and_objects(
        server, bucket, fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url = f"s3://{bucket}/rm-parts"
    argv = ["prepare", "imagenet", "--source", str(fake.folder), "--no-verify", "--quiet",
            "--cache-dir", url, "--split", "train", "--num-shards", "3"]

    def run(index):
        monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / f"machine-{index}"))
        return main([*argv, "--shard-index", str(index)])

    assert run(0) == 0 and run(1) == 0
    assert main(["cache", "rm", "imagenet", "--cache-dir", url]) == 0
    out = capsys.readouterr().out
    assert "1 leftover(s)" in out
    # nothing of the set is left: a later set is not refused for records naming
    # objects that are gone, and publishes from scratch
    assert main(["cache", "ls", "--cache-dir", url]) == 0
    listed = capsys.readouterr().out
    assert "under way" not in listed and "leftovers" not in listed
    assert run(0) == 0 and run(1) == 0 and run(2) == 0
    assert "published\ncache:" in capsys.readouterr().out


# ------------------------------------------------------------------ killed runs


KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from imagenet_fixture import recipe_for
from datapipe.remote.parts import prepare_part
from datapipe.remote.store import Store
from datapipe.remote.sync import open_remote
from datapipe.stages.download import FetchOptions

real = Store.create
def create(self, key, data):
    if "/parts/" in key:  # every object is up; killed before the part record
        Path(sys.argv[5]).write_text(json.dumps(sorted(
            m for m in ("torch", "torchvision") if m in sys.modules)))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, key, data)
Store.create = create
remote = open_remote(sys.argv[3], local_cache=sys.argv[4],
                     storage_options={"client_kwargs": {"endpoint_url": sys.argv[6]}})
prepare_part(remote, recipe_for(Path(sys.argv[2]), val_shard_size=4), "train",
             FetchOptions(source=sys.argv[2]), num_shards=3, shard_index=0, processes=1)
"""


def test_a_killed_part_leaves_no_record_and_its_rerun_reuses_the_objects(
        server, bucket, fake, recipe, tmp_path):
    url, local, seen = f"s3://{bucket}/team", tmp_path / "a", tmp_path / "modules.json"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(TESTS), str(fake.folder), url, str(local),
         str(seen), server.url],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert killed.returncode == -9, killed.stderr
    assert json.loads(seen.read_text()) == []  # prepare never imported torch
    a = machine(server, bucket, tmp_path, "a")
    fp = next(iter(a.store.list_names(*layout.version_folder(recipe.name, recipe.version))))
    entry = entry_of(recipe, fp)
    assert a.store.list_names(*entry) == ["objects"]  # its object, no record, no manifest
    assert part(machine(server, bucket, tmp_path, "b"), recipe, fake, 1).present == (1,)
    rerun = part(a, recipe, fake, 0)
    assert (rerun.written, rerun.uploaded, rerun.present) == (0, 0, (0, 1))  # all reused
    assert part(a, recipe, fake, 2).status == PUBLISHED
    got = fetch_split(machine(server, bucket, tmp_path, "reader"), recipe, "train",
                      options(fake))
    assert got is not None and got.rows == 18


# ------------------------------------------------------------------ hostile records


def _attacks(record: dict, other_shard: dict) -> dict[str, tuple[object, str]]:
    """name -> (what is put at part 0's key, what the refusal says)."""

    def edited(**changes):
        shard = {**record["shards"][0], **changes.pop("shard", {})}
        return {**record, "shards": [shard], **changes}

    size = record["shards"][0]["bytes"]
    return {
        "a name with ..": (edited(shard={"file": "../../../etc/passwd"}), "names shard"),
        "a plausible name of another shard": (
            edited(shard={"file": "train-00001-of-00003.arrow"}), "names shard"),
        "a huge size": (edited(shard={"bytes": 10**12, "chunk_bytes": 1 << 30,
                                      "chunks": ["0" * 16] * 932}), "has .* bytes, the record"),
        "a size off by one": (edited(shard={"bytes": size + 1}), "do not fit|has .* bytes"),
        "more rows than bytes": (edited(shard={"rows": size + 1}), "rows in"),
        "negative rows": (edited(shard={"rows": -1}), "rows in"),
        "rows as text": (edited(shard={"rows": "6"}), "rows in"),
        "no shards": (edited(shards=[]), "lists 0 shards"),
        "two shards": (edited(shards=[record["shards"][0], other_shard]), "lists 2 shards"),
        "another total": (edited(total_shards=4), "total_shards"),
        "another N": (edited(num_shards=2), "num_shards"),
        "another index": (edited(shard_index=1), "shard_index"),
        "another split": (edited(split="val"), "split"),
        "rows that are not the images counted": (edited(shard={"rows": 5}), "counts 6"),
        "a class out of range": (edited(shard={"class_counts": {"1000": 6}}), "class '1000'"),
        "a negative class": (edited(shard={"class_counts": {"-1": 6}}), "class '-1'"),
        "class counts that are no mapping": (edited(shard={"class_counts": 6}),
                                             "do not describe their shards"),
        "not a sha256": (edited(shard={"sha256": "../x"}), "sha256"),
        "not a part record": ({"format": "something else"}, "not a datapipe part record"),
        "a list": ([1, 2, 3], "not a datapipe part record"),
        "not JSON": (b"\xff{", "not a datapipe part record"),
    }


def test_hostile_part_records_are_refused_in_one_line_and_nothing_is_published(
        server, bucket, fake, recipe, tmp_path, monkeypatch):
    a = machine(server, bucket, tmp_path, "a")
    for index in (0, 1):
        progress = part(a, recipe, fake, index)
    store, fp = a.store, progress.fingerprint
    key = record_key(store, recipe, fp, 0)
    valid = store.fs.cat_file(key)
    record = json.loads(valid)
    other = json.loads(store.fs.cat_file(record_key(store, recipe, fp, 1)))["shards"][0]
    # Names in the parts folder that are no part of this N are never read.
    folder = store.key(*layout.parts_folder(*entry_of(recipe, fp)[1:]))
    for junk in ("part-00005-of-00003.json", "part-1-of-3.json", "notes.txt"):
        store.fs.pipe_file(f"{folder}/{junk}", b"junk")
    for name, (hostile, says) in _attacks(record, other).items():
        data = hostile if isinstance(hostile, bytes) else json.dumps(hostile).encode()
        store.fs.pipe_file(key, data)
        with pytest.raises(CacheError, match=says) as e:
            part(a, recipe, fake, 2)
        assert "\n" not in str(e.value) and "nothing was published" in str(e.value), name
        assert not store.exists(manifest_key(store, recipe, fp)), name
    # A record larger than a part record may be: refused before it is read.
    store.fs.pipe_file(key, valid)
    monkeypatch.setattr(parts_module, "RECORD_LIMIT", len(valid) - 1)
    with pytest.raises(CacheError, match="more than the"):
        part(a, recipe, fake, 2)
    monkeypatch.undo()
    # A record whose object is gone.
    sha = record["shards"][0]["sha256"]
    store.remove(store.key(*layout.stored_object(recipe.name, recipe.version, fp, sha)))
    with pytest.raises(CacheError, match="is missing"):
        part(a, recipe, fake, 2)
    part(a, recipe, fake, 0, force=True)  # the repair the refusal names
    done = part(a, recipe, fake, 2)
    assert done.status == ALREADY and done.rows == 18
