"""Cross-validation runs: every fold from Python or the CLI, folds as separate jobs, the table."""

from __future__ import annotations

import functools
import json
import math

import pytest

from datapipe.cli import main
from datapipe.cv import CVReport, FoldResult, cross_validate, fold_dir, gather
from datapipe.errors import ConfigError


def _result(fold, metrics, plan_id="aaaa0000aaaa0000", folds=3):
    return FoldResult(dataset="mnist", folds=folds, fold=fold, plan_id=plan_id,
                      split_id=f"{fold:016x}", stratified=True,
                      sizes={"train": 400, "val": 200}, metrics=metrics, epochs=1, steps=4)


def test_the_table_has_every_fold_then_mean_and_std():
    report = CVReport([_result(0, {"val_acc": 0.5, "val_loss": 1.0}),
                       _result(1, {"val_acc": 0.7, "val_loss": 2.0}),
                       _result(2, {"val_acc": 0.9, "val_loss": 3.0})])
    summary = report.summary()
    assert summary["val_acc"]["mean"] == pytest.approx(0.7)
    assert summary["val_acc"]["std"] == pytest.approx(math.sqrt(0.08 / 3))  # ddof=0
    assert summary["val_loss"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2 / 3)), "n": 3}
    lines = report.table().splitlines()
    assert lines[0] == "3-fold cross-validation of mnist (stratified), K-fold plan " \
                       "aaaa0000aaaa0000"
    assert lines[1].split() == ["fold", "split", "id", "train", "val", "epochs", "val_acc",
                                "val_loss"]
    assert lines[2].split() == ["0", "0000000000000000", "400", "200", "1", "0.5000", "1.0000"]
    assert lines[5].split() == ["mean", "0.7000", "2.0000"]
    assert lines[6].split() == ["std", "0.1633", "0.8165"]
    assert "ddof=0" in lines[7]


def _write(root, result):
    folder = fold_dir(root, result.fold)
    folder.mkdir(parents=True)
    (folder / "fold.json").write_text(json.dumps(result.to_json()))


def test_gather_reads_the_folds_of_separate_jobs_and_names_missing_ones(tmp_path):
    _write(tmp_path, _result(2, {"val_acc": 0.9}))
    _write(tmp_path, _result(0, {"val_acc": 0.5}))
    report = gather(tmp_path)
    assert [r.fold for r in report.results] == [0, 2] and report.missing == [1]
    assert "not run yet: fold(s) 1" in report.table()
    assert report.summary()["val_acc"]["mean"] == pytest.approx(0.7)


@pytest.mark.parametrize("damage, message", [
    (lambda root: _write(root, _result(1, {"val_acc": 0.1}, plan_id="bbbb0000bbbb0000")),
     "come from different K-fold plans"),
    (lambda root: (root / "fold-1").mkdir() or (root / "fold-1" / "fold.json").write_text("[]"),
     "is not a fold result of datapipe"),
    (lambda root: (root / "fold-1").mkdir() or (root / "fold-1" / "fold.json").write_text(
        json.dumps({**_result(2, {}).to_json()})), "holds fold 2, not fold 1"),
    (lambda root: (root / "fold-1").mkdir() or (root / "fold-1" / "fold.json").write_text(
        json.dumps({**_result(1, {}).to_json(), "metrics": {"val_acc": "high"}})),
     "a fold or metric of the wrong type"),
])
def test_gather_refuses_what_does_not_belong_together(tmp_path, damage, message):
    _write(tmp_path, _result(0, {"val_acc": 0.5}))
    damage(tmp_path)
    with pytest.raises(ConfigError, match=message):
        gather(tmp_path)


def test_gather_of_an_empty_folder_says_what_to_run(tmp_path):
    with pytest.raises(ConfigError, match="no fold results under .*datapipe train --folds K"):
        gather(tmp_path)


# ------------------------------------------------------------------ real runs


@pytest.fixture
def prepared(fake_mnist, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "mnist", "--source", str(fake_mnist.folder), "--no-verify",
                 "--quiet", "--cache-dir", str(cache)]) == 0
    return ["--cache-dir", str(cache), "--no-verify"]


TRAIN = ["train", "--data", "mnist", "--model", "mlp", "--epochs", "1", "--batch-size", "100",
         "--quiet"]


