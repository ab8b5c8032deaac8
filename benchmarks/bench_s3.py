"""Reading from an object store: a first epoch streamed from S3 against one from local disk.

    .venv/bin/python benchmarks/bench_s3.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_s3.py --quick    # 3 rounds

MNIST-sized data (60,000 random 28 x 28 images, one 47 MB Arrow file) is prepared once
and published to moto's S3 server on 127.0.0.1. Three contestants, each a fresh
DataModule that sets up and runs one training epoch (batches of 256, normalized to
float32 as ``on_after_batch_transfer`` does):

    store, cold          ``cache_dir="s3://..."`` with an empty local cache: the entry is
                         fetched (HEAD, GET, chunk digests checked) before the epoch
    store, local cache   the same store with the local cache that a cold run filled: the
                         entry is found locally, nothing is fetched
    local cache          ``cache_dir=`` the folder it was prepared in (the reference)

Rounds are interleaved (harness.py). The loopback server shows what the client side
costs (request handling, copying, digest checks), not what a network costs; the cold
fetch's rate is given too, and docs/object-storage.md projects it onto real bandwidth.
Results go to results/s3.md (``--results PATH``; ``-`` for nowhere).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

BATCH = 256


def make_source(folder: Path, rows: int) -> Path:
    from datapipe.formats.idx import encode_idx

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (rows, 28, 28), np.uint8),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, rows).astype(np.uint8)}
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(encode_idx(array), compresslevel=1))
    return folder


def epoch(dm) -> float:
    """Set up ``dm`` and run one training epoch; the seconds it took, set-up included."""
    started = time.perf_counter()
    dm.setup("fit")
    for images, _labels in dm.train_dataloader():
        images.float().mul_(1 / (255 * 0.3081)).sub_(0.1307 / 0.3081)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--rows", type=int, default=60_000, help="images in the split")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where files and caches go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" /
                        "s3.md", help="markdown file the report is written to ('-' for none)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)

    from s3_server import CREDENTIALS, S3Server

    import datapipe
    from datapipe.cache import Cache
    from datapipe.datamodules.mnist import RECIPE
    from datapipe.prepare import prepare_split
    from datapipe.remote.sync import open_remote, publish_split
    from datapipe.stages.download import FetchOptions

    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, S3Server() as server:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        server.make_bucket("bench")
        url = "s3://bench/datasets"
        local = workdir / "prepared-here"
        source = make_source(workdir / "source", args.rows)
        import torch  # noqa: F401  (imported before any timing)

        machine, load_before = harness.machine_line(), harness.load_line()
        print(f"{machine}\nbefore: {load_before}", flush=True)
        options = FetchOptions(source=str(source), verify=False, quiet=True)
        prepared, _ = prepare_split(RECIPE, "train", Cache.at(local), options)
        remote = open_remote(url, workdir / "publisher", storage_options=server.storage_options())
        started = time.perf_counter()
        publish_split(remote, prepared)
        publish_s = time.perf_counter() - started
        size = prepared.data_file.stat().st_size
        common = dict(verify=False, batch_size=BATCH, num_workers=0, val_split=0,
                      test_split=None)
        remote_options = dict(cache_dir=url, storage_options=server.storage_options(),
                              **common)
        warm_dir = workdir / "warm"
        cold_runs = [0]
        fetches: list[float] = []

        def cold() -> float:
            cold_runs[0] += 1
            folder = workdir / f"cold-{cold_runs[0]}"
            dm = datapipe.load("mnist", local_cache=folder, **remote_options)
            t0 = time.perf_counter()
            dm.prepare_data()  # the fetch alone, for its rate
            fetches.append(time.perf_counter() - t0)
            seconds = time.perf_counter() - t0 + epoch(dm)
            shutil.rmtree(folder, ignore_errors=True)
            return seconds

        def warm() -> float:
            return epoch(datapipe.load("mnist", local_cache=warm_dir, **remote_options))

        def plain() -> float:
            return epoch(datapipe.load("mnist", cache_dir=local, **common))

        rows = prepared.rows
        contestants = [
            harness.Contestant("store, cold", None, rows, timed=cold,
                               note="empty local cache: fetch + digest check + epoch"),
            harness.Contestant("store, local cache", None, rows, timed=warm,
                               note="the local cache holds the entry: nothing fetched"),
            harness.Contestant("local cache", None, rows, timed=plain,
                               note="cache_dir= the folder it was prepared in"),
        ]
        harness.run_rounds(contestants, rounds, warmup=1)
    by_name = {c.name: c for c in contestants}
    fetch = sorted(fetches)[len(fetches) // 2]
    notes = [f"- data: {rows:,} images, one Arrow file of {size / 1e6:.1f} MB",
             f"- cold fetch alone (median of {len(fetches)}): {fetch:.3f} s, "
             f"{size / fetch / 1e6:.0f} MB/s from the loopback server, digests checked",
             f"- not timed: publish to the store once ({publish_s:.2f} s)"]
    command = "benchmarks/bench_s3.py" + (" --quick" if args.quick else "")
    harness.report(
        f"A first epoch from S3 (moto on 127.0.0.1) and from local disk ({rows:,} images, "
        f"batch {BATCH})", command, contestants, [by_name["local cache"]], machine=machine,
        load_before=load_before, rounds=rounds, warmup=1, notes=notes,
        results=None if str(args.results) == "-" else args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
