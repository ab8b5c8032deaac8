"""What the integrity check costs: a first epoch with and without checking chunk digests.

    .venv/bin/python benchmarks/bench_integrity.py            # about 2 min on 2 cores
    .venv/bin/python benchmarks/bench_integrity.py --quick    # 3 rounds, 300 JPEGs

A prepared split's data files carry per-chunk digests in the manifest; each process
checks a chunk the first time it touches it (``datapipe.integrity``). This measures
what that adds to a *first* epoch, where all of it is paid (later epochs of the same
process pay nothing):

    in-memory    60,000 MNIST-sized rows (28 x 28 uint8, random), prepared by
                 ``prepare_split``; a fresh dataset per epoch (so the file is mapped,
                 and checked, anew), batches of 256 through the split's loader,
                 normalized to float32 as ``on_after_batch_transfer`` does
    jpeg shards  ImageNet-style: synthetic photo-like JPEGs (about 500 x 375, quality
                 90) prepared into shards (shorter side <= 256); a fresh dataset per
                 epoch, RandomResizedCrop(224) + flip decoded in the process, batches
                 of 64

"with" is the dataset the load stage builds (bound to the manifest's promise); "without"
is the same dataset given the bare paths. The two run interleaved (with, without,
without, with, ...) on warm page cache, so both read memory, not disk; the table gives
the median first epoch of each and their ratio, and the hash speeds measured on the
machine. Results go to results/integrity.md (``--results PATH``; ``-`` for nowhere).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def machine_line() -> str:
    """The suite's machine line, with the load this run started under."""
    from harness import machine_line as suite_machine_line

    return f"{suite_machine_line()}, load average {os.getloadavg()[0]:.2f}"


def hash_speeds() -> dict[str, float]:
    """GB/s of each candidate hash over 64 MiB in 1 MiB blocks, best of 3."""
    import xxhash

    data = memoryview(os.urandom(64 << 20))
    candidates = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
        "xxh3_64": xxhash.xxh3_64_digest,
    }
    try:
        import blake3

        candidates["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        pass
    speeds = {}
    for name, fn in candidates.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for i in range(0, len(data), 1 << 20):
                fn(data[i:i + (1 << 20)])
            best = min(best, time.perf_counter() - started)
        speeds[name] = len(data) / best / 1e9
    return speeds


# ------------------------------------------------------------------ in-memory (MNIST-sized)


def prepare_mnist_sized(workdir: Path):
    from datapipe.cache import Cache
    from datapipe.datamodules.mnist import RECIPE
    from datapipe.formats.idx import encode_idx
    from datapipe.prepare import prepare_split
    from datapipe.stages.download import FetchOptions

    source = workdir / "mnist"
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (60_000, 28, 28), np.uint8),
             "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 60_000).astype(np.uint8)}
    for name, array in files.items():
        (source / name).write_bytes(gzip.compress(encode_idx(array), compresslevel=1))
    prepared, _ = prepare_split(RECIPE, "train", Cache(workdir / "cache"),
                                FetchOptions(source=str(source), verify=False, quiet=True))
    return RECIPE, prepared


def mnist_epoch(recipe, prepared, checked: bool) -> float:
    from datapipe.loader import ArrayDataset
    from datapipe.stages.load import ArrowLoad

    transform = recipe.transform
    parts = [("train", np.arange(prepared.rows))]
    started = time.perf_counter()
    if checked:
        dataset = recipe.load.dataset({"train": prepared}, parts, train=True,
                                      transform=transform)
    else:
        augment = transform.augment if transform.train else None
        dataset = ArrayDataset({"train": prepared.data_file}, parts, ArrowLoad(),
                               augment=augment)
    loader = recipe.wrap.build(dataset, train=True, seed=0)
    for images, _labels in loader:
        images.float().mul_(1 / (255 * 0.3081)).sub_(0.1307 / 0.3081)
    return time.perf_counter() - started


# ------------------------------------------------------------------ JPEG shards (ImageNet-style)


