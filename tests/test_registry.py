"""The registry: names to DataModule factories, overrides, discovery, suggestions."""

from __future__ import annotations

import sys
import textwrap

import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)

import datapipe
from datapipe.errors import RecipeError, UnknownRecipeError


def test_mnist_is_built_in_and_listed():
    assert "mnist" in datapipe.list_recipes()
    assert datapipe.list_recipes("mn*") == ["mnist"]
    assert datapipe.list_recipes("cifar*") == ["cifar10", "cifar100"]
    assert datapipe.list_recipes("nothing*") == []


def test_load_applies_overrides_over_the_recipe_defaults(tmp_path):
    dm = datapipe.load("mnist", batch_size=7, cache_dir=tmp_path, val_split=0.2)
    assert dm.batch_size == 7
    assert dm.split_specs["val"] == 0.2
    assert dm.cache.root == tmp_path
    default = datapipe.load("mnist")
    assert default.batch_size == 32 and default.split_specs["val"] == 0.2


@pytest.mark.usefixtures("fresh_registry")
def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownRecipeError, match="did you mean mnist"):
        datapipe.load("mnsit")
    with pytest.raises(datapipe.DatapipeError, match="unknown recipe 'zzz'"):
        datapipe.load("zzz")


def test_unknown_option_names_the_recipe():
    with pytest.raises(RecipeError, match="'mnist' does not take that option.*batchsize"):
        datapipe.load("mnist", batchsize=3)


@pytest.mark.usefixtures("fresh_registry")
def test_register_a_function_recipe(tmp_path):
    from datapipe.datamodules.mnist import RECIPE

    @datapipe.register("tiny-digits")
    def tiny(**kw):
        return datapipe.DataModule(RECIPE, **{"batch_size": 4, **kw})

    assert datapipe.load("tiny-digits").batch_size == 4
    assert datapipe.load("tiny-digits", batch_size=9).batch_size == 9


@pytest.mark.usefixtures("fresh_registry")
def test_registering_one_name_twice_names_both_places():
    @datapipe.register("twice")
    def first(**kw):
        return None

    with pytest.raises(RecipeError, match=r"registered twice: at .*test_registry.py:\d+ and at"):
        @datapipe.register("twice")
        def second(**kw):
            return None


RECIPE_FILE = '''
import datapipe
from datapipe.datamodules.mnist import RECIPE

@datapipe.register("{name}")
def make(**kw):
    return datapipe.DataModule(RECIPE, **kw)
'''


@pytest.mark.usefixtures("fresh_registry")
def test_recipe_folder_loads_with_load_recipe_dir(tmp_path):
    (tmp_path / "mine.py").write_text(RECIPE_FILE.format(name="from-folder"))
    (tmp_path / "_private.py").write_text("raise RuntimeError('must not be imported')")
    datapipe.load_recipe_dir(tmp_path)
    assert "from-folder" in datapipe.list_recipes()


@pytest.mark.usefixtures("fresh_registry")
def test_recipe_folder_loads_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "env_recipe.py").write_text(RECIPE_FILE.format(name="from-env"))
    monkeypatch.setenv("DATAPIPE_RECIPES", str(tmp_path))
    assert datapipe.list_recipes("from-*") == ["from-env"]


@pytest.mark.usefixtures("fresh_registry")
def test_a_broken_recipe_file_names_the_file_and_the_error(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(RecipeError, match=r"broken.py failed to import: ModuleNotFoundError"):
        datapipe.load_recipe_dir(tmp_path)


@pytest.mark.usefixtures("fresh_registry")
def test_entry_point_group_registers_installed_recipes(tmp_path, monkeypatch):
    """A distribution on sys.path that declares a `datapipe.recipes` entry point."""
    (tmp_path / "thirdparty_recipe.py").write_text(textwrap.dedent('''
        import datapipe
        from datapipe.datamodules.mnist import RECIPE

        def factory(**kw):
            return datapipe.DataModule(RECIPE, **{"batch_size": 3, **kw})
    '''))
    dist = tmp_path / "thirdparty_recipe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-recipe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[datapipe.recipes]\nthird-party = thirdparty_recipe:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "thirdparty_recipe", raising=False)
    assert "third-party" in datapipe.list_recipes()
    assert datapipe.load("third-party").batch_size == 3


@pytest.mark.usefixtures("fresh_registry")
def test_a_recipe_named_like_a_built_in_is_a_clash_not_a_replacement():
    # Before the built-ins are found the clash shows when they are; after, at once.
    with pytest.raises(RecipeError, match=r"'mnist' is registered twice: at .*mnist.py"):
        @datapipe.register("mnist")
        def mine(**kw):
            return None

        datapipe.list_recipes()
