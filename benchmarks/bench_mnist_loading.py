"""One epoch of MNIST-sized batches on CPU: datapipe vs torchvision vs a plain in-memory loop.

    .venv/bin/python benchmarks/bench_mnist_loading.py [--quick] [--workdir DIR]

Every contestant reads the same MNIST-format files (60,000 + 10,000 seeded random
28x28 uint8 images and labels, gzipped IDX, written into the workdir) and yields,
per batch of 256, normalized float32 images (N x 1 x 28 x 28, mean 0.1307 / std
0.3081) and int64 labels on the CPU:

* datapipe: MNISTDataModule(...).train_dataloader(), each batch through
  dm.to_device(batch, "cpu") (normalization happens in on_after_batch_transfer);
* torchvision: datasets.MNIST + Compose([ToTensor(), Normalize]) + DataLoader;
* in-memory loop: the uint8 tensor in RAM, a randperm, one gather + normalize per
  batch -- the practical limit of any loader.

Each contestant runs one untimed-for-ranking warm-up epoch (reported as "first
epoch"), then the best of 3 timed epochs (1 with --quick). torchvision is slow, so it
gets one timed epoch (after a short warm-up of a few batches) unless
--torchvision-epochs says otherwise. Preparing the data (`datapipe prepare` in its
own process, torchvision's dataset construction, loading the tensor for the loop) is
outside the timing. The table also goes to benchmarks/results/mnist_loading.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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
TARGET_VS_TORCHVISION = 50.0
TARGET_VS_LOOP = 0.7


# ---------------------------------------------------------------------- data


def make_files(workdir: Path, seed: int) -> tuple[Path, Path]:
    """Write the 4 gzipped IDX files (for datapipe) and their ungzipped copies (for
    torchvision, at <root>/MNIST/raw/); reuse them when the workdir already holds
    files made with the same seed. Returns (gz folder, torchvision root)."""
    gz_dir = workdir / "mnist-gz"
    tv_root = workdir / "torchvision"
    raw_dir = tv_root / "MNIST" / "raw"
    stamp = workdir / "mnist-files.json"
    want = {"seed": seed, "train": N_TRAIN, "test": N_TEST}
    complete = all((gz_dir / n).is_file() and (raw_dir / n[:-3]).is_file() for n in FILES)
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return gz_dir, tv_root
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }
    gz_dir.mkdir(parents=True, exist_ok=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = encode_idx(array)
        (gz_dir / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        (raw_dir / name[:-3]).write_bytes(raw)
    stamp.write_text(json.dumps(want))
    return gz_dir, tv_root


# ---------------------------------------------------------------------- timing


@dataclass
class Result:
    name: str
    workers: int
    first: float  # seconds of the warm-up epoch (nan if only a partial warm-up ran)
    epochs: list[float] = field(default_factory=list)
    setup: float = 0.0
    note: str = ""
    samples: int = N_TRAIN  # in one epoch

    @property
    def best(self) -> float:
        return min(self.epochs)

    @property
    def rate(self) -> float:
        return self.samples / self.best


def consume(batches: Iterable, limit: int | None = None,
            shape: tuple[int, ...] = (1, 28, 28)) -> int:
    """Iterate ``batches`` of (x, y), checking the first; return the number of samples."""
    import torch

    n = 0
    for i, (x, y) in enumerate(batches):
        if i == 0 and not (
            x.dtype == torch.float32 and x.shape[1:] == shape and y.dtype == torch.int64
        ):
            raise AssertionError(f"unexpected batch: {x.dtype} {tuple(x.shape)}, labels {y.dtype}")
        n += len(y)
        if limit is not None and i + 1 >= limit:
            return n
    return n


def run_contestant(
    name: str,
    workers: int,
    epoch: Callable[[], Iterable],
    repeats: int,
    *,
    setup: float,
    full_warmup: bool = True,
    note: str = "",
    samples: int = N_TRAIN,
    shape: tuple[int, ...] = (1, 28, 28),
) -> Result:
    """Warm up (a full epoch, or 20 batches), then time ``repeats`` full epochs.

    An epoch must give ``samples`` samples of ``shape``.
    """
    label = f"{name} (workers={workers})"
    t0 = time.perf_counter()
    n = consume(epoch(), limit=None if full_warmup else 20, shape=shape)
    first = time.perf_counter() - t0 if full_warmup else float("nan")
    if full_warmup and n != samples:
        raise AssertionError(f"{label}: an epoch gave {n} samples, expected {samples}")
    result = Result(name, workers, first, setup=setup, note=note, samples=samples)
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = consume(epoch(), shape=shape)
        result.epochs.append(time.perf_counter() - t0)
        if n != samples:
            raise AssertionError(f"{label}: an epoch gave {n} samples, expected {samples}")
    first_txt = f"first epoch {first:.3f} s, " if full_warmup else ""
    print(f"  {label:32s} {first_txt}timed epochs "
          f"{', '.join(f'{t:.3f}' for t in result.epochs)} s -> {result.rate:,.0f} samples/s",
          flush=True)
    return result


# ---------------------------------------------------------------------- contestants


def in_memory_loop(gz_dir: Path, repeats: int) -> tuple[Result, tuple]:
    import torch

    t0 = time.perf_counter()
    images = torch.from_numpy(read_idx(gz_dir / "train-images-idx3-ubyte.gz").copy())
    images = images.unsqueeze(1).contiguous()  # N x 1 x 28 x 28 uint8
    labels = torch.from_numpy(read_idx(gz_dir / "train-labels-idx1-ubyte.gz").astype(np.int64))
    setup = time.perf_counter() - t0
    n = len(images)

    scale, shift = 1.0 / (255.0 * STD), MEAN / STD  # (x / 255 - mean) / std, fused

    def epoch():
        perm = torch.randperm(n)
        for start in range(0, n, BATCH):
            idx = perm[start:start + BATCH]
            yield images[idx].float().mul_(scale).sub_(shift), labels[idx]

    return run_contestant("in-memory loop", 0, epoch, repeats, setup=setup), (images, labels)


def prepare_datapipe(gz_dir: Path, cache_dir: Path) -> float:
    """`datapipe prepare mnist` in its own process, as a user prepares data once before
    training: the training process then finds the prepared split in the cache and
    inherits nothing the preparation imported."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "datapipe", "prepare", "mnist", "--cache-dir", str(cache_dir),
         "--source", str(gz_dir), "--no-verify", "--quiet"],
        cwd=REPO, capture_output=True, text=True,
    )
    if done.returncode != 0:  # its warnings (random files are not MNIST's md5s) only then
        sys.exit(f"datapipe prepare failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - t0


def time_datamodule(module_class: type, source: Path, cache_dir: Path, workers: int,
                    repeats: int, **timing) -> tuple:
    """Set up a prebuilt DataModule on ``source`` (untimed), then time its epochs.

    Batches are normalized in ``to_device``, as a trainer does. Returns (dm, Result).
    """
    from datapipe.errors import UnverifiedDataWarning

    # The generated files cannot match the official md5s; verify=False says so per file.
    warnings.simplefilter("ignore", UnverifiedDataWarning)
    t0 = time.perf_counter()
    dm = module_class(cache_dir=cache_dir, source=source, verify=False, val_split=0,
                      batch_size=BATCH, normalize=True, num_workers=workers, quiet=True)
    dm.prepare_data()
    dm.setup("fit")
    setup = time.perf_counter() - t0

    def epoch():
        for batch in dm.train_dataloader():
            yield dm.to_device(batch, "cpu")

    return dm, run_contestant("datapipe", workers, epoch, repeats, setup=setup, **timing)


def datapipe_contestant(gz_dir: Path, cache_dir: Path, workers: int, repeats: int,
                        reference: tuple) -> Result:
    from datapipe.datamodules.mnist import MNISTDataModule

    dm, result = time_datamodule(MNISTDataModule, gz_dir, cache_dir, workers, repeats)

    # Correctness, after the timing (so that the first epoch keeps its one-time costs):
    # the first batch equals the in-memory normalization of the rows the sampler names.
    loader = dm.train_dataloader()
    x, y = dm.to_device(next(iter(loader)), "cpu")
    rows = loader.batch_sampler.order(0)[:BATCH]
    images, labels = reference
    want = images[rows].float().div_(255).sub_(MEAN).div_(STD)
    if not (x.shape == want.shape and float((x - want).abs().max()) < 1e-4
            and bool((y == labels[rows]).all())):
        raise AssertionError("datapipe's first batch does not match the source files")
    return result


def torchvision_contestant(tv_root: Path, workers: int, repeats: int,
                           reference: tuple) -> Result:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    t0 = time.perf_counter()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    dataset = datasets.MNIST(str(tv_root), train=True, transform=transform, download=False)
    setup = time.perf_counter() - t0
    images, labels = reference
    x0, y0 = dataset[0]
    want = images[0].float().div_(255).sub_(MEAN).div_(STD)
    if not (float((x0 - want).abs().max()) < 1e-4 and y0 == int(labels[0])):
        raise AssertionError("torchvision's sample 0 does not match the source files")

    def epoch():
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)

    torch.manual_seed(0)
    return run_contestant("torchvision", workers, epoch, repeats, setup=setup,
                          full_warmup=False, note="warm-up: 20 batches, not a full epoch")


