"""`datapipe verify`, `datapipe cache ls` and `datapipe cache rm` (faults: tests/torture/)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from loopback import MirrorServer

from datapipe.cache import Cache
from datapipe.cli import main
from datapipe.prepare import prepare_lock_key
from datapipe.stages.load import ArrowLoad


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prepare(capsys, fake_mnist, cache, *extra):
    code, out, err = run(capsys, "prepare", "mnist", "--source", fake_mnist.folder,
                         "--no-verify", "--quiet", "--cache-dir", cache, *extra)
    assert code == 0, err
    return out


def test_ls_lists_entries_downloads_and_leftovers(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", cache)
    assert code == 0 and "no prepared entries" in out and "downloads: 0 file(s)" in out
    prepare(capsys, fake_mnist, cache)
    version = cache / "prepared" / "mnist" / "1"
    (version / ".tmp-0123456789abcdef-99999-deadbeef").mkdir()  # a killed run's
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", cache)
    assert code == 0
    header, *rows = out.splitlines()[:3]
    assert header.split() == ["recipe", "version", "split", "fingerprint", "rows", "size",
                              "sources", "state", "path"]
    assert sorted(r.split()[2] for r in rows) == ["test", "train"]
    assert all(r.split()[6:8] == ["UNVERIFIED", "trusted"] for r in rows)
    assert "leftovers of interrupted runs: 1" in out

    code, out, _ = run(capsys, "cache", "ls", "mnist", "--json", "--cache-dir", cache)
    listing = json.loads(out)
    assert {e["split"]: e["rows"] for e in listing["entries"]} == {"train": 600, "test": 100}
    assert all(e["state"] == "trusted" and e["verified"] is False
               for e in listing["entries"])
    assert len(listing["leftovers"]) == 1


def test_rm_removes_entries_splits_and_leftovers(fake_mnist, tmp_path, capsys):
    import datapipe

    cache = tmp_path / "cache"
    prepare(capsys, fake_mnist, cache)
    dm = datapipe.load("mnist", cache_dir=cache, source=fake_mnist.folder, verify=False,
                       val_split=100)
    dm.plan_splits()  # writes splits/mnist/<id>.json
    assert list((cache / "splits" / "mnist").glob("*.json"))
    (cache / "prepared" / "mnist" / "1" / ".tmp-0123456789abcdef-99999-deadbeef").mkdir()
    other = cache / "prepared" / "mnist" / "2" / "fedcba9876543210"
    other.mkdir(parents=True)

    code, out, _ = run(capsys, "cache", "rm", "mnist", "--version", "2", "--cache-dir", cache)
    assert code == 0 and "1 prepared entry" in out
    assert not (cache / "prepared" / "mnist" / "2").exists()
    assert list((cache / "splits" / "mnist").glob("*.json"))  # kept with --version

    code, out, _ = run(capsys, "cache", "rm", "mnist", "--cache-dir", cache)
    assert code == 0, out
    assert "2 prepared entries, 1 split plan(s), 0 download(s), 1 leftover(s)" in out
    assert not (cache / "prepared" / "mnist").exists()
    assert not (cache / "splits" / "mnist").exists()
    code, out, _ = run(capsys, "cache", "rm", "mnist", "--cache-dir", cache)
    assert code == 0 and "nothing of mnist" in out


def test_rm_all_also_removes_downloads(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    with MirrorServer(fake_mnist.files) as mirror:
        code, _, err = run(capsys, "prepare", "mnist", "--no-verify", "--quiet",
                           "--mirror", mirror.url, "--cache-dir", cache)
    assert code == 0, err
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", cache)
    assert "downloads: 4 file(s)" in out and "(4 kept unverified)" in out
    code, out, _ = run(capsys, "cache", "rm", "mnist", "--all", "--cache-dir", cache)
    assert code == 0 and "4 download(s)" in out
    assert [p.name for p in (cache / "downloads").iterdir()] == []


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from datapipe.cache import Cache
    with Cache(Path(sys.argv[1])).lock(sys.argv[2], what="a prepare"):
        print("held", flush=True)
        time.sleep(1.5)
""")


@pytest.mark.slow  # separate processes
def test_rm_waits_for_the_prepare_lock(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare(capsys, fake_mnist, cache)
    [entry] = [p.parent for p in (cache / "prepared").glob("mnist/1/*/manifest.json")
               if "train" in json.loads(p.read_text())["split"]]
    key = prepare_lock_key("mnist", "1", entry.name)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache), key],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        code, out, err = run(capsys, "cache", "rm", "mnist", "--cache-dir", cache)
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)
    assert code == 0 and "2 prepared entries" in out
    assert waited > 0.5
    assert f"waiting for the lock on removal of mnist 1 {entry.name}, held by pid " \
           f"{holder.pid}" in err


