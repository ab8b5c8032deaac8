"""Failing mirrors, through the CLI: each one falls through, and all failing lists them all.

tests/test_download.py checks the download stage itself against most of these; here each
fault goes through ``python -m datapipe prepare`` end to end (the suite's verified
recipe, $DATAPIPE_TIMEOUT for the silent ones), and every run is audited: a mirror that
fails leaves nothing trusted, and the data finally prepared is byte-identical to a
clean run's.
"""

from __future__ import annotations

import pytest
import torture_kit as kit
from loopback import MirrorServer, refused_url
from torture_kit import (
    TEST,
    TortureMirror,
    audit,
    cli_env,
    data_hashes,
    error_lines,
    hanging_url,
    prepare_args,
    run_cli,
)

from datapipe.stages.download import SUGGESTION

world, figures = kit.world, kit.figures  # the suite's shared fixtures

# fault -> (how to make the mirror, what the error says about it)
FAULTS = {
    "refused": "connection refused",
    "timeout": "timed out after 1 s",
    "stall": "timed out after 1 s",
    "http404": "HTTP 404",
    "http500": "HTTP 500",
    "http503": "HTTP 503",
    "html": "HTML page",
    "truncated": "truncated",
    "wrong-bytes": "does not match the expected",
    "drop": "",  # a reset or a short body, depending on when the reset lands
}


class _Fixed:
    """A 'mirror' that is only a URL (refused, hanging)."""

    def __init__(self, url: str):
        self.url = url
        self.requests: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def bad_mirror(fault: str, files: dict[str, bytes]):
    if fault == "refused":
        return _Fixed(refused_url())
    if fault == "timeout":
        return _Fixed(hanging_url())
    if fault == "stall":
        return TortureMirror(files, stall=True)
    return MirrorServer(files, mode=fault)


ENV = {"DATAPIPE_TIMEOUT": "1"}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_failing_mirror_falls_through_to_the_next(fault, world, figures, tmp_path):
    cache = tmp_path / "cache"
    with bad_mirror(fault, world.files) as bad, MirrorServer(world.files) as good:
        done = run_cli(prepare_args(world, cache, "--split", "test", "--mirror", bad.url,
                                    "--mirror", good.url), env=cli_env(**ENV))
    figures.fault(f"mirror {fault}", len(TEST))
    assert done.returncode == 0, done.stderr
    for name in TEST:  # one warning per file, naming the mirror and why
        [warning] = [ln for ln in done.stderr.splitlines() if f"mirror {bad.url}{name}" in ln]
        assert FAULTS[fault] in warning and "failed" in warning
        if isinstance(bad, MirrorServer):
            assert bad.requests[name] == 1
        assert good.requests[name] == 1
    assert data_hashes(cache, "torture-mnist") == {"test": world.reference["test"]}
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []
    assert found.trusted_downloads == len(TEST) and found.trusted_prepared == 1


def test_all_mirrors_failing_is_one_line_listing_every_one(world, figures, tmp_path):
    cache = tmp_path / "cache"
    faults = list(FAULTS)
    mirrors = [bad_mirror(f, world.files) for f in faults]
    for m in mirrors:
        m.__enter__()
    try:
        urls = [m.url for m in mirrors]
        args = prepare_args(world, cache, "--split", "test")
        for url in urls:
            args += ["--mirror", url]
        done = run_cli(args, env=cli_env(**ENV))
    finally:
        for m in mirrors:
            m.__exit__(None, None, None)
    figures.fault("mirror (all failing)", len(faults))
    assert done.returncode == 2 and done.stdout == ""
    [line] = error_lines(done.stderr)
    name = TEST[0]
    assert line.startswith(f"datapipe: error: could not download {name}: ")
    assert line.endswith(SUGGESTION)
    listed = line.removeprefix(f"datapipe: error: could not download {name}: ").split("; ")[:-1]
    assert [part.split(" (")[0] for part in listed] == [u + name for u in urls]
    for fault, part in zip(faults, listed, strict=True):
        assert FAULTS[fault] in part, (fault, part)
    # Nothing trusted, no temporary; a .partial may stay, to be resumed and then verified.
    found = audit(cache)
    figures.check(found)
    assert (found.trusted_downloads, found.trusted_prepared, found.corruptions) == (0, 0, [])
    assert all(p.name.endswith(".partial") for p in found.leftovers), found.leftovers

    with MirrorServer(world.files) as good:  # the network comes back
        again = run_cli(prepare_args(world, cache, "--split", "test", "--mirror", good.url))
    assert again.returncode == 0, again.stderr
    assert data_hashes(cache, "torture-mnist") == {"test": world.reference["test"]}
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == []
