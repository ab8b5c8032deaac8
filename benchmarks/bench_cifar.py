"""CIFAR-10 training epochs with crop + flip + normalize on CPU: datapipe vs hand-written
whole-batch loops vs torchvision.

    .venv/bin/python benchmarks/bench_cifar.py [--quick] [--workdir DIR]

Every contestant serves the same work: one shuffled epoch of the same 50,000 seeded
random 32 x 32 RGB images (a format-exact cifar-10-python.tar.gz and its unpacked
members, held in RAM by every contestant), in batches of 256, each image randomly
cropped from its 4-pixel zero-padded copy and flipped left-right with probability
1/2, ending as normalized float32 (N x 3 x 32 x 32, CIFAR-10's mean/std) with int64
labels on the CPU.

* ceiling: float32 resident, no augmentation: the images normalized up front, per
  batch one ``index_select`` (less work than the others: the floor of any loader);
* airbench-style (one gather): the whole split zero-padded once as a resident uint8
  tensor, per batch one advanced-index gather of every image's crop at its own
  offsets, a ``torch.where`` flip, then the fused convert + normalize;
* airbench-style (masked shifts): the same padded tensor, ``index_select``, then
  airbench94's ``batch_crop`` (one masked copy per row shift, then per column shift)
  and ``batch_flip_lr`` (``torch.where``), then the fused convert + normalize;
* datapipe: ``CIFAR10DataModule(..., normalize=True).train_dataloader()``, each batch
  through ``dm.to_device(batch, "cpu")``, with 0 and 2 workers and ``resident=True``;
* torchvision: ``datasets.CIFAR10`` + ``Compose([RandomCrop(32, padding=4),
  RandomHorizontalFlip(), ToTensor(), Normalize])`` + ``DataLoader``.

Timing (benchmarks/harness.py): the same warm-up epoch for all, then interleaved
rounds, ratios as medians of paired rounds. Not timed: writing the files,
``datapipe prepare cifar10`` (its own process), padding the resident tensors,
torchvision's dataset construction. The report also goes to benchmarks/results/cifar.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import harness  # noqa: E402
from harness import Contestant  # noqa: E402

from datapipe.datamodules.cifar import CIFAR10_CLASSES, CIFAR10_FOLDER  # noqa: E402
from datapipe.formats.cifar import encode_batch, encode_pickle  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
BATCH = 256
PER_BATCH = 10_000
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)]
PAD = 4
GOAL_VS_AIRBENCH = 2.0
GOAL_VS_CEILING = 0.35


# ---------------------------------------------------------------------- data


def make_files(workdir: Path, seed: int, per_batch: int = PER_BATCH
               ) -> tuple[Path, Path, dict[str, str]]:
    """Write the tarball (for datapipe) and its members unpacked (for torchvision, at
    <root>/cifar-10-batches-py/); reuse them when the workdir holds files made with the
    same seed. Returns (tarball folder, torchvision root, member name -> md5)."""
    source = workdir / "cifar-source"
    tv_root = workdir / "torchvision"
    stamp = workdir / "cifar-files.json"
    want = {"seed": seed, "per_batch": per_batch}
    if stamp.is_file() and (source / ARCHIVE).is_file():
        record = json.loads(stamp.read_text())
        if record.get("want") == want:
            return source, tv_root, record["md5"]
    rng = np.random.default_rng(seed)
    members = {}
    for i, name in enumerate([*TRAIN_MEMBERS, "test_batch"]):
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        title = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        members[name] = encode_batch(images, {"labels": labels}, title)
    members["batches.meta"] = encode_pickle({
        b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
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


# ---------------------------------------------------------------------- contestants


def train_arrays(tv_root: Path) -> tuple:
    """The training images (N x 3 x 32 x 32 uint8) and labels, read from the members."""
    import pickle

    import torch

    images, labels = [], []
    for name in TRAIN_MEMBERS:
        with open(tv_root / CIFAR10_FOLDER / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # our own synthetic files
        images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"], np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def affine(device="cpu"):
    import torch

    scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD, strict=True)], device=device)
    shift = shift.view(1, 3, 1, 1)
    return scale, shift


def batch_crop(images, crop_size: int):
    """airbench94's batch_crop (its r > 2 branch): masked copies per row, then column shift."""
    import torch

    r = (images.size(-1) - crop_size) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2), device=images.device)
    out = torch.empty((len(images), images.size(1), crop_size, crop_size),
                      device=images.device, dtype=images.dtype)
    tmp = torch.empty((len(images), images.size(1), crop_size, crop_size + 2 * r),
                      device=images.device, dtype=images.dtype)
    for s in range(-r, r + 1):
        mask = shifts[:, 0] == s
        tmp[mask] = images[mask, :, r + s:r + s + crop_size, :]
    for s in range(-r, r + 1):
        mask = shifts[:, 1] == s
        out[mask] = tmp[mask, :, :, r + s:r + s + crop_size]
    return out


def batch_flip_lr(images):
    """airbench94's batch_flip_lr."""
    import torch

    flip = (torch.rand(len(images), device=images.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def hand_written(images, labels, batch: int) -> list[Contestant]:
    """The float32 ceiling and two airbench-style whole-batch loops over resident tensors."""
    import torch
    import torch.nn.functional as F

    n = len(images)
    scale, shift = affine()
    floats = images.to(torch.float32).mul_(scale).sub_(shift)
    padded = F.pad(images, (PAD,) * 4)  # N x 3 x 40 x 40 uint8, made once
    channel = torch.arange(3).view(1, 3, 1, 1)
    steps = torch.arange(32)

    def ceiling():
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            yield floats.index_select(0, idx), labels.index_select(0, idx)

    def one_gather():
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            k = len(idx)
            top = torch.randint(0, 2 * PAD + 1, (k,))
            left = torch.randint(0, 2 * PAD + 1, (k,))
            ys = (top[:, None] + steps).view(k, 1, 32, 1)
            xs = (left[:, None] + steps).view(k, 1, 1, 32)
            x = padded[idx.view(k, 1, 1, 1), channel, ys, xs]
            x = batch_flip_lr(x)
            yield x.to(torch.float32).mul_(scale).sub_(shift), labels.index_select(0, idx)

    def masked_shifts():
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            x = batch_flip_lr(batch_crop(padded.index_select(0, idx), 32))
            yield x.to(torch.float32).mul_(scale).sub_(shift), labels.index_select(0, idx)

    check = harness.batch_check((3, 32, 32))
    return [
        Contestant("ceiling: float32 resident, no augmentation", ceiling, n, check=check),
        Contestant("airbench-style (one gather)", one_gather, n, check=check),
        Contestant("airbench-style (masked shifts)", masked_shifts, n, check=check),
    ]


def datapipe_contestants(source: Path, cache_dir: Path, batch: int, reference: tuple,
                         workers: tuple[int, ...] = (0, 2)) -> list[Contestant]:
    import torch

    from datapipe.datamodules.cifar import CIFAR10DataModule
    from datapipe.loader import Batch

    images, labels = reference
    scale, shift = affine()
    out = []
    configs = [(f"datapipe (workers {w})", {"num_workers": w}) for w in workers]
    configs.append(("datapipe (resident=True)", {"resident": True}))
    for name, kwargs in configs:
        # augment=True: the crop + flip the hand-written loops do (bolts' default is off)
        dm = harness.datamodule(CIFAR10DataModule, source, cache_dir, batch_size=batch,
                                augment=True, **kwargs)
        if not dm.transform.train:
            raise AssertionError(f"{name}: the train split is not augmented")
        # Correctness, untimed: the first batch is the crop + flip of the rows the
        # sampler names, drawn from that batch's generator, then normalized.
        loader = dm.train_dataloader()
        x, y = dm.to_device(next(iter(loader)), "cpu")
        rows = torch.from_numpy(loader.batch_sampler.order(0)[:batch])
        crops = dm.transform.augment(images[rows], Batch(rows, dm.seed, 0, 0).generator())
        want = crops.to(torch.float32).mul_(scale).sub_(shift)
        if not (float((x - want).abs().max()) < 1e-4 and bool((y == labels[rows]).all())):
            raise AssertionError(f"{name}: the first batch is not the crop + flip of its rows")
        out.append(Contestant(name, harness.datapipe_epoch(dm), len(images),
                              check=harness.batch_check((3, 32, 32))))
    return out


def torchvision_contestants(tv_root: Path, md5: dict[str, str], batch: int,
                            workers: tuple[int, ...]) -> list[Contestant]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    class SyntheticCIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR10, checking our synthetic files' md5s instead of CIFAR's."""

        train_list = [[name, md5[name]] for name in TRAIN_MEMBERS]
        test_list = [["test_batch", md5["test_batch"]]]
        meta = {**datasets.CIFAR10.meta, "md5": md5["batches.meta"]}

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=PAD),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    dataset = SyntheticCIFAR10(str(tv_root), train=True, transform=transform, download=False)
    out = []
    for w in workers:
        def epoch(w=w):
            return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w)
        out.append(Contestant(f"torchvision (workers {w})", epoch, len(dataset),
                              check=harness.batch_check((3, 32, 32))))
    return out


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, torchvision with 0 workers only")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--per-member", type=int, default=PER_BATCH,
                        help="images per archive member (5 training members)")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--no-torchvision", action="store_true", help="leave torchvision out")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the files and datapipe's cache go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every contestant (default: torch's)")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "cifar.md",
                        help="markdown file the report is written to ('-' for none)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        source, tv_root, md5 = make_files(workdir, args.seed, args.per_member)
        import torch  # (imported before any timing)

        if args.threads:
            torch.set_num_threads(args.threads)

        machine, load_before = harness.machine_line(), harness.load_line()
        print(f"{machine}\nbefore: {load_before}", flush=True)
        prepare_s = harness.prepare_cli("cifar10", source, workdir / "datapipe-cache", REPO)
        reference = train_arrays(tv_root)
        contestants = [*hand_written(*reference, args.batch_size),
                       *datapipe_contestants(source, workdir / "datapipe-cache",
                                             args.batch_size, reference)]
        if not args.no_torchvision:
            contestants += torchvision_contestants(tv_root, md5, args.batch_size,
                                                   (0,) if args.quick else (0, 2))
        harness.run_rounds(contestants, rounds, warmup=1)
    by_name = {c.name: c for c in contestants}
    dp0 = by_name["datapipe (workers 0)"]
    ceiling = by_name["ceiling: float32 resident, no augmentation"]
    airbench = [by_name["airbench-style (one gather)"], by_name["airbench-style (masked shifts)"]]
    fastest_airbench = min(airbench, key=lambda c: c.median)
    references = [ceiling, fastest_airbench]
    checks = [
        harness.target(f"datapipe (workers 0) vs {fastest_airbench.name} (the faster one)",
                       harness.paired_ratio(dp0, fastest_airbench), GOAL_VS_AIRBENCH,
                       harness.paired_ratio(dp0, fastest_airbench, cpu=True)),
        harness.target("datapipe (workers 0) vs the float32 ceiling",
                       harness.paired_ratio(dp0, ceiling), GOAL_VS_CEILING,
                       harness.paired_ratio(dp0, ceiling, cpu=True)),
        harness.target("datapipe (workers 2) vs datapipe (workers 0)",
                       harness.paired_ratio(by_name["datapipe (workers 2)"], dp0), 1.0),
    ]
    if "torchvision (workers 0)" in by_name:
        references.append(by_name["torchvision (workers 0)"])
    command = "benchmarks/bench_cifar.py" + (" --quick" if args.quick else "")
    harness.report(
        f"CIFAR-10 epochs with crop + flip + normalize on CPU ({len(reference[1]):,} images, "
        f"batch {args.batch_size})", command, contestants, references, machine=machine,
        load_before=load_before, rounds=rounds, warmup=1, checks=checks,
        notes=[f"- not timed: `datapipe prepare cifar10` in its own process ({prepare_s:.2f} s)"],
        results=None if str(args.results) == "-" else args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
