"""The recipes/ folder: recipes written as users write them, loaded as users load them."""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import MirrorServer

from datapipe import registry
from datapipe.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    monkeypatch.setattr(registry, "_origins", dict(registry._origins))
    monkeypatch.setattr(registry, "_discovered", False)


def test_fashion_mnist_prepares_through_the_cli_and_loads(fake_mnist, tmp_path, capsys,
                                                          clean_registry):
    with MirrorServer(fake_mnist.files) as mirror:
        code = main(["--recipes", str(RECIPES), "prepare", "fashion-mnist", "--no-verify",
                     "--quiet", "--mirror", mirror.url, "--cache-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "fashion-mnist train: 600 rows" in out and "fashion-mnist test: 100 rows" in out

    dm = registry.load("fashion-mnist", cache_dir=tmp_path, verify=False, val_split=60)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (540, 60)
    assert dm.classes[9] == "Ankle boot" and dm.num_classes == 10
