"""Many processes preparing one dataset at once: one download per file, one result."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from loopback import MirrorServer


@pytest.mark.slow  # separate processes
def test_six_processes_prepare_mnist_at_once(fake_mnist, tmp_path):
    cache = tmp_path / "shared-cache"
    with MirrorServer(fake_mnist.files, mode="slow", delay=0.3) as mirror:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "datapipe", "prepare", "mnist", "--quiet", "--no-verify",
                 "--mirror", mirror.url, "--cache-dir", str(cache)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(6)
        ]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        requests = dict(mirror.requests)

    for code, _, err in results:
        assert code == 0, err
    assert requests == {name: 1 for name in fake_mnist.files}  # each file fetched once
    fingerprints = {tuple(re.findall(r"fingerprint (\w+)", out)) for _, out, _ in results}
    assert len(fingerprints) == 1 and len(next(iter(fingerprints))) == 2
    entries = [p for p in (cache / "prepared" / "mnist" / "1").iterdir()]
    assert sorted(p.name for p in entries) == sorted(next(iter(fingerprints)))
    assert all((p / "manifest.json").is_file() for p in entries)
    # Exactly one process did each split's work; the others found it done.
    worked = sum(out.count("prepared in") for _, out, _ in results)
    assert worked == 2
