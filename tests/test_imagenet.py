"""ImageNet: a format-exact miniature of the ILSVRC2012 archives, prepared in shards, decoded."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from imagenet_fixture import DEVKIT, TRAIN, make_fake_imagenet, recipe_for  # noqa: E402
from PIL import Image  # noqa: E402

import datapipe  # noqa: E402
from datapipe.cache import Cache  # noqa: E402
from datapipe.cli import main  # noqa: E402
from datapipe.datamodules.imagenet import RECIPE, ImageNetDataModule  # noqa: E402
from datapipe.decode import (  # noqa: E402
    EncodedBatch,
    decode_center,
    decode_crop,
    random_resized_crop_boxes,
)
from datapipe.errors import (  # noqa: E402
    CacheError,
    ChecksumError,
    ConfigError,
    DownloadError,
    FormatError,
    NotPreparedError,
)
from datapipe.formats.imagenet import read_devkit  # noqa: E402
from datapipe.formats.jpeg_shards import ShardReader, shard_paths  # noqa: E402
from datapipe.prepare import find_prepared, prepare_shards, prepare_split, work_dir  # noqa: E402
from datapipe.splits import carve_per_class  # noqa: E402
from datapipe.stages.download import FetchOptions  # noqa: E402
from datapipe.stages.jpeg import ImageNetClean  # noqa: E402

TESTS = Path(__file__).resolve().parent
VOLATILE = ("created_at", "seconds", "digest")  # what differs between two prepares of the same data


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"))


@pytest.fixture(scope="module")
def recipe(fake):
    return recipe_for(fake.folder, val_shard_size=4)


@pytest.fixture(scope="module")
def prepared(fake, recipe, tmp_path_factory):
    """Both splits prepared once, by a pool of two processes: {split: PreparedSplit}."""
    cache = Cache.at(tmp_path_factory.mktemp("prepared"))
    options = FetchOptions(source=str(fake.folder))
    return {split: prepare_split(recipe, split, cache, options, processes=2)[0]
            for split in ("train", "val")}


def rows_of(prepared_split) -> dict[str, tuple]:
    """name -> (label, height, width, jpeg bytes) of every row of a prepared split."""
    import pyarrow as pa

    out = {}
    for path in shard_paths(prepared_split):
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all().to_pydict()
        for i, name in enumerate(table["name"]):
            out[name] = (table["label"][i], table["height"][i], table["width"][i],
                         table["image"][i])
    return out


def stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def module(cache, fake, recipe, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": 24, "batch_size": 5, "num_workers": 0, "num_imgs_per_val_class": 2,
              **kwargs}
    return ImageNetDataModule(cache_dir=cache, source=fake.folder, recipe=recipe, **kwargs)


# ------------------------------------------------------------------ devkit and labels


def test_devkit_classes_and_val_labels_equal_torchvision_parser(fake, tmp_path, monkeypatch):
    from torchvision.datasets import imagenet as tv

    monkeypatch.setattr(tv, "_verify_archive", lambda *args, **kwargs: None)  # fixture md5s
    shutil.copy(fake.folder / DEVKIT, tmp_path / DEVKIT)
    tv.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tv.load_meta_file(str(tmp_path))

    devkit = read_devkit(fake.folder / DEVKIT)
    assert len(devkit.synsets) == 1000  # the inner nodes of meta.mat are no classes
    assert {s.wnid: tuple(s.words.split(", ")) for s in devkit.synsets} == wnid_to_classes
    assert list(devkit.wnids) == sorted(wnid_to_classes)  # labels: sorted wnids, like ImageFolder
    assert [devkit.synsets[label].wnid for label in devkit.val_labels()] == val_wnids


def test_prepared_rows_equal_torchvision_imagenet_and_an_extracted_tree_gives_the_same(
        fake, prepared, tmp_path, monkeypatch):
    from torchvision.datasets import imagenet as tv

    monkeypatch.setattr(tv, "_verify_archive", lambda *args, **kwargs: None)
    root = tmp_path / "torchvision"
    shutil.copytree(fake.folder, root)
    for split in ("train", "val"):
        theirs = tv.ImageNet(str(root), split=split)
        ours = rows_of(prepared[split])
        assert {Path(p).name: y for p, y in theirs.samples} == {n: r[0] for n, r in ours.items()}
        for path, _ in theirs.samples:  # same pixels, up to one JPEG re-encoding
            stored = Image.open(io.BytesIO(ours[Path(path).name][3]))
            assert stored.format == "JPEG" and stored.mode == "RGB"
            original = np.asarray(Image.open(path).convert("RGB"), np.float32)
            assert np.abs(np.asarray(stored, np.float32) - original).mean() < 6

    # torchvision left train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: that tree alone works too.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("train", "val"):
        shutil.move(root / name, tree / name)
    shutil.copy(fake.folder / DEVKIT, tree / DEVKIT)
    recipe = recipe_for(fake.folder, val_shard_size=4)
    cache = Cache.at(tmp_path / "cache")
    with pytest.raises(ChecksumError, match="--no-verify"):
        prepare_split(recipe, "train", cache, FetchOptions(source=str(tree)))
    for split in ("train", "val"):
        from_tree, _ = prepare_split(recipe, split, cache,
                                     FetchOptions(source=str(tree), verify=False), processes=1)
        assert not from_tree.verified
        assert rows_of(from_tree) == rows_of(prepared[split])
        assert from_tree.manifest["shards"] == prepared[split].manifest["shards"]


# ------------------------------------------------------------------ prepare


def test_every_image_becomes_an_rgb_jpeg_with_its_shorter_side_capped(fake, tmp_path):
    recipe = recipe_for(fake.folder, val_shard_size=4, max_short_side=32, quality=80)
    cache = Cache.at(tmp_path)
    sources = {**{n: d for images in fake.train.values() for n, d in images.items()},
               **{n: d for n, _, d in fake.val}}
    for split in ("train", "val"):
        entry, _ = prepare_split(recipe, split, cache, FetchOptions(source=str(fake.folder)),
                                 processes=1)
        for name, (_, height, width, jpeg) in rows_of(entry).items():
            stored = Image.open(io.BytesIO(jpeg))
            assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (width, height))
            w, h = Image.open(io.BytesIO(sources[name])).size
            assert min(width, height) == min(32, w, h)  # capped, never enlarged
            assert abs(width / height - w / h) < 0.05  # the aspect is kept
            if fake.special.get(name) == "gray":
                pixels = np.asarray(stored, np.int16)
                assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 3
        # Nothing but the shards and the manifest: the archives were never extracted.
        assert sorted(p.name for p in entry.path.iterdir()) == sorted(
            [*entry.manifest["shards"], "manifest.json"])
    train = find_prepared(recipe, "train", cache).manifest
    val = find_prepared(recipe, "val", cache).manifest
    assert train["statistics"]["converted_to_rgb_jpeg"] == {"JPEG CMYK": 1, "JPEG L": 1}
    assert val["statistics"]["converted_to_rgb_jpeg"] == {"PNG RGB": 1}
    assert train["statistics"]["resized"] > 0
    assert [c["wnid"] for c in train["classes"]] == fake.sorted_wnids
    # The size cap and the quality shape the bytes: they are part of the fingerprint.
    other = recipe_for(fake.folder, val_shard_size=4, max_short_side=32, quality=81)
    assert find_prepared(other, "train", cache) is None


def test_without_the_archives_the_error_says_where_to_get_them(tmp_path, capsys):
    dm = datapipe.load("imagenet", cache_dir=tmp_path / "cache")
    with pytest.raises(DownloadError, match=r"register at https://image-net.org.*--source DIR"):
        dm.prepare_data()
    assert main(["prepare", "imagenet", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image-net.org" in err and TRAIN in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", "imagenet", "--source", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{empty} lacks {TRAIN}, {DEVKIT}" in err


def test_archives_that_are_not_the_official_ones_are_refused(fake, tmp_path):
    dm = ImageNetDataModule(cache_dir=tmp_path, source=fake.folder)
    with pytest.raises(ChecksumError, match="1d675b47d978889d74fa0da5fadfb00e.*--no-verify"):
        dm.prepare_data(["train"])


def test_a_prepare_killed_between_shards_resumes_to_the_same_manifest(
        fake, prepared, tmp_path, monkeypatch):
    cache = Cache.at(tmp_path / "cache")
    # A run that dies by SIGKILL halfway into its second shard (the first one is whole).
    script = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from imagenet_fixture import recipe_for
from datapipe.cache import Cache
from datapipe.prepare import prepare_split
from datapipe.stages.download import FetchOptions
from datapipe.stages.jpeg import ImageNetClean

real, calls = ImageNetClean.write_shard, []
def write_shard(self, split, files, task, path):
    calls.append(path)
    if len(calls) == 2:
        path.write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, split, files, task, path)
ImageNetClean.write_shard = write_shard
prepare_split(recipe_for(Path(sys.argv[2]), val_shard_size=4), "train", Cache.at(sys.argv[3]),
              FetchOptions(source=sys.argv[2]), processes=1)
"""
    killed = subprocess.run([sys.executable, "-c", script, str(TESTS), str(fake.folder),
                             str(cache.root)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    recipe = recipe_for(fake.folder, val_shard_size=4)
    expected = prepared["train"]
    assert find_prepared(recipe, "train", cache) is None  # never trusted half done
    work = work_dir(cache, recipe, expected.fingerprint)
    left = sorted(p.name for p in work.iterdir())
    assert "train-00000-of-00003.arrow" in left and "train-00000-of-00003.json" in left
    assert any(name.startswith(".tmp-train-00001") for name in left)  # the shard it died in

    written = []
    real = ImageNetClean.write_shard
    monkeypatch.setattr(ImageNetClean, "write_shard",
                        lambda self, *a: written.append(a[2]) or real(self, *a))
    resumed, worked = prepare_split(recipe, "train", cache, FetchOptions(source=str(fake.folder)),
                                    processes=1)
    assert worked and len(written) == 2  # the finished shard was kept
    assert stable(resumed.manifest) == stable(expected.manifest)
    assert not work.exists()
    assert [p.name for p in resumed.path.parent.iterdir()] == [resumed.fingerprint]


def test_a_source_vanishing_under_a_sharded_prepare_is_one_line(fake, tmp_path, monkeypatch):
    """A `cache rm` of an unverified download it could not lock against: one line, no
    traceback, and nothing published."""
    recipe = recipe_for(fake.folder, val_shard_size=4)
    cache = Cache.at(tmp_path / "cache")

    def vanished(self, *args):
        raise FileNotFoundError(2, "No such file or directory", str(fake.folder / "gone.tar"))

    monkeypatch.setattr(ImageNetClean, "write_shard", vanished)
    with pytest.raises(CacheError, match="gone.tar of .* vanished while it was being read"):
        prepare_split(recipe, "train", cache, FetchOptions(source=str(fake.folder)),
                      processes=1)
    assert find_prepared(recipe, "train", cache, FetchOptions(source=str(fake.folder))) is None


def test_machines_share_a_prepare_with_num_shards(fake, prepared, tmp_path, capsys):
    recipe = recipe_for(fake.folder, val_shard_size=4)
    cache, options = Cache.at(tmp_path / "api"), FetchOptions(source=str(fake.folder))
    first = prepare_shards(recipe, "train", cache, options, num_shards=2, shard_index=0,
                           processes=1)
    assert (first.written, first.done, first.total, first.prepared) == (2, 2, 3, None)
    assert find_prepared(recipe, "train", cache, options) is None
    last = prepare_shards(recipe, "train", cache, options, num_shards=2, shard_index=1,
                          processes=1)
    assert last.published and last.written == 1
    assert stable(last.prepared.manifest) == stable(prepared["train"].manifest)
    with pytest.raises(ConfigError, match="shard-index"):
        prepare_shards(recipe, "train", cache, options, num_shards=2, shard_index=2)

    argv = ["prepare", "imagenet", "--source", str(fake.folder), "--no-verify", "--quiet",
            "--cache-dir", str(tmp_path / "cli"), "--split", "train", "--num-shards", "2"]
    assert main([*argv, "--shard-index", "1"]) == 0
    assert "part 1 of 2 wrote 1 shard(s); 1 of 3 shards are in" in capsys.readouterr().out
    assert main([*argv, "--shard-index", "0"]) == 0
    assert "part 0 of 2 wrote 2 shard(s); 18 rows" in capsys.readouterr().out
    assert main(["prepare", "imagenet", "--num-shards", "2"]) == 2


# ------------------------------------------------------------------ splits


def test_per_class_carve_takes_that_many_of_every_class_seeded():
    labels = np.repeat(np.arange(5), [7, 9, 4, 12, 6])
    np.random.default_rng(0).shuffle(labels)
    train, val = carve_per_class(labels, 3, seed=7)
    assert np.bincount(labels[val]).tolist() == [3] * 5
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.array_equal(train, np.sort(train)) and train.dtype == np.int64
    again = carve_per_class(labels, 3, seed=7)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(carve_per_class(labels, 3, seed=8)[1], val)
    with pytest.raises(ConfigError, match="every sample of class 2"):
        carve_per_class(labels, 4, seed=0)


def test_val_is_carved_per_class_from_train_and_test_is_the_official_val(
        fake, recipe, prepared, tmp_path):
    cache = prepared["train"].path.parents[3]
    dm = module(cache, fake, recipe, seed=3)
    dm.setup("fit")
    dm.setup("test")
    assert dm.plan.sizes() == {"train": 12, "val": 6, "test": 9, "predict": 9}
    assert np.bincount(dm.datasets["val"].labels()).tolist() == [2, 2, 2]
    [(_, train_rows)], [(_, val_rows)] = dm.plan.parts["train"], dm.plan.parts["val"]
    assert not set(train_rows) & set(val_rows)
    assert dm.plan.parts["test"][0][0] == "val"
    assert (cache / "splits" / "imagenet" / f"{dm.plan.id}.json").is_file()
    same = module(cache, fake, recipe, seed=3)
    assert same.plan_splits().id == dm.plan.id
    other = module(cache, fake, recipe, seed=4).plan_splits()
    assert other.id != dm.plan.id
    assert dm.plan.provenance["specs"]["val"]["per_class"] == 2


# ------------------------------------------------------------------ loading


def test_module_facts_before_and_after_prepare(fake, recipe, prepared, tmp_path):
    assert "imagenet" in datapipe.list_recipes()
    bare = datapipe.load("imagenet", cache_dir=tmp_path, image_size=64)
    assert (bare.num_classes, bare.dims) == (1000, (3, 64, 64))
    with pytest.raises(NotPreparedError, match="devkit"):
        bare.classes  # noqa: B018
    dm = module(prepared["train"].path.parents[3], fake, recipe)
    assert dm.num_classes == 1000 and len(dm.classes) == 1000
    assert dm.classes[0] == "tench, Tinca tinca" and dm.wnids == fake.sorted_wnids
    assert dm.normalization()["mean"] == [0.485, 0.456, 0.406]


def test_batches_are_uint8_squares_normalized_on_the_device(fake, recipe, prepared):
    dm = module(prepared["train"].path.parents[3], fake, recipe, normalize=True)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (5, 3, 24, 24) and x.dtype == torch.uint8
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64
        z, _ = dm.to_device((x, y))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(z, (x / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_augmentation_is_the_same_in_any_worker_layout_and_after_a_resume(
        fake, recipe, prepared):
    cache = prepared["train"].path.parents[3]

    def epoch(num_workers):
        dm = module(cache, fake, recipe, num_workers=num_workers, batch_size=4)
        return [b for b in dm.train_dataloader()]

    alone, workers = epoch(0), epoch(2)
    assert len(alone) == 3
    for (xa, ya), (xb, yb) in zip(alone, workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    dm = module(cache, fake, recipe, batch_size=4)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    state = dm.state_dict()
    resumed = module(cache, fake, recipe, batch_size=4)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 2
    for (xa, ya), (xb, yb) in zip(alone[1:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    second_epoch = list(loader)  # a new epoch draws new crops
    assert not torch.equal(second_epoch[0][0], alone[0][0])


def test_eval_pipeline_is_torchvision_resize_and_center_crop(fake, recipe, prepared):
    from torchvision import transforms as T

    reader = ShardReader(shard_paths(prepared["val"]))
    for size in (24, 8):
        resize = round(size / 0.875)
        reference = T.Compose([T.Resize(resize), T.CenterCrop(size)])
        for row in range(len(reader)):
            data = reader.image(row).tobytes()
            expected = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")))
            exact, reduction = decode_center(data, size, resize, draft=False)
            assert reduction == 1 and np.array_equal(exact, expected)
            drafted, reduction = decode_center(data, size, resize, draft=True)
            assert (reduction > 1) == (size == 8)
            assert np.abs(drafted.astype(int) - expected).mean() < 6
    exact_recipe = dataclasses.replace(recipe, transform=dataclasses.replace(
        recipe.transform, draft=False))
    dm = module(prepared["train"].path.parents[3], fake, exact_recipe)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    reference = T.Compose([T.Resize(round(24 / 0.875)), T.CenterCrop(24)])
    for k in range(len(x)):
        stored = Image.open(io.BytesIO(reader.image(k).tobytes())).convert("RGB")
        assert np.array_equal(x[k].permute(1, 2, 0).numpy(), np.asarray(reference(stored)))


def test_reduced_size_decode_is_used_when_the_target_is_small(fake, prepared, monkeypatch):
    from PIL import JpegImagePlugin

    rows = rows_of(prepared["train"])
    big = next(n for n, kind in fake.special.items() if kind == "big")
    _, height, width, jpeg = rows[big]
    assert (width, height) == (160, 120)
    whole = (0, 0, width, height)
    assert decode_crop(jpeg, whole, 224)[1] == 1
    assert decode_crop(jpeg, whole, 40)[1] == 2
    image, reduction = decode_crop(jpeg, whole, 14)
    assert reduction == 8 and image.shape == (14, 14, 3)
    assert decode_crop(jpeg, whole, 14, draft=False)[1] == 1
    # The loader's workers use it: every draft call of a training epoch at 8 pixels.
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real(self, mode, size))
    dm = ImageNetDataModule(cache_dir=prepared["train"].path.parents[3], source=fake.folder,
                            recipe=recipe_for(fake.folder, val_shard_size=4), image_size=8,
                            num_workers=0, num_imgs_per_val_class=2, batch_size=6)
    for x, _ in dm.train_dataloader():
        assert x.shape[1:] == (3, 8, 8)
    assert drafts


def test_random_resized_crop_boxes_follow_torchvision_rules():
    n = 4000
    heights, widths = np.full(n, 375), np.full(n, 500)
    boxes = random_resized_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3),
                                      torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 500).all() and (y0 + h <= 375).all()
    area, aspect = w * h / (500 * 375), w / h
    assert area.min() > 0.079 and area.max() <= 1.0
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    # The same law as torchvision's own draws (which take up to 10 tries per crop too).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = Image.new("RGB", (500, 375))
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)])
    their_area = theirs[:, 2] * theirs[:, 3] / (500 * 375)
    assert abs(area.mean() - their_area.mean()) < 0.02
    assert abs(np.median(aspect) - np.median(theirs[:, 3] / theirs[:, 2])) < 0.03
    assert x0.std() > 20 and y0.std() > 20  # placed anywhere, not centered
    again = random_resized_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3),
                                      torch.Generator().manual_seed(0))
    assert np.array_equal(boxes, again)
    # No draw fits a 1000 x 10 strip: the fallback is the center crop of aspect 4/3.
    [strip] = random_resized_crop_boxes(np.array([10]), np.array([1000]), (0.08, 1.0),
                                        (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert strip.tolist() == [493, 0, 13, 10]


def _device_check(fake, recipe, prepared, device):
    cache = prepared["train"].path.parents[3]
    cpu = module(cache, fake, recipe, batch_size=6, normalize=False)
    gpu = module(cache, fake, recipe, batch_size=6, normalize=False, device_decode=True)
    cpu.setup("fit")
    cpu.setup("test")
    gpu.setup("fit")
    gpu.setup("test")
    for name in ("train_dataloader", "test_dataloader"):
        (xa, ya), (xb, yb) = next(iter(getattr(cpu, name)())), next(iter(getattr(gpu, name)()))
        assert isinstance(xb, EncodedBatch)
        za, _ = cpu.to_device((xa, ya), device)
        zb, yb = gpu.to_device((xb, yb), device)
        assert zb.device.type == torch.device(device).type and zb.shape == za.shape
        assert torch.equal(yb.cpu(), ya)
        diff = (za - zb).abs()
        assert diff.mean() < 4 / 255 and diff.max() < 64 / 255, name


def test_device_decode_gives_the_worker_decode_on_the_cpu(fake, recipe, prepared):
    _device_check(fake, recipe, prepared, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decode_on_cuda_gives_the_worker_decode(fake, recipe, prepared):
    _device_check(fake, recipe, prepared, "cuda")


def test_imagenet_prepare_path_imports_no_torch(fake, tmp_path):
    code = ("import sys, datapipe.datamodules, datapipe.stages.jpeg, datapipe.prepare; "
            "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'PIL', 'scipy') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert json.loads(out.stdout) == []
    assert ImageNetClean().splits() == ("train", "val") and RECIPE.info.num_classes == 1000


# ------------------------------------------------------------------ hostile archives


def test_tar_members_leading_out_or_past_the_end_are_refused(tmp_path):
    import hostile

    from datapipe.stages.jpeg import MAX_IMAGE_BYTES, _check_span, _tar_members

    archive = tmp_path / "ILSVRC2012_img_val.tar"
    archive.write_bytes(hostile.tar_of(hostile.members(
        {"../ILSVRC2012_val_00000001.JPEG": b"x"}), compress=False))
    with pytest.raises(FormatError, match="is not a relative path inside the archive"):
        list(_tar_members(archive, MAX_IMAGE_BYTES))
    archive.write_bytes(hostile.tar_of([hostile.sparse_member("a.JPEG", 1 << 33)],
                                       compress=False))
    with pytest.raises(FormatError, match="a.JPEG is a sparse member"):
        list(_tar_members(archive, MAX_IMAGE_BYTES))
    # A shard plan read back from the work folder may not send a read past the archive.
    with pytest.raises(FormatError, match="does not lie inside the archive"):
        _check_span(archive, "a.JPEG", 512, 1 << 30, MAX_IMAGE_BYTES)


def test_a_meta_mat_declaring_a_huge_struct_array_is_refused_before_scipy_allocates():
    import struct
    import tracemalloc

    from imagenet_fixture import meta_mat

    from datapipe.formats.imagenet import parse_meta_mat

    genuine = meta_mat([(1, "n01440764", "tench")], [])
    assert len(parse_meta_mat(genuine)) == 1
    evil = bytearray(genuine)
    at = evil.index(struct.pack("<II", 5, 8), 128)  # the synsets' dimensions
    evil[at + 8:at + 16] = struct.pack("<ii", 30000, 30000)  # 13 GiB of struct elements
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"meta.mat: a 30000x30000 array of \d+ field"):
            parse_meta_mat(bytes(evil))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