# ---------------------------------------------------------------------- report


def machine_line() -> str:
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torchvision

    return (f"{model}, {cores} cores, Python {platform.python_version()}, torch {torch.__version__}"
            f" ({torch.get_num_threads()} threads), torchvision {torchvision.__version__}")


def load_line() -> str:
    """The 1-minute load average against the core count: other work skews the numbers."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = " -- the machine was busy, numbers are noisy" if load > 0.5 * cores else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def table(results: list[Result], tv0: Result, loop: Result) -> str:
    rows = [
        "| contestant | workers | samples/s | vs torchvision (workers 0) | vs in-memory loop "
        "| best epoch (s) | first epoch (s) | timed epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = f"{r.first:.3f}" if r.first == r.first else "-"
        rows.append(
            f"| {r.name} | {r.workers} | {r.rate:,.0f} | {r.rate / tv0.rate:.1f}x "
            f"| {r.rate / loop.rate:.2f}x | {r.best:.3f} | {first} | {len(r.epochs)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed epoch per contestant")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the MNIST files and datapipe's cache go (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed epochs per contestant, best kept (default 3, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--torchvision-epochs", type=int, default=1,
                        help="timed epochs for torchvision (default 1: it is slow)")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "mnist_loading.md",
                        help="markdown file the table is written to ('-' for none)")
    args = parser.parse_args(argv)
    repeats = max(1, args.repeats) if args.repeats else (1 if args.quick else 3)
    tv_repeats = max(1, args.torchvision_epochs)

    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        gz_dir, tv_root = make_files(workdir, args.seed)
        print(f"MNIST-format files in {workdir} ({time.perf_counter() - t0:.1f} s)", flush=True)
        t0 = time.perf_counter()
        import torch  # noqa: F401  (imported here so its start-up is not in any row)
        import torchvision  # noqa: F401
        print(f"imported torch + torchvision ({time.perf_counter() - t0:.1f} s)", flush=True)
        machine = machine_line()
        print(machine, flush=True)
        load_before = load_line()
        print(f"before: {load_before}", flush=True)
        print(f"epochs: warm-up + best of {repeats} (torchvision: 20-batch warm-up + "
              f"{tv_repeats} epoch{'s' if tv_repeats > 1 else ''})", flush=True)

        loop, reference = in_memory_loop(gz_dir, repeats)
        cache_dir = workdir / "datapipe-cache"
        prepare_s = prepare_datapipe(gz_dir, cache_dir)
        print(f"  datapipe prepare (CLI, own process): {prepare_s:.2f} s", flush=True)
        results = [loop]
        # workers=2 first: a user's process with workers never maps the data itself, so
        # each epoch's fresh workers pay the first-load costs; after a workers=0 run in
        # this process they would inherit what it imported and loaded (by fork).
        for workers in (2, 0):
            results.append(datapipe_contestant(gz_dir, cache_dir, workers, repeats,
                                               reference))
        for workers in (0, 2):
            results.append(torchvision_contestant(tv_root, workers, tv_repeats, reference))

    load_after = load_line()
    order = {"in-memory loop": 0, "datapipe": 1, "torchvision": 2}
    results.sort(key=lambda r: (order[r.name], r.workers))
    tv0 = next(r for r in results if r.name == "torchvision" and r.workers == 0)
    dp0 = next(r for r in results if r.name == "datapipe" and r.workers == 0)
    text = table(results, tv0, loop)
    checks = [
        f"datapipe (workers 0) vs torchvision (workers 0): {dp0.rate / tv0.rate:.1f}x "
        f"(target >= {TARGET_VS_TORCHVISION:g}x): "
        f"{'PASS' if dp0.rate / tv0.rate >= TARGET_VS_TORCHVISION else 'FAIL'}",
        f"datapipe (workers 0) vs in-memory loop: {dp0.rate / loop.rate:.2f}x "
        f"(target >= {TARGET_VS_LOOP:g}x): "
        f"{'PASS' if dp0.rate / loop.rate >= TARGET_VS_LOOP else 'FAIL'}",
    ]
    method = (
        f"One epoch = {N_TRAIN:,} samples in batches of {BATCH}, normalized float32 "
        f"N x 1 x 28 x 28 + int64 labels, on CPU. Each row: a warm-up epoch "
        f"(\"first epoch\"), then the best of "
        f"{repeats} timed epoch{'s' if repeats > 1 else ''}; torchvision: a 20-batch warm-up, then "
        f"{tv_repeats} timed epoch{'s' if tv_repeats > 1 else ''}. Not timed: data "
        f"preparation (`datapipe prepare mnist` in its own process: {prepare_s:.2f} s; then "
        f"prepare_data() + setup() on the cache hit: {dp0.setup:.2f} s)."
        + (" (--quick run: single epochs of a few tens of milliseconds are noisy; judge the "
           "targets on a full run)" if repeats == 1 else "")
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
            "# MNIST loading: one epoch on CPU\n\n"
            "`.venv/bin/python benchmarks/bench_mnist_loading.py"
            + (" --quick" if args.quick else "") + "`\n\n"
            f"Machine: {machine}\n\nLoad: before the run {load_before}; after {load_after}.\n\n"
            f"{text}\n\n" + "\n".join(f"- {c}" for c in checks) + f"\n\n{method}\n"
        )
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
