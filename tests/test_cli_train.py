"""`datapipe train` and `datapipe test`: a model from the zoo on a recipe, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from datapipe.cli import main


@pytest.fixture
def prepared(fake_mnist, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "mnist", "--source", str(fake_mnist.folder), "--no-verify",
                 "--quiet", "--cache-dir", str(cache)]) == 0
    return ["--cache-dir", str(cache), "--no-verify"]


def test_train_then_test_a_checkpoint(prepared, tmp_path, capsys):
    root = tmp_path / "runs"
    capsys.readouterr()
    code = main(["train", "--data", "mnist", "--model", "mlp", "--epochs", "2",
                 "--val-split", "100", "--batch-size", "50", "--root-dir", str(root),
                 "--quiet", *prepared])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "after 2 epoch(s), 20 steps:" in out
    assert "val_acc" in out and "val_loss" in out
    metrics = root / "logs" / "version_0" / "metrics.csv"
    assert f"metrics: {metrics}" in out and metrics.is_file()
    last = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    code = main(["test", "--data", "mnist", "--ckpt", str(last), "--quiet", *prepared])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(trained on mnist) on mnist test:" in out
    assert "test_acc" in out and "test_loss" in out

    # Continue the same run for a third epoch from its last checkpoint.
    code = main(["train", "--data", "mnist", "--model", "mlp", "--epochs", "3",
                 "--val-split", "100", "--batch-size", "50", "--root-dir", str(root),
                 "--ckpt-path", "last", "--quiet", *prepared])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "after 3 epoch(s), 30 steps:" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "mnist", "--model", "lenet5"],
     "unknown model 'lenet5'; did you mean lenet"),
    (["train", "--data", "mnist", "--model", "mlp", "--devices", "999"], "devices=999 but only"),
    (["train", "--data", "mnsit", "--model", "mlp"], "did you mean mnist?"),
    (["train", "--data", "mnist", "--model", "mlp", "--precision", "8"], "precision='8'"),
    (["test", "--data", "mnist", "--ckpt", "/no/such.ckpt"],
     "checkpoint /no/such.ckpt does not exist"),
])
def test_train_and_test_errors_are_one_line(argv, message, prepared, capsys):
    capsys.readouterr()
    code = main([*argv, "--val-split", "100"] if argv[0] == "train" else argv)
    _, err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_devices_2_relaunches_under_torchrun(prepared, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "datapipe", "train", "--data", "mnist", "--model", "mlp",
         "--devices", "2", "--max-steps", "4", "--val-split", "100", "--batch-size", "50",
         "--root-dir", str(tmp_path / "runs"), "--quiet", *prepared],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("4 steps:") == 1  # printed by rank 0 only


def test_a_diverging_run_ends_in_one_line_naming_the_step(prepared, tmp_path, capsys):
    capsys.readouterr()
    code = main(["train", "--data", "mnist", "--model", "mlp", "--epochs", "2", "--lr", "1e30",
                 "--optimizer", "sgd", "--val-split", "100", "--batch-size", "50",
                 "--root-dir", str(tmp_path / "runs"), "--quiet", *prepared])
    _, err = capsys.readouterr()
    assert code == 2, err
    [line] = [ln for ln in err.splitlines() if ln.strip()]
    assert "the training loss is" in line and "at step" in line, line
