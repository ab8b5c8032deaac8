"""`datapipe` on the command line: prepare, list, info, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from loopback import MirrorServer

from datapipe import load
from datapipe.cli import main

T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_test_split_from_a_mirror_then_again_from_cache(real_mnist, tmp_path, capsys):
    files = {n: (real_mnist / n).read_bytes() for n in T10K}
    with MirrorServer(files) as mirror:
        code, out, err = run(capsys, "prepare", "mnist", "--split", "test",
                             "--mirror", mirror.url, "--cache-dir", str(tmp_path))
        assert code == 0, err
        assert "mnist test: 10000 rows, fingerprint" in out and "prepared in" in out
        assert sum(mirror.requests.values()) == 2
        code, out, _ = run(capsys, "prepare", "mnist", "--split", "test",
                           "--mirror", mirror.url, "--cache-dir", str(tmp_path))
        assert code == 0 and "already prepared" in out
        assert sum(mirror.requests.values()) == 2  # the second prepare downloads nothing


def test_all_mirrors_failing_is_one_line_listing_each(tmp_path, capsys):
    own = load("mnist").recipe.download.mirrors  # cut off by the suite's loopback guard
    with MirrorServer({}, mode="http500") as broken:
        code, out, err = run(capsys, "prepare", "mnist", "--split", "test", "--quiet",
                             "--mirror", broken.url, "--cache-dir", str(tmp_path))
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("datapipe: error: could not download t10k-")
    assert broken.url in line and "500" in line
    assert own and all(m in line for m in own)
    assert "--mirror" in line and "--source" in line
    assert not list((tmp_path / "prepared").glob("*/*/*"))


def test_source_and_no_verify_mark_the_data_unverified(fake_mnist, tmp_path, capsys):
    code, out, err = run(capsys, "prepare", "mnist", "--source", str(fake_mnist.folder),
                         "--no-verify", "--cache-dir", str(tmp_path))
    assert code == 0, err
    assert out.count("(UNVERIFIED sources)") == 2
    assert "datapipe: warning: t10k-images-idx3-ubyte.gz" in err

    code, out, _ = run(capsys, "info", "mnist", "--json", "--cache-dir", str(tmp_path))
    card = json.loads(out)
    assert code == 0
    assert card["prepared"]["train"]["rows"] == 600
    assert card["prepared"]["test"]["verified"] is False
    checksums = {s["filename"]: s for s in card["prepared"]["test"]["sources"]}
    assert checksums[T10K[0]]["checksum"] == fake_mnist.md5(T10K[0])
    assert checksums[T10K[0]]["expected"] == "9fb629c4189551a2d022fa330f9573f3"
    # The default val_split=0.2 (lightning-bolts') carves 120 of the 600 rows.
    assert card["splits"]["sizes"]["val"] == 120


def test_info_shows_the_four_answers(fake_mnist, tmp_path, capsys):
    assert main(["prepare", "mnist", "--source", str(fake_mnist.folder), "--no-verify",
                 "--cache-dir", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "info", "mnist", "--cache-dir", str(tmp_path))
    assert code == 0, err
    for heading in ("How was the data prepared?", "What splits?",
                    "What transforms and normalization?"):
        assert heading in out
    assert "NO" in out and "UNVERIFIED (expected 9fb629c4189551a2d022fa330f9573f3)" in out


def test_list_filters_by_pattern(capsys):
    assert {"cifar10", "cifar100", "mnist"} <= set(run(capsys, "list")[1].split())
    assert run(capsys, "list", "cifar*")[1].split() == ["cifar10", "cifar100"]
    assert run(capsys, "list", "nothing*")[1] == ""


@pytest.mark.parametrize("argv, message", [
    (["prepare", "mnsit"], "unknown recipe 'mnsit'; did you mean mnist?"),
    (["prepare", "mnist", "--split", "train[:5%"], "train[:5%"),
    (["prepare", "mnist", "--split", "validation"], "mnist has no split 'validation'"),
    (["prepare", "mnist", "--source", "/nonexistent/folder"], "/nonexistent/folder"),
    (["info", "nope"], "unknown recipe 'nope'"),
    (["prepare"], "the following arguments are required: name"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--recipes", "/no/such/dir", "list"], "recipe folder /no/such/dir does not exist"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code, out, err = run(capsys, *argv, *(["--cache-dir", str(tmp_path)]
                                          if argv[0] == "prepare" and len(argv) > 1 else []))
    assert code == 2
    lines = [ln for ln in err.splitlines() if not ln.startswith("usage:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="unknown recipe"):
        main(["--debug", "info", "zzz"])


@pytest.mark.usefixtures("fresh_registry")
def test_recipes_folder_adds_recipes(tmp_path, capsys):
    (tmp_path / "extra.py").write_text(
        "import datapipe\nfrom datapipe.datamodules.mnist import RECIPE\n"
        "@datapipe.register('extra-digits')\n"
        "def f(**kw):\n    return datapipe.DataModule(RECIPE, **kw)\n")
    code, out, _ = run(capsys, "--recipes", str(tmp_path), "list")
    assert code == 0 and "extra-digits" in out.split()


def test_prepare_list_and_info_never_import_torch(fake_mnist, tmp_path):
    """The fast paths stay fast: no torch, torchvision or datasets import."""
    script = (
        "import sys\n"
        "from datapipe.cli import main\n"
        f"cache = {str(tmp_path)!r}\n"
        f"assert main(['prepare', 'mnist', '--quiet', '--no-verify', '--source', "
        f"{str(fake_mnist.folder)!r}, '--cache-dir', cache]) == 0\n"
        "assert main(['list']) == 0\n"
        "assert main(['info', 'mnist', '--cache-dir', cache]) == 0\n"
        "heavy = [m for m in ('torch', 'torchvision', 'datasets', 'fsspec', 's3fs', 'botocore')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


TRAIN = ["train", "--data", "mnist", "--model", "mlp"]


@pytest.mark.parametrize("argv, message", [
    (["prepare", "mnist", "--mirror", "http://[::1"], "is not a well-formed URL"),
    (["prepare", "mnist", "--mirror", "http://:80/"], "names no host"),
    (["prepare", "mnist", "--mirror", "http://127.0.0.1:99999/"], "is not a well-formed URL"),
    (["prepare", "mnist", "--mirror", "http://127.0.0.1/\x00"], "is not a URL"),
    (["prepare", "mnist", "--num-shards", "0", "--shard-index", "0"], "less than 1"),
    ([*TRAIN, "--seed", "99999999999999999999999"], "is out of range"),
    ([*TRAIN, "--seed", "-1"], "'-1' is less than 0"),
    ([*TRAIN, "--epochs", "-3"], "'-3' is less than 1"),
    ([*TRAIN, "--max-steps", "0"], "'0' is less than 1"),
    ([*TRAIN, "--batch-size", "0"], "'0' is less than 1"),
    ([*TRAIN, "--num-workers", "-1"], "'-1' is less than 0"),
    ([*TRAIN, "--devices", "0"], "'0' is less than 1"),
    ([*TRAIN, "--lr", "inf"], "'inf' is not a finite number above 0"),
    ([*TRAIN, "--lr", "nan"], "'nan' is not a finite number above 0"),
    ([*TRAIN, "--lr", "-0.1"], "'-0.1' is not a finite number above 0"),
    ([*TRAIN, "--val-split", "nan"], "'nan' is neither a count nor a fraction"),
    (["test", "--data", "mnist", "--ckpt", "x.ckpt", "--batch-size", "-2"], "less than 1"),
])
def test_out_of_range_options_are_one_line(argv, message, tmp_path, capsys):
    code, _, err = run(capsys, *argv, "--cache-dir", str(tmp_path))
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("usage:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_root_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("a file\n")
    for root in (runs, runs / "deeper"):
        code, _, err = run(capsys, *TRAIN, "--root-dir", str(root), "--cache-dir",
                           str(tmp_path / "cache"))
        assert code == 2 and "is not a folder" in err and "Traceback" not in err, err
    assert runs.read_text() == "a file\n" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "soon", ""])
def test_lock_timeout_must_be_finite_and_not_negative(value, fake_mnist, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setenv("DATAPIPE_LOCK_TIMEOUT", value)
    code, _, err = run(capsys, "prepare", "mnist", "--source", str(fake_mnist.folder),
                       "--no-verify", "--quiet", "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "Traceback" not in err, err
    assert f"$DATAPIPE_LOCK_TIMEOUT={value!r} is not a number of seconds" in err
    assert not list((tmp_path / "cache" / "prepared").glob("*/*/*"))


def test_a_closed_pipe_ends_cache_ls_quietly(fake_mnist, tmp_path):
    """``datapipe cache ls | head -1``: the reader leaves; no traceback, SIGPIPE's status."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "datapipe", "cache", "ls", "--cache-dir",
                               str(tmp_path)], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr
