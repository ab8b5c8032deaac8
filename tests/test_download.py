"""The download stage against loopback mirrors: order, faults, resume, caching, --source."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import multiprocessing
import random
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from loopback import MirrorServer, corrupt, refused_url

from datapipe import source_digests, transport
from datapipe.cache import Cache
from datapipe.errors import ChecksumError, ConfigError, DownloadError
from datapipe.stages import download as dl
from datapipe.stages.download import SUGGESTION, Download, FetchOptions, Resource

NAME = "train-images-idx3-ubyte.gz"
DATA = gzip.compress(random.Random(0).randbytes(200_000), mtime=0)
SHA256 = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()
RESOURCE = Resource(NAME, md5=MD5, sha256=SHA256, size=len(DATA))
KEY = f"sha256-{SHA256}"


@pytest.fixture(autouse=True)
def _no_env_mirrors(monkeypatch):
    monkeypatch.delenv(dl.MIRRORS_ENV, raising=False)


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


def options(*mirrors: str, **kwargs) -> FetchOptions:
    kwargs.setdefault("quiet", True)
    kwargs.setdefault("timeout", 5.0)
    return FetchOptions(mirrors=mirrors, **kwargs)


def fetch_one(stage: Download, cache: Cache, opts: FetchOptions):
    return stage.fetch([NAME], cache, opts)[NAME]


def stored_names(cache: Cache) -> list[str]:
    """Every file under downloads/, relative, sorted."""
    root = cache.downloads
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ happy path


def test_fetch_verifies_and_stores_under_checksum_folder_with_sidecar(cache):
    with MirrorServer({NAME: DATA}, prefix="mnist") as mirror:
        got = fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())

    final = cache.downloads / KEY / NAME
    assert got.path == final
    assert final.read_bytes() == DATA
    assert (got.algorithm, got.checksum, got.expected, got.verified) == (
        "sha256", SHA256, SHA256, True)
    assert got.origin == mirror.url + NAME
    sidecar = json.loads((cache.downloads / KEY / f"{NAME}.json").read_text())
    assert {k: v for k, v in sidecar.items() if k != "fetched_at"} == {
        "filename": NAME, "algorithm": "sha256", "checksum": SHA256, "expected": SHA256,
        "verified": True, "origin": mirror.url + NAME, "size": len(DATA)}
    assert stored_names(cache) == [f"{KEY}/{NAME}", f"{KEY}/{NAME}.json"]
    assert mirror.requests == {NAME: 1}


def test_second_fetch_makes_no_request(cache):
    with MirrorServer({NAME: DATA}) as mirror:
        stage = Download((RESOURCE,), mirrors=(mirror.url,))
        first = fetch_one(stage, cache, options())
        again = fetch_one(Download((RESOURCE,), mirrors=(refused_url(),)), cache, options())
        third = fetch_one(stage, cache, options())
    assert again == first == third
    assert sum(mirror.requests.values()) == 1


def test_cached_never_touches_the_network_and_needs_the_sidecar(cache):
    with MirrorServer({NAME: DATA}) as mirror:
        stage = Download((RESOURCE,), mirrors=(mirror.url,))
        assert stage.cached(NAME, cache) is None
        got = fetch_one(stage, cache, options())
        assert stage.cached(NAME, cache) == got
        (cache.downloads / KEY / f"{NAME}.json").unlink()
        assert stage.cached(NAME, cache) is None
        assert fetch_one(stage, cache, options()) == got
    assert mirror.requests == {NAME: 2}


def test_md5_only_resource_uses_md5_folder(cache):
    resource = Resource(NAME, md5=MD5.upper())
    with MirrorServer({NAME: DATA}) as mirror:
        got = fetch_one(Download((resource,), mirrors=(mirror.url,)), cache, options())
    assert resource.checksum == ("md5", MD5)
    assert got.path == cache.downloads / f"md5-{MD5}" / NAME
    assert (got.algorithm, got.checksum, got.verified) == ("md5", MD5, True)


# ------------------------------------------------------------------ mirror order


def test_user_mirror_is_tried_before_env_and_recipe_mirrors(cache, monkeypatch):
    with MirrorServer({NAME: DATA}) as user, MirrorServer({NAME: DATA}) as env, \
            MirrorServer({NAME: DATA}) as recipe:
        monkeypatch.setenv(dl.MIRRORS_ENV, f"{env.url}  {refused_url()}")
        stage = Download((RESOURCE,), mirrors=(recipe.url,))
        got = fetch_one(stage, cache, options(user.url))
    assert got.origin == user.url + NAME
    assert (user.requests[NAME], env.requests[NAME], recipe.requests[NAME]) == (1, 0, 0)


def test_env_mirrors_are_tried_before_the_recipe_mirrors(cache, monkeypatch):
    with MirrorServer({NAME: DATA}, mode="http404") as first, \
            MirrorServer({NAME: DATA}) as second, MirrorServer({NAME: DATA}) as recipe:
        monkeypatch.setenv(dl.MIRRORS_ENV, f"{first.url} {second.url.rstrip('/')}")
        got = fetch_one(Download((RESOURCE,), mirrors=(recipe.url,)), cache, options())
    assert got.origin == second.url + NAME
    assert (first.requests[NAME], second.requests[NAME], recipe.requests[NAME]) == (1, 1, 0)


def test_urls_lists_mirrors_in_order_without_duplicates(monkeypatch):
    monkeypatch.setenv(dl.MIRRORS_ENV, "http://env.example/a http://recipe.example/")
    stage = Download((Resource("x y.bin"),), mirrors=("http://recipe.example",))
    assert stage.urls("x y.bin", options("http://user.example/m/")) == [
        "http://user.example/m/x%20y.bin",
        "http://env.example/a/x%20y.bin",
        "http://recipe.example/x%20y.bin",
    ]


# ------------------------------------------------------------------ failures fall through


@pytest.mark.parametrize("mode", ["http500", "http404", "http503", "html", "truncated",
                                  "wrong-bytes", "drop"])
def test_failing_mirror_falls_through_to_a_good_one(cache, mode, caplog):
    caplog.set_level(logging.INFO, logger="datapipe")
    with MirrorServer({NAME: DATA}, mode=mode) as bad, MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(bad.url, good.url)), cache, options())
    assert got.path.read_bytes() == DATA
    assert (got.verified, got.origin) == (True, good.url + NAME)
    assert (bad.requests[NAME], good.requests[NAME]) == (1, 1)
    assert stored_names(cache) == [f"{KEY}/{NAME}", f"{KEY}/{NAME}.json"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and bad.url + NAME in warned[0] and "failed" in warned[0]
    assert any(f"fetched {NAME} from {good.url}" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)


@pytest.mark.parametrize("mode", ["truncated", "drop"])
def test_next_mirror_continues_an_interrupted_transfer(cache, mode):
    with MirrorServer({NAME: DATA}, mode=mode) as bad, MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(bad.url, good.url)), cache, options())
    assert got.path.read_bytes() == DATA
    assert good.range_requests == 1
    start = int(good.range_headers[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(DATA) // 2


def test_refused_connection_falls_through(cache):
    refused = refused_url()
    with MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(refused, good.url)), cache, options())
    assert (got.verified, got.origin) == (True, good.url + NAME)


def test_timeout_falls_through(cache):
    with MirrorServer({NAME: DATA}, mode="slow", delay=3.0) as slow, \
            MirrorServer({NAME: DATA}) as good:
        stage = Download((RESOURCE,), mirrors=(slow.url, good.url))
        got = fetch_one(stage, cache, options(timeout=0.5))
    assert got.origin == good.url + NAME


def test_all_mirrors_failing_raise_one_line_error_naming_each(cache, caplog):
    caplog.set_level(logging.INFO, logger="datapipe")
    refused = refused_url()
    with MirrorServer({NAME: DATA}, mode="http500") as m500, \
            MirrorServer({NAME: DATA}, mode="http404") as m404, \
            MirrorServer({NAME: DATA}, mode="html") as html, \
            MirrorServer({NAME: DATA}, mode="wrong-bytes") as wrong, \
            MirrorServer({NAME: DATA[:1000]}) as short:
        urls = [refused, m500.url, m404.url, html.url, wrong.url, short.url]
        with pytest.raises(DownloadError) as info:
            fetch_one(Download((RESOURCE,), mirrors=tuple(urls)), cache, options())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {NAME}: ")
    assert message.endswith(SUGGESTION)
    parts = message.split("; ")
    assert [p.split(" (")[0].split(": ")[-1] for p in parts[:-1]] == [u + NAME for u in urls]
    reasons = ["connection refused", "HTTP 500", "HTTP 404", "HTML page",
               "does not match the expected", "announces 1000 bytes, the recipe expects"]
    for part, reason in zip(parts[:-1], reasons, strict=True):
        assert reason in part
    assert stored_names(cache) == []
    # Progress is logged at info; the error alone carries the failures, not warnings too.
    assert [r.levelno for r in caplog.records if NAME in r.getMessage()] == [logging.INFO] * 6


def test_status_and_html_modes_answer_for_files_the_mirror_lacks():
    with MirrorServer({}, mode="http500") as broken, MirrorServer({"a": b"1"}) as plain:
        for url, status in [(broken.url + "x.bin", 500), (plain.url + "x.bin", 404)]:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url, timeout=5)
            info.value.close()
            assert info.value.code == status
        assert urllib.request.urlopen(plain.url + "a", timeout=5).read() == b"1"
    assert broken.requests == {"x.bin": 1} and plain.requests == {"x.bin": 1, "a": 1}


def test_no_mirror_at_all_says_how_to_add_one(cache):
    with pytest.raises(DownloadError, match="no mirror is known for .*--mirror URL"):
        fetch_one(Download((RESOURCE,)), cache, options())


# ------------------------------------------------------------------ partial files


def partial_path(cache: Cache) -> Path:
    path = cache.downloads / KEY / f"{NAME}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_existing_partial_is_resumed_with_a_range_request(cache):
    partial_path(cache).write_bytes(DATA[:70_000])
    with MirrorServer({NAME: DATA}) as mirror:
        got = fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())
    assert mirror.range_headers == ["bytes=70000-"]
    assert mirror.requests == {NAME: 1}
    assert got.path.read_bytes() == DATA and got.verified
    assert not partial_path(cache).exists()


def test_resumed_file_that_does_not_match_is_downloaded_again_from_scratch(cache):
    partial_path(cache).write_bytes(corrupt(DATA[:70_000]))
    with MirrorServer({NAME: DATA}) as mirror:
        got = fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())
    assert (mirror.requests[NAME], mirror.range_requests) == (2, 1)
    assert got.path.read_bytes() == DATA and got.verified


def test_server_without_ranges_starts_over(cache):
    partial_path(cache).write_bytes(b"junk" * 1000)
    with MirrorServer({NAME: DATA}, ranges=False) as mirror:
        got = fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())
    assert mirror.requests == {NAME: 1}
    assert got.path.read_bytes() == DATA and got.verified


def test_partial_as_long_as_the_file_is_replaced_without_a_range_request(cache):
    partial_path(cache).write_bytes(corrupt(DATA))
    with MirrorServer({NAME: DATA}) as mirror:
        got = fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())
    assert (mirror.requests[NAME], mirror.range_requests) == (1, 0)
    assert got.path.read_bytes() == DATA


def test_nothing_is_left_when_every_mirror_sends_wrong_bytes(cache):
    with MirrorServer({NAME: DATA}, mode="wrong-bytes") as a, \
            MirrorServer({NAME: DATA}, mode="wrong-bytes") as b:
        with pytest.raises(DownloadError, match="does not match"):
            fetch_one(Download((RESOURCE,), mirrors=(a.url, b.url)), cache, options())
    assert stored_names(cache) == []


# ------------------------------------------------------------------ --no-verify


def test_no_verify_accepts_mismatch_with_a_warning_and_keeps_it_apart(cache):
    actual = hashlib.sha256(corrupt(DATA)).hexdigest()
    with MirrorServer({NAME: DATA}, mode="wrong-bytes") as mirror:
        stage = Download((RESOURCE,), mirrors=(mirror.url,))
        with pytest.warns(UserWarning) as record:
            got = fetch_one(stage, cache, options(verify=False))
        message = str(record[0].message)
        assert NAME in message and SHA256 in message and actual in message
        assert got.path == cache.downloads / f"{KEY}.unverified" / NAME
        assert (got.checksum, got.expected, got.verified) == (actual, SHA256, False)
        assert got.path.read_bytes() == corrupt(DATA)
        assert stage.cached(NAME, cache, verify=True) is None
        assert stage.cached(NAME, cache, verify=False) == got
        assert fetch_one(stage, cache, options(verify=False)) == got  # no request
        assert mirror.requests == {NAME: 1}
        with pytest.raises(DownloadError, match="does not match"):
            fetch_one(stage, cache, options())  # verifying, the kept copy does not count
    assert not (cache.downloads / KEY / NAME).exists()


def test_verified_copy_is_preferred_without_verify(cache):
    with MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(good.url,)), cache, options())
    stage = Download((RESOURCE,), mirrors=(refused_url(),))
    assert stage.cached(NAME, cache, verify=False) == got
    assert fetch_one(stage, cache, options(verify=False)) == got


def test_html_is_rejected_even_without_verify(cache):
    with MirrorServer({NAME: DATA}, mode="html") as html:
        with pytest.raises(DownloadError, match="HTML page"):
            fetch_one(Download((RESOURCE,), mirrors=(html.url,)), cache, options(verify=False))
    assert stored_names(cache) == []


def test_non_gzip_bytes_for_a_gz_name_are_rejected_without_verify(cache):
    with MirrorServer({NAME: b"plain text, not gzip" * 10}) as mirror:
        resource = Resource(NAME, sha256=SHA256)
        with pytest.raises(DownloadError, match="not gzip data"):
            fetch_one(Download((resource,), mirrors=(mirror.url,)), cache, options(verify=False))


@pytest.mark.parametrize(("head", "name", "content_type", "problem"), [
    (b"\x1f\x8b\x08\x00", "a.gz", "application/octet-stream", None),
    (b"\x1f\x8b\x08\x00", "a.tgz", None, None),
    (b"\n  <!DOCTYPE HTML>\n<html>", "a.bin", None, "HTML page"),
    (b"\xef\xbb\xbf<html lang=en>", "a.bin", None, "HTML page"),
    (b"\x00\x00\x08\x03", "a.bin", "text/html; charset=utf-8", "Content-Type text/html"),
    (b"<!doctype html>", "a.gz", None, "HTML page"),
    (b"PK\x03\x04", "a.gz", None, "not gzip data (starts with 0x504b0304)"),
    (b"<!doctype html>", "page.html", "text/html", None),
    (b"<htm", "a.bin", None, None),
    (b"", "a.gz", None, "not gzip data"),
])
def test_sniff_problem(head, name, content_type, problem):
    found = transport.sniff_problem(head, name, content_type)
    if problem is None:
        assert found is None
    else:
        assert problem in found


# ------------------------------------------------------------------ resources without checksum


def test_unchecked_resource_is_accepted_with_its_sha256_and_no_warning(cache):
    data = b"id,label\n1,cat\n"
    resource = Resource("labels.csv")
    with MirrorServer({"labels.csv": data}) as mirror:
        stage = Download((resource,), mirrors=(mirror.url,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = stage.fetch("labels.csv", cache, options())["labels.csv"]
            assert stage.fetch(None, cache, options())["labels.csv"] == got
    folder = stage.folder_key(resource)
    assert folder.startswith("unchecked-") and len(folder) == len("unchecked-") + 16
    assert got.path == cache.downloads / folder / "labels.csv"
    assert (got.algorithm, got.checksum) == ("sha256", hashlib.sha256(data).hexdigest())
    assert (got.expected, got.verified) == (None, False)
    assert stage.cached("labels.csv", cache, verify=True) == got
    assert mirror.requests == {"labels.csv": 1}
    other_recipe = Download((resource,), mirrors=("http://elsewhere.example/",))
    assert other_recipe.folder_key(resource) != folder


# ------------------------------------------------------------------ file: mirrors and --source


def test_file_url_and_plain_folder_mirrors(tmp_path, cache):
    folder = tmp_path / "mirror dir"
    folder.mkdir()
    (folder / NAME).write_bytes(DATA)
    got = fetch_one(Download((RESOURCE,), mirrors=(folder.as_uri(),)), cache, options())
    assert got.origin == folder.as_uri() + "/" + NAME
    assert got.verified and got.path == cache.downloads / KEY / NAME
    other = Cache(tmp_path / "other")
    got = fetch_one(Download((RESOURCE,)), other, options(str(folder)))
    assert got.verified and got.path.read_bytes() == DATA


def test_source_files_are_used_in_place_without_network(tmp_path, cache):
    (tmp_path / NAME).write_bytes(DATA)
    stage = Download((RESOURCE,), mirrors=(refused_url(),))
    got = fetch_one(stage, cache, options(source=str(tmp_path)))
    assert got.path == tmp_path / NAME
    assert (got.checksum, got.verified, got.origin) == (SHA256, True, str(tmp_path / NAME))
    assert not (cache.downloads / KEY).exists()


def test_source_checksum_mismatch_raises_checksum_error(tmp_path, cache):
    (tmp_path / NAME).write_bytes(corrupt(DATA))
    actual = hashlib.sha256(corrupt(DATA)).hexdigest()
    with pytest.raises(ChecksumError) as info:
        fetch_one(Download((RESOURCE,)), cache, options(source=str(tmp_path)))
    message = str(info.value)
    assert NAME in message and SHA256 in message and actual in message
    assert "--no-verify" in message and "\n" not in message


def test_source_mismatch_without_verify_warns_and_is_used(tmp_path, cache):
    (tmp_path / NAME).write_bytes(corrupt(DATA))
    with pytest.warns(UserWarning, match=SHA256):
        got = fetch_one(Download((RESOURCE,)), cache, options(source=str(tmp_path), verify=False))
    assert (got.path, got.verified) == (tmp_path / NAME, False)


def test_source_html_page_is_rejected_even_without_verify(tmp_path, cache):
    (tmp_path / NAME).write_bytes(b"<!DOCTYPE html><html>sign in</html>")
    with pytest.raises(DownloadError, match="HTML page"):
        fetch_one(Download((RESOURCE,)), cache, options(source=str(tmp_path), verify=False))


def test_source_missing_files_are_all_listed(tmp_path, cache):
    stage = Download((RESOURCE, Resource("b.bin"), Resource("c.bin")))
    (tmp_path / "b.bin").write_bytes(b"b")
    with pytest.raises(DownloadError) as info:
        stage.fetch(None, cache, options(source=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path) in message and NAME in message and "c.bin" in message
    assert "b.bin" not in message.split("lacks", 1)[1]
    assert not isinstance(info.value, ChecksumError)


def test_source_digest_is_memoized_until_the_file_changes(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(source_digests, "RACY_SECONDS", -1.0)
    hashed = []
    real = source_digests.file_digest
    monkeypatch.setattr(source_digests, "file_digest", lambda p, a: hashed.append(p) or real(p, a))
    (tmp_path / NAME).write_bytes(DATA)
    stage, opts = Download((RESOURCE,)), options(source=str(tmp_path))
    assert fetch_one(stage, cache, opts).verified
    assert fetch_one(stage, cache, opts).verified
    assert len(hashed) == 1
    (tmp_path / NAME).write_bytes(corrupt(DATA))  # same size
    with pytest.raises(ChecksumError):
        fetch_one(stage, cache, opts)
    assert len(hashed) == 2


# ------------------------------------------------------------------ progress, config


def test_progress_bar_only_when_asked_or_on_a_terminal(cache, capsys):
    with MirrorServer({NAME: DATA}) as mirror:
        stage = Download((RESOURCE,), mirrors=(mirror.url,))
        fetch_one(stage, cache, options(quiet=None))  # stderr is not a terminal here
        assert capsys.readouterr().err == ""
        fetch_one(stage, Cache(cache.root / "2"), options(quiet=False))
        assert NAME in capsys.readouterr().err
        fetch_one(stage, Cache(cache.root / "3"), options(quiet=True))
        assert capsys.readouterr().err == ""


def test_config_is_json_and_round_trips():
    stage = Download([RESOURCE, {"filename": "b.bin", "size": 3}], mirrors="http://m.example/")
    config = json.loads(json.dumps(stage.config()))
    assert config["stage"] == "download"
    assert config["mirrors"] == ["http://m.example/"]
    assert config["resources"][0] == {"type": "Resource", "filename": NAME, "md5": MD5,
                                      "sha256": SHA256, "size": len(DATA), "forms": []}
    assert Download.from_config(config) == stage
    assert hash(stage) == hash(Download.from_config(config))


def test_config_with_forms_and_source_folders_round_trips():
    from datapipe.stages.source_layout import Decompressed, Extracted

    stage = Download([Resource("a.gz", md5=MD5, forms=[Decompressed("a", md5=MD5, size=3)]),
                      Resource("b.tar.gz", forms=[Extracted("b", {"x": MD5, "y": None})])],
                     source_folders=["raw", "A/raw"])
    config = json.loads(json.dumps(stage.config()))
    assert config["source_folders"] == ["raw", "A/raw"]
    assert config["resources"][1]["forms"] == [
        {"type": "Extracted", "folder": "b", "files": [["x", MD5], ["y", None]]}]
    assert Download.from_config(config) == stage
    assert hash(stage) == hash(Download.from_config(config))
    for bad in ({"source_folders": ["../up"]}, {"source_folders": ["/abs"]}):
        with pytest.raises(ConfigError):
            Download([RESOURCE], **bad)
    with pytest.raises(ConfigError, match="plain file name"):
        Resource("a.gz", forms=[Decompressed("../a")])


@pytest.mark.parametrize("kwargs", [
    {"filename": "../etc/passwd"}, {"filename": "a/b"}, {"filename": ""},
    {"filename": "a", "sha256": "abc"}, {"filename": "a", "md5": "z" * 32},
    {"filename": "a", "size": -1},
])
def test_bad_resources_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Resource(**kwargs)


def test_unknown_file_and_duplicates_are_config_errors(cache):
    stage = Download((RESOURCE,))
    with pytest.raises(ConfigError, match="nope.bin.*" + NAME):
        stage.fetch(["nope.bin"], cache, options())
    with pytest.raises(ConfigError, match="declared twice"):
        Download((RESOURCE, Resource(NAME)))


# ------------------------------------------------------------------ many processes


def _fetch_in_child(cache_root: str, url: str, barrier, results) -> None:
    try:
        stage = Download((RESOURCE,), mirrors=(url,))
        barrier.wait(timeout=60)
        got = fetch_one(stage, Cache(Path(cache_root)), options(timeout=30))
        results.put((str(got.path), got.checksum, got.verified))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(("error", repr(e), False))


@pytest.mark.slow  # separate processes
def test_concurrent_processes_download_once(cache):
    n = 8
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    with MirrorServer({NAME: DATA}, mode="slow", delay=1.0) as mirror:
        procs = [ctx.Process(target=_fetch_in_child, args=(str(cache.root), mirror.url,
                                                           barrier, results))
                 for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    assert got == [(str(cache.downloads / KEY / NAME), SHA256, True)] * n
    assert mirror.requests == {NAME: 1}
    assert (cache.downloads / KEY / NAME).read_bytes() == DATA


def test_interrupted_download_is_kept_and_resumed_by_the_next_run(cache):
    with MirrorServer({NAME: DATA}, mode="drop") as dropping:
        with pytest.raises(DownloadError, match="truncated|reset"):
            fetch_one(Download((RESOURCE,), mirrors=(dropping.url,)), cache, options())
    kept = partial_path(cache).stat().st_size
    assert 0 < kept < len(DATA)
    assert not (cache.downloads / KEY / NAME).exists()
    with MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(good.url,)), cache, options())
    assert good.range_headers == [f"bytes={kept}-"]
    assert got.path.read_bytes() == DATA


def test_unsatisfiable_range_starts_over(cache):
    resource = Resource(NAME, sha256=SHA256)  # no size: a too long .partial goes unnoticed
    partial_path(cache).write_bytes(DATA + b"extra")
    with MirrorServer({NAME: DATA}) as mirror:
        got = fetch_one(Download((resource,), mirrors=(mirror.url,)), cache, options())
    assert (mirror.requests[NAME], mirror.range_requests) == (2, 1)
    assert got.path.read_bytes() == DATA


def test_without_verify_a_partial_is_not_carried_to_another_mirror(cache):
    with MirrorServer({NAME: DATA}, mode="truncated") as bad, \
            MirrorServer({NAME: DATA}) as good:
        stage = Download((RESOURCE,), mirrors=(bad.url, good.url))
        got = fetch_one(stage, cache, options(verify=False))
    assert good.range_requests == 0
    assert got.verified and got.path.read_bytes() == DATA


def test_without_verify_another_size_is_kept_with_a_warning(cache):
    short = DATA[:5000]
    with MirrorServer({NAME: short}) as mirror:
        stage = Download((RESOURCE,), mirrors=(mirror.url,))
        with pytest.warns(UserWarning, match=SHA256):
            got = fetch_one(stage, cache, options(verify=False))
        assert got.path.read_bytes() == short and not got.verified
        with pytest.raises(DownloadError, match="announces 5000 bytes"):
            fetch_one(stage, cache, options())


def test_unchecked_resource_of_another_size_is_refused_unless_no_verify(cache):
    resource = Resource("labels.csv", size=100)
    with MirrorServer({"labels.csv": b"x" * 40}) as mirror:
        stage = Download((resource,), mirrors=(mirror.url,))
        with pytest.raises(DownloadError, match="announces 40 bytes, the recipe expects 100"):
            stage.fetch(None, cache, options())
        with pytest.warns(UserWarning, match="has 40 bytes but the recipe expects 100"):
            got = stage.fetch(None, cache, options(verify=False))["labels.csv"]
        assert stage.cached("labels.csv", cache, verify=False) == got
        assert stage.cached("labels.csv", cache, verify=True) is None


# ------------------------------------------------------------------ hostile mirrors


def test_a_trickling_mirror_is_abandoned_within_the_window_for_the_next(cache):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "torture"))
    from torture_kit import TortureMirror

    opts = options(min_rate=1000.0, rate_window=1.0)
    with TortureMirror({NAME: DATA}, piece=1, pause=0.5) as slow, \
            MirrorServer({NAME: DATA}) as good:
        got = fetch_one(Download((RESOURCE,), mirrors=(slow.url, good.url)), cache, opts)
    assert got.verified and got.path.read_bytes() == DATA
    assert good.requests[NAME] == 1


def test_all_mirrors_too_slow_names_the_reason(cache):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "torture"))
    from torture_kit import TortureMirror

    opts = options(min_rate=1000.0, rate_window=1.0)
    with TortureMirror({NAME: DATA}, piece=1, pause=0.5) as slow, \
            pytest.raises(DownloadError, match=r"too slow: \d+ bytes in \d+ s, under 1000 "
                                               r"bytes/s \(\$DATAPIPE_MIN_RATE"):
        fetch_one(Download((RESOURCE,), mirrors=(slow.url,)), cache, opts)


def test_a_transfer_past_its_deadline_is_abandoned():
    pace = transport.Pace(options(min_rate=100.0, rate_window=1000.0).limits, expected=100)
    pace.started -= 1002  # the deadline: one window plus 100 bytes at 100 bytes/s
    with pytest.raises(transport.MirrorFailed, match="not done after 1002 s, the deadline"):
        pace.check(50)


def test_without_verify_the_declared_size_still_caps_the_body(cache):
    bloated = DATA + b"\0" * 4096
    with MirrorServer({NAME: bloated}) as big, \
            pytest.raises(DownloadError, match=f"announces {len(bloated)} bytes, more than "
                                               f"the {len(DATA)} bytes the recipe declares"):
        fetch_one(Download((RESOURCE,), mirrors=(big.url,)), cache, options(verify=False))


def test_an_undeclared_size_is_capped_by_the_setting(cache, monkeypatch):
    resource = Resource(NAME)  # no checksum, no size
    monkeypatch.setenv("DATAPIPE_MAX_DOWNLOAD", "100")
    with MirrorServer({NAME: DATA}) as mirror, \
            pytest.raises(DownloadError, match=r"more than the 100 bytes taken for a file of "
                                               r"undeclared size \(\$DATAPIPE_MAX_DOWNLOAD\)"):
        fetch_one(Download((resource,), mirrors=(mirror.url,)), cache, options())


@pytest.mark.parametrize("name", ["DATAPIPE_MIN_RATE", "DATAPIPE_RATE_WINDOW",
                                  "DATAPIPE_MAX_DOWNLOAD"])
@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "fast"])
def test_bad_rate_and_cap_settings_are_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"\${name}='{value}' is not a positive number"):
        FetchOptions()


@pytest.mark.parametrize("field, value", [("algorithm", "../../etc"), ("checksum", "../x"),
                                          ("filename", "/etc/passwd"), ("checksum", 7)])
def test_a_sidecar_with_a_bad_value_is_not_trusted(cache, field, value):
    stage = Download((RESOURCE,), mirrors=())
    with MirrorServer({NAME: DATA}) as mirror:
        fetch_one(Download((RESOURCE,), mirrors=(mirror.url,)), cache, options())
    sidecar = cache.downloads / KEY / f"{NAME}.json"
    meta = json.loads(sidecar.read_text())
    meta[field] = value
    sidecar.write_text(json.dumps(meta))
    assert stage.cached(NAME, cache) is None
    assert stage.cached(NAME, cache, verify=False) is None
