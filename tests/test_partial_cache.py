"""A cache holding only some splits serves what those splits allow, and unverified
copies are pointed at, never used silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from loopback import MirrorServer, refused_url

import datapipe
from datapipe.card import data_card, format_card
from datapipe.cli import main
from datapipe.errors import DownloadError, NotPreparedError

T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def test_only(fake_mnist, tmp_path):
    """A --source folder with the two test files of the fake MNIST only."""
    folder = tmp_path / "test-only"
    folder.mkdir()
    for name in T10K:
        shutil.copy(fake_mnist.folder / name, folder / name)
    return folder


def prepare_test_split(cache, folder, capsys):
    code, _, err = run(capsys, "prepare", "mnist", "--split", "test", "--source", str(folder),
                       "--no-verify", "--cache-dir", str(cache), "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("val_split", [None, 0, 5000])
def test_setup_test_needs_only_the_test_split(test_only, tmp_path, capsys, val_split):
    prepare_test_split(tmp_path / "cache", test_only, capsys)
    options = {} if val_split is None else {"val_split": val_split}
    dm = datapipe.load("mnist", cache_dir=tmp_path / "cache", verify=False, **options)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 100
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape[1:] == (1, 28, 28)
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 100
    with pytest.raises(NotPreparedError, match="split 'train' of mnist is not prepared"):
        dm.setup("fit")


def test_a_partial_plan_gives_the_rows_of_the_whole_plan(fake_mnist, test_only, tmp_path,
                                                          capsys):
    prepare_test_split(tmp_path / "partial", test_only, capsys)
    partial = datapipe.load("mnist", cache_dir=tmp_path / "partial", verify=False,
                            val_split=100)
    partial.setup("test")
    whole = datapipe.load("mnist", cache_dir=tmp_path / "whole", source=fake_mnist.folder,
                          verify=False, val_split=100, quiet=True)
    whole.prepare_data()
    whole.setup("test")
    assert set(whole.plan.parts) == {"train", "val", "test", "predict"}
    assert set(partial.plan.parts) == {"test", "predict"}
    assert (partial.plan.parts["test"][0][1] == whole.plan.parts["test"][0][1]).all()


def test_info_and_plot_describe_a_partial_cache(test_only, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare_test_split(cache, test_only, capsys)
    code, out, err = run(capsys, "info", "mnist", "--cache-dir", str(cache), "--plot",
                         str(tmp_path / "mnist.png"))
    assert code == 0, err
    assert (tmp_path / "mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["train"][:3] == ["-", "not", "prepared"]
    assert rows["test"][0] == "100" and rows["predict"][0] == "100"
    assert "train is not (`datapipe prepare mnist --split train`)" in out

    card = data_card(datapipe.load("mnist", cache_dir=cache, verify=False))
    assert card["splits"]["sizes"] == {"test": 100, "predict": 100}
    assert card["splits"]["not_prepared"] == ["train"]
    assert card["prepared"]["train"] is None and card["prepared"]["test"]["rows"] == 100
    assert "What splits?" in format_card(card)


def test_datapipe_test_fetches_only_the_test_files(fake_mnist, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", "mnist", "--model", "mlp", "--max-steps", "1",
                       "--val-split", "100", "--source", str(fake_mnist.folder), "--no-verify",
                       "--cache-dir", str(tmp_path / "train-cache"), "--root-dir",
                       str(tmp_path / "runs"), "--quiet")
    assert code == 0, err
    [ckpt] = (tmp_path / "runs").rglob("last.ckpt")
    files = {name: fake_mnist.files[name] for name in T10K}
    with MirrorServer(files) as mirror:
        code, out, err = run(capsys, "test", "--data", "mnist", "--ckpt", str(ckpt),
                             "--mirror", mirror.url, "--no-verify", "--quiet",
                             "--cache-dir", str(tmp_path / "test-cache"))
        assert code == 0, err
        assert set(mirror.requests) <= set(T10K)  # train files were never asked for
    assert "test_acc" in out
    assert not list((tmp_path / "test-cache" / "prepared").glob("mnist/*/*/train.arrow"))


# ------------------------------------------------------------------ unverified copies


def test_setup_names_the_unverified_copy_and_the_switch(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, _, err = run(capsys, "prepare", "mnist", "--source", str(fake_mnist.folder),
                       "--no-verify", "--cache-dir", str(cache), "--quiet")
    assert code == 0, err
    dm = datapipe.load("mnist", cache_dir=cache, val_split=100)
    with pytest.raises(NotPreparedError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert "an unverified copy of mnist train is in the cache" in message
    assert "--no-verify" in message and "verify=False" in message
    assert "\n" not in message
    # Asked for, it is used.
    unverified = datapipe.load("mnist", cache_dir=cache, val_split=100, verify=False)
    unverified.setup("fit")
    assert len(unverified.datasets["train"]) == 500


def test_offline_prepare_names_the_unverified_copy(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "mnist", "--source", str(fake_mnist.folder), "--no-verify",
                 "--cache-dir", str(cache), "--quiet"]) == 0
    dm = datapipe.load("mnist", cache_dir=cache, mirrors=[refused_url()], quiet=True)
    with pytest.raises(DownloadError, match="an unverified copy of mnist train is in the cache"):
        dm.prepare_data()
    capsys.readouterr()
    code, out, err = run(capsys, "train", "--data", "mnist", "--model", "mlp", "--max-steps",
                         "1", "--mirror", refused_url(), "--cache-dir", str(cache), "--quiet")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert "unverified copy" in line and "--no-verify" in line


def test_verified_data_gets_no_unverified_hint(real_mnist, tmp_path, capsys):
    code, _, err = run(capsys, "prepare", "mnist", "--split", "test", "--source",
                       str(real_mnist), "--cache-dir", str(tmp_path), "--quiet")
    assert code == 0, err
    dm = datapipe.load("mnist", cache_dir=tmp_path)
    dm.setup("test")  # verified test data, no train: fine for this stage
    with pytest.raises(NotPreparedError) as caught:
        dm.setup("fit")
    assert "unverified" not in str(caught.value)


def test_source_lacking_train_files_suggests_split(test_only, tmp_path, capsys):
    code, out, err = run(capsys, "prepare", "mnist", "--source", str(test_only),
                         "--cache-dir", str(tmp_path), "--quiet", "--no-verify")
    assert code == 2
    [line] = err.strip().splitlines()
    assert "lacks train-images-idx3-ubyte.gz" in line
    assert "prepare only that split with --split test" in line
    # The suggestion works as given.
    code, out, err = run(capsys, "prepare", "mnist", "--source", str(test_only), "--split",
                         "test", "--cache-dir", str(tmp_path), "--quiet", "--no-verify")
    assert code == 0, err
    assert json.loads(run(capsys, "info", "mnist", "--json", "--cache-dir",
                          str(tmp_path))[1])["prepared"]["test"]["rows"] == 100


@pytest.mark.usefixtures("fresh_registry")
def test_test_from_a_test_only_cache_normalizes_as_the_checkpoint_was_trained(
        fake_mnist, test_only, tmp_path, capsys, monkeypatch):
    """kmnist declares no mean/std: they are computed on train at prepare. A test from a
    cache holding only the test split uses the card's, never test's own statistics."""
    import torch

    from datapipe.datamodule import DataModule
    from datapipe.trainer import checkpoint as ckpt

    recipes = ["--recipes", str(Path(__file__).resolve().parents[1] / "recipes")]
    whole, partial, root = tmp_path / "whole", tmp_path / "partial", tmp_path / "runs"
    code, _, err = run(capsys, *recipes, "prepare", "kmnist", "--source",
                       str(fake_mnist.folder), "--no-verify", "--quiet",
                       "--cache-dir", str(whole))
    assert code == 0, err
    code, _, err = run(capsys, *recipes, "train", "--data", "kmnist", "--model", "mlp",
                       "--epochs", "1", "--val-split", "100", "--batch-size", "50", "-o",
                       "normalize=true", "--root-dir", str(root), "--quiet", "--no-verify",
                       "--cache-dir", str(whole))
    assert code == 0, err
    last = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    card = ckpt.load(last)["data_card"]["normalization"]
    trained = datapipe.load("kmnist", cache_dir=whole, verify=False).normalization()
    assert trained["from"] == "computed on train at prepare"
    assert (card["mean"], card["std"]) == (trained["mean"], trained["std"])
    code, _, err = run(capsys, *recipes, "prepare", "kmnist", "--split", "test", "--source",
                       str(test_only), "--no-verify", "--quiet", "--cache-dir", str(partial))
    assert code == 0, err
    own = datapipe.load("kmnist", cache_dir=partial, verify=False, train_split=None,
                        val_split=None).normalization()
    assert own["from"] == "computed on test at prepare" and own["mean"] != card["mean"]

    used = []
    setup = DataModule.setup

    def spy(self, stage=None):
        setup(self, stage)
        used.append((list(self.recipe.transform.mean), list(self.recipe.transform.std)))
    monkeypatch.setattr(DataModule, "setup", spy)
    code, out, err = run(capsys, *recipes, "test", "--data", "kmnist", "--ckpt", str(last),
                         "-o", "normalize=true", "--quiet", "--no-verify",
                         "--cache-dir", str(partial))
    assert code == 0, err
    assert "test_acc" in out and used
    assert all(torch.allclose(torch.tensor(m), torch.tensor(card["mean"]))
               and torch.allclose(torch.tensor(s), torch.tensor(card["std"])) for m, s in used)
