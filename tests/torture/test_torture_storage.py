"""Storage faults: unwritable and read-only caches, full disks, corrupted bytes, stale locks.

Each fault ends in one actionable line and exit status 2 (or, where nothing needs
writing, in success); the cache never holds an entry a reader trusts that is wrong;
once the fault is gone the next prepare succeeds with data byte-identical to a clean
run's and leaves no temporary behind.

Real faults where the machine allows them (a tmpfs of 2 MB, filled up; a read-only
remount; these need root and are skipped otherwise), simulated ``ENOSPC`` at every
write of a prepare where it does not (and in any case: they run everywhere).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torture_kit as kit
from loopback import MirrorServer
from torture_kit import (
    RECIPE,
    TEST,
    TRAIN,
    VICTIM,
    audit,
    cli_env,
    data_hashes,
    error_lines,
    fill,
    mounted_tmpfs,
    prepare_args,
    run_cli,
)

import datapipe
from datapipe import cache as cache_module
from datapipe import transport as transport_module
from datapipe.cache import Cache
from datapipe.cli import main
from datapipe.errors import NotPreparedError
from datapipe.prepare import find_prepared
from datapipe.stages.download import FetchOptions
from datapipe.stages.save import ArrowSave
from datapipe.verify import CORRUPT, OK, verify

world, figures = kit.world, kit.figures  # the suite's shared fixtures


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mnist_args(world, cache: Path, *extra: str) -> list[str]:
    """The built-in mnist recipe on the suite's files, in this process (no network)."""
    return ["prepare", "mnist", "--source", str(world.source), "--no-verify", "--quiet",
            "--cache-dir", str(cache), *extra]


def assert_one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_recovers(world, capsys, cache: Path, figures) -> None:
    """No wrong entry trusted; the next prepare succeeds, identical, leaving nothing behind."""
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == []
    assert [p for p in found.leftovers if not p.name.endswith(".partial")] == []
    code, _, err = cli(capsys, *mnist_args(world, cache))
    assert code == 0, err
    assert data_hashes(cache, "mnist") == world.reference
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []


# ------------------------------------------------------------------ unwritable