def test_a_reader_keeps_its_mapped_data_after_rm(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare(capsys, fake_mnist, cache, "--split", "test")
    [arrow] = (cache / "prepared").glob("mnist/1/*/test.arrow")
    columns = ArrowLoad()(arrow)
    code, _, _ = run(capsys, "cache", "rm", "mnist", "--cache-dir", cache)
    assert code == 0 and not arrow.exists()
    assert np.array_equal(columns["image"][:, 0], fake_mnist.arrays["t10k-images-idx3-ubyte.gz"])


def test_verify_all_checks_downloads_too(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, _ = run(capsys, "verify", "--cache-dir", cache)
    assert code == 0 and "nothing of any recipe" in out
    with MirrorServer(fake_mnist.files) as mirror:
        code, _, err = run(capsys, "prepare", "mnist", "--no-verify", "--quiet",
                           "--mirror", mirror.url, "--cache-dir", cache)
    assert code == 0, err
    code, out, _ = run(capsys, "verify", "--cache-dir", cache)
    lines = out.splitlines()
    assert code == 0
    assert sum(ln.startswith("OK") and "download" in ln for ln in lines) == 4
    assert sum(ln.startswith("OK") and "prepared" in ln for ln in lines) == 2
    assert lines[-1].startswith("6 checked in") and "6 OK, 0 CORRUPT" in lines[-1]
    # A sidecar that lies about its file is caught like a flipped byte.
    [sidecar] = (cache / "downloads").glob("*/t10k-labels-idx1-ubyte.gz.json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "checksum": "0" * 32}))
    code, out, err = run(capsys, "verify", "mnist", "--cache-dir", cache)
    assert code == 2 and "1 corrupt cache entry" in err
    assert not sidecar.exists() and not sidecar.with_suffix("").exists()
    assert Cache(cache).root == cache


def test_verify_and_cache_never_import_torch(fake_mnist, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from datapipe.cli import main
        cache = {str(tmp_path)!r}
        assert main(['prepare', 'mnist', '--quiet', '--no-verify', '--source',
                     {str(fake_mnist.folder)!r}, '--cache-dir', cache]) == 0
        assert main(['verify', 'mnist', '--cache-dir', cache]) == 0
        assert main(['cache', 'ls', '--cache-dir', cache]) == 0
        assert main(['cache', 'rm', 'mnist', '--cache-dir', cache]) == 0
        print('HEAVY', [m for m in ('torch', 'torchvision', 'datasets', 'fsspec', 's3fs',
                                    'botocore') if m in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


@pytest.mark.slow  # separate processes
def test_rm_waits_for_a_prepare_that_has_written_nothing_yet(fake_mnist, tmp_path, capsys):
    """The prepare lock of an entry not yet on disk (the prepare is parsing) holds rm too."""
    import datapipe
    from datapipe.prepare import expected_fingerprints

    cache = tmp_path / "cache"
    recipe = datapipe.load("mnist", cache_dir=cache).recipe
    fp = sorted(expected_fingerprints(recipe, Cache.at(cache)))[0]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache),
                               prepare_lock_key("mnist", "1", fp)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run(capsys, "cache", "rm", "mnist", "--all", "--cache-dir", cache)
    finally:
        holder.wait(timeout=30)
    assert code == 0 and "nothing of mnist" in out, err
    assert f"waiting for the lock on removal of mnist 1 {fp}, held by pid {holder.pid}" in err


@pytest.mark.slow  # separate processes
def test_rm_all_during_a_real_prepare_from_a_slow_mirror(fake_mnist, tmp_path, capsys):
    """rm --all while a prepare downloads: the prepare fetches what went again (or ends
    in one line), never a traceback; what it publishes is whole."""
    cache = tmp_path / "cache"
    with MirrorServer(fake_mnist.files, mode="slow", delay=0.7) as mirror:
        preparer = subprocess.Popen(
            [sys.executable, "-m", "datapipe", "prepare", "mnist", "--split", "test",
             "--no-verify", "--quiet", "--mirror", mirror.url, "--cache-dir", str(cache)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while not mirror.requests["t10k-labels-idx1-ubyte.gz"] and preparer.poll() is None:
                time.sleep(0.02)  # the images are downloaded, the labels on their way
            code, out, err = run(capsys, "cache", "rm", "mnist", "--all", "--cache-dir", cache)
            stdout, stderr = preparer.communicate(timeout=120)
        finally:
            preparer.kill()
    assert code == 0 and "Traceback" not in err, err
    assert "Traceback" not in stderr, stderr
    if preparer.returncode == 0:  # it fetched the removed images again
        assert mirror.requests["t10k-images-idx3-ubyte.gz"] >= 1 and "100 rows" in stdout
    else:
        lines = [ln for ln in stderr.splitlines() if "error:" in ln]
        assert preparer.returncode == 2 and len(lines) == 1, stderr
    code, out, _ = run(capsys, "verify", "--cache-dir", cache)
    assert code == 0, out
    prepare(capsys, fake_mnist, cache, "--split", "test")


def test_leftovers_of_a_killed_rm_go_with_the_next_rm_or_prepare(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    with MirrorServer(fake_mnist.files) as mirror:
        fetch = ("prepare", "mnist", "--split", "test", "--no-verify", "--quiet",
                 "--mirror", mirror.url, "--cache-dir", cache)
        assert run(capsys, *fetch)[0] == 0
        downloads = sorted(p for p in (cache / "downloads").iterdir() if p.is_dir())
        [entry] = (cache / "prepared" / "mnist" / "1").iterdir()

        def killed_rm():  # what `cache rm --all` leaves when killed midway
            for folder in [*downloads, entry]:
                if folder.exists():
                    folder.rename(folder.with_name(f".tmp-{folder.name}-99999-deadbeef"))

        killed_rm()
        code, out, _ = run(capsys, "cache", "ls", "--cache-dir", cache)
        assert f"leftovers of interrupted runs: {len(downloads) + 1}" in out
        assert run(capsys, *fetch)[0] == 0  # fetches and prepares again, sweeping them
        assert not list(cache.rglob(".tmp-*"))
        killed_rm()
        code, out, _ = run(capsys, "cache", "rm", "mnist", "--all", "--cache-dir", cache)
        assert code == 0 and not list(cache.rglob(".tmp-*")), out
