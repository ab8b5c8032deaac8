"""Data cards: `info --ckpt` reads a checkpoint's card, compares it with the cache; `--plot`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_fake_mnist
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from PIL import Image

from datapipe.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a two-step run on fake MNIST files, and the cache it used."""
    from datapipe.datamodules import MNISTDataModule
    from datapipe.models import ImageClassifier
    from datapipe.trainer import Trainer

    root = tmp_path_factory.mktemp("card")
    files = make_fake_mnist(root / "files").folder
    cache = root / "cache"
    dm = MNISTDataModule(cache_dir=cache, source=files, verify=False, val_split=100,
                         batch_size=100)
    model = ImageClassifier.from_datamodule(dm, "mlp")
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=root / "runs", seed=0)
    trainer.fit(model, dm)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return SimpleNamespace(root=root, files=files, cache=cache, ckpt=ckpt)


def saved_card(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=False)["data_card"]


def test_info_ckpt_prints_the_card_the_checkpoint_carries(trained, capsys):
    code, out, err = run(capsys, "info", "--ckpt", trained.ckpt)
    assert code == 0, err
    card = saved_card(trained.ckpt)
    assert out.startswith(f"checkpoint {trained.ckpt}\n")
    assert "mnist (recipe version" in out and "What splits?" in out
    assert card["prepared"]["train"]["fingerprint"] in out and card["splits"]["id"] in out
    code, out, _ = run(capsys, "info", "--ckpt", trained.ckpt, "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(card))


@pytest.mark.usefixtures("fresh_registry")
def test_info_ckpt_needs_no_registered_recipe(trained, tmp_path, capsys):
    from datapipe.trainer import checkpoint

    saved = checkpoint.load(trained.ckpt)
    saved["data_card"]["recipe"]["name"] = "registered-nowhere"
    checkpoint.save(saved, tmp_path / "other.ckpt")
    code, out, err = run(capsys, "info", "--ckpt", tmp_path / "other.ckpt")
    assert code == 0, err
    assert "registered-nowhere (recipe version 1)" in out


def test_info_name_and_ckpt_say_whether_the_cache_still_holds_that_data(trained, tmp_path,
                                                                        capsys):
    code, out, err = run(capsys, "info", "mnist", "--ckpt", trained.ckpt, "--cache-dir",
                         trained.cache)
    assert code == 0, err
    assert f"the cache {trained.cache} holds the data this checkpoint saw" in out

    code, out, _ = run(capsys, "info", "mnist", "--ckpt", trained.ckpt, "--cache-dir",
                       tmp_path / "empty")
    assert code == 1
    assert "does NOT hold the data" in out and "train: checkpoint fingerprint" in out
    assert "not prepared in the cache" in out

    changed = tmp_path / "changed"
    shutil.copytree(trained.cache, changed)
    other = make_fake_mnist(tmp_path / "other-files", seed=1).folder
    assert main(["prepare", "mnist", "--source", str(other), "--no-verify", "--quiet",
                 "--cache-dir", str(changed)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "info", "mnist", "--ckpt", trained.ckpt, "--cache-dir", changed,
                       "--source", other, "--json")  # the data made from those files
    report = json.loads(out)
    assert code == 1 and report["matches"] is False
    was = saved_card(trained.ckpt)["prepared"]["train"]["fingerprint"]
    assert any(d.startswith(f"train: checkpoint fingerprint {was}, cache ")
               for d in report["differences"])


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "cannot be read"),
    ("no-card", "holds no data card"),
])
def test_a_bad_checkpoint_is_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "bad.ckpt"
    if make == "no-card":
        from datapipe.trainer import checkpoint

        checkpoint.save({"format": checkpoint.FORMAT, "module": None, "hparams": {},
                         "state_dict": {}, "data_card": None}, path)
    else:
        make(path)
    code, out, err = run(capsys, "info", "--ckpt", path)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("datapipe: error:") and message in line and str(path) in line


def test_info_without_a_name_or_a_checkpoint_is_one_line(capsys):
    code, _, err = run(capsys, "info")
    assert code == 2 and "give a recipe name, or --ckpt PATH" in err


def test_plot_draws_samples_and_the_class_balance_of_each_split(trained, tmp_path):
    from datapipe.datamodules import MNISTDataModule
    from datapipe.plot import COLORS, plot_card

    dm = MNISTDataModule(cache_dir=trained.cache, verify=False, val_split=100)
    written = plot_card(dm, tmp_path / "plots" / "mnist.png")
    image = np.asarray(Image.open(written).convert("RGB"))
    assert image.shape[0] > 10 * 64 and image.shape[1] >= 8 * 64  # ten rows of 8 samples
    colors = {tuple(c) for c in image.reshape(-1, 3)[::7]}
    assert COLORS["train"] in colors and COLORS["val"] in colors and COLORS["test"] in colors
    assert COLORS["predict"] not in colors  # predict is the test split: not drawn twice
    assert [p.name for p in written.parent.iterdir()] == ["mnist.png"]  # no temporaries


def test_plot_of_unprepared_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    code, out, err = run(capsys, "info", "mnist", "--cache-dir", tmp_path / "cache", "--plot",
                         tmp_path / "out.png")
    assert code == 2 and "not prepared" in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.usefixtures("fresh_registry")
def test_the_card_and_plot_of_data_read_in_place(tmp_path, capsys):
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.full((8, 8, 3), 40 * i + 10, np.uint8)
            pixels[::2] = 255 - pixels[::2]
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    cache = tmp_path / "cache"
    assert main(["--recipes", str(RECIPES), "prepare", "image-folder", "--source", str(root),
                 "--cache-dir", str(cache), "--quiet"]) == 0
    code, out, err = run(capsys, "--recipes", RECIPES, "info", "image-folder", "--source", root,
                         "--cache-dir", cache, "--plot", tmp_path / "pets.png")
    assert code == 0, err
    [source] = [line for line in out.splitlines() if "read in place" in line]
    assert f"ImageFolderClean root={root} " in source
    assert f"plot: {tmp_path / 'pets.png'}" in out
    assert Image.open(tmp_path / "pets.png").size[0] >= 8 * 64