def test_cache_under_a_regular_file(world, figures, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    figures.fault("unwritable cache")
    code, _, err = cli(capsys, *mnist_args(world, blocker / "cache"))
    assert_one_line(code, err, "cannot create cache directory", "--cache-dir")


def test_locks_folder_that_is_a_file(world, figures, capsys, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "locks").write_text("in the way")
    figures.fault("unwritable cache")
    code, _, err = cli(capsys, *mnist_args(world, cache))
    assert_one_line(code, err, "locks", "--cache-dir")
    (cache / "locks").unlink()
    assert_recovers(world, capsys, cache, figures)


def test_read_only_cache_serves_what_it_holds_and_refuses_the_rest(world, figures, capsys,
                                                                   tmp_path):
    mount = tmp_path / "ro"
    with mounted_tmpfs(mount, "4M"):
        cache = mount / "cache"
        code, _, err = cli(capsys, *mnist_args(world, cache, "--split", "train"))
        assert code == 0, err
        done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
        figures.fault("read-only cache")
        try:
            # What is there is served: no lock, no write is needed to find it.
            code, out, err = cli(capsys, *mnist_args(world, cache, "--split", "train"))
            assert code == 0 and "already prepared" in out, err
            code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
            assert code == 0 and not _corrupt_lines(out), err
            # What is not there cannot be made: one line saying why.
            code, _, err = cli(capsys, *mnist_args(world, cache, "--split", "test"))
            assert_one_line(code, err, str(cache), "--cache-dir")
            code, _, err = cli(capsys, "cache", "rm", "mnist", "--cache-dir", str(cache))
            assert_one_line(code, err, str(cache))
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        assert_recovers(world, capsys, cache, figures)


def test_verify_on_a_read_only_cache_says_what_it_could_not_fix(world, figures, capsys,
                                                                tmp_path):
    mount = tmp_path / "ro"
    with mounted_tmpfs(mount, "4M"):
        cache = mount / "cache"
        code, _, err = cli(capsys, *mnist_args(world, cache, "--split", "test"))
        assert code == 0, err
        [arrow] = cache.glob("prepared/mnist/1/*/test.arrow")
        _flip(arrow)
        done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
        figures.fault("damaged prepared entry on a read-only cache")
        try:
            code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        line = assert_one_line(code, err, "still in use because the cache cannot be changed",
                               str(arrow.parent), "by hand")
        [bad] = _corrupt_lines(out)
        assert "could NOT be marked untrusted" in bad and line


# ------------------------------------------------------------------ full disk

# Free bytes left on a 2 MB tmpfs before a prepare that writes, in order: the train files
# (470 KB), the train entry (467 KB), the test files (78 KB), the test entry (80 KB).
# Each value runs out at another of those writes; the last leaves room enough.
FREE = [0, 300 << 10, 600 << 10, 900 << 10, 980 << 10, 1060 << 10, 1400 << 10]


def test_full_disk_at_every_stage(world, figures, tmp_path):
    """A real small filesystem, filled so that each run finds the disk full elsewhere."""
    outcomes = []
    with MirrorServer(world.files) as mirror, mounted_tmpfs(tmp_path / "small", "2M") as fs:
        for free in FREE:
            cache = fs / f"cache-{free}"
            filler = fill(fs, free)
            done = run_cli(prepare_args(world, cache, "--mirror", mirror.url))
            figures.fault("disk full")
            outcomes.append(done.returncode)
            if done.returncode != 0:
                [line] = error_lines(done.stderr)
                assert done.returncode == 2 and "No space left on device" in line, done.stderr
                assert "free space or choose another cache" in line
                figures.disk_full[f"at {_what_was_written(line)}"] += 1
            else:
                figures.disk_full["room enough"] += 1
            found = audit(cache)
            figures.check(found)
            assert found.corruptions == []
            assert all(p.name.endswith(".partial") for p in found.leftovers), found.leftovers
            filler.unlink()
            again = run_cli(prepare_args(world, cache, "--mirror", mirror.url))
            assert again.returncode == 0, again.stderr
            assert data_hashes(cache, RECIPE) == world.reference
            found = audit(cache)
            figures.check(found)
            assert found.corruptions == [] and found.leftovers == []
            subprocess.run(["rm", "-rf", str(cache)], check=True)
    assert 2 in outcomes and 0 in outcomes, outcomes  # the sweep hit full disks and room


def _what_was_written(line: str) -> str:
    path = line.split("could not write ", 1)[1].split(": ", 1)[0]
    name = Path(path).name
    if name.endswith(".partial"):
        return "a download"
    if name.endswith(".gz.json"):
        return "a download's sidecar"
    if name == "manifest.json":
        return "a manifest"
    if "prepared" in path:
        return "an Arrow file"
    return name


class _FullFile:
    """A writable file on a disk that fills up after ``room`` bytes."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def _full_open(match: str, room: int = 100):
    def fake_open(path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        if "w" in mode and match in Path(path).name:
            return _FullFile(real, room)
        return real
    return fake_open


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


SIMULATED = {
    # where: (module to patch, attribute, replacement)
    "partial download": lambda mp: mp.setattr(transport_module, "open", _full_open(".partial"),
                                              raising=False),
    "sidecar": lambda mp: mp.setattr(cache_module, "open", _full_open(".gz.json"),
                                     raising=False),
    "arrow file": lambda mp: mp.setattr(ArrowSave, "__call__", _enospc),
    "manifest": lambda mp: mp.setattr(cache_module, "open", _full_open("manifest.json"),
                                      raising=False),
}


@pytest.mark.parametrize("where", list(SIMULATED))
def test_simulated_enospc(where, world, figures, capsys, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    with MirrorServer(world.files) as mirror:
        args = ["prepare", "mnist", "--no-verify", "--quiet", "--cache-dir", str(cache),
                "--mirror", mirror.url]
        with monkeypatch.context() as patched:
            SIMULATED[where](patched)
            code, _, err = cli(capsys, *args)
        figures.fault("disk full (simulated)")
        assert_one_line(code, err, "No space left on device", "free space or choose another")
        found = audit(cache)
        figures.check(found)
        assert found.corruptions == []
        assert [p for p in found.leftovers if not p.name.endswith(".partial")] == []
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    assert data_hashes(cache, "mnist") == world.reference
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []


# ------------------------------------------------------------------ corrupted bytes


def _corrupt_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(CORRUPT)]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bit": lambda entry, m: _flip(entry / m["data_file"]),
    "truncated": lambda entry, m: os.truncate(entry / m["data_file"], 1000),
    "extra byte": lambda entry, m: (entry / m["data_file"]).open("ab").write(b"\0"),
    "missing file": lambda entry, m: (entry / m["data_file"]).unlink(),
    "garbage manifest": lambda entry, m: (entry / "manifest.json").write_text("{\"form"),
    "manifest of another entry": lambda entry, m: (entry / "manifest.json").write_text(
        json.dumps({**m, "fingerprint": "0" * 16})),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_prepared_entry_is_caught_and_never_served(damage, world, figures, capsys,
                                                           tmp_path):
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, *mnist_args(world, cache))
    assert code == 0, err
    options = FetchOptions(source=str(world.source), verify=False)
    dm = datapipe.load("mnist", cache_dir=cache, source=world.source, verify=False,
                       val_split=0)
    [entry] = [p.parent for p in cache.glob("prepared/mnist/1/*/manifest.json")
               if json.loads(p.read_text())["split"] == "train"]
    manifest = json.loads((entry / "manifest.json").read_text())
    DAMAGE[damage](entry, manifest)
    figures.fault("damaged prepared entry")

    code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
    line = assert_one_line(code, err, "corrupt", "datapipe prepare mnist")
    assert "1 corrupt" in line
    [bad] = [ln for ln in out.splitlines() if ln.startswith(CORRUPT)]
    assert entry.name in bad and "no longer trusted" in bad
    assert sum(ln.startswith(OK) for ln in out.splitlines()) == 1  # the test split

    # Never served: not found, not loaded, and the card says so.
    assert find_prepared(dm.recipe, "train", Cache(cache), options) is None
    with pytest.raises(NotPreparedError, match="not prepared"):
        dm.setup("fit")
    code, out, _ = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
    assert code == 0 and not _corrupt_lines(out)  # marked once; now only INCOMPLETE
    assert_recovers(world, capsys, cache, figures)
    assert all(c.status == OK for c in verify(Cache(cache), "mnist"))


def test_size_damage_is_not_served_even_before_verify(world, figures, capsys, tmp_path):
    """A reader checks the sizes the manifest records: a cut file is never mapped."""
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, *mnist_args(world, cache))
    assert code == 0, err
    [manifest_path] = [p for p in cache.glob("prepared/mnist/1/*/manifest.json")
                       if json.loads(p.read_text())["split"] == "test"]
    os.truncate(manifest_path.parent / "test.arrow", 4096)
    figures.fault("damaged prepared entry")
    dm = datapipe.load("mnist", cache_dir=cache, source=world.source, verify=False)
    assert find_prepared(dm.recipe, "test", Cache(cache), dm.fetch_options) is None
    code, out, err = cli(capsys, *mnist_args(world, cache))
    assert code == 0 and "mnist test: 100 rows" in out and "prepared in" in out, err
    assert data_hashes(cache, "mnist") == world.reference


def test_corrupted_download_is_removed_and_fetched_again_once(world, figures, tmp_path):
    cache = tmp_path / "cache"
    with MirrorServer(world.files) as mirror:
        args = prepare_args(world, cache, "--mirror", mirror.url)
        assert run_cli(args).returncode == 0
        _flip(cache / "downloads" / world.download_key(TEST[0]) / TEST[0])
        figures.fault("corrupted download")
        done = run_cli(["--recipes", str(world.recipes), "verify", RECIPE,
                        "--cache-dir", str(cache)])
        assert done.returncode == 2
        [bad] = [ln for ln in done.stdout.splitlines() if ln.startswith(CORRUPT)]
        assert TEST[0] in bad and "downloads it again" in bad
        assert len(error_lines(done.stderr)) == 1
        found = audit(cache)
        assert found.trusted_downloads == 3 and found.corruptions == []
        # The entries built from it were whole; rebuild everything to need the file again.
        done = run_cli(["--recipes", str(world.recipes), "cache", "rm", RECIPE,
                        "--cache-dir", str(cache)])
        assert done.returncode == 0 and "2 prepared entries" in done.stdout, done.stderr
        assert run_cli(args).returncode == 0
        assert mirror.requests == {n: 2 if n == TEST[0] else 1 for n in world.files}
    assert data_hashes(cache, RECIPE) == world.reference
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []


# ------------------------------------------------------------------ stale locks

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from datapipe.cache import Cache
    with Cache(Path(sys.argv[1])).lock(sys.argv[2], what="a test holder"):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
""")


