"""One CIFAR-10 training epoch with crop + flip + normalize: datapipe vs torchvision, on CPU.

    .venv/bin/python benchmarks/bench_cifar.py [--quick] [--workdir DIR]

Both contestants read the same files: a synthetic but format-exact
cifar-10-python.tar.gz (5 x 10,000 + 10,000 seeded random 32x32 RGB images and
labels, pickled as the official batches are), written into the workdir, and
torchvision's copy of its members unpacked next to it. Per batch of 256, each
yields normalized float32 images (N x 3 x 32 x 32, CIFAR-10's mean/std) after a
random crop with 4-pixel zero padding and a random horizontal flip, plus int64
labels, on the CPU:

* datapipe: CIFAR10DataModule(..., normalize=True).train_dataloader() (crop and flip
  as whole-batch ops in the loader), each batch through dm.to_device(batch, "cpu")
  (normalization happens in on_after_batch_transfer);
* torchvision: datasets.CIFAR10 + Compose([RandomCrop(32, padding=4),
  RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)]) + DataLoader.

datapipe: a warm-up epoch (reported as "first epoch"), then the best of 5 timed
epochs (1 with --quick). torchvision: a 20-batch warm-up, then 1 timed epoch
(--torchvision-epochs N for more). Workers 0 and 2 for both. Not timed: writing the
files, `datapipe prepare cifar10` (in its own process) and torchvision's dataset
construction. The table also goes to benchmarks/results/cifar.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_mnist_loading import (  # noqa: E402
    Result,
    load_line,
    machine_line,
    time_datamodule,
)
from bench_mnist_loading import run_contestant as run_mnist_contestant  # noqa: E402

from datapipe.datamodules.cifar import CIFAR10_CLASSES, CIFAR10_FOLDER  # noqa: E402
from datapipe.formats.cifar import encode_batch, encode_pickle  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
BATCH = 256
PER_BATCH = 10_000
N_TRAIN = 5 * PER_BATCH
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)]
TARGET_VS_TORCHVISION = 30.0


# ---------------------------------------------------------------------- data


def make_files(workdir: Path, seed: int) -> tuple[Path, Path, dict[str, str]]:
    """Write the tarball (for datapipe) and its members unpacked (for torchvision, at
    <root>/cifar-10-batches-py/); reuse them when the workdir holds files made with the
    same seed. Returns (tarball folder, torchvision root, member name -> md5)."""
    source = workdir / "cifar-source"
    tv_root = workdir / "torchvision"
    stamp = workdir / "cifar-files.json"
    want = {"seed": seed, "per_batch": PER_BATCH}
    if stamp.is_file() and (source / ARCHIVE).is_file():
        record = json.loads(stamp.read_text())
        if record.get("want") == want:
            return source, tv_root, record["md5"]
    rng = np.random.default_rng(seed)
    members = {}
    for i, name in enumerate([*TRAIN_MEMBERS, "test_batch"]):
        images = rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, PER_BATCH)
        title = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        members[name] = encode_batch(images, {"labels": labels}, title)
    members["batches.meta"] = encode_pickle({
        b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source.mkdir(parents=True, exist_ok=True)
    (source / ARCHIVE).write_bytes(gzip.compress(raw.getvalue(), compresslevel=1, mtime=0))
    unpacked = tv_root / CIFAR10_FOLDER
    unpacked.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (unpacked / name).write_bytes(data)
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in members.items()}
    stamp.write_text(json.dumps({"want": want, "md5": md5}))
    return source, tv_root, md5


# ---------------------------------------------------------------------- timing


def run_contestant(name: str, workers: int, epoch: Callable[[], Iterable], repeats: int, *,
                   setup: float, full_warmup: bool = True) -> Result:
    """The MNIST benchmark's timing, for CIFAR-10's epochs of 32 x 32 color images."""
    return run_mnist_contestant(name, workers, epoch, repeats, setup=setup,
                                full_warmup=full_warmup, samples=N_TRAIN, shape=(3, 32, 32))


# ---------------------------------------------------------------------- contestants


def prepare_datapipe(source: Path, cache_dir: Path) -> float:
    """`datapipe prepare cifar10 --force` in its own process, as a user prepares data once
    (--force: the tarball is read again even when the workdir's cache holds the entry)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "datapipe", "prepare", "cifar10", "--cache-dir", str(cache_dir),
         "--source", str(source), "--no-verify", "--quiet", "--force"],
        cwd=REPO, capture_output=True, text=True,
    )
    if done.returncode != 0:  # its warnings (random files are not CIFAR's md5) only then
        sys.exit(f"datapipe prepare failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - t0


def datapipe_contestant(source: Path, cache_dir: Path, workers: int, repeats: int) -> Result:
    import torch

    from datapipe.datamodules.cifar import CIFAR10DataModule
    from datapipe.loader import Batch

    dm, result = time_datamodule(CIFAR10DataModule, source, cache_dir, workers, repeats,
                                 samples=N_TRAIN, shape=(3, 32, 32))

    # Correctness, untimed: the first batch is the crop + flip of the rows the sampler
    # names, drawn from that batch's generator, then normalized.
    loader = dm.train_dataloader()  # a new loader starts at epoch 0
    x, y = dm.to_device(next(iter(loader)), "cpu")
    positions = loader.batch_sampler.order(0)[:BATCH]
    rows = dm.datasets["train"].rows[positions]
    columns = dm.recipe.load(dm.prepared["train"].data_file)
    raw = torch.from_numpy(columns["image"][rows])
    crops = dm.transform.augment(raw, Batch(positions.tolist(), dm.seed, 0, 0).generator())
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    want = (crops.float() / 255 - mean) / std
    labels = torch.from_numpy(columns["label"][rows])
    if not (float((x - want).abs().max()) < 1e-4 and bool((y == labels).all())):
        raise AssertionError("datapipe's first batch is not the crop + flip of its rows")
    return result


def torchvision_contestant(tv_root: Path, md5: dict[str, str], workers: int,
                           repeats: int) -> Result:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    class SyntheticCIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR10, checking our synthetic files' md5s instead of CIFAR's."""

        train_list = [[name, md5[name]] for name in TRAIN_MEMBERS]
        test_list = [["test_batch", md5["test_batch"]]]
        meta = {**datasets.CIFAR10.meta, "md5": md5["batches.meta"]}

    t0 = time.perf_counter()
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    dataset = SyntheticCIFAR10(str(tv_root), train=True, transform=transform, download=False)
    setup = time.perf_counter() - t0

    def epoch():
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)

    torch.manual_seed(0)
    return run_contestant("torchvision", workers, epoch, repeats, setup=setup,
                          full_warmup=False)


# ---------------------------------------------------------------------- report


def table(results: list[Result], tv0: Result) -> str:
    rows = [
        "| contestant | workers | samples/s | vs torchvision (workers 0) | best epoch (s) "
        "| first epoch (s) | timed epochs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = f"{r.first:.3f}" if r.first == r.first else "-"
        rows.append(f"| {r.name} | {r.workers} | {r.rate:,.0f} | {r.rate / tv0.rate:.1f}x "
                    f"| {r.best:.3f} | {first} | {len(r.epochs)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed epoch per contestant")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the files and datapipe's cache go (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed epochs for datapipe, best kept (default 5, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--torchvision-epochs", type=int, default=1,
                        help="timed epochs for torchvision (default 1: it is slow)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's); "
                             "1 keeps a busy machine from stalling whole-batch ops")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "cifar.md",
                        help="markdown file the table is written to ('-' for none)")
    args = parser.parse_args(argv)
    repeats = max(1, args.repeats) if args.repeats else (1 if args.quick else 5)
    tv_repeats = max(1, args.torchvision_epochs)

    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        source, tv_root, md5 = make_files(workdir, args.seed)
        print(f"CIFAR-10-format files in {workdir} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        import torch  # (imported here so its start-up is not in any row)
        import torchvision  # noqa: F401

        if args.threads:
            torch.set_num_threads(args.threads)
        machine = machine_line()
        print(machine, flush=True)
        load_before = load_line()
        print(f"before: {load_before}", flush=True)
        cache_dir = workdir / "datapipe-cache"
        prepare_s = prepare_datapipe(source, cache_dir)
        print(f"  datapipe prepare (CLI, own process): {prepare_s:.2f} s", flush=True)
        results = []
        # workers=2 first, so that its fresh workers inherit nothing a workers=0 run
        # in this process imported or mapped (as in bench_mnist_loading.py).
        for workers in (2, 0):
            results.append(datapipe_contestant(source, cache_dir, workers, repeats))
        for workers in (0, 2):
            results.append(torchvision_contestant(tv_root, md5, workers, tv_repeats))

    load_after = load_line()
    results.sort(key=lambda r: (r.name != "datapipe", r.workers))
    tv0 = next(r for r in results if r.name == "torchvision" and r.workers == 0)
    dp0 = next(r for r in results if r.name == "datapipe" and r.workers == 0)
    best_dp = max((r for r in results if r.name == "datapipe"), key=lambda r: r.rate)
    best_tv = max((r for r in results if r.name == "torchvision"), key=lambda r: r.rate)
    text = table(results, tv0)
    ratio = dp0.rate / tv0.rate
    checks = [
        f"datapipe (workers 0) vs torchvision (workers 0): {ratio:.1f}x "
        f"(target >= {TARGET_VS_TORCHVISION:g}x): "
        f"{'PASS' if ratio >= TARGET_VS_TORCHVISION else 'FAIL'}",
        f"best datapipe (workers {best_dp.workers}) vs best torchvision "
        f"(workers {best_tv.workers}): {best_dp.rate / best_tv.rate:.1f}x",
    ]
    method = (
        f"One epoch = {N_TRAIN:,} samples in batches of {BATCH}: RandomCrop(32, padding=4) + "
        f"RandomHorizontalFlip + normalize (mean {MEAN}, std {STD}) to float32 "
        f"N x 3 x 32 x 32, int64 labels, on CPU. datapipe: a warm-up epoch (\"first "
        f"epoch\"), then the best of {repeats} timed epoch{'s' if repeats > 1 else ''}; "
        f"torchvision: a 20-batch warm-up, then {tv_repeats} timed "
        f"epoch{'s' if tv_repeats > 1 else ''}. With workers, every epoch starts its workers "
        f"anew (persistent_workers=False) for both. Not timed: writing the files, data "
        f"preparation (`datapipe prepare cifar10` in its own process, reading the tarball: "
        f"{prepare_s:.2f} s; then prepare_data() + setup() on the cache hit: "
        f"{dp0.setup:.2f} s) and torchvision's dataset construction ({tv0.setup:.2f} s)."
    )
    print()
    print(text)
    print()
    for line in checks:
        print(line)
    print(f"\nmachine: {machine}\nbefore the run: {load_before}; after: {load_after}\n{method}")

    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            "# CIFAR-10: one training epoch with crop + flip + normalize, on CPU\n\n"
            "`.venv/bin/python benchmarks/bench_cifar.py"
            + (" --quick" if args.quick else "")
            + (f" --threads {args.threads}" if args.threads else "") + "`\n\n"
            f"Machine: {machine}\n\nLoad: before the run {load_before}; after {load_after}.\n\n"
            f"{text}\n\n" + "\n".join(f"- {c}" for c in checks) + f"\n\n{method}\n"
        )
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
