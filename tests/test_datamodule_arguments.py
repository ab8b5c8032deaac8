"""DataModule arguments that would act as something else later are refused at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import datapipe
from datapipe.datamodules.mnist import RECIPE
from datapipe.errors import ConfigError, DatapipeError, RecipeError


@pytest.mark.parametrize("overrides, message", [
    ({"drop_last": "no"}, "drop_last must be True, False or None"),
    ({"shuffle": 1}, "shuffle must be True, False, 'shards' or None"),
    ({"shuffle": "random"}, "shuffle must be True, False, 'shards' or None"),
    ({"pin_memory": "yes"}, "pin_memory must be True, False or None"),
    ({"persistent_workers": 0}, "persistent_workers must be True, False or None"),
    ({"normalize": "false"}, "normalize must be True, False or None"),
    ({"quiet": "quiet"}, "quiet must be True, False or None"),
    ({"verify": "no"}, "verify must be True or False"),
    ({"batch_size": True}, "batch_size must be an integer of at least 1"),
    ({"batch_size": 0}, "batch_size must be an integer of at least 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer of at least 1"),
    ({"num_workers": -1}, "num_workers must be an integer of at least 0"),
    ({"num_workers": False}, "num_workers must be an integer of at least 0"),
    ({"seed": 10**23}, "seed must be an integer in 0.."),
    ({"seed": -1}, "seed must be an integer in 0.."),
    ({"seed": True}, "seed must be an integer in 0.."),
    ({"cache_dir": 123}, "cache_dir must be a folder path"),
    ({"data_dir": 123}, "cache_dir must be a folder path"),
    ({"source": 5}, "source must be a folder path"),
    ({"mirrors": 7}, "mirrors must be a list of URLs"),
    ({"mirrors": ["http://[::1"]}, "is not a well-formed URL"),
    ({"mirrors": [None]}, "is not a URL or a folder path"),
])
def test_arguments_of_the_wrong_kind_are_refused(overrides, message, tmp_path):
    overrides.setdefault("cache_dir", None if "data_dir" in overrides else tmp_path)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as raised:
        datapipe.load("mnist", **overrides)
    assert isinstance(raised.value, ValueError)  # as a plain ValueError too
    assert not list(Path(tmp_path).iterdir())


def test_arguments_of_the_right_kind_still_work(tmp_path):
    dm = datapipe.load("mnist", cache_dir=tmp_path, drop_last=False, shuffle=True,
                       batch_size=7, num_workers=0, seed=2**63 - 1,
                       mirrors="http://127.0.0.1:1/", source=tmp_path)
    assert dm.batch_size == 7 and dm.fetch_options.mirrors == ("http://127.0.0.1:1/",)
    assert datapipe.load("mnist", mirrors=(m for m in ["a/b"])).fetch_options.mirrors == ("a/b",)


@pytest.mark.parametrize("field, value", [("name", "../x"), ("name", "/abs"),
                                          ("name", "MNIST"), ("version", "1/../../x")])
def test_a_recipe_named_like_a_path_is_refused(field, value, tmp_path):
    with pytest.raises(DatapipeError, match="not a plain name"):
        datapipe.DataModule(dataclasses.replace(RECIPE, **{field: value}), cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["../x", "/abs", "Upper", "a/b", "", "x\x00"])
def test_register_takes_plain_names_only(name):
    with pytest.raises(RecipeError, match="not a plain name"):
        datapipe.register(name)
