"""recipes/ as users write and load them: kmnist, image-folder, hf; folders, env, entry points."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from loopback import MirrorServer
from PIL import Image

import datapipe
from datapipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=6, seed=0) -> Path:
    """root/<class>/<image>.png of assorted sizes; the first image of each class is 16x16."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (16, 16, 3) if i == 0 else (18 + i, 20 + 3 * i, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                folder / f"{i:03d}.png")
    return root


def prepared_entries(cache: Path) -> list[Path]:
    return [p for p in (cache / "prepared").glob("*/*/*") if p.is_dir()]


# ------------------------------------------------------------------ kmnist


@pytest.mark.usefixtures("fresh_registry")
def test_kmnist_prepares_through_the_cli_from_a_mirror_and_loads(fake_mnist, tmp_path, capsys):
    with MirrorServer(fake_mnist.files) as mirror:
        code, out, err = run(capsys, "--recipes", RECIPES, "prepare", "kmnist", "--no-verify",
                             "--quiet", "--mirror", mirror.url, "--cache-dir", tmp_path)
    assert code == 0, err
    assert "kmnist train: 600 rows" in out and "kmnist test: 100 rows" in out

    dm = datapipe.load("kmnist", cache_dir=tmp_path, verify=False, val_split=100)
    dm.setup("fit")
    images, labels = dm.datasets["train"].__getitems__([0, 1, 2])
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (500, 100)
    assert images.shape == (3, 1, 28, 28) and dm.classes[:3] == ["o", "ki", "su"]