def test_train_folds_runs_every_fold_and_prints_the_table(prepared, tmp_path, capsys):
    root = tmp_path / "runs"
    capsys.readouterr()
    assert main([*TRAIN, "--folds", "3", "--stratify", "--root-dir", str(root), *prepared]) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation of mnist (stratified)" in out
    assert "mean" in out and "std" in out and "val_acc" in out and "val_loss" in out
    ids = set()
    for i in range(3):
        result = json.loads((fold_dir(root, i) / "fold.json").read_text())
        assert result["fold"] == i and result["sizes"] == {"train": 400, "val": 200,
                                                           "test": 100, "predict": 100}
        ids.add(result["split_id"])
        assert (fold_dir(root, i) / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
        assert (fold_dir(root, i) / "logs" / "version_0" / "metrics.csv").is_file()
    assert len(ids) == 3
    # cv-report prints the same table from the files alone.
    assert main(["cv-report", str(root)]) == 0
    assert capsys.readouterr().out.strip() in out
    # --ckpt-path last after a finished run keeps every fold: nothing is trained again.
    assert main([*TRAIN, "--folds", "3", "--stratify", "--root-dir", str(root),
                 "--ckpt-path", "last", *prepared]) == 0
    assert not (fold_dir(root, 0) / "logs" / "version_1").exists()


def test_folds_run_as_separate_jobs_are_gathered_by_cv_report(prepared, tmp_path, capsys):
    root = tmp_path / "runs"
    for fold in ("1", "0"):
        assert main([*TRAIN, "--folds", "3", "--fold", fold, "--root-dir", str(root),
                     *prepared]) == 0
    capsys.readouterr()
    assert main(["cv-report", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["folds"] == 3 and report["missing"] == [2]
    assert [r["fold"] for r in report["results"]] == [0, 1]
    assert set(report["summary"]) >= {"val_acc", "val_loss"}
    # Another K-fold plan (another seed) in the same folder is refused before training.
    code = main([*TRAIN, "--folds", "3", "--fold", "2", "--seed", "1", "--root-dir", str(root),
                 *prepared])
    err = capsys.readouterr().err
    assert code == 2 and "holds a fold of another K-fold plan" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--fold", "1"], "--fold I needs --folds K"),
    (["--folds", "3", "--val-split", "100"], "--val-split and --folds are alternatives"),
    (["--folds", "1"], "folds=1 must be an integer >= 2"),
    (["--folds", "3", "--fold", "3"], "fold=3 must be an integer in 0..2"),
    (["--folds", "300", "--stratify"], "folds=300 with stratify needs at least 300 samples"),
    (["--stratify", "--val-split", "5000"], None),  # 5000 > 600 rows: its own error
])
def test_fold_options_errors_are_one_line(argv, message, prepared, tmp_path, capsys):
    capsys.readouterr()
    code = main([*TRAIN, *argv, "--root-dir", str(tmp_path / "r"), *prepared])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    if message:
        assert message in lines[0]


def test_cross_validate_from_python_with_a_datamodule_factory(prepared, tmp_path):
    from datapipe.datamodules.mnist import MNISTDataModule
    from datapipe.models import ImageClassifier
    from datapipe.trainer import ModelCheckpoint

    seen = []

    def model(dm):
        seen.append(dm.plan_splits().id)
        return ImageClassifier.from_datamodule(dm, model="mlp")

    callback = ModelCheckpoint(monitor="val_loss", save_last=True)
    report = cross_validate(
        model, functools.partial(MNISTDataModule, cache_dir=prepared[1], verify=False,
                                 batch_size=100),
        folds=2, root_dir=tmp_path / "cv",
        trainer_kwargs={"max_epochs": 1, "enable_progress_bar": False, "callbacks": [callback]})
    assert [r.fold for r in report.results] == [0, 1] and report.missing == []
    assert [r.split_id for r in report.results] == seen and len(set(seen)) == 2
    assert report.results[0].plan_id == report.results[1].plan_id
    assert callback.best_model_path == ""  # each fold trained its own copy of the callback
    for r in report.results:
        assert set(r.metrics) >= {"val_acc", "val_loss"} and r.sizes["val"] == 300


def test_cross_validate_refuses_a_datamodule_instance(prepared, tmp_path):
    import datapipe

    dm = datapipe.load("mnist", cache_dir=prepared[1], verify=False)
    with pytest.raises(ConfigError, match="not a DataModule: each fold needs its own"):
        cross_validate(lambda dm: None, dm, folds=2, root_dir=tmp_path)
