"""The recipes/ folder: recipes written as users write them, loaded as users load them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from loopback import MirrorServer

from datapipe import registry
from datapipe.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.usefixtures("fresh_registry")
def test_fashion_mnist_prepares_through_the_cli_and_loads(fake_mnist, tmp_path, capsys):
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


# ------------------------------------------------------------------ hostile folders


def _pets(root: Path) -> None:
    from PIL import Image

    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 9, 9)).save(root / name / f"{i}.png")


def _listing(root: Path) -> dict[str, list[str]]:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("image_folder_under_test",
                                                  RECIPES / "image_folder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.list_images(root, {"train": "."})["train"]


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_registry")
def test_a_fifo_named_like_an_image_is_listed_never_and_read_never(tmp_path, caplog):
    import os

    from datapipe.errors import FormatError
    from datapipe.folders import read_regular

    root = tmp_path / "pets"
    _pets(root)
    os.mkfifo(root / "cat" / "stuck.jpg")
    with caplog.at_level("WARNING", "datapipe"):
        listing = _listing(root)
    assert listing["cat"] == ["cat/0.png", "cat/1.png", "cat/2.png"]
    assert "skipped 1 entries that are not regular files" in caplog.text
    with pytest.raises(FormatError, match="stuck.jpg is not a regular file"):
        read_regular(root / "cat" / "stuck.jpg", 1 << 20)  # returns at once: never blocks


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_registry")
def test_link_loops_end_and_each_file_is_one_row(tmp_path):
    root = tmp_path / "pets"
    _pets(root)
    for i in range(4):  # four loops: a walk that follows them visits 2**4 copies
        (root / "cat" / f"loop{i}").symlink_to(".")
    (root / "cat" / "up").symlink_to("..")
    (root / "dog" / "cats").symlink_to("../cat")
    (root / "dog" / "twin.png").symlink_to("0.png")
    listing = _listing(root)
    assert listing == {"cat": ["cat/0.png", "cat/1.png", "cat/2.png"],
                       "dog": ["dog/0.png", "dog/1.png", "dog/2.png"]}


@pytest.mark.usefixtures("fresh_registry")
def test_links_out_of_the_root_are_not_followed(tmp_path):
    root, outside = tmp_path / "pets", tmp_path / "elsewhere"
    _pets(root)
    _pets(outside)
    (root / "cat" / "more").symlink_to(outside / "cat")
    (root / "cat" / "one.png").symlink_to(outside / "dog" / "0.png")
    (root / "bird").symlink_to(outside / "dog")
    (root / "dog" / "zero.png").symlink_to("/dev/zero")
    listing = _listing(root)
    assert sorted(listing) == ["cat", "dog"]
    assert all(len(paths) == 3 for paths in listing.values())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open
@pytest.mark.usefixtures("fresh_registry")
def test_an_image_declaring_more_pixels_than_pil_allows_is_refused_before_decoding(
        tmp_path):
    import importlib.util
    import sys

    from PIL import Image

    from datapipe.errors import FormatError

    bomb = tmp_path / "bomb.png"
    side = int(Image.MAX_IMAGE_PIXELS ** 0.5) + 100  # above the limit, below PIL's error
    Image.new("1", (side, side)).save(bomb)
    assert bomb.stat().st_size < 1 << 20
    spec = importlib.util.spec_from_file_location("image_folder_bomb",
                                                  RECIPES / "image_folder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        with pytest.raises(FormatError, match=f"bomb.png: {side} x {side} pixels, more than"):
            module.load_image(bomb, (8, 8), 3)
    finally:
        del sys.modules[spec.name]
