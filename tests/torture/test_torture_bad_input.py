"""Bad input: malformed and truncated files, unknown names, bad specs, arguments, settings.

Each case runs the CLI in this process and must end in exactly one line on stderr that
says what is wrong (and names the file, option or value at fault), exit status 2, no
traceback; then the cache is audited (nothing wrong trusted, no temporary left) and a
good prepare into the same cache must succeed, byte-identical to a clean run, leaving
nothing behind. tests/test_cli.py covers a first set of user errors (a misspelt recipe,
an unclosed bracket, a split the recipe lacks, a missing --source folder); these go
further.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torture_kit as kit
from torture_kit import (
    TEST,
    TRAIN,
    audit,
    data_hashes,
    error_lines,
)

from datapipe.cli import main
from datapipe.formats.idx import encode_idx

world, figures = kit.world, kit.figures  # the suite's shared fixtures


def _images(n: int = 100, size: int = 28) -> bytes:
    return encode_idx(np.zeros((n, size, size), np.uint8))


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# file replaced in the --source folder -> its bytes, and what the one line must say
MALFORMED = {
    "bad IDX magic": (TEST[0], _gz(b"\x08\x03" + bytes(100)), "bad IDX magic"),
    "header too short": (TEST[0], _gz(b"\x00\x00"), "too short for an IDX header"),
    "unknown IDX type": (TEST[1], _gz(b"\x00\x00\x07\x01" + (100).to_bytes(4, "big")),
                         "unknown IDX type code 0x07"),
    "zero dimensions": (TEST[1], _gz(b"\x00\x00\x08\x00"), "zero dimensions"),
    "truncated IDX header": (TEST[0], _gz(b"\x00\x00\x08\x03" + bytes(6)),
                             "truncated IDX header"),
    "IDX body shorter than its header": (TEST[0], _gz(_images()[:-500]), TEST[0]),
    "truncated gzip archive": (TRAIN[0], None, "corrupt or truncated gzip stream"),
    "not gzip at all": (TEST[0], _images(), "not gzip data"),
    "empty file": (TEST[1], b"", TEST[1]),
    "images and labels disagree": (TEST[1], _gz(encode_idx(np.zeros(99, np.uint8))), "99"),
    # A few hundred bytes claiming 10^12 pixels: refused before anything is allocated.
    "IDX header claiming more than the file holds": (
        TEST[0], _gz(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big")
                                                 for n in (10**6, 1000, 1000)) + bytes(64)),
        "more than the file can hold"),
}
# Images of another size than the recipe declares (1, 28, 28) are refused at prepare.
WRONG_SIZE = pytest.param("wrong image size")
MALFORMED["wrong image size"] = (TEST[0], _gz(_images(size=27)), TEST[0])


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("datapipe") and "error:" in lines[0], lines[0]
    return lines[0]


def prepare(world, cache: Path, source: Path | str | None = None, *extra: str) -> list[str]:
    return ["prepare", "mnist", "--source", str(source or world.source), "--no-verify",
            "--quiet", "--cache-dir", str(cache), *extra]


def then_a_good_prepare_recovers(world, capsys, cache: Path, figures) -> None:
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == [], found
    code, _, err = cli(capsys, *prepare(world, cache))
    assert code == 0, err
    assert data_hashes(cache, "mnist") == world.reference
    found = audit(cache)
    figures.check(found)
    assert found.corruptions == [] and found.leftovers == [] and found.trusted_prepared == 2


@pytest.mark.parametrize("case", [c if c != "wrong image size" else WRONG_SIZE
                                  for c in MALFORMED])
def test_malformed_source_file(case, world, figures, capsys, tmp_path):
    name, data, needle = MALFORMED[case]
    source = tmp_path / "source"
    shutil.copytree(world.source, source)
    if data is None:  # cut the real archive in the middle of its deflate stream
        data = world.files[name][:len(world.files[name]) // 2]
    (source / name).write_bytes(data)
    cache = tmp_path / "cache"
    figures.fault("bad input")
    line = one_line(*cli(capsys, *prepare(world, cache, source))[::2])
    assert needle in line, line
    assert name in line, line  # it names the file at fault
    found = audit(cache)
    # A bad test file cannot spoil train, prepared first; nothing of the bad split is kept.
    assert found.trusted_prepared == (1 if name in TEST else 0)
    then_a_good_prepare_recovers(world, capsys, cache, figures)


def test_source_folder_missing_files(world, figures, capsys, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in TRAIN:
        shutil.copy(world.source / name, source / name)
    cache = tmp_path / "cache"
    figures.fault("bad input")
    line = one_line(*cli(capsys, *prepare(world, cache, source))[::2])
    assert f"lacks {TEST[0]} (or {TEST[0].removesuffix('.gz')}), {TEST[1]}" in line
    assert "--source" in line
    then_a_good_prepare_recovers(world, capsys, cache, figures)


def test_source_that_is_a_file(world, figures, capsys, tmp_path):
    cache = tmp_path / "cache"
    figures.fault("bad input")
    line = one_line(*cli(capsys, *prepare(world, cache, world.source / TEST[0]))[::2])
    assert "is not a folder" in line
    then_a_good_prepare_recovers(world, capsys, cache, figures)


# argv (the cache dir is appended where the command takes one) -> what the line must say
USER_ERRORS = {
    "unknown recipe for verify": (["verify", "mnits"], "unknown recipe 'mnits'; did you mean"),
    "unknown recipe for cache rm": (["cache", "rm", "nope"], "unknown recipe 'nope'"),
    "unknown recipe for train": (["train", "--data", "nope", "--model", "mlp"],
                                 "unknown recipe 'nope'"),
    "unknown model": (["train", "--data", "mnist", "--model", "resnet9000", "--no-verify"],
                      "unknown model 'resnet9000'"),
    "percent out of range": (["prepare", "mnist", "--split", "train[:150%]"],
                             "outside -100%..100%"),
    "dangling plus": (["prepare", "mnist", "--split", "train+"], "empty term"),
    "slice step": (["prepare", "mnist", "--split", "train[::2]"], "steps are not supported"),
    "empty spec": (["prepare", "mnist", "--split", ""], "the spec is empty"),
    "val fraction out of range": (["train", "--data", "mnist", "--model", "mlp",
                                   "--val-split", "1.5", "--no-verify"],
                                  "val=1.5 is a fraction outside [0, 1)"),
    "unknown option": (["prepare", "mnist", "--bogus"], "unrecognized arguments: --bogus"),
    "cache without action": (["cache"], "required: ACTION"),
    "cache rm without name": (["cache", "rm"], "required: name"),
    "unknown cache action": (["cache", "frob"], "invalid choice: 'frob'"),
    "verify two names": (["verify", "mnist", "cifar10"], "unrecognized arguments: cifar10"),
    "version without value": (["cache", "rm", "mnist", "--version"],
                              "expected one argument"),
    "epochs not a number": (["train", "--data", "mnist", "--model", "mlp", "--epochs", "x"],
                            "invalid int value: 'x'"),
}
TAKES_CACHE = ("prepare", "verify", "train")


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error(case, world, figures, capsys, tmp_path):
    argv, needle = USER_ERRORS[case]
    cache = tmp_path / "cache"
    argv = list(argv)
    if argv[0] in TAKES_CACHE or argv[:2] == ["cache", "rm"] and len(argv) > 2 \
            and argv[-1] != "--version":
        argv += ["--cache-dir", str(cache)]
    if argv[0] == "train" and "--data" in argv and "mnist" in argv:
        argv += ["--source", str(world.source), "--quiet", "--root-dir", str(tmp_path / "runs")]
    figures.fault("bad input")
    line = one_line(*cli(capsys, *argv)[::2])
    assert needle in line, line
    then_a_good_prepare_recovers(world, capsys, cache, figures)


SETTINGS = {
    "DATAPIPE_LOCK_TIMEOUT": ("soon", "$DATAPIPE_LOCK_TIMEOUT='soon' is not a number"),
    "DATAPIPE_TIMEOUT": ("-1", "$DATAPIPE_TIMEOUT='-1' is not a positive number"),
    "DATAPIPE_LOCK": ("sfot", "$DATAPIPE_LOCK='sfot' is not a lock mode"),
}


@pytest.mark.parametrize("variable", list(SETTINGS))
def test_bad_setting(variable, world, figures, capsys, monkeypatch, tmp_path):
    value, needle = SETTINGS[variable]
    cache = tmp_path / "cache"
    figures.fault("bad input")
    with monkeypatch.context() as patched:
        patched.setenv(variable, value)
        line = one_line(*cli(capsys, *prepare(world, cache))[::2])
    assert needle in line, line
    then_a_good_prepare_recovers(world, capsys, cache, figures)