def test_kmnist_declares_the_files_and_md5s_torchvision_knows():
    spec = importlib.util.find_spec("torchvision")  # its source is read, not imported
    source = Path(spec.origin).parent / "datasets" / "mnist.py" if spec else None
    if source is None or not source.is_file():
        pytest.skip("torchvision's sources are not installed")
    text = source.read_text()
    kmnist_block = text[text.index("class KMNIST"):text.index("class EMNIST")]
    spec = importlib.util.spec_from_file_location("kmnist_recipe_under_test",
                                                  RECIPES / "kmnist.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:  # registering is not the point here
        mp.setattr(datapipe, "register", lambda name: (lambda f: f))
        spec.loader.exec_module(module)
    for resource in module.RECIPE.download.resources:
        assert f'("{resource.filename}", "{resource.md5}")' in kmnist_block
    assert all(f'"{c}"' in kmnist_block for c in module.RECIPE.info.classes)


@pytest.mark.usefixtures("fresh_registry")
def test_every_recipe_loads_from_the_environment_variable(monkeypatch):
    monkeypatch.setenv("DATAPIPE_RECIPES", str(RECIPES))
    names = datapipe.list_recipes()
    assert {"kmnist", "fashion-mnist", "image-folder", "hf"} <= set(names)


def test_listing_the_recipe_folder_imports_nothing_heavy():
    script = ("import sys\nfrom datapipe.cli import main\n"
              f"assert main(['--recipes', {str(RECIPES)!r}, 'list']) == 0\n"
              "print('HEAVY', [m for m in ('torch', 'torchvision', 'datasets', 'PIL') "
              "if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "image-folder" in done.stdout and "HEAVY []" in done.stdout


@pytest.mark.slow  # separate processes
def test_an_installed_package_registers_a_recipe_through_the_entry_point(fake_mnist, tmp_path):
    """A real `pip install` of a tiny package whose pyproject declares the entry point."""
    package = tmp_path / "tiny-recipes"
    (package / "tiny_recipes").mkdir(parents=True)
    (package / "tiny_recipes" / "__init__.py").write_text("")
    shutil.copy(RECIPES / "kmnist.py", package / "tiny_recipes" / "kmnist.py")
    (package / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tiny-recipes"
        version = "0.1"

        [project.entry-points."datapipe.recipes"]
        kmnist = "tiny_recipes.kmnist:KMNISTDataModule"

        [tool.setuptools]
        packages = ["tiny_recipes"]
    """))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(target),
                          str(package)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]),
           "DATAPIPE_CACHE": str(tmp_path / "cache")}
    env.pop("DATAPIPE_RECIPES", None)

    def datapipe_cli(*argv):
        return subprocess.run([sys.executable, "-m", "datapipe", *argv], capture_output=True,
                              text=True, timeout=120, env=env, cwd=tmp_path)

    listed = datapipe_cli("list", "k*")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["kmnist"]
    with MirrorServer(fake_mnist.files) as mirror:
        done = datapipe_cli("prepare", "kmnist", "--split", "test", "--no-verify", "--quiet",
                            "--mirror", mirror.url)
    assert done.returncode == 0, done.stderr
    assert "kmnist test: 100 rows" in done.stdout


# ------------------------------------------------------------------ bad recipe files


@pytest.mark.usefixtures("fresh_registry")
def test_a_recipe_file_that_fails_to_import_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "broken_recipe.py").write_text("import datapipe\n1 / 0\n")
    code, out, err = run(capsys, "--recipes", tmp_path, "list")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert f"{tmp_path / 'broken_recipe.py'} failed to import: ZeroDivisionError" in line


@pytest.mark.usefixtures("fresh_registry")
def test_two_recipes_under_one_name_name_both_files(tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    shutil.copy(RECIPES / "kmnist.py", other / "my_kmnist.py")
    code, out, err = run(capsys, "--recipes", RECIPES, "--recipes", other, "list")
    assert code == 2
    [line] = err.strip().splitlines()
    assert "'kmnist' is registered twice" in line
    assert str(RECIPES / "kmnist.py") in line and str(other / "my_kmnist.py") in line


# ------------------------------------------------------------------ image-folder


@pytest.mark.usefixtures("fresh_registry")
def test_image_folder_prepares_from_cli_source_into_fixed_size_uint8(tmp_path, capsys):
    root = make_image_folder(tmp_path / "pets")
    Image.fromarray(np.full((30, 10), 7, np.uint8)).save(root / "dog" / "gray.jpg")
    Image.new("RGBA", (12, 12), (1, 2, 3, 4)).save(root / "eel" / "alpha.png")
    (root / "cat" / "more").mkdir()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "cat" / "more" / "deep.bmp")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    cache = tmp_path / "cache"
    code, out, err = run(capsys, "--recipes", RECIPES, "prepare", "image-folder", "--source",
                         root, "--cache-dir", cache)
    assert code == 0, err
    assert "image-folder train: 21 rows" in out
    code, out, _ = run(capsys, "--recipes", RECIPES, "prepare", "image-folder", "--source",
                       root, "--cache-dir", cache)
    assert "already prepared" in out

    dm = datapipe.load("image-folder", root=root, image_size=16, cache_dir=cache, val_split=3)
    assert dm.classes == ["cat", "dog", "eel"] and dm.dims == (3, 16, 16)
    dm.prepare_data()
    dm.setup("fit")
    columns = dm.recipe.load(dm.prepared["train"].data_file)
    assert columns["image"].dtype == np.uint8 and columns["image"].shape == (21, 3, 16, 16)
    first_cat = np.asarray(Image.open(root / "cat" / "000.png")).transpose(2, 0, 1)
    assert np.array_equal(columns["image"][0], first_cat)  # already 16x16: stored as is
    assert np.bincount(columns["label"]).tolist() == [7, 7, 7]
    train, val = (dm.plan.parts[p][0][1] for p in ("train", "val"))
    assert len(val) == 3 and not set(train) & set(val) and len(train) + len(val) == 21
    again = datapipe.load("image-folder", root=root, image_size=16, cache_dir=cache,
                          val_split=3)
    assert np.array_equal(again.plan_splits().parts["val"][0][1], val)  # seeded, cached
    other = datapipe.load("image-folder", root=root, image_size=16, cache_dir=cache,
                          val_split=3, seed=7)
    assert not np.array_equal(other.plan_splits().parts["val"][0][1], val)


@pytest.mark.usefixtures("fresh_registry")
def test_image_folder_fingerprint_follows_size_and_content(tmp_path):
    datapipe.load_recipe_dir(RECIPES)
    root = make_image_folder(tmp_path / "pets", per_class=2)

    def fingerprint(**kw):
        dm = datapipe.load("image-folder", root=root, cache_dir=tmp_path / "cache", **kw)
        return dm.prepare_data()["train"].fingerprint

    base = fingerprint(image_size=8)
    assert fingerprint(image_size=8) == base
    assert fingerprint(image_size=(8, 12)) != base
    assert fingerprint(image_size=8, channels=1) != base
    Image.new("RGB", (8, 8)).save(root / "dog" / "new.png")
    assert fingerprint(image_size=8) != base


@pytest.mark.usefixtures("fresh_registry")
def test_image_folder_with_split_folders_gives_those_splits(tmp_path):
    datapipe.load_recipe_dir(RECIPES)
    make_image_folder(tmp_path / "data" / "train", per_class=4)
    make_image_folder(tmp_path / "data" / "val", per_class=1, seed=1)
    make_image_folder(tmp_path / "data" / "test", per_class=2, seed=2)
    dm = datapipe.load("image-folder", root=tmp_path / "data", image_size=8,
                       cache_dir=tmp_path / "cache")
    assert dm.recipe.splits() == ("train", "val", "test")
    dm.prepare_data()
    assert dm.plan_splits().sizes() == {"train": 12, "val": 3, "test": 6, "predict": 6}


@pytest.mark.usefixtures("fresh_registry")
def test_image_folder_without_class_folders_is_one_clear_error(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    code, out, err = run(capsys, "--recipes", RECIPES, "prepare", "image-folder", "--source",
                         root, "--cache-dir", tmp_path / "cache")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert f"{root} has no class folders" in line and "one folder per class" in line
    code, _, err = run(capsys, "--recipes", RECIPES, "prepare", "image-folder", "--source",
                       tmp_path / "nowhere", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "does not exist" in err
    assert not prepared_entries(tmp_path / "cache")


@pytest.mark.usefixtures("fresh_registry")
def test_an_unreadable_image_names_the_file_and_nothing_is_written(tmp_path, capsys):
    root = make_image_folder(tmp_path / "pets", per_class=3)
    bad = root / "dog" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cache = tmp_path / "cache"
    code, out, err = run(capsys, "--recipes", RECIPES, "prepare", "image-folder", "--source",
                         root, "--cache-dir", cache)
    assert code == 2
    [line] = [x for x in err.strip().splitlines() if "error" in x]
    assert line.startswith(f"datapipe: error: {bad} is not a readable image")
    assert not prepared_entries(cache)
    assert not [p for p in (cache / "prepared").rglob("*") if p.is_file()]


# ------------------------------------------------------------------ hf


@pytest.fixture
def pets_parquet(tmp_path) -> Path:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
                 for _ in range(12)],
         "kind": ["cat", "dog", "eel"] * 4},
        features=datasets.Features({"img": datasets.Image(),
                                    "kind": datasets.ClassLabel(names=["cat", "dog", "eel"])}))
    path = tmp_path / "pets.parquet"
    ds.to_parquet(str(path))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' own cache under tmp_path; the hub is never asked."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("fresh_registry")
def test_hf_recipe_prepares_a_parquet_file_from_the_cli(pets_parquet, tmp_path, capsys, hf_cache):
    cache = tmp_path / "cache"
    code, out, err = run(capsys, "--recipes", RECIPES, "prepare", "hf", "--source",
                         pets_parquet, "--quiet", "--cache-dir", cache)
    assert code == 0, err
    assert "hf train: 12 rows" in out
    dm = datapipe.load("hf", path=str(pets_parquet), cache_dir=cache, val_split=3)
    assert dm.classes == ["cat", "dog", "eel"] and dm.dims == (3, 10, 10)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (9, 3)


@pytest.mark.usefixtures("fresh_registry")
def test_hf_recipe_with_a_missing_column_lists_the_columns(pets_parquet, tmp_path, capsys, hf_cache,
                                                           monkeypatch):
    monkeypatch.setenv("DATAPIPE_RECIPES", str(RECIPES))
    with pytest.raises(datapipe.ConfigError, match=r"has no column 'label'; its columns are "
                                                   r"img, kind; pass label_column="):
        datapipe.load("hf", path=str(pets_parquet), label_column="label")
    code, _, err = run(capsys, "prepare", "hf", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "hf needs a dataset" in err
    assert not prepared_entries(tmp_path / "cache")
