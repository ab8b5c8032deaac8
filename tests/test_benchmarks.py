"""Every benchmark runs end to end on tiny data (a smoke test: no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = {
    "bench_mnist_loading.py": ["--train-size", "600", "--batch-size", "64", "--rounds", "1"],
    "bench_cifar.py": ["--per-member", "64", "--batch-size", "32", "--rounds", "1"],
    "bench_imagenet.py": ["--images", "12", "--classes", "2", "--batch-size", "4",
                          "--rounds", "1", "--workers", "0"],
    "bench_resident.py": ["--images", "80", "--widths", "4,8,8", "--batch-size", "16",
                          "--rounds", "1"],
    "bench_trainer.py": ["--train-size", "512", "--quick", "--models", "tiny",
                         "--max-wait", "0", "--retries", "0"],
    "bench_integrity.py": ["--rounds", "1", "--images", "16"],
    "bench_scale.py": ["--sizes", "1500,3000", "--rounds", "1"],
    "bench_s3.py": ["--rows", "600", "--rounds", "1"],
}
# The others compare contestants.
HEADER = {"bench_integrity.py": "| first epoch", "bench_scale.py": "| images"}


@pytest.mark.slow  # about 40 s for the eight scripts together
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_on_tiny_data_and_reports(script, tmp_path):
    if script == "bench_s3.py":  # the s3 and dev extras
        pytest.importorskip("s3fs")
        pytest.importorskip("moto.server")
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *TINY[script], "--workdir",
         str(tmp_path / "work"), "--results", str(report)],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = report.read_text()
    assert "Machine:" in text and HEADER.get(script, "| contestant") in text


def test_run_all_names_every_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCHMARKS))
    scripts = {script for script, _ in run_all.SUITE.values()}
    assert scripts == set(TINY)