def _hold(cache: Path, key: str, seconds: float, lock: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cache), key, str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=cli_env(lock))
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_lock_of_a_process_killed_while_holding_it(lock, world, figures, tmp_path):
    cache = tmp_path / "cache"
    with MirrorServer(world.files) as mirror:
        args = prepare_args(world, cache, "--mirror", mirror.url)
        victim = subprocess.Popen([sys.executable, str(VICTIM), "prepare-lock:1", "--", *args],
                                  stdout=subprocess.PIPE, text=True, env=cli_env(lock))
        assert victim.stdout.readline().startswith("TORTURE-POINT prepare-lock")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        figures.fault(f"stale lock ({lock})")
        [holder] = (cache / "locks").glob("prepare-*.lock.holder")
        assert json.loads(holder.read_text())["pid"] == victim.pid
        started = time.monotonic()
        done = run_cli(args, env=cli_env(lock, DATAPIPE_LOCK_TIMEOUT="60"))
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 15  # not the timeout: the lock was free or broken
    assert data_hashes(cache, RECIPE) == world.reference
    assert not list((cache / "locks").glob("*.holder"))


def test_soft_lock_without_any_owner_record_is_broken_once_old(world, figures, tmp_path):
    """A holder killed between creating the lock file and recording itself."""
    cache = tmp_path / "cache"
    lock = cache / "locks" / f"download-{world.download_key(TRAIN[0])}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = time.time() - 120
    os.utime(lock, (old, old))
    figures.fault("stale lock (soft, no record)")
    with MirrorServer(world.files) as mirror:
        done = run_cli(prepare_args(world, cache, "--mirror", mirror.url),
                       env=cli_env("soft", DATAPIPE_LOCK_TIMEOUT="30"))
    assert done.returncode == 0, done.stderr
    assert data_hashes(cache, RECIPE) == world.reference


