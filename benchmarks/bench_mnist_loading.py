"""MNIST epochs on CPU: datapipe vs the honest in-memory limits vs torchvision.

    .venv/bin/python benchmarks/bench_mnist_loading.py [--quick] [--workdir DIR]

Every contestant serves the same work: one shuffled epoch of the same 60,000 seeded
random 28 x 28 uint8 images (written as MNIST's gzipped IDX files, and held in RAM
by every contestant: a resident tensor, torchvision's in-memory dataset, or
datapipe's memory map of its prepared file in the page cache), in batches of 256,
each ending as normalized float32 images (N x 1 x 28 x 28, mean 0.1307 / std 0.3081)
and int64 labels on the CPU.

* limit (uint8 resident): the uint8 tensor, ``randperm``, per batch ``index_select``
  then the fused convert + normalize ``x.to(float32).mul_(1 / (255 std)).sub_(mean / std)``
  (on this CPU that is faster than any single-op form: addcmul, a lookup table);
* ceiling (float32 resident): the images normalized up front, per batch one
  ``index_select``: no loader can beat it without changing the work;
* datapipe: ``MNISTDataModule(...).train_dataloader()``, each batch through
  ``dm.to_device(batch, "cpu")`` (normalization in ``on_after_batch_transfer``), with
  0 and 2 workers and ``resident=True``;
* torchvision: ``datasets.MNIST`` + ``Compose([ToTensor(), Normalize])`` + ``DataLoader``
  (0 and 2 workers; its default non-persistent workers).

Timing (benchmarks/harness.py): the same warm-up epoch for all, then interleaved
rounds of one epoch each, ratios as medians of paired rounds. Preparing the data is
not timed (``datapipe prepare mnist`` in its own process). The table also goes to
benchmarks/results/mnist_loading.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import harness  # noqa: E402
from harness import Contestant  # noqa: E402

from datapipe.formats.idx import encode_idx, read_idx  # noqa: E402

MEAN, STD = 0.1307, 0.3081
BATCH = 256
N_TRAIN, N_TEST = 60_000, 10_000
FILES = {
    "train-images-idx3-ubyte.gz": ("train", "images"),
    "train-labels-idx1-ubyte.gz": ("train", "labels"),
    "t10k-images-idx3-ubyte.gz": ("test", "images"),
    "t10k-labels-idx1-ubyte.gz": ("test", "labels"),
}
GOAL_VS_LIMIT = 0.90


# ---------------------------------------------------------------------- data


def make_files(workdir: Path, seed: int, n_train: int = N_TRAIN,
               n_test: int = N_TEST) -> tuple[Path, Path]:
    """Write the 4 gzipped IDX files (for datapipe) and their ungzipped copies (for
    torchvision, at <root>/MNIST/raw/); reuse them when the workdir already holds
    files made with the same seed. Returns (gz folder, torchvision root)."""
    gz_dir = workdir / "mnist-gz"
    tv_root = workdir / "torchvision"
    raw_dir = tv_root / "MNIST" / "raw"
    stamp = workdir / "mnist-files.json"
    want = {"seed": seed, "train": n_train, "test": n_test}
    complete = all((gz_dir / n).is_file() and (raw_dir / n[:-3]).is_file() for n in FILES)
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return gz_dir, tv_root
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    gz_dir.mkdir(parents=True, exist_ok=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = encode_idx(array)
        (gz_dir / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        (raw_dir / name[:-3]).write_bytes(raw)
    stamp.write_text(json.dumps(want))
    return gz_dir, tv_root


def prepare_datapipe(gz_dir: Path, cache_dir: Path) -> float:
    """`datapipe prepare mnist` over the files in its own process (the trainer benchmark's too)."""
    return harness.prepare_cli("mnist", gz_dir, cache_dir, REPO)


load_line = harness.load_line


# ---------------------------------------------------------------------- contestants


def resident_limits(gz_dir: Path, batch: int) -> tuple[list[Contestant], tuple]:
    """The uint8-resident limit and the float32-resident ceiling, written by hand."""
    import torch

    images = torch.from_numpy(read_idx(gz_dir / "train-images-idx3-ubyte.gz").copy())
    images = images.unsqueeze(1).contiguous()  # N x 1 x 28 x 28 uint8
    labels = torch.from_numpy(read_idx(gz_dir / "train-labels-idx1-ubyte.gz").astype(np.int64))
    n = len(images)
    scale, shift = 1.0 / (255.0 * STD), MEAN / STD
    floats = images.to(torch.float32).mul_(scale).sub_(shift)

    def uint8_epoch():
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            x = images.index_select(0, idx).to(torch.float32).mul_(scale).sub_(shift)
            yield x, labels.index_select(0, idx)

    def float_epoch():
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            yield floats.index_select(0, idx), labels.index_select(0, idx)

    check = harness.batch_check((1, 28, 28))
    return [
        Contestant("limit: uint8 resident", uint8_epoch, n, check=check,
                   note="resident uint8 tensor, randperm, index_select, fused convert + "
                        "normalize per batch"),
        Contestant("ceiling: float32 resident", float_epoch, n, check=check,
                   note="normalized float32 tensor made up front, randperm, index_select"),
    ], (images, labels)


def datapipe_contestants(gz_dir: Path, cache_dir: Path, batch: int, reference: tuple,
                         workers: tuple[int, ...] = (0, 2)) -> list[Contestant]:
    from datapipe.datamodules.mnist import MNISTDataModule

    images, labels = reference
    out = []
    configs = [(f"datapipe (workers {w})", {"num_workers": w}) for w in workers]
    configs.append(("datapipe (resident=True)", {"resident": True}))
    for name, kwargs in configs:
        dm = harness.datamodule(MNISTDataModule, gz_dir, cache_dir, batch_size=batch, **kwargs)
        # Correctness, untimed: the first batch is the normalization of the rows named.
        loader = dm.train_dataloader()
        x, y = dm.to_device(next(iter(loader)), "cpu")
        rows = loader.batch_sampler.order(0)[:batch]
        want = images[rows].float().div_(255).sub_(MEAN).div_(STD)
        if not (x.shape == want.shape and float((x - want).abs().max()) < 1e-4
                and bool((y == labels[rows]).all())):
            raise AssertionError(f"{name}: the first batch does not match the source files")
        out.append(Contestant(name, harness.datapipe_epoch(dm), len(images),
                              check=harness.batch_check((1, 28, 28))))
    return out


def torchvision_contestants(tv_root: Path, batch: int, reference: tuple,
                            workers: tuple[int, ...] = (0, 2)) -> list[Contestant]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    dataset = datasets.MNIST(str(tv_root), train=True, transform=transform, download=False)
    images, labels = reference
    x0, y0 = dataset[0]
    want = images[0].float().div_(255).sub_(MEAN).div_(STD)
    if not (float((x0 - want).abs().max()) < 1e-4 and y0 == int(labels[0])):
        raise AssertionError("torchvision's sample 0 does not match the source files")
    out = []
    for w in workers:
        def epoch(w=w):
            return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w)
        out.append(Contestant(f"torchvision (workers {w})", epoch, len(dataset),
                              check=harness.batch_check((1, 28, 28))))
    return out


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, torchvision with 0 workers only")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--train-size", type=int, default=N_TRAIN, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--no-torchvision", action="store_true", help="leave torchvision out")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the files and datapipe's cache go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every contestant (default: torch's)")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "mnist_loading.md",
                        help="markdown file the report is written to ('-' for none)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        gz_dir, tv_root = make_files(workdir, args.seed, args.train_size,
                                     max(1, args.train_size // 6))
        import torch  # (imported before any timing)

        if args.threads:
            torch.set_num_threads(args.threads)

        machine, load_before = harness.machine_line(), harness.load_line()
        print(f"{machine}\nbefore: {load_before}", flush=True)
        prepare_s = prepare_datapipe(gz_dir, workdir / "datapipe-cache")
        limits, reference = resident_limits(gz_dir, args.batch_size)
        contestants = [*limits, *datapipe_contestants(gz_dir, workdir / "datapipe-cache",
                                                      args.batch_size, reference)]
        if not args.no_torchvision:
            contestants += torchvision_contestants(tv_root, args.batch_size, reference,
                                                   (0,) if args.quick else (0, 2))
        harness.run_rounds(contestants, rounds, warmup=1)
    by_name = {c.name: c for c in contestants}
    limit, dp0 = by_name["limit: uint8 resident"], by_name["datapipe (workers 0)"]
    references = [limit, by_name["ceiling: float32 resident"]]
    checks = [harness.target("datapipe (workers 0) vs limit: uint8 resident",
                             harness.paired_ratio(dp0, limit), GOAL_VS_LIMIT,
                             harness.paired_ratio(dp0, limit, cpu=True)),
              harness.target("datapipe (workers 2) vs datapipe (workers 0)",
                             harness.paired_ratio(by_name["datapipe (workers 2)"], dp0), 1.0)]
    if "torchvision (workers 0)" in by_name:
        references.append(by_name["torchvision (workers 0)"])
    command = "benchmarks/bench_mnist_loading.py" + (" --quick" if args.quick else "")
    harness.report(
        f"MNIST epochs on CPU ({args.train_size:,} images, batch {args.batch_size})",
        command, contestants, references, machine=machine, load_before=load_before,
        rounds=rounds, warmup=1, checks=checks,
        notes=[f"- not timed: `datapipe prepare mnist` in its own process ({prepare_s:.2f} s)"],
        results=None if str(args.results) == "-" else args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
