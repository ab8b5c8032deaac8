"""How prepare's memory, the split plan and an epoch grow with the number of images.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--sizes 60000,300000,600000]

For each size N: seeded random 28x28 uint8 images (10 classes) in MNIST's gzipped IDX
files. Then, each in its own fresh process so that nothing is shared between sizes:

* ``datapipe prepare mnist --source`` through the CLI's ``main``; the process's peak
  resident memory (``ru_maxrss``) is recorded. The same command over the smallest
  size gives the constant (interpreter, pyarrow, the CLI); the figures of merit are
  (peak - constant) / one split's decoded size (N x 784 bytes of images plus N int64
  labels) at the largest size, and the peak's growth per decoded byte from the
  smallest size to the largest; the goal is at most 1.3 for both.
* ``MNISTDataModule(val_split=0.1, normalize=True, batch_size=256)``: the size of the
  split plan the cache stores, and epoch time at workers 0 (each batch through
  ``to_device``: the uint8 gather, convert and normalize), 1 warm-up epoch, then the
  median of ``--rounds`` timed epochs. Linear growth means the same microseconds per
  image at every size; the table gives them and their ratio to the smallest size.

Not timed: making the files. The report goes to benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from harness import load_line, machine_line  # noqa: E402

from datapipe.formats.idx import encode_idx  # noqa: E402

GOAL = 1.3  # peak memory over one split's decoded size, after the constant
N_TEST = 1000  # the test split is kept small: the train split is the one measured
CONSTANT_N = 1000  # the size whose prepare gives the constant

# Run in a fresh interpreter: prepare, then print the peak resident memory in KiB.
# VmHWM is this process image's own high-water mark; ru_maxrss would not do, as Linux
# carries it over exec from the forking parent (which has imported torch).
PREPARE = """
import sys, warnings
from datapipe.cli import main
warnings.simplefilter("ignore")
rc = main(["prepare", "mnist", "--cache-dir", sys.argv[1], "--source", sys.argv[2],
           "--no-verify", "--quiet"])
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
sys.exit(rc)
"""

# Run in a fresh interpreter: the plan's size and epoch times, as JSON.
EPOCHS = """
import json, statistics, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from datapipe.datamodules.mnist import MNISTDataModule
cache, source, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dm = MNISTDataModule(cache_dir=cache, source=source, verify=False, val_split=0.1,
                     normalize=True, batch_size=256, num_workers=0, quiet=True)
dm.prepare_data()
dm.setup("fit")
plans = sorted((cache / "splits").rglob("*.json"))
loader = dm.train_dataloader()
def epoch():
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        x, y = dm.to_device(batch)
        n += len(y)
    return time.perf_counter() - t0, n
epoch()
times = []
for _ in range(rounds):
    seconds, n = epoch()
    times.append(seconds)
print(json.dumps({"plan_bytes": sum(p.stat().st_size for p in plans), "images": n,
                  "epochs": times, "median": statistics.median(times)}))
"""


def make_files(folder: Path, n: int, seed: int) -> None:
    """MNIST's four gzipped IDX files with ``n`` random training images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(encode_idx(array), compresslevel=1, mtime=0))


def run_python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"a measurement failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def decoded_bytes(n: int) -> int:
    """One split's decoded size: the images and their int64 labels."""
    return n * 28 * 28 + n * 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 6,000 and 30,000")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated image counts (default 60000,300000,600000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "scale.md")
    args = parser.parse_args(argv)
    default = "6000,30000" if args.quick else "60000,300000,600000"
    sizes = sorted({int(s) for s in (args.sizes or default).split(",") if s.strip()})
    machine, load_before = machine_line(), load_line()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        constant_files = work / f"files-{CONSTANT_N}"
        make_files(constant_files, CONSTANT_N, args.seed)
        constant = int(run_python(PREPARE, str(work / f"cache-{CONSTANT_N}"),
                                  str(constant_files))) * 1024
        print(f"constant (prepare of {CONSTANT_N} images): {constant / 2**20:.0f} MiB",
              flush=True)
        for n in sizes:
            files = work / f"files-{n}"
            t0 = time.perf_counter()
            make_files(files, n, args.seed)
            print(f"{n:,} images: files made in {time.perf_counter() - t0:.1f} s", flush=True)
            cache = work / f"cache-{n}"
            t0 = time.perf_counter()
            peak = int(run_python(PREPARE, str(cache), str(files))) * 1024
            prepare_s = time.perf_counter() - t0
            measured = json.loads(run_python(EPOCHS, str(cache), str(files), str(args.rounds)))
            row = {"n": n, "peak": peak, "prepare_s": prepare_s,
                   "ratio": (peak - constant) / decoded_bytes(n), **measured}
            rows.append(row)
            print(f"  peak {peak / 2**20:.0f} MiB ({row['ratio']:.2f}x the split's decoded "
                  f"size after the constant), plan {row['plan_bytes']:,} B, epoch "
                  f"{row['median']:.3f} s", flush=True)

    base = rows[0]["median"] / rows[0]["images"]
    lines = [
        "# Scale: prepare's peak memory, the split plan and epoch time against N images",
        "", f"`.venv/bin/python benchmarks/bench_scale.py{' --quick' if args.quick else ''}`",
        "", f"Machine: {machine}", "", f"Load before: `{load_before}`", "",
        f"Load after: `{load_line()}`", "",
        f"Constant (peak of `datapipe prepare mnist` over {CONSTANT_N:,} images, a fresh "
        f"process): {constant / 2**20:.0f} MiB.", "",
        "| images | decoded split (MiB) | prepare peak (MiB) | (peak - constant) / split "
        "| prepare (s) | split plan (bytes) | epoch s min / median / max "
        "| µs / image | vs smallest |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per = r["median"] / r["images"]
        lines.append(
            f"| {r['n']:,} | {decoded_bytes(r['n']) / 2**20:.0f} | {r['peak'] / 2**20:.0f} "
            f"| {r['ratio']:.2f}x | {r['prepare_s']:.1f} | {r['plan_bytes']:,} "
            f"| {min(r['epochs']):.3f} / {r['median']:.3f} / {max(r['epochs']):.3f} "
            f"| {1e6 * per:.2f} | {per / base:.2f}x |")
    # The growth of the peak per byte of decoded split between the smallest and the
    # largest size: the "x one split's decoded size" of "peak = x * split + constant",
    # free of whatever fixed cost the constant's small run does not pay.
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        slope = (last["peak"] - first["peak"]) / (decoded_bytes(last["n"])
                                                  - decoded_bytes(first["n"]))
        lines += ["", f"- prepare's peak memory grows by {slope:.2f} bytes per byte of decoded "
                  f"split from {first['n']:,} to {last['n']:,} images, and is "
                  f"{last['ratio']:.2f}x the split over the constant at {last['n']:,} "
                  f"(goal <= {GOAL:g}x): "
                  f"{'MET' if max(slope, last['ratio']) <= GOAL else 'NOT MET'}"]
    lines += [
              f"- epoch time per image at the largest size: "
              f"{rows[-1]['median'] / rows[-1]['images'] / base:.2f}x the smallest's",
              "", "Each prepare and each set of epochs runs in a fresh process; the epoch "
              "is the training split (90% of N) at workers 0, each batch through "
              "`to_device` (uint8 gather, convert, normalize), median of "
              f"{args.rounds} timed epochs after 1 warm-up."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