def test_soft_lock_of_another_host_times_out_naming_it(world, figures, tmp_path):
    """Who knows whether a process on another host is alive: wait, then say who holds it."""
    cache = tmp_path / "cache"
    lock = cache / "locks" / f"download-{world.download_key(TEST[0])}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    Path(f"{lock}.holder").write_text(json.dumps(
        {"pid": 4242, "host": "gpu-node-17", "since": "2024-05-01T10:00:00+00:00"}))
    figures.fault("lock held elsewhere (soft)")
    assert socket.gethostname() != "gpu-node-17"
    args = prepare_args(world, cache, "--split", "test", "--mirror", "http://127.0.0.1:9/")
    args.remove("--quiet")
    done = run_cli(args, env=cli_env("soft", DATAPIPE_LOCK_TIMEOUT="2"))
    [line] = [ln for ln in error_lines(done.stderr) if not ln.startswith("datapipe: waiting")]
    assert done.returncode == 2
    assert line.startswith("datapipe: error: timed out after 2s waiting for the lock on "
                           f"download of {TEST[0]}")
    assert "held by pid 4242 on gpu-node-17 since 2024-05-01T10:00:00+00:00" in line
    assert str(lock) in line and "DATAPIPE_LOCK_TIMEOUT" in line
    waiting = [ln for ln in done.stderr.splitlines() if ln.startswith("datapipe: waiting")]
    assert len(waiting) == 1 and "pid 4242 on gpu-node-17" in waiting[0] and str(lock) in \
        waiting[0]
    assert lock.exists()  # never broken: its holder may be alive
    assert audit(cache).trusted_prepared == 0


@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_waiting_for_a_live_holder_says_who_and_then_goes_on(lock, world, figures, tmp_path):
    cache = tmp_path / "cache"
    key = f"download-{world.download_key(TEST[0])}"
    holder = _hold(cache, key, 3, lock)
    figures.fault(f"lock held by a live process ({lock})")
    try:
        with MirrorServer(world.files) as mirror:
            args = prepare_args(world, cache, "--split", "test", "--mirror", mirror.url)
            args.remove("--quiet")
            done = run_cli(args, env=cli_env(lock))
    finally:
        holder.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    [waiting] = [ln for ln in done.stderr.splitlines() if "waiting for the lock" in ln]
    assert f"download of {TEST[0]}, held by pid {holder.pid} on {socket.gethostname()} since" \
        in waiting
    assert f"{key}.lock" in waiting
    assert data_hashes(cache, RECIPE) == {"test": world.reference["test"]}
