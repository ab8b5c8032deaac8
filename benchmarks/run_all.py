"""Run every benchmark, one after another, and write their reports under results/.

    .venv/bin/python benchmarks/run_all.py            # the full suite
    .venv/bin/python benchmarks/run_all.py --quick    # each benchmark's quick mode
    .venv/bin/python benchmarks/run_all.py --only mnist,cifar

Each benchmark runs in its own process (so none inherits another's imports, maps or
threads) with the same interpreter; its report goes to benchmarks/results/<name>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, extra arguments of the full run).
SUITE = {
    "mnist": ("bench_mnist_loading.py", []),
    "cifar": ("bench_cifar.py", []),
    "imagenet": ("bench_imagenet.py", []),
    "resident": ("bench_resident.py", []),
    "trainer": ("bench_trainer.py", []),
    "integrity": ("bench_integrity.py", []),
    "scale": ("bench_scale.py", []),
    "s3": ("bench_s3.py", []),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--only", default=",".join(SUITE),
                        help=f"comma-separated subset of {', '.join(SUITE)}")
    args, rest = parser.parse_known_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    failed = []
    for name in names:
        script, extra = SUITE[name]
        command = [sys.executable, str(HERE / script), *extra,
                   *(["--quick"] if args.quick else []), *rest]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(command, cwd=HERE.parent).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
