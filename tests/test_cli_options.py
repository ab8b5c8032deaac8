"""The command line as a user meets it: overview, --version, defaults in --help, recipe
options with -o, repeatable training with --seed, quiet logs off a terminal."""

from __future__ import annotations

import json

import pytest
import torch

import datapipe
from datapipe.cli import _literal, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bare_datapipe_gives_an_overview(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    for command in ("prepare", "list", "info", "train", "test", "verify", "cache"):
        assert f"\n    {command} " in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"datapipe {datapipe.__version__}"


def test_help_shows_defaults(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "learning rate (default: 0.001)" in text
    assert "(default: adam)" in text and "(default: 42)" in text
    assert "(default: runs)" in text
    assert "(default: False)" not in text and "(default: None)" not in text


@pytest.mark.parametrize("raw, value", [
    ("3", 3), ("-2", -2), ("0.25", 0.25), ("1e-3", 1e-3), ("true", True), ("False", False),
    ("none", None), ("coarse", "coarse"), ("'7'", "7"), ('"a b"', "a b"), ("nan", "nan"),
    ("__import__('os')", "__import__('os')"),
])
def test_option_values_are_literals_never_code(raw, value):
    assert _literal(raw) == value and type(_literal(raw)) is type(value)


def test_recipe_option_reaches_the_datamodule(capsys, tmp_path):
    code, out, err = run(capsys, "info", "cifar100", "-o", "labels=coarse", "--json",
                         "--cache-dir", tmp_path)
    assert code == 0, err
    assert json.loads(out)["dataset"]["num_classes"] == 20
    code, out, err = run(capsys, "info", "mnist", "-o", "val_split=0.5", "-o", "seed=3",
                         "--json", "--cache-dir", tmp_path)
    card = json.loads(out)
    assert code == 0 and card["splits"]["specs"]["val"] == 0.5 and card["splits"]["seed"] == 3


def test_bad_recipe_options_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "info", "mnist", "-o", "no_such_thing=1", "--cache-dir",
                         tmp_path)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert "does not take that option" in line and "no_such_thing" in line
    code, _, err = run(capsys, "prepare", "mnist", "-o", "labels", "--cache-dir", tmp_path)
    assert code == 2 and "is not KEY=VALUE" in err
    code, _, err = run(capsys, "train", "--data", "mnist", "--model", "mlp", "--batch-size", 4,
                       "-o", "batch_size=8", "--cache-dir", tmp_path)
    assert code == 2 and "give batch_size once" in err


def train(capsys, fake_mnist, cache, root, seed):
    code, out, err = run(capsys, "train", "--data", "mnist", "--model", "mlp", "--max-steps", 4,
                         "--val-split", 100, "--batch-size", 50, "--seed", seed,
                         "--source", fake_mnist.folder, "--no-verify", "--cache-dir", cache,
                         "--root-dir", root)
    assert code == 0, err
    assert "\r" not in err  # no progress bars into a captured stderr
    [ckpt] = root.rglob("last.ckpt")
    weights = torch.load(ckpt, weights_only=False)["state_dict"]
    metrics = [line for line in out.splitlines() if line.startswith("  ")]
    return metrics, weights


def test_train_with_a_seed_repeats_exactly(fake_mnist, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = train(capsys, fake_mnist, cache, tmp_path / "a", 7)
    again = train(capsys, fake_mnist, cache, tmp_path / "b", 7)
    other = train(capsys, fake_mnist, cache, tmp_path / "c", 8)
    assert first[0] == again[0] and any("val_acc" in line for line in first[0])
    assert first[1].keys() == again[1].keys()
    assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    assert not all(torch.equal(first[1][k], other[1][k]) for k in first[1])


def test_messages_are_words_not_reprs(fake_mnist, tmp_path, capsys):
    code, _, err = run(capsys, "prepare", "mnist", "--source", fake_mnist.folder, "--no-verify",
                       "--cache-dir", tmp_path)
    assert code == 0, err
    code, out, err = run(capsys, "info", "mnist", "-o", "val_split=100", "--cache-dir", tmp_path)
    assert code == 0
    assert "wrote split plan" in err and "500 train, 100 val, 100 test, 100 predict" in err
    assert "{" not in err and "{" not in out
