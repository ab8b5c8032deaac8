"""Attacks on the local cache's claims: an entry a reader uses is never evicted under it.

The readers and evictors here are real separate processes sharing one local cache folder
(``local_cache=DIR``), as several runs on one node are; the store is a real S3 server
(moto) on 127.0.0.1 that the subprocesses reach through ``DATAPIPE_S3_ENDPOINT``.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import s3_server
from s3_server import entry_parts_of, needs_s3, published_mnist

from datapipe.cache import Cache
from datapipe.datamodules.mnist import RECIPE
from datapipe.manifest import trusted
from datapipe.prepare import prepare_split
from datapipe.remote import reader as reader_module
from datapipe.remote.reader import RemoteCache
from datapipe.stages.download import FetchOptions

pytestmark = [needs_s3, pytest.mark.skipif(reader_module.fcntl is None,
                                           reason="no flock: claims are not enforced")]

server, bucket = s3_server.server, s3_server.bucket  # the fixtures (see s3_server.py)

TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
DEAD_ENDPOINT = "http://127.0.0.1:9"

# A reader in its own process: a DataModule over the store, driven line by line on stdin,
# answering one JSON line each on stdout. Only mnist's train split is used (no test split),
# so its claims are exactly the train entry.
READER = textwrap.dedent("""
    import json, sys, traceback
    import datapipe

    config = json.loads(sys.argv[1])
    dm = None

    def say(**answer):
        print(json.dumps(answer), flush=True)

    def rows_and_label_sum(batches):
        rows = total = 0
        for _, labels in batches:
            rows += len(labels)
            total += int(labels.sum())
        return {"rows": rows, "label_sum": total}

    def workers_epoch(workers):
        # torch workers (fork) over the datasets: each maps the files itself, now
        from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
        from datapipe.loader import keep_batch
        out = {"rows": 0, "label_sum": 0}
        for part in ("train", "val"):
            ds = dm.datasets[part]
            batches = BatchSampler(SequentialSampler(range(len(ds))), 64, drop_last=False)
            got = rows_and_label_sum(DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                                collate_fn=keep_batch))
            out = {k: out[k] + got[k] for k in out}
        return out

    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "setup":
                dm = datapipe.load("mnist", cache_dir=config["url"], local_cache=config["local"],
                                   local_cache_limit=config.get("limit"), verify=False,
                                   batch_size=64, num_workers=0, val_split=100,
                                   test_split=None)
                dm.setup("fit")
                say(paths={s: str(p.path) for s, p in dm.prepared.items()},
                    claims=sorted(str(p) for p in dm.remote._claims),
                    offline=dm.remote.store._store is None)
            elif command == "epoch0":
                a = rows_and_label_sum(dm.train_dataloader())
                b = rows_and_label_sum(dm.val_dataloader())
                say(rows=a["rows"] + b["rows"], label_sum=a["label_sum"] + b["label_sum"])
            elif command == "epoch2":
                say(**workers_epoch(2))
            elif command == "release":
                dm.remote.release()
                say(claims=sorted(str(p) for p in dm.remote._claims))
            elif command == "quit":
                say(bye=True)
                break
            else:
                say(error=f"unknown command {command!r}")
        except Exception as e:
            say(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
""")

# An evictor in its own process: the size limit of the local cache, enforced once.
EVICTOR = textwrap.dedent("""
    import json, sys
    from datapipe.remote.sync import open_remote

    url, local, limit = sys.argv[1:4]
    remote = open_remote(url, local, int(limit))  # the store itself is never opened
    print(json.dumps([str(p) for p in remote.evict()]), flush=True)
""")


class Process:
    """A Python subprocess driven by lines on stdin, answering JSON lines on stdout."""

    def __init__(self, script: str, *args: str, env: dict | None = None) -> None:
        # stderr to a file: a pipe nobody reads fills up (a warning per evict) and blocks it
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True,
                                     env={**os.environ, **(env or {})})

    def stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-4000:]

    def answer(self, timeout: float = 60.0) -> dict | list:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                self.kill()
                pytest.fail(f"no answer in {timeout}s; stderr: {self.stderr()}")
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"the process ended (rc {self.proc.wait()}); stderr: "
                            f"{self.stderr()}")
            try:
                return json.loads(line)
            except ValueError:
                continue  # something printed that is not an answer

    def ask(self, command: str, timeout: float = 60.0) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        got = self.answer(timeout)
        assert "error" not in got, got.get("trace", got)
        return got

    def quit(self) -> None:
        self.ask("quit")
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def processes():
    started: list[Process] = []

    def start(script: str, *args: str, env: dict | None = None) -> Process:
        started.append(Process(script, *args, env=env))
        return started[-1]

    yield start
    for p in started:
        p.kill()
        for stream in (p.proc.stdin, p.proc.stdout, p.errors):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def evict_elsewhere(url: str, local, limit: int = 1) -> list[str]:
    """Run the size limit once in a process of its own; the entries it removed."""
    done = subprocess.run([sys.executable, "-c", EVICTOR, url, str(local), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def race(claimer: Process, evictor: Process) -> tuple[dict, dict]:
    """Start both once they are ready; what each reports when its time is up."""
    assert claimer.answer() == "ready" and evictor.answer() == "ready"
    for p in (claimer, evictor):
        p.proc.stdin.write("go\n")
        p.proc.stdin.flush()
    claimed, evicted = claimer.answer(), evictor.answer()
    print(claimed, evicted)  # with -s: how often each side won
    return claimed, evicted


def whole(path) -> bool:
    """The entry at ``path`` is there, trusted, every data file in place."""
    found = trusted(path)
    return found is not None and all((path / name).is_file() for name in found.manifest["files"])


def epoch_of(fake_mnist) -> dict:
    """What a full epoch of mnist's train and val parts serves: every train row once."""
    labels = fake_mnist.arrays[TRAIN_LABELS]
    return {"rows": len(labels), "label_sum": int(labels.astype(np.int64).sum())}


# ------------------------------------------------------------------ 1. separate processes


def test_a_run_in_another_process_keeps_its_splits_until_it_exits(
        server, bucket, fake_mnist, tmp_path, monkeypatch, processes, caplog):
    store, (test, train) = published_mnist(server, bucket, fake_mnist, tmp_path)
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    a = processes(READER, json.dumps({"url": url, "local": str(node), "limit": "1GB"}))
    ready = a.ask("setup")
    held = node / "prepared" / "mnist" / "1" / train.fingerprint
    assert ready["paths"] == {"train": str(held)} and ready["claims"] == [str(held)]
    assert whole(held)

    # This process: a reader with a tiny limit fetches mnist's other split.
    b = RemoteCache(store, Cache(node), limit=1)
    with caplog.at_level("WARNING", logger="datapipe"):
        got = b.fetch(entry_parts_of(test))
    assert "over its limit" in caplog.text
    assert whole(held) and whole(got.path)  # A's split stays; b's own is in use by b
    b.release()
    assert b.evict() == [got.path]  # b's, released, goes; A's claimed one stays
    assert whole(held) and evict_elsewhere(url, node) == []  # nor any other process

    # A still serves whole epochs from its split: workers mapping the files now, then itself.
    assert a.ask("epoch2") == epoch_of(fake_mnist)
    assert a.ask("epoch0") == epoch_of(fake_mnist)
    assert evict_elsewhere(url, node) == [] and whole(held)

    a.quit()  # its claims go with the process
    assert evict_elsewhere(url, node) == [str(held)]
    assert not held.exists()


def test_a_killed_run_gives_its_claims_up(server, bucket, fake_mnist, tmp_path, monkeypatch,
                                          processes):
    published_mnist(server, bucket, fake_mnist, tmp_path, splits=("train",))
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    a = processes(READER, json.dumps({"url": url, "local": str(node)}))
    held = a.ask("setup")["paths"]["train"]
    assert evict_elsewhere(url, node) == []
    a.kill()  # SIGKILL: no cleanup ran, the kernel drops the flock with the last descriptor
    assert evict_elsewhere(url, node) == [held]


# ------------------------------------------------------------------ 2. racing processes

CLAIMER = textwrap.dedent("""
    import json, sys, time
    from datapipe.cache import Cache
    from datapipe.layout import entry
    from datapipe.manifest import trusted
    from datapipe.remote.reader import RemoteCache
    from datapipe.remote.store import open_store

    url, endpoint, local, fp, seconds = sys.argv[1:6]
    store = open_store(url, {"client_kwargs": {"endpoint_url": endpoint}})
    reader = RemoteCache(store, Cache.at(local))  # no limit: it never evicts itself
    parts = entry("mnist", "1", fp)
    refused = 0
    real_claim = reader.claim

    def claim(found):
        global refused
        ok = real_claim(found)
        refused += not ok
        return ok

    reader.claim = claim

    def whole(path, files):
        return trusted(path) is not None and all((path / n).is_file() for n in files)

    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()  # go
    claims = broken = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        found = reader.fetch(parts)  # claimed: found here, or fetched again if evicted
        claims += 1
        files = list(found.manifest["files"])
        if not whole(found.path, files):
            broken += 1
        time.sleep(0.002)  # in use a while: the evictor tries meanwhile
        if not whole(found.path, files):
            broken += 1
        reader.release()
    print(json.dumps({"claims": claims, "broken": broken, "refused": refused}), flush=True)
""")

EVICT_LOOP = textwrap.dedent("""
    import json, sys, time
    from datapipe.remote.sync import open_remote

    url, local, seconds = sys.argv[1:4]
    remote = open_remote(url, local, 1)
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()  # go
    tries = removed = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        tries += 1
        removed += len(remote.evict())
    print(json.dumps({"tries": tries, "removed": removed}), flush=True)
""")


def test_a_claim_racing_evictions_in_another_process_never_holds_a_gone_entry(
        server, bucket, fake_mnist, tmp_path, processes):
    _, (test,) = published_mnist(server, bucket, fake_mnist, tmp_path, splits=("test",))
    url, node, seconds = f"s3://{bucket}", tmp_path / "node", "3"
    claimer = processes(CLAIMER, url, server.url, str(node), test.fingerprint, seconds)
    evictor = processes(EVICT_LOOP, url, str(node), seconds)
    claimed, evicted = race(claimer, evictor)
    assert claimed["broken"] == 0, claimed
    # Both sides got through many times: the race was run, not one side starved.
    # (Lower bounds far below what a quiet machine does: CI's two cores are shared.)
    assert claimed["claims"] >= 5 and evicted["removed"] >= 1, (claimed, evicted)
    assert evicted["removed"] <= claimed["claims"]  # each eviction was of a fetched copy


# The same race with no store in the loop (hundreds of rounds a second): the evictor puts
# the entry back itself, as a fetch would (a temporary sibling renamed into place under the
# entry's lock), whenever it has moved it away.
LOCAL_CLAIMER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from datapipe.cache import Cache
    from datapipe.manifest import trusted
    from datapipe.remote.reader import RemoteCache

    local, entry, seconds = sys.argv[1:4]
    entry = Path(entry)
    reader = RemoteCache(store=None, local=Cache.at(local))
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()
    claims = refused = absent = broken = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        found = trusted(entry)
        if found is None:
            absent += 1
            continue
        if not reader.claim(found):
            refused += 1
            continue
        claims += 1
        for _ in range(2):
            if trusted(entry) is None or not all((entry / n).is_file()
                                                 for n in found.manifest["files"]):
                broken += 1
        reader.release()
    print(json.dumps({"claims": claims, "refused": refused, "absent": absent,
                      "broken": broken}), flush=True)
""")

LOCAL_EVICTOR = textwrap.dedent("""
    import json, os, shutil, sys, time
    from pathlib import Path
    from datapipe import layout
    from datapipe.cache import Cache, temporary_sibling
    from datapipe.manifest import trusted
    from datapipe.remote.reader import RemoteCache

    local, entry, pristine, seconds = sys.argv[1:5]
    entry, cache = Path(entry), Cache.at(local)
    evictor = RemoteCache(store=None, local=cache, limit=1)
    parts = entry.relative_to(cache.root).parts
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()
    removed = kept = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        found = trusted(entry)
        if found is None:
            with cache.lock(layout.prepare_lock(*parts[1:]), "putting it back"):
                tmp = temporary_sibling(entry)
                shutil.copytree(pristine, tmp)
                os.replace(tmp, entry)
            continue
        if evictor._remove(found):
            removed += 1
        else:
            kept += 1
    print(json.dumps({"removed": removed, "kept": kept}), flush=True)
""")


def test_claims_racing_local_evictions_hundreds_of_times(fake_mnist, tmp_path, processes):
    node = Cache(tmp_path / "node")
    entry, _ = prepare_split(RECIPE, "test", node,
                             FetchOptions(source=str(fake_mnist.folder), verify=False))
    pristine = tmp_path / "pristine"
    shutil.copytree(entry.path, pristine)
    seconds = "2"
    claimer = processes(LOCAL_CLAIMER, str(node.root), str(entry.path), seconds)
    evictor = processes(LOCAL_EVICTOR, str(node.root), str(entry.path), str(pristine), seconds)
    claimed, evicted = race(claimer, evictor)
    assert claimed["broken"] == 0, claimed
    assert claimed["claims"] >= 20 and evicted["removed"] >= 10, (claimed, evicted)
    assert evicted["kept"] >= 1, evicted  # some evictions found the entry claimed


# ------------------------------------------------------------------ 3. found locally, offline


def test_a_split_found_locally_offline_is_claimed_against_other_processes(
        server, bucket, fake_mnist, tmp_path, monkeypatch, processes):
    store, (train,) = published_mnist(server, bucket, fake_mnist, tmp_path, splits=("train",))
    url, node = f"s3://{bucket}", tmp_path / "node"
    earlier = RemoteCache(store, Cache(node))
    held = earlier.fetch(entry_parts_of(train)).path  # an earlier run fetched it, and is over
    earlier.release()

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", DEAD_ENDPOINT)  # the store is unreachable now
    a = processes(READER, json.dumps({"url": url, "local": str(node), "limit": "1"}))
    ready = a.ask("setup")
    assert ready["offline"] and ready["claims"] == [str(held)]
    assert evict_elsewhere(url, node) == [] and whole(held)  # a tiny limit, elsewhere
    assert a.ask("epoch2") == epoch_of(fake_mnist)
    assert a.ask("epoch0") == epoch_of(fake_mnist)
    assert a.ask("release")["claims"] == []  # given up: the next evictor takes it
    assert evict_elsewhere(url, node) == [str(held)]
    a.quit()


# ------------------------------------------------------------------ 4. other ways in


def test_a_split_prepared_here_is_claimed_while_it_is_published(
        server, bucket, fake_mnist, tmp_path, monkeypatch):
    """The store lacks the split: the DataModule prepares it locally, then uploads it. An
    evictor elsewhere running meanwhile (the upload takes a while) must not take it."""
    import datapipe
    from datapipe.remote import sync

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    real_publish, during = sync.publish, []

    def slow_upload(store, entry, force=False):
        during.append(evict_elsewhere(url, node))  # another run's limit, mid-upload
        return real_publish(store, entry, force=force)

    monkeypatch.setattr(sync, "publish", slow_upload)
    dm = datapipe.load("mnist", cache_dir=url, local_cache=node, verify=False,
                       source=str(fake_mnist.folder), test_split=None, val_split=100)
    prepared = dm.prepare_data()["train"]
    assert during == [[]]  # nothing was evicted under the upload
    assert prepared.path in dm.remote._claims and whole(prepared.path)
    assert dm.remote.store.exists(dm.remote.store.key(
        "prepared", "mnist", "1", prepared.fingerprint, "manifest.json"))
    assert evict_elsewhere(url, node) == []  # claimed after the upload too
    dm.setup("fit")
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    assert sum(len(y) for _, y in batches) == epoch_of(fake_mnist)["rows"]


CHILD = textwrap.dedent("""
    import json, pickle, sys
    dm = pickle.loads(open(sys.argv[1], "rb").read())
    print(json.dumps({"claims": [str(p) for p in dm.remote._claims]}), flush=True)
    sys.stdin.readline()
    rows = sum(len(y) for part in (dm.train_dataloader(), dm.val_dataloader()) for _, y in part)
    print(json.dumps({"rows": rows}), flush=True)
""")


def _sent_datamodule(server, bucket, fake_mnist, tmp_path, monkeypatch, processes):
    """(dm, the entry it holds, a child process that unpickled it, the store url, node)."""
    import datapipe

    published_mnist(server, bucket, fake_mnist, tmp_path, splits=("train",))
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    dm = datapipe.load("mnist", cache_dir=url, local_cache=node, verify=False,
                       test_split=None, val_split=100, batch_size=64)
    dm.setup("fit")
    sent = tmp_path / "dm.pickle"
    sent.write_bytes(pickle.dumps(dm))
    return dm, dm.prepared["train"].path, processes(CHILD, str(sent)), url, node


def test_a_datamodule_sent_to_a_spawned_process_reads_what_the_original_holds(
        server, bucket, fake_mnist, tmp_path, monkeypatch, processes):
    dm, held, child, url, node = _sent_datamodule(server, bucket, fake_mnist, tmp_path,
                                                  monkeypatch, processes)
    assert child.answer() == {"claims": [str(held)]}  # the copy claims it as well
    assert held in dm.remote._claims
    assert evict_elsewhere(url, node) == [] and whole(held)
    assert child.ask("go") == {"rows": epoch_of(fake_mnist)["rows"]}


def test_a_datamodule_copy_that_outlives_the_original_keeps_its_splits(
        server, bucket, fake_mnist, tmp_path, monkeypatch, processes):
    import gc

    dm, held, child, url, node = _sent_datamodule(server, bucket, fake_mnist, tmp_path,
                                                  monkeypatch, processes)
    child.answer()
    del dm
    gc.collect()  # the submitting process moved on; the job reads its splits later
    assert evict_elsewhere(url, node) == [] and whole(held)
    assert child.ask("go") == {"rows": epoch_of(fake_mnist)["rows"]}


def test_a_split_evicted_between_its_prepare_and_its_claim_is_prepared_again(
        server, bucket, fake_mnist, tmp_path, monkeypatch):
    import datapipe
    from datapipe import datamodule

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    real_prepare, evicted = datamodule.prepare_split, []

    def then_evicted(*args, **kwargs):
        got = real_prepare(*args, **kwargs)
        if not evicted:  # the first time: another run's evictor gets in before the claim
            evicted.append(evict_elsewhere(url, node))
        return got

    monkeypatch.setattr(datamodule, "prepare_split", then_evicted)
    dm = datapipe.load("mnist", cache_dir=url, local_cache=node, verify=False,
                       source=str(fake_mnist.folder), test_split=None, val_split=100)
    prepared = dm.prepare_data()["train"]
    assert evicted == [[str(prepared.path)]]  # it was taken, then prepared again
    assert prepared.path in dm.remote._claims and whole(prepared.path)
    assert evict_elsewhere(url, node) == []
    assert dm.remote.store.exists(dm.remote.store.key(
        "prepared", "mnist", "1", prepared.fingerprint, "manifest.json"))


def test_a_released_entry_is_evicted_and_the_next_lookup_fetches_and_claims_it_again(
        server, bucket, fake_mnist, tmp_path, monkeypatch):
    import datapipe

    published_mnist(server, bucket, fake_mnist, tmp_path, splits=("train",))
    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    url, node = f"s3://{bucket}", tmp_path / "node"
    dm = datapipe.load("mnist", cache_dir=url, local_cache=node, verify=False,
                       test_split=None, val_split=100)
    dm.setup("fit")
    held = dm.prepared["train"].path
    assert evict_elsewhere(url, node) == []
    dm.remote.release(dm.prepared["train"])
    assert dm.remote._claims == {}
    assert evict_elsewhere(url, node) == [str(held)] and not held.exists()
    again = dm._lookup("train")  # the module's entry was evicted: fetched again, claimed
    assert again.path == held and whole(held) and held in dm.remote._claims
    assert evict_elsewhere(url, node) == []


def test_a_claim_is_on_the_entry_not_on_a_reader_object(server, bucket, fake_mnist, tmp_path):
    """Two readers in one process: one's release does not free the other's claim, and
    claiming twice is one claim, released once."""
    store, (test,) = published_mnist(server, bucket, fake_mnist, tmp_path, splits=("test",))
    node = Cache(tmp_path / "node")
    a, b = RemoteCache(store, node), RemoteCache(store, node)
    found = a.fetch(entry_parts_of(test))
    assert b.claim(found) and a.claim(found)
    a.release()
    evictor = RemoteCache(store, node, limit=1)
    assert evictor.evict() == [] and whole(found.path)
    b.release()
    assert evictor.evict() == [found.path]
    assert not a.claim(found) and not b.claim(found) and a._claims == b._claims == {}


def test_a_split_evicted_at_every_prepare_ends_in_one_line_not_a_loop(
        server, bucket, fake_mnist, tmp_path, monkeypatch):
    import datapipe
    from datapipe import datamodule
    from datapipe.errors import CacheError

    monkeypatch.setenv("DATAPIPE_S3_ENDPOINT", server.url)
    dm = datapipe.load("mnist", cache_dir=f"s3://{bucket}", local_cache=tmp_path / "node",
                       verify=False, source=str(fake_mnist.folder), test_split=None,
                       val_split=100)
    real_prepare, prepares = datamodule.prepare_split, []

    def counted(*args, **kwargs):
        prepares.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(datamodule, "prepare_split", counted)
    monkeypatch.setattr(dm.remote, "claim", lambda entry: False)  # taken every time
    with pytest.raises(CacheError, match="raise local_cache_limit") as e:
        dm.prepare_data()
    assert len(prepares) == datamodule.CLAIM_ATTEMPTS and "\n" not in str(e.value)
