"""The hostile-input corpus: crafted archives, pickles, folders and mirrors, through the CLI.

Each input is built in its real format (pickles opcode by opcode, tars header by header,
FIFOs with mkfifo, link loops with symlink, a mirror that trickles over loopback; see
tests/hostile.py) and fed to ``python -m datapipe prepare`` in a subprocess whose address
space is capped (RLIMIT_AS) and whose wall time is bounded. Defended means: one line,
exit status 2 (or, for folders and mirrors, a correct prepare that skipped the bad part),
nothing trusted half written, within the bounds. Each is counted with
``figures.attack(class, breach)``: a run that hits the time bound is a "hang", one that
exhausts the memory cap or serves what the attacker planted is "served".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import numpy as np
import pytest
import torture_kit as kit
from cifar_files import CIFAR10_FOLDER, make_fake_cifar10
from loopback import MirrorServer
from PIL import Image
from torture_kit import (
    REPO,
    TEST,
    TortureMirror,
    audit,
    cli_env,
    data_hashes,
    datapipe_argv,
    error_lines,
    prepare_args,
)

world, figures = kit.world, kit.figures  # the suite's shared fixtures

pytestmark = pytest.mark.timeout(180)
MEMORY_CAP = 3 << 30  # address space of each attacked process: far below what the attacks ask
WALL = 90  # seconds any attacked run may take; past it the attack is a hang
RECIPES = REPO / "recipes"


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def attacked(args: list[str], env: dict[str, str] | None = None,
             wall: float = WALL) -> subprocess.CompletedProcess | None:
    """Run the CLI under the memory cap; None when it ran past ``wall`` (killed)."""
    try:
        return subprocess.run(datapipe_argv(*args), capture_output=True, text=True,
                              env=env or cli_env(), timeout=wall, cwd=REPO,
                              preexec_fn=_cap_memory)
    except subprocess.TimeoutExpired:
        return None


def breach_of(done: subprocess.CompletedProcess | None, refused: bool) -> str | None:
    """What an attack achieved: None when ``refused`` holds for a run that ended in time."""
    if done is None:
        return "hang"
    if "MemoryError" in done.stderr or "Traceback" in done.stderr or not refused:
        return "served"
    return None


def one_line_refusal(done: subprocess.CompletedProcess | None, *words: str) -> bool:
    if done is None or done.returncode != 2 or done.stdout:
        return False
    lines = error_lines(done.stderr)
    return len(lines) == 1 and all(w in lines[0] for w in words)


def nothing_trusted(cache: Path) -> bool:
    found = audit(cache)
    kit.FIGURES.check(found)
    return found.trusted_prepared == 0 and found.corruptions == [] and not [
        p for p in found.leftovers if not p.name.endswith(".partial")]


def cifar_args(folder: Path, cache: Path) -> list[str]:
    return ["prepare", "cifar10", "--source", str(folder), "--no-verify", "--split", "train",
            "--cache-dir", str(cache), "--quiet"]


# ------------------------------------------------------------------ pickles

PICKLES = {
    "billion-laughs": (hostile.billion_laughs, "more objects than it has bytes"),
    "object-dtype-5e8": (hostile.object_array, "refused _reconstruct of shape (500000000,)"),
    "unbuilt-array": (hostile.unbuilt_array, "refused _reconstruct of shape (60, 3072)"),
    "huge-declared-shape": (hostile.huge_state, "but carries 16"),
    "ndarray-called": (hostile.ndarray_called, "refused to call ndarray"),
    "ndarray-newobj": (hostile.ndarray_newobj, "refused an opcode that instantiates"),
}


@pytest.mark.parametrize("attack", list(PICKLES))
def test_a_crafted_cifar_pickle_is_refused_fast_in_bounded_memory(attack, figures, tmp_path):
    build, says = PICKLES[attack]
    evil = build()
    assert len(evil) < 4096  # kilobytes asking for gigabytes, or for unbounded work
    fake = make_fake_cifar10(tmp_path / "files", replace={"data_batch_3": evil})
    cache = tmp_path / "cache"
    done = attacked(cifar_args(fake.folder, cache))
    refused = one_line_refusal(done, "data_batch_3", says)
    figures.attack("pickles", breach_of(done, refused and nothing_trusted(cache)))
    assert done is not None and refused, done and done.stderr
    assert nothing_trusted(cache)


# ------------------------------------------------------------------ archives


def _cifar_members(fake) -> dict[str, bytes]:
    return dict(fake.members)


def test_a_gnu_sparse_member_is_refused_before_it_expands(figures, tmp_path):
    fake = make_fake_cifar10(tmp_path / "good")
    entries = _cifar_members(fake)
    sparse = f"{CIFAR10_FOLDER}/data_batch_1"
    del entries[sparse]
    evil = hostile.tar_of([hostile.sparse_member(sparse, 8 << 30), *hostile.members(entries)])
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / fake.filename).write_bytes(evil)
    cache = tmp_path / "cache"
    done = attacked(cifar_args(folder, cache))
    refused = one_line_refusal(done, "data_batch_1 is a sparse member")
    figures.attack("archives", breach_of(done, refused and nothing_trusted(cache)))
    assert done is not None and refused, done and done.stderr


def test_a_member_declaring_more_than_the_cap_is_refused_before_it_is_read(figures, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(
        hostile.zero_bomb_member(f"{CIFAR10_FOLDER}/data_batch_1", 300 << 20))
    assert (folder / "cifar-10-python.tar.gz").stat().st_size < 2 << 20
    cache = tmp_path / "cache"
    done = attacked(cifar_args(folder, cache))
    refused = one_line_refusal(done, "data_batch_1 declares 314572800 bytes, more than")
    figures.attack("archives", breach_of(done, refused and nothing_trusted(cache)))
    assert done is not None and refused, done and done.stderr


def test_member_names_leading_out_of_the_archive_never_become_paths(figures, tmp_path):
    fake = make_fake_cifar10(tmp_path / "good")
    target = tmp_path / "escaped.txt"
    entries = {f"../../{target.name}": b"escaped", str(target): b"escaped",
               **_cifar_members(fake)}
    folder = tmp_path / "work" / "deep" / "files"
    folder.mkdir(parents=True)
    (folder / fake.filename).write_bytes(hostile.tar_of(hostile.members(entries)))
    cache = tmp_path / "work" / "deep" / "cache"
    done = attacked(cifar_args(folder, cache))
    escaped = [p for p in tmp_path.rglob("escaped.txt")] + list(
        Path(REPO).glob("escaped.txt"))
    figures.attack("archives", "escape" if escaped else breach_of(
        done, done is not None and done.returncode == 0))
    assert escaped == [] and done is not None and done.returncode == 0, done and done.stderr


def _imagenet_with(tmp_path: Path, name: str, data: bytes) -> Path:
    from imagenet_fixture import make_fake_imagenet

    fake = make_fake_imagenet(tmp_path / "imagenet")
    (fake.folder / name).write_bytes(data)
    return fake.folder


def imagenet_args(folder: Path, cache: Path, split: str) -> list[str]:
    return ["prepare", "imagenet", "--source", str(folder), "--no-verify", "--split", split,
            "--cache-dir", str(cache), "--quiet"]


def test_imagenet_val_members_leading_out_or_sparse_are_refused(figures, tmp_path):
    from imagenet_fixture import VAL

    for parts, says in (
            (hostile.members({"../ILSVRC2012_val_00000001.JPEG": b"x"}),
             "is not a relative path inside the archive"),
            ([hostile.sparse_member("ILSVRC2012_val_00000001.JPEG", 8 << 30)],
             "is a sparse member")):
        folder = _imagenet_with(tmp_path / says[:8].strip(), VAL,
                                hostile.tar_of(parts, compress=False))
        cache = folder.parent / "cache"
        done = attacked(imagenet_args(folder, cache, "val"))
        refused = one_line_refusal(done, VAL, says)
        figures.attack("archives", breach_of(done, refused and nothing_trusted(cache)))
        assert done is not None and refused, done and done.stderr


def test_a_devkit_declaring_a_huge_struct_array_is_refused_before_it_is_allocated(
        figures, tmp_path):
    import struct
    import tarfile

    from imagenet_fixture import DEVKIT, tar_bytes

    folder = _imagenet_with(tmp_path, "unused", b"")
    with tarfile.open(folder / DEVKIT) as tar:
        entries = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    patched = []
    for name, data in entries:
        if name.endswith("meta.mat"):
            data = bytearray(data)
            at = data.index(struct.pack("<II", 5, 8), 128)
            data[at + 8:at + 16] = struct.pack("<ii", 1 << 20, 1 << 20)  # 2**40 structs
        patched.append((name, bytes(data)))
    (folder / DEVKIT).write_bytes(tar_bytes(patched, gzip=True))
    cache = tmp_path / "cache"
    done = attacked(imagenet_args(folder, cache, "val"))
    refused = one_line_refusal(done, "meta.mat: a 1048576x1048576 array")
    figures.attack("archives", breach_of(done, refused and nothing_trusted(cache)))
    assert done is not None and refused, done and done.stderr


# ------------------------------------------------------------------ folders


def _image_folder(root: Path, per_class: int = 4) -> int:
    rng = np.random.default_rng(3)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / name / f"{i:03d}.png")
    return 2 * per_class


def _rows(cache: Path) -> int:
    manifests = list((cache / "prepared" / "image-folder").glob("*/*/manifest.json"))
    return sum(json.loads(m.read_text())["rows"] for m in manifests)


def folder_args(root: Path, cache: Path) -> list[str]:
    return ["--recipes", str(RECIPES), "prepare", "image-folder", "--source", str(root),
            "--cache-dir", str(cache), "--quiet"]


def test_a_fifo_named_like_an_image_is_never_opened(figures, tmp_path):
    root = tmp_path / "pets"
    images = _image_folder(root)
    os.mkfifo(root / "cat" / "blocking.jpg")
    cache = tmp_path / "cache"
    done = attacked(folder_args(root, cache), wall=60)
    ok = done is not None and done.returncode == 0 and _rows(cache) == images
    figures.attack("folders", breach_of(done, ok))
    assert ok, done and done.stderr
    assert "not regular files" in done.stderr


def test_link_loops_give_each_image_once_and_end(figures, tmp_path):
    root = tmp_path / "pets"
    images = _image_folder(root)
    (root / "cat" / "self").symlink_to(".")
    (root / "cat" / "up").symlink_to("..")
    (root / "dog" / "cats").symlink_to("../cat")
    (root / "dog" / "again.png").symlink_to("000.png")
    cache = tmp_path / "cache"
    done = attacked(folder_args(root, cache), wall=60)
    rows = _rows(cache) if done is not None else None
    figures.attack("folders", breach_of(done, done is not None and done.returncode == 0
                                        and rows == images))
    assert done is not None and done.returncode == 0, done and done.stderr
    assert rows == images


def test_links_leading_out_of_the_folder_are_not_followed(figures, tmp_path):
    root = tmp_path / "pets"
    images = _image_folder(root)
    outside = tmp_path / "private"
    _image_folder(outside)
    (root / "cat" / "private").symlink_to(outside / "cat")
    (root / "secrets").symlink_to(outside / "dog")  # a class folder outside
    (root / "dog" / "zero.png").symlink_to("/dev/zero")
    cache = tmp_path / "cache"
    done = attacked(folder_args(root, cache), wall=60)
    ok = done is not None and done.returncode == 0 and _rows(cache) == images
    figures.attack("folders", breach_of(done, ok) if ok or done is None else "escape")
    assert ok, done and done.stderr


# ------------------------------------------------------------------ mirrors

TRICKLE = {"DATAPIPE_MIN_RATE": "1000", "DATAPIPE_RATE_WINDOW": "2", "DATAPIPE_TIMEOUT": "5"}


def test_a_trickling_mirror_is_abandoned_for_the_next(world, figures, tmp_path):
    cache = tmp_path / "cache"
    with TortureMirror(world.files, piece=1, pause=2.0) as slow, \
            MirrorServer(world.files) as good:
        done = attacked(prepare_args(world, cache, "--split", "test", "--mirror", slow.url,
                                     "--mirror", good.url), env=cli_env(**TRICKLE), wall=60)
    ok = done is not None and done.returncode == 0
    figures.attack("mirrors", breach_of(done, ok))
    assert ok, done and done.stderr
    assert "too slow" in done.stderr
    assert data_hashes(cache, kit.RECIPE) == {"test": world.reference["test"]}


def test_all_mirrors_trickling_is_one_line_with_the_reason(world, figures, tmp_path):
    cache = tmp_path / "cache"
    with TortureMirror(world.files, piece=1, pause=2.0) as slow:
        done = attacked(prepare_args(world, cache, "--split", "test", "--mirror", slow.url),
                        env=cli_env(**TRICKLE), wall=60)
    refused = one_line_refusal(done, f"could not download {TEST[0]}", "too slow")
    figures.attack("mirrors", breach_of(done, refused))
    assert refused, done and done.stderr


def test_an_oversized_body_is_cut_at_the_declared_size_even_unverified(world, figures,
                                                                     tmp_path):
    cache = tmp_path / "cache"
    bloated = {name: data + b"\0" * (1 << 20) for name, data in world.files.items()}
    with MirrorServer(bloated) as big, MirrorServer(world.files) as good:
        done = attacked(prepare_args(world, cache, "--split", "test", "--no-verify",
                                     "--mirror", big.url, "--mirror", good.url))
    ok = (done is not None and done.returncode == 0
          and data_hashes(cache, kit.RECIPE) == {"test": world.reference["test"]})
    figures.attack("mirrors", breach_of(done, ok))
    assert ok, done and done.stderr
    assert "bytes the recipe declares" in done.stderr


def test_a_tampered_sidecar_is_not_trusted_nor_followed(world, figures, tmp_path):
    cache = tmp_path / "cache"
    with MirrorServer(world.files) as good:
        first = attacked(prepare_args(world, cache, "--split", "test", "--mirror", good.url))
        assert first is not None and first.returncode == 0, first and first.stderr
        for sidecar in (cache / "downloads").glob("*/*.json"):
            meta = json.loads(sidecar.read_text())
            meta.update(algorithm="../../../outside", checksum="../../x", filename="../y")
            sidecar.write_text(json.dumps(meta))
        shutil.rmtree(cache / "prepared")
        again = attacked(prepare_args(world, cache, "--split", "test", "--mirror", good.url))
        fetched = sum(good.requests.values())
    ok = again is not None and again.returncode == 0 and fetched == 2 * len(TEST)
    figures.attack("mirrors", breach_of(again, ok))
    assert ok, again and again.stderr
    assert data_hashes(cache, kit.RECIPE) == {"test": world.reference["test"]}
    assert not list(tmp_path.glob("outside*"))


# ------------------------------------------------------------------ Ctrl-C

SLOW_PREPARE = '''
import sys, time
from datapipe.stages import jpeg

def slow(self, *args, **kwargs):  # a shard that takes long: Ctrl-C lands mid-pool
    print("TORTURE-SHARD-STARTED", file=sys.stderr, flush=True)
    time.sleep(120)

jpeg.ImageNetClean.write_shard = slow
from datapipe.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.timeout(120)
def test_ctrl_c_ends_a_sharded_prepare_at_once_in_one_line_with_no_lock_held(figures,
                                                                           tmp_path):
    import filelock
    from imagenet_fixture import make_fake_imagenet

    fake = make_fake_imagenet(tmp_path / "imagenet")
    cache = tmp_path / "cache"
    argv = [sys.executable, "-c", SLOW_PREPARE, "prepare", "imagenet", "--source",
            str(fake.folder), "--no-verify", "--quiet", "--split", "train",
            "--cache-dir", str(cache)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the pool to be at work
            if proc.stderr.readline().startswith("TORTURE-SHARD-STARTED"):
                break
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=20)
        ended = True
    except subprocess.TimeoutExpired:
        ended = False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [ln for ln in err.splitlines()
             if ln.strip() and not ln.startswith("TORTURE-")] if ended else []
    figures.attack("folders", None if ended else "hang")
    assert ended, "Ctrl-C did not end the prepare"
    assert proc.returncode == 130 and lines == [
        "datapipe: interrupted; the cache holds no partial entry"], err
    assert nothing_trusted(cache)
    for lock in (cache / "locks").glob("*"):  # every lock free again
        if lock.suffix != ".holder":
            filelock.FileLock(str(lock)).acquire(timeout=0)


FORK_UNDER_CTRL_C = """
import os, sys, time
from datapipe import prepare_sharded

def slow_hook():  # an at-fork hook that runs long in each child (filelock has one)
    time.sleep(1.0)

os.register_at_fork(after_in_child=slow_hook)
try:
    pool = prepare_sharded._start_pool(2)
    print("FORKED", flush=True)
    time.sleep(10)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_the_prepare_pool_forks_reaches_no_worker(tmp_path):
    """Ctrl-C in the window between a worker's fork and its initializer (the at-fork
    hooks run there) reaches the parent alone: no worker prints a traceback."""
    proc = subprocess.Popen([sys.executable, "-c", FORK_UNDER_CTRL_C], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "FORKED"
        time.sleep(0.3)  # the children are inside their slow at-fork hook now
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and out.strip() == "INTERRUPTED", err
    assert err == ""  # no "Exception ignored in ...", no traceback from any worker
