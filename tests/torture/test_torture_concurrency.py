"""Eight preparers at once against one cache, in flock and soft lock mode.

Beyond tests/test_concurrency.py (six processes, one recipe, flock): eight processes, a
mirror that trickles every body so that they all overlap in the download, the suite's
verified recipe, both lock modes, two recipes sharing their downloads, and a stale soft
lock left by a killed process in the way. Every run checks: every process exits 0, the
mirror served every file exactly once, every process reports the same fingerprints,
the Arrow files are byte-identical to a clean run's, exactly one process did each
split's work, and nothing is left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torture_kit as kit
from torture_kit import (
    RECIPE,
    TWIN,
    VICTIM,
    TortureMirror,
    audit,
    cli_env,
    data_hashes,
    datapipe_argv,
    fingerprints,
    prepare_args,
)

from datapipe.cache import Cache
from datapipe.verify import OK, verify

world, figures = kit.world, kit.figures  # the suite's shared fixtures

N = 8
TRICKLE = {"piece": 64 * 1024, "pause": 0.05}


def _run_all(world, cache, mirror, recipes: list[str], lock: str):
    procs = [subprocess.Popen(datapipe_argv(*prepare_args(world, cache, "--mirror", mirror.url,
                                                          recipe=recipe)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli_env(lock))
             for recipe in recipes]
    results = []
    for recipe, p in zip(recipes, procs, strict=True):
        out, err = p.communicate(timeout=180)
        results.append((recipe, p.returncode, out, err))
    return results


def _check(world, cache, mirror, results, figures):
    for recipe, code, _, err in results:
        assert code == 0, (recipe, err)
    figures.counts["concurrent_runs"] += 1
    figures.counts["concurrent_processes"] += len(results)
    figures.counts["downloads_counted"] += sum(mirror.requests.values())
    figures.counts["downloads_expected"] += len(world.files)
    assert dict(mirror.requests) == {name: 1 for name in world.files}  # each file once
    for recipe in {r for r, *_ in results}:
        outs = [out for r, _, out, _ in results if r == recipe]
        assert len({fingerprints(out) for out in outs}) == 1, outs  # one answer
        assert len(fingerprints(outs[0])) == 2
        assert sum(out.count("prepared in") for out in outs) == 2  # one worker per split
        assert data_hashes(cache, recipe) == world.reference
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []
    assert all(c.status == OK for c in verify(Cache(cache)))


@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_eight_processes_prepare_one_recipe(lock, world, figures, tmp_path):
    cache = tmp_path / "cache"
    with TortureMirror(world.files, **TRICKLE) as mirror:
        results = _run_all(world, cache, mirror, [RECIPE] * N, lock)
    _check(world, cache, mirror, results, figures)


@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_two_recipes_sharing_downloads(lock, world, figures, tmp_path):
    cache = tmp_path / "cache"
    with TortureMirror(world.files, **TRICKLE) as mirror:
        results = _run_all(world, cache, mirror, [RECIPE, TWIN] * (N // 2), lock)
    _check(world, cache, mirror, results, figures)
    # Two recipes, two sets of entries, one set of downloads.
    assert len(list((cache / "prepared").glob("*/*/*/manifest.json"))) == 4
    assert len(list((cache / "downloads").glob("*/*.gz"))) == len(world.files)


def test_eight_processes_past_a_stale_soft_lock(world, figures, tmp_path):
    """A soft lock held by a process killed -9 is in the way of all eight."""
    cache = tmp_path / "cache"
    with TortureMirror(world.files, **TRICKLE) as mirror:
        args = prepare_args(world, cache, "--mirror", mirror.url)
        victim = subprocess.Popen([sys.executable, str(VICTIM), "download-lock:1", "--", *args],
                                  stdout=subprocess.PIPE, text=True, env=cli_env("soft"))
        assert victim.stdout.readline().startswith("TORTURE-POINT"), "victim missed its point"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        stale = [p for p in (cache / "locks").glob("download-*.lock")]
        assert stale, "the killed process left no soft lock"
        figures.fault("stale soft lock")
        started = time.monotonic()
        results = _run_all(world, cache, mirror, [RECIPE] * N, "soft")
        assert time.monotonic() - started < 40
    assert Counter(r[1] for r in results) == {0: N}, [r[3] for r in results]
    _check(world, cache, mirror, results, figures)