def prepare_jpeg_shards(workdir: Path, images: int):
    from bench_imagenet import write_images
    from imagenet_fixture import recipe_for

    from datapipe.cache import Cache
    from datapipe.prepare import prepare_split
    from datapipe.stages.download import FetchOptions

    facts = write_images(workdir / "jpeg", images, classes=10)
    recipe = recipe_for(facts["archives"])
    prepared, _ = prepare_split(recipe, "train", Cache(workdir / "cache"),
                                FetchOptions(source=str(facts["archives"]), verify=False,
                                             quiet=True))
    return recipe, prepared


def jpeg_epoch(recipe, prepared, checked: bool) -> float:
    import dataclasses

    from datapipe.decode import JpegDataset
    from datapipe.formats.jpeg_shards import shard_paths
    from datapipe.stages.jpeg import JpegTransform

    transform = JpegTransform(image_size=224)
    parts = [("train", np.arange(prepared.rows))]
    started = time.perf_counter()
    if checked:
        dataset = recipe.load.dataset({"train": prepared}, parts, train=True,
                                      transform=transform)
    else:
        dataset = JpegDataset({"train": shard_paths(prepared)}, parts, transform, train=True)
    wrap = dataclasses.replace(recipe.wrap, batch_size=64, num_workers=0)
    for _batch in wrap.build(dataset, train=True, seed=0):
        pass
    return time.perf_counter() - started


# ------------------------------------------------------------------ the run


def interleaved(epoch, rounds: int) -> tuple[list[float], list[float]]:
    """First epochs with and without the check, in the order with, without, without, with..."""
    on, off = [], []
    epoch(True)
    epoch(False)  # warm the page cache and the imports for both
    for r in range(rounds):
        for checked in ((True, False) if r % 2 == 0 else (False, True)):
            (on if checked else off).append(epoch(checked))
    return on, off


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 300 JPEGs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--images", type=int, default=None, help="JPEGs (default 1,000)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/integrity.md"))
    parser.add_argument("--workdir", default=None,
                        help="where the synthetic data goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    images = args.images or (300 if args.quick else 1000)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the synthetic files are used unverified, on purpose

    speeds = hash_speeds()
    rows = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        recipe, prepared = prepare_mnist_sized(workdir)
        on, off = interleaved(lambda c: mnist_epoch(recipe, prepared, c), rounds)
        rows.append(("in-memory, 60,000 x 28 x 28 uint8", prepared.data_file.stat().st_size,
                     on, off))
        recipe, prepared = prepare_jpeg_shards(workdir, images)
        on, off = interleaved(lambda c: jpeg_epoch(recipe, prepared, c), rounds)
        size = sum(p.stat().st_size for p in prepared.data_files)
        rows.append((f"JPEG shards, {prepared.rows} images, decode + crop 224", size, on, off))

    lines = [
        "# Integrity check: cost in a first epoch",
        "",
        f"Machine: {machine_line()}",
        "",
        "Hash speeds (1 MiB blocks, one core): " + ", ".join(
            f"{name} {gbs:.2f} GB/s" for name, gbs in speeds.items()),
        "",
        "| first epoch | data | with check (median) | without (median) | ratio | one xxh3 pass "
        "over the data |",
        "|---|---|---|---|---|---|",
    ]
    for what, size, on, off in rows:
        ratio = statistics.median(on) / statistics.median(off)
        one_pass = size / (speeds["xxh3_64"] * 1e9)
        lines.append(f"| {what} | {size / 1e6:.1f} MB | {statistics.median(on) * 1e3:.1f} ms | "
                     f"{statistics.median(off) * 1e3:.1f} ms | {ratio:.3f}x | "
                     f"{one_pass * 1e3:.1f} ms ({one_pass / statistics.median(off):.1%}) |")
    lines += ["", f"{rounds} interleaved rounds each, after one warm-up epoch of each; "
              f"`benchmarks/bench_integrity.py{' --quick' if args.quick else ''}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results != "-":
        Path(args.results).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
