"""The cache's layout (datapipe.layout) pinned: existing caches must keep working, so a
change to any of these names is a deliberate one, made here and in the module's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapipe import layout
from datapipe.cache import Cache
from datapipe.errors import CacheError

FP = "86e2138a6d342c2a"
MD5 = "9fb629c4189551a2d022fa330f9573f3"
PLAN = "0123456789abcdef"

# Every kind of path -> where it lies under the root.
TABLE = {
    "download file": (layout.download_file(f"md5-{MD5}", "train.gz"),
                      f"downloads/md5-{MD5}/train.gz"),
    "download sidecar": (layout.sidecar(f"md5-{MD5}", "train.gz"),
                         f"downloads/md5-{MD5}/train.gz.json"),
    "partial download": (layout.partial(f"md5-{MD5}", "train.gz"),
                         f"downloads/md5-{MD5}/train.gz.partial"),
    "unverified file": (layout.download_file(f"md5-{MD5}", "train.gz", verified=False),
                        f"downloads/md5-{MD5}.unverified/train.gz"),
    "unverified sidecar": (layout.sidecar(f"md5-{MD5}", "train.gz", verified=False),
                           f"downloads/md5-{MD5}.unverified/train.gz.json"),
    "unchecked file": (layout.download_file(layout.unchecked_key(FP), "labels.csv"),
                       f"downloads/unchecked-{FP}/labels.csv"),
    "source digest memo": (layout.source_digest_memo(FP),
                           f"downloads/.source-digests/{FP}.json"),
    "recipe folder": (layout.recipe_folder("mnist"), "prepared/mnist"),
    "version folder": (layout.version_folder("mnist", "1"), "prepared/mnist/1"),
    "entry": (layout.entry("mnist", "1", FP), f"prepared/mnist/1/{FP}"),
    "manifest": (layout.manifest("mnist", "1", FP), f"prepared/mnist/1/{FP}/manifest.json"),
    "stored object": (layout.stored_object("mnist", "1", FP, "ab" * 32),
                      f"prepared/mnist/1/{FP}/objects/{'ab' * 32}"),
    "parts folder": (layout.parts_folder("imagenet", "1", FP),
                     f"prepared/imagenet/1/{FP}/parts"),
    "part record": (layout.part_record("imagenet", "1", FP, 1, 3),
                    f"prepared/imagenet/1/{FP}/parts/part-00001-of-00003.json"),
    "work folder": (layout.work_folder("imagenet", "1", FP), f"prepared/imagenet/1/.work-{FP}"),
    "shard plan": ((*layout.work_folder("imagenet", "1", FP), layout.SHARD_PLAN),
                   f"prepared/imagenet/1/.work-{FP}/plan.json"),
    "split plans": (layout.plan_folder("mnist"), "splits/mnist"),
    "split plan": (layout.plan_file("mnist", PLAN), f"splits/mnist/{PLAN}.json"),
    "lock file": (layout.lock_file(f"prepare-mnist-1-{FP}"),
                  f"locks/prepare-mnist-1-{FP}.lock"),
}

NAMES = {
    "checked download folder": (layout.checked_key("md5", MD5), f"md5-{MD5}"),
    "set-aside manifest": (layout.set_aside(layout.MANIFEST), "manifest.json.corrupt"),
    "set-aside plan": (layout.set_aside(f"{PLAN}.json"), f"{PLAN}.json.corrupt"),
    "shard": (layout.shard_name("train", 7, 1000), "train-00007-of-01000.arrow"),
    "shard summary": (layout.shard_summary_name("train-00007-of-01000.arrow"),
                      "train-00007-of-01000.json"),
    "lock holder": (layout.holder_name("k.lock"), "k.lock.holder"),
    "temporary": (layout.temporary_name("manifest.json", 123, "ab12cd34"),
                  ".tmp-manifest.json-123-ab12cd34"),
    "temporaries": (layout.temporaries_of(FP), f".tmp-{FP}-*"),
}

LOCKS = {
    "prepare": (layout.prepare_lock("mnist", "1", FP), f"prepare-mnist-1-{FP}"),
    "shard": (layout.shard_lock("imagenet", "1", FP, 7), f"prepare-imagenet-1-{FP}-shard-00007"),
    "download": (layout.download_lock(f"md5-{MD5}"), f"download-md5-{MD5}"),
    "split plan": (layout.plan_lock("mnist", PLAN), f"splits-mnist-{PLAN}"),
}


@pytest.mark.parametrize("kind", sorted(TABLE))
def test_every_path_kind_lies_where_existing_caches_have_it(kind):
    parts, expected = TABLE[kind]
    assert layout.key(parts) == expected


@pytest.mark.parametrize("kind", sorted(NAMES))
def test_every_file_name_kind_is_spelled_as_existing_caches_spell_it(kind):
    made, expected = NAMES[kind]
    assert made == expected


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_every_lock_key_is_spelled_as_running_processes_spell_it(kind):
    made, expected = LOCKS[kind]
    assert made == expected


def test_names_read_back_from_disk_are_parsed_by_the_layout():
    assert layout.sidecar_of("train.gz.json") == "train.gz"
    assert layout.sidecar_of(".tmp-train.gz.json-1-ab") is None
    assert layout.sidecar_of("train.gz") is None
    assert layout.verified_twin(f"md5-{MD5}.unverified") == f"md5-{MD5}"
    assert layout.is_unverified_folder(f"md5-{MD5}.unverified")
    assert layout.work_fingerprint(f".work-{FP}") == FP
    assert layout.work_fingerprint(FP) is None
    assert layout.temporary_target(f".tmp-{FP}-123-ab12cd34") == FP
    assert layout.temporary_target(f".tmp-{PLAN}.json-9-ff") == f"{PLAN}.json"
    assert layout.temporary_target(FP) is None
    assert layout.plan_id_of(f"{PLAN}.json") == PLAN
    assert layout.part_of("part-00001-of-00003.json") == (1, 3)
    for other in ("part-00003-of-00003.json", "part-1-of-3.json", "../part-00001-of-00003.json",
                  ".tmp-part-00001-of-00003.json-1-ab", "part-00001-of-00003.json.x"):
        assert layout.part_of(other) is None


@pytest.mark.parametrize("make", [
    lambda: layout.entry("../etc", "1", FP),
    lambda: layout.entry("mnist", "a/b", FP),
    lambda: layout.entry("mnist", "1", "../x"),
    lambda: layout.download_file(f"md5-{MD5}", "../../passwd"),
    lambda: layout.download_file("..", "x"),
    lambda: layout.plan_file("mnist", "not-hex"),
    lambda: layout.lock_file("a/b"),
    lambda: layout.source_digest_memo("../x"),
    lambda: layout.checked_key("crc32", MD5),
    lambda: layout.part_record("imagenet", "1", FP, 3, 3),
    lambda: layout.part_record("imagenet", "1", FP, -1, 3),
])
def test_a_name_that_is_a_path_never_becomes_a_part(make):
    with pytest.raises(CacheError):
        make()


def test_the_cache_joins_the_parts_under_its_root_and_refuses_links(tmp_path):
    cache = Cache(tmp_path)
    assert cache.path(layout.entry("mnist", "1", FP)) == tmp_path / "prepared/mnist/1" / FP
    assert cache.path(layout.work_folder("mnist", "1", FP)) == \
        tmp_path / "prepared/mnist/1" / f".work-{FP}"
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared/mnist").symlink_to(tmp_path)
    with pytest.raises(CacheError, match="symbolic link"):
        cache.path(layout.entry("mnist", "1", FP))
    assert cache.path(layout.recipe_folder("mnist"), link_ok=True) == \
        tmp_path / "prepared/mnist"
    for bad in (("..",), ("a/b",), ("",)):
        with pytest.raises(CacheError):
            cache.path(bad)


def test_the_cache_folders_are_the_layout_s(tmp_path):
    cache = Cache(tmp_path)
    assert [cache.downloads, cache.prepared, cache.splits, cache.locks] == [
        Path(tmp_path, name) for name in ("downloads", "prepared", "splits", "locks")]
