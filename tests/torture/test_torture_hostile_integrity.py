"""Hostile integrity: damaged prepared files, edited manifests, damaged downloads.

Each attack damages a real prepared entry (or a cached download) the way a bad disk, a
careless edit or a hand-made forgery would, then reads it through the real API (a
DataModule's first epoch, batches through the loader) and the real CLI (``train``,
``verify``, ``prepare``). Counted with ``figures.attack("integrity", breach)``; the
breach is "served" when damaged bytes (or a wrong number of rows) reached a batch, or
"escape" when a manifest made a reader touch a file outside its entry. After each
attack the next prepare must give data byte-identical to a clean run's.

The prepared files here are cut into 16 KiB chunks (instead of 1 MiB) so that the
600-image train file has 29 of them and a flip can land in the first, a middle, the
last, or on a boundary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torture_kit as kit
from imagenet_fixture import make_fake_imagenet, recipe_for
from torture_kit import data_hashes, error_lines

import datapipe
from datapipe import integrity
from datapipe.cache import Cache
from datapipe.cli import main
from datapipe.errors import CacheError, NotPreparedError
from datapipe.manifest import MANIFEST, manifest_digest
from datapipe.prepare import find_prepared, prepare_split
from datapipe.stages.download import FetchOptions
from datapipe.verify import CORRUPT, verify

world, figures = kit.world, kit.figures  # the suite's shared fixtures

CHUNK = 16 << 10


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(integrity, "CHUNK_BYTES", CHUNK)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def prepare(world, capsys, cache: Path) -> Path:
    """Prepare mnist (the suite's files); return the train entry's folder."""
    code, _, err = cli(capsys, "prepare", "mnist", "--source", str(world.source), "--no-verify",
                       "--quiet", "--cache-dir", str(cache))
    assert code == 0, err
    [entry] = [p.parent for p in cache.glob(f"prepared/mnist/1/*/{MANIFEST}")
               if json.loads(p.read_text())["split"] == "train"]
    return entry


def module(world, cache: Path):
    return datapipe.load("mnist", cache_dir=cache, source=world.source, verify=False,
                         val_split=0, batch_size=128, shuffle=False)


def first_epoch(world, cache: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dm = module(world, cache)
    dm.setup("fit")
    return list(dm.train_dataloader())


def differs(batches, reference) -> bool:
    """Whether what was served is not exactly the clean data (rows, pixels or labels)."""
    if len(batches) != len(reference):
        return True
    return any(not (torch.equal(x, rx) and torch.equal(y, ry))
               for (x, y), (rx, ry) in zip(batches, reference, strict=True))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The first epoch of a clean entry, to tell damaged batches from good ones."""
    cache = tmp_path_factory.mktemp("clean")
    assert main(["prepare", "mnist", "--source", str(world.source), "--no-verify", "--quiet",
                 "--cache-dir", str(cache)]) == 0
    return first_epoch(world, cache)


def assert_rebuilt(world, capsys, cache: Path, reference) -> None:
    """The next prepare rebuilds what was set aside; the data is the clean run's again."""
    code, _, err = cli(capsys, "prepare", "mnist", "--source", str(world.source),
                       "--no-verify", "--quiet", "--cache-dir", str(cache))
    assert code == 0, err
    assert data_hashes(cache, "mnist") == world.reference
    assert not differs(first_epoch(world, cache), reference)
    assert all(c.status != CORRUPT for c in verify(Cache(cache), "mnist"))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _positions(size: int) -> dict[str, int]:
    labels = size - 600 * 8 - 64  # the label column lies near the end of the body
    return {"first byte": 0, "schema": 40, "chunk boundary": 3 * CHUNK,
            "last byte of a chunk": 5 * CHUNK - 1, "middle": size // 2, "labels": labels,
            "last chunk": size - CHUNK // 3, "last byte": size - 1}


POSITIONS = list(_positions(500_000))


# ------------------------------------------------------------------ flipped bytes


@pytest.mark.parametrize("where", POSITIONS)
def test_a_flipped_byte_anywhere_is_refused_by_the_first_reader(where, world, figures,
                                                                 reference, capsys, tmp_path):
    cache = tmp_path / "cache"
    entry = prepare(world, capsys, cache)
    data = entry / "train.arrow"
    flip(data, _positions(data.stat().st_size)[where])
    served = None
    try:
        batches = first_epoch(world, cache)
        served = "served" if differs(batches, reference) else None
    except CacheError as e:
        message = str(e)
        assert "\n" not in message and entry.name in message and "is damaged" in message
        assert "`datapipe verify mnist`" in message and "set aside" in message
    else:
        figures.attack("integrity", served)
        pytest.fail(f"a flipped byte at {where} was not refused")
    figures.attack("integrity", served)
    assert (entry / (MANIFEST + ".corrupt")).exists()  # set aside: never served again
    assert find_prepared(module(world, cache).recipe, "train", Cache(cache),
                         FetchOptions(source=str(world.source), verify=False)) is None
    assert_rebuilt(world, capsys, cache, reference)


def test_a_flipped_byte_ends_cli_training_in_one_line(world, figures, reference, capsys,
                                                      tmp_path):
    cache = tmp_path / "cache"
    entry = prepare(world, capsys, cache)
    flip(entry / "train.arrow", 200_000)
    code, out, err = cli(capsys, "train", "--data", "mnist", "--model", "mlp", "--epochs", "1",
                         "--val-split", "100", "--batch-size", "100", "--root-dir",
                         str(tmp_path / "runs"), "--quiet", "--cache-dir", str(cache),
                         "--no-verify")
    figures.attack("integrity", "served" if code == 0 else None)
    assert code == 2 and "Traceback" not in err, err
    [line] = error_lines(err)
    assert "is damaged" in line and "datapipe verify mnist" in line
    assert_rebuilt(world, capsys, cache, reference)


@pytest.mark.parametrize("damage", ["truncated", "extended", "replaced by a symlink"])
def test_a_file_of_another_size_is_never_mapped(damage, world, figures, reference, capsys,
                                                tmp_path):
    cache = tmp_path / "cache"
    entry = prepare(world, capsys, cache)
    data = entry / "train.arrow"
    if damage == "truncated":
        os.truncate(data, data.stat().st_size - 100)
    elif damage == "extended":
        with open(data, "ab") as f:
            f.write(b"\0" * 7)
    else:
        outside = tmp_path / "elsewhere.arrow"
        outside.write_bytes(data.read_bytes())
        data.unlink()
        data.symlink_to(outside)
    breach = None
    try:
        batches = first_epoch(world, cache)
        breach = "served" if differs(batches, reference) else "escape"
    except NotPreparedError:
        pass
    figures.attack("integrity", breach)
    assert breach is None
    code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
    assert code == 2 and any(entry.name in ln for ln in out.splitlines()
                             if ln.startswith(CORRUPT)), out
    assert_rebuilt(world, capsys, cache, reference)


# ------------------------------------------------------------------ edited manifests


def _edit(entry: Path, change, redigest: bool = False) -> None:
    path = entry / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    if redigest:  # a forger who knows the rule: the content check must catch it
        manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


EDITS = {
    "rows 5": (lambda m: m.update(rows=5), False),
    "rows + 1": (lambda m: m.update(rows=m["rows"] + 1), False),
    "rows 5, digest recomputed": (lambda m: m.update(rows=5), True),
    "rows + 1, digest recomputed": (lambda m: m.update(rows=m["rows"] + 1), True),
    "data_file outside the entry": (lambda m: m.update(data_file="../../../../outside.arrow"),
                                    True),
    "data_file an absolute path": (lambda m: m.update(data_file="/etc/passwd"), True),
    "data_file of the test entry": (lambda m: m.update(data_file="test.arrow"), True),
    "digest removed": (lambda m: m.pop("digest"), False),
    "digest forged, content unchanged": (lambda m: m.update(digest="0" * 64), False),
    "chunk digest forged": (lambda m: m["files"]["train.arrow"]["chunks"].__setitem__(
        2, "0" * 16), True),
    "chunk digests removed": (lambda m: m["files"]["train.arrow"].pop("chunks"), True),
    "source algorithm a path": (lambda m: m["sources"][0].update(algorithm="../../etc"), True),
    "older format, no digests": (lambda m: m.update(format="datapipe.prepared/1"), False),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_never_served(edit, world, figures, reference, capsys, tmp_path):
    cache = tmp_path / "cache"
    entry = prepare(world, capsys, cache)
    (tmp_path / "outside.arrow").write_bytes((entry / "train.arrow").read_bytes()[:1000])
    change, redigest = EDITS[edit]
    _edit(entry, change, redigest)
    breach = None
    try:
        batches = first_epoch(world, cache)
        breach = "served" if differs(batches, reference) else None
        if breach is None:
            pytest.fail(f"{edit}: the edited manifest was trusted")
    except (NotPreparedError, CacheError) as e:  # not trusted, or refused on first read
        assert "\n" not in str(e)
    finally:
        figures.attack("integrity", breach)
    set_aside = (entry / (MANIFEST + ".corrupt")).exists()  # by the reader that found it
    code, out, err = cli(capsys, "verify", "mnist", "--cache-dir", str(cache))
    lines = [ln for ln in out.splitlines() if entry.name in ln]
    assert lines and not lines[0].startswith("OK"), out
    if not set_aside and edit != "older format, no digests":  # an old entry is only unused
        assert code == 2 and lines[0].startswith(CORRUPT) and len(error_lines(err)) == 1, err
    assert_rebuilt(world, capsys, cache, reference)


# ------------------------------------------------------------------ downloads


def test_a_damaged_download_is_never_made_into_an_entry(world, figures, reference, capsys,
                                                        tmp_path):
    """A flipped byte in a cached download: the next prepare that reads it fetches it anew."""
    from loopback import MirrorServer

    cache = tmp_path / "cache"
    with MirrorServer(world.files) as mirror:
        argv = ["--recipes", str(world.recipes), "prepare", kit.RECIPE, "--cache-dir",
                str(cache), "--quiet", "--mirror", mirror.url]
        assert cli(capsys, *argv)[0] == 0
        name = kit.TRAIN[0]
        download = cache / "downloads" / world.download_key(name) / name
        flip(download, download.stat().st_size // 2)
        assert cli(capsys, *argv, "--force")[0] == 0  # reads the download again
        assert mirror.requests[name] == 2  # found damaged, fetched again
    hashes = data_hashes(cache, kit.RECIPE)
    figures.attack("integrity", None if hashes == world.reference else "served")
    assert hashes == world.reference
    # And verify finds a damaged download too (and removes it).
    flip(download, 100)
    code, out, _ = cli(capsys, "--recipes", str(world.recipes), "verify", kit.RECIPE,
                       "--cache-dir", str(cache))
    figures.attack("integrity", None if code == 2 else "served")
    assert code == 2 and any(name in ln for ln in out.splitlines() if ln.startswith(CORRUPT))
    assert not download.exists()


# ------------------------------------------------------------------ JPEG shards


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    pytest.importorskip("scipy")
    fake = make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"))
    return fake, recipe_for(fake.folder, val_shard_size=4)


def _jpeg_epoch(cache: Path, fake, recipe) -> list:
    """Batches of 4 of the prepared val split, decoded as the loader's workers decode them."""
    from datapipe.stages.jpeg import JpegTransform

    prepared = find_prepared(recipe, "val", Cache(cache), FetchOptions(source=str(fake.folder)))
    if prepared is None:
        raise NotPreparedError("val is not prepared")
    dataset = recipe.load.dataset({"val": prepared}, [("val", np.arange(prepared.rows))],
                                  train=False, transform=JpegTransform(image_size=16))
    return [dataset.__getitems__(list(range(i, min(i + 4, len(dataset)))))
            for i in range(0, len(dataset), 4)]


@pytest.mark.parametrize("where", ["a JPEG", "the labels", "the Arrow header"])
def test_a_flipped_byte_in_a_jpeg_shard_is_refused(where, imagenet, world, figures, capsys,
                                                   tmp_path):
    fake, recipe = imagenet
    cache = tmp_path / "cache"
    prepared, _ = prepare_split(recipe, "val", Cache(cache), FetchOptions(source=str(
        fake.folder)), processes=1)
    clean = _jpeg_epoch(cache, fake, recipe)
    shard = prepared.data_files[1]
    size = shard.stat().st_size
    flip(shard, {"a JPEG": size // 2, "the labels": size - 40, "the Arrow header": 60}[where])
    breach = None
    try:
        batches = _jpeg_epoch(cache, fake, recipe)
        if differs(batches, clean):
            breach = "served"
        pytest.fail(f"a flipped byte in {where} of a shard was not refused")
    except CacheError as e:
        assert "is damaged" in str(e) and "datapipe verify imagenet" in str(e)
        assert shard.name in str(e)
    finally:
        figures.attack("integrity", breach)
    assert (prepared.path / (MANIFEST + ".corrupt")).exists()
    prepared_again, worked = prepare_split(recipe, "val", Cache(cache), FetchOptions(
        source=str(fake.folder)), processes=1)
    assert worked
    assert not differs(_jpeg_epoch(cache, fake, recipe), clean)
