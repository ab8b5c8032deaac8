"""ImageNet-style loading and preparing: datapipe's JPEG shards against torchvision ImageFolder.

    .venv/bin/python benchmarks/bench_imagenet.py                # 2,000 images, ~3 min, 2 cores
    .venv/bin/python benchmarks/bench_imagenet.py --quick        # 400 images, 2 rounds

One set of synthetic photo-like JPEGs (about 500 x 375, sizes varied, quality 90, 10
classes) is written twice: as an ImageNet train archive (a tar of per-class tars, with
a devkit) and as the extracted ``train/<wnid>/*.JPEG`` tree ImageFolder reads.

Training epochs (``torch.set_num_threads(1)``; workers 0 and 2, persistent on both
sides): decode, RandomResizedCrop to 224, horizontal flip, normalize to float32 on
the CPU, batches of 64. Every contestant gets one warm-up epoch and the same timed
epochs in interleaved rounds (benchmarks/harness.py); ratios are medians of paired
rounds.

    datapipe        ImageNetDataModule(image_size=224, normalize=True): uint8 batches
                    from the loader, normalized by ``dm.to_device(batch, "cpu")``
    torchvision     ImageFolder + Compose([RandomResizedCrop(224), RandomHorizontalFlip(),
                    ToTensor(), Normalize]) in a DataLoader(batch_size=64, shuffle=True)

Like for like, torchvision reads the full-size JPEG files and datapipe a cache that
keeps every image at full size (``max_short_side=None``), with and without draft
decode; the default cache (shorter side <= 256) is a row of its own, not a comparison.

Prepare throughput: ``prepare_split(train)`` from the archive, with one process and
with every core, in images per second; projected to ImageNet's 1,281,167 training
images on 16 cores assuming the per-core rate scales (plus the one-time md5 of the
138 GB archive at the measured hashing speed).

The table goes to results/imagenet.md (``--results PATH``; ``-`` for nowhere).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import harness  # noqa: E402
from harness import Contestant  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_TRAIN_BYTES = 147_897_477_120  # ILSVRC2012_img_train.tar


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Blobs of colour over a gradient, with coarse and fine texture: JPEG-like entropy."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32) + rng.uniform(60, 190, 3)
    image += (x / width)[..., None] * rng.uniform(-60, 60, 3) + (y / height)[..., None] * \
        rng.uniform(-60, 60, 3)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(20, 140)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(-90, 90, 3)
    for scale, amplitude in ((16, 30.0), (4, 20.0), (2, 24.0)):
        small = rng.normal(0, amplitude, (height // scale + 1, width // scale + 1, 3))
        channels = [np.asarray(Image.fromarray(small[..., c].astype(np.float32), mode="F")
                               .resize((width, height), Image.Resampling.BILINEAR))
                    for c in range(3)]
        image += np.stack(channels, axis=-1)
    image += rng.normal(0, 7, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def one_image(i: int) -> tuple[int, int, bytes]:
    """Image ``i`` of the set: (width, height, JPEG bytes), the same in any process."""
    from PIL import Image

    rng = np.random.default_rng([0, i])
    width = int(rng.integers(350, 501))
    height = int(rng.integers(280, 501)) if rng.random() < 0.3 else 375
    out = io.BytesIO()
    Image.fromarray(photo_like(rng, width, height)).save(out, "JPEG", quality=90)
    return width, height, out.getvalue()


def write_images(folder: Path, n: int, classes: int) -> dict:
    """The archives and the extracted tree of ``n`` images; returns facts about them."""
    import multiprocessing

    from imagenet_fixture import POPULATED, meta_mat, tar_bytes

    wnids = [w for w, _ in POPULATED] + [f"n0200{i:04d}" for i in range(classes)]
    wnids = sorted(wnids[:classes])
    tree = folder / "tree" / "train"
    per_class: dict[str, list[tuple[str, bytes]]] = {w: [] for w in wnids}
    pixels = total_bytes = 0
    with multiprocessing.get_context("fork").Pool() as pool:
        images = pool.map(one_image, range(n), chunksize=16)
    for i, (width, height, data) in enumerate(images):
        wnid = wnids[i % classes]
        name = f"{wnid}_{i:06d}.JPEG"
        per_class[wnid].append((name, data))
        pixels += width * height
        total_bytes += len(data)
        (tree / wnid).mkdir(parents=True, exist_ok=True)
        (tree / wnid / name).write_bytes(data)
    others = [(f"n{10000000 + 7919 * i:08d}", f"class {i}") for i in range(1000 - classes)]
    leaves = [(k + 1, w, w) for k, w in enumerate(wnids)] + [
        (classes + k + 1, w, words) for k, (w, words) in enumerate(others)]
    archives = folder / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    (archives / "ILSVRC2012_img_train.tar").write_bytes(
        tar_bytes([(f"{w}.tar", tar_bytes(items)) for w, items in per_class.items()]))
    (archives / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes([
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(leaves, [])),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n"),
    ], gzip=True))
    (archives / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes([]))
    return {"images": n, "mean_pixels": pixels / n, "mean_kb": total_bytes / n / 1024,
            "tree": tree, "archives": archives}


def bench_recipe(archives: Path, **clean):
    from imagenet_fixture import recipe_for

    return recipe_for(archives, **clean)


def time_prepare(recipe, archives: Path, cache_dir: Path, processes: int) -> tuple[float, int]:
    from datapipe.cache import Cache
    from datapipe.prepare import prepare_split
    from datapipe.stages.download import FetchOptions

    shutil.rmtree(cache_dir, ignore_errors=True)
    options = FetchOptions(source=str(archives), quiet=True)
    cache = Cache.at(cache_dir)
    from datapipe.stages.download import source_digest

    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        source_digest(archives / name, "md5", cache)  # hashing is timed on its own
    started = time.perf_counter()
    prepared, _ = prepare_split(recipe, "train", cache, options, processes=processes)
    return time.perf_counter() - started, prepared.rows


def datapipe_contestant(name: str, cache_dir: Path, archives: Path, recipe, batch_size: int,
                        workers: int, image_size: int = 224) -> Contestant:
    """ImageNetDataModule's train loader, each batch normalized by the transfer hooks."""
    from datapipe.datamodules.imagenet import ImageNetDataModule

    dm = ImageNetDataModule(cache_dir=cache_dir, source=archives, recipe=recipe,
                            image_size=image_size, normalize=True, batch_size=batch_size,
                            max_short_side=recipe.clean.max_short_side,  # the recipe's own
                            num_workers=workers, persistent_workers=workers > 0, val_split=0,
                            test_split=None)
    dm.setup("fit")
    return Contestant(name, harness.datapipe_epoch(dm), len(dm.datasets["train"]),
                      check=harness.batch_check((3, image_size, image_size)))


def torchvision_contestant(name: str, tree: Path, batch_size: int, workers: int,
                           mean, std) -> Contestant:
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(224),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    dataset = datasets.ImageFolder(str(tree), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    return Contestant(name, lambda: loader, len(dataset),
                      check=harness.batch_check((3, 224, 224)))


def device_decode_rate(cache_dir: Path, archives: Path, recipe, batch_size: int) -> float:
    """Images/s with the JPEGs decoded and cropped on the GPU (one CPU process gathers)."""
    import torch

    from datapipe.datamodules.imagenet import ImageNetDataModule

    dm = ImageNetDataModule(cache_dir=cache_dir, source=archives, recipe=recipe, image_size=224,
                            batch_size=batch_size, num_workers=0, val_split=0, test_split=None,
                            device_decode=True, pin_memory=True,
                            max_short_side=recipe.clean.max_short_side)
    dm.setup("fit")
    epoch = harness.datapipe_epoch(dm, "cuda")

    def synced():
        yield from epoch()
        torch.cuda.synchronize()

    c = Contestant("device decode", synced, len(dm.datasets["train"]))
    harness.run_rounds([c], 3, warmup=1)
    return c.rate


def md5_speed() -> float:
    """Bytes per second of hashlib's md5 on this machine (one core)."""
    block = os.urandom(64 << 20)
    started = time.perf_counter()
    for _ in range(4):
        hashlib.md5(block).hexdigest()
    return 4 * len(block) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=32,
                        help="classes, so shards (default 32: work for 16 prepare processes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")],
                        default=[0, 2], help="loader workers to compare (default 0,2)")
    parser.add_argument("--quick", action="store_true", help="400 images, 2 rounds")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--processes", type=int, default=None,
                        help="prepare processes for the all-cores run (default: every core)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "imagenet.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = min(args.images, 400), min(args.rounds, 2)

    import torch

    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = args.processes or cores
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-imagenet-"))
    started = time.perf_counter()
    facts = write_images(work, args.images, args.classes)
    print(f"wrote {args.images} images ({facts['mean_pixels'] / 1e3:.0f} kpixels, "
          f"{facts['mean_kb']:.0f} KB on average) in {time.perf_counter() - started:.0f}s",
          flush=True)
    archives, tree = facts["archives"], facts["tree"]

    default = bench_recipe(archives)
    full = bench_recipe(archives, max_short_side=None)
    prepare_one, rows = time_prepare(default, archives, work / "cache-default", 1)
    prepare_all, _ = time_prepare(default, archives, work / "cache-default", processes)
    time_prepare(full, archives, work / "cache-full", processes)
    all_cores = rows / prepare_all
    print(f"prepared {rows} images: {rows / prepare_one:.0f}/s on 1 process, "
          f"{rows / prepare_all:.0f}/s on {processes}", flush=True)

    import dataclasses

    no_draft = dataclasses.replace(full, transform=dataclasses.replace(full.transform,
                                                                        draft=False))
    from datapipe.datamodules.imagenet import RECIPE

    mean, std = RECIPE.info.mean, RECIPE.info.std
    load_before = harness.load_line()
    full_cache = work / "cache-full"
    contestants = []
    for w in args.workers:
        contestants += [
            torchvision_contestant(f"torchvision ImageFolder, full-size files (workers {w})",
                                   tree, args.batch_size, w, mean, std),
            datapipe_contestant(f"datapipe, full-size cache (workers {w})", full_cache,
                                archives, full, args.batch_size, w),
        ]
    contestants += [
        datapipe_contestant("datapipe, full-size cache, draft off (workers 0)", full_cache,
                            archives, no_draft, args.batch_size, 0),
        datapipe_contestant("datapipe, default cache: short side <= 256 (workers 0)",
                            work / "cache-default", archives, default, args.batch_size, 0),
    ]
    harness.run_rounds(contestants, args.rounds, warmup=1)
    tv0 = contestants[0]
    lines_table = harness.table(contestants, [tv0])

    gpu_line = ["", "`device_decode=True` (nvJPEG on a GPU): not measured (no device "
                    "lent)."]
    if torch.cuda.is_available():
        gpu = device_decode_rate(work / "cache-default", archives, default, 256)
        gpu_line = ["", f"With `device_decode=True` on {torch.cuda.get_device_name()} (nvJPEG "
                        f"batch decode, crops on the GPU, batches of 256, one CPU process "
                        f"gathering bytes): {gpu:.0f} images/s, normalized float32 on the GPU."]
        print(gpu_line[-1], flush=True)

    hash_rate = md5_speed()
    per_core = rows / prepare_one
    # On 16 cores: the measured all-core rate where this machine has 16, else per-core x 16.
    rate16 = all_cores if processes == 16 else per_core * 16
    projected = IMAGENET_TRAIN_IMAGES / rate16
    hashing = IMAGENET_TRAIN_BYTES / hash_rate
    lines = [
        "`.venv/bin/python benchmarks/bench_imagenet.py"
        + (" --quick" if args.quick else "") + "`",
        "",
        f"Machine: {harness.machine_line()}, Pillow {__import__('PIL').__version__}",
        "",
        f"Images: {args.images} synthetic photo-like JPEGs in {args.classes} classes, "
        f"{facts['mean_pixels'] / 1e3:.0f} kpixels and {facts['mean_kb']:.0f} KB on average "
        f"(quality 90, widths 350-500, heights 280-500).",
        "",
        f"Load before: `{load_before}`; after: `{harness.load_line()}`",
        "",
        "Training epochs, `torch.set_num_threads(1)`: decode, RandomResizedCrop(224), flip, "
        "normalize to float32 on the CPU (datapipe: uint8 from the loader, normalized by "
        "`on_after_batch_transfer`; torchvision: ToTensor + Normalize), batches of "
        f"{args.batch_size}; every contestant 1 warm-up epoch and {args.rounds} timed epochs "
        "in interleaved rounds, ratios medians of paired rounds. Like for like: torchvision "
        "reads the full-size JPEG files, datapipe a cache that keeps them at full size; the "
        "default cache (shorter side <= 256) row decodes smaller files and is shown for what "
        "the default gives, not as a comparison. Workers persist across epochs on both sides.",
        "",
        lines_table,
        *gpu_line,
        "",
        "Prepare (train archive -> shards, default settings: shorter side <= 256, quality 90):",
        "",
        "| processes | images/s | seconds |",
        "|---:|---:|---:|",
        f"| 1 | {rows / prepare_one:.0f} | {prepare_one:.1f} |",
        f"| {processes} | {rows / prepare_all:.0f} | {prepare_all:.1f} |",
        "",
        f"Projected for ImageNet's {IMAGENET_TRAIN_IMAGES:,} training images on 16 cores at "
        f"{rate16:.0f} images/s ("
        + ("measured on 16 processes" if processes == 16 else "the 1-process rate x 16")
        + f"): {projected / 60:.0f} min, plus the one-time md5 "
        f"of the 138 GiB archive at {hash_rate / 2**20:.0f} MiB/s: {hashing / 60:.0f} min "
        f"(memoized afterwards; disk reads permitting).",
    ]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.results != "-":
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(table)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
