"""K-fold cross-validation with the Trainer: a fresh model per fold, one table at the end.

    from functools import partial
    import datapipe
    from datapipe.models import ImageClassifier

    report = datapipe.cross_validate(
        lambda dm: ImageClassifier.from_datamodule(dm, model="lenet"),
        "mnist", folds=5, stratify=True, root_dir="runs/cv",
        trainer_kwargs={"max_epochs": 3})
    print(report.table())            # per fold, then mean and std of each val metric

Every fold is a DataModule with ``folds=K, fold=I``: the K-fold plan is computed once
and shared, each fold has its own split id (in its data card and checkpoints). Fold I
trains under ``<root_dir>/fold-<I>/`` (checkpoints, metrics.csv) and ends by writing
``fold-<I>/fold.json`` (ids, sizes, final validation metrics), so folds run as separate
jobs (``datapipe train --folds K --fold I``) are gathered by :func:`gather`
(``datapipe cv-report ROOT``). Gathering and the table need no torch.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datapipe.cache import read_json, write_json_atomic
from datapipe.errors import ConfigError
from datapipe.splits import Folds

RESULT_FILE = "fold.json"
RESULT_FORMAT = "datapipe.cv-fold/1"
_FOLD_DIR = re.compile(r"fold-(\d{1,6})")


def fold_dir(root: str | os.PathLike, fold: int) -> Path:
    """Where fold ``fold`` of a cross-validation under ``root`` keeps its run."""
    return Path(root) / f"fold-{int(fold)}"


@dataclass(frozen=True)
class FoldResult:
    """What one fold's run leaves: its ids, sizes and final validation metrics."""

    dataset: str
    folds: int
    fold: int
    plan_id: str
    split_id: str
    stratified: bool
    sizes: dict[str, int]
    metrics: dict[str, float]
    epochs: int
    steps: int
    run_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> FoldResult:
        """A result read from a file; anything unexpected is one ConfigError line."""
        def bad(why: str) -> ConfigError:
            return ConfigError(f"{where} is not a fold result of datapipe ({why}); run that "
                               f"fold again")

        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT:
            raise bad("unknown format")
        try:
            result = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise bad(f"missing {e}") from None
        texts = (result.dataset, result.plan_id, result.split_id, result.run_dir)
        counts = (result.folds, result.fold, result.epochs, result.steps)
        if not all(isinstance(t, str) for t in texts) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise bad("a field of the wrong type")
        if not 0 <= result.fold < result.folds or not isinstance(result.metrics, dict) or not \
                all(isinstance(k, str) and isinstance(v, numbers.Real)
                    for k, v in result.metrics.items()):
            raise bad("a fold or metric of the wrong type")
        return result


@dataclass(frozen=True)
class CVReport:
    """The folds of one cross-validation: per-fold results, mean and std of each metric."""

    results: list[FoldResult]
    missing: list[int] = field(default_factory=list)

    @property
    def folds(self) -> int:
        return self.results[0].folds

    @property
    def plan_id(self) -> str:
        return self.results[0].plan_id

    def metric_names(self) -> list[str]:
        return sorted({name for r in self.results for name in r.metrics})

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean", "std", "n"}}`` over the folds that report it.

        ``std`` is the population standard deviation (ddof=0), as numpy's ``std`` that
        ``cross_val_score(...).std()`` uses.
        """
        out = {}
        for name in self.metric_names():
            values = [float(r.metrics[name]) for r in self.results if name in r.metrics]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            out[name] = {"mean": mean, "std": std, "n": len(values)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"folds": self.folds, "plan_id": self.plan_id, "missing": self.missing,
                "results": [r.to_json() for r in self.results], "summary": self.summary()}

    def table(self) -> str:
        """Per fold, then mean and std of each validation metric, as aligned text."""
        first = self.results[0]
        names = self.metric_names()
        head = (f"{first.folds}-fold cross-validation of {first.dataset}"
                f"{' (stratified)' if first.stratified else ''}, K-fold plan {first.plan_id}")
        rows = [["fold", "split id", "train", "val", "epochs", *names]]
        for r in self.results:
            rows.append([str(r.fold), r.split_id, str(r.sizes.get("train", "-")),
                         str(r.sizes.get("val", "-")), str(r.epochs),
                         *(f"{r.metrics[n]:.4f}" if n in r.metrics else "-" for n in names)])
        summary = self.summary()
        rows.append(["mean", "", "", "", "", *(f"{summary[n]['mean']:.4f}" for n in names)])
        rows.append(["std", "", "", "", "", *(f"{summary[n]['std']:.4f}" for n in names)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head, *("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows)]
        lines.append(f"(std: population, ddof=0; over {len(self.results)} of {first.folds} "
                     f"folds)")
        if self.missing:
            lines.append(f"not run yet: fold(s) {', '.join(map(str, self.missing))}")
        return "\n".join(lines)


# ------------------------------------------------------------------ gathering


def gather(root: str | os.PathLike) -> CVReport:
    """The report of the folds whose results lie under ``root`` (``fold-<I>/fold.json``).

    Folds run as separate jobs are gathered here; they must come from one K-fold plan
    (same data, specs, seed and K), else ConfigError names the mismatch.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder of cross-validation runs")
    results = []
    for child in sorted(root.iterdir()):
        m = _FOLD_DIR.fullmatch(child.name)
        path = child / RESULT_FILE
        if not m or child.is_symlink() or not path.is_file():
            continue
        result = FoldResult.from_json(read_json(path), str(path))
        if result.fold != int(m[1]):
            raise ConfigError(f"{path} holds fold {result.fold}, not fold {m[1]}; move it to "
                              f"{fold_dir(root, result.fold)}")
        results.append(result)
    if not results:
        raise ConfigError(f"no fold results under {root}; run `datapipe train --folds K "
                          f"--fold I --root-dir {root}` for each fold first")
    plans = sorted({(r.plan_id, r.folds, r.dataset) for r in results})
    if len(plans) > 1:
        found = "; ".join(f"{d} plan {p} ({k} folds): folds "
                          f"{', '.join(str(r.fold) for r in results if r.plan_id == p)}"
                          for p, k, d in plans)
        raise ConfigError(f"the folds under {root} come from different K-fold plans ({found}); "
                          f"keep one cross-validation per folder")
    results.sort(key=lambda r: r.fold)
    done = {r.fold for r in results}
    return CVReport(results, [i for i in range(results[0].folds) if i not in done])


# ------------------------------------------------------------------ running


def _datamodule(data: Any, folds: int, fold: int, stratify: bool | None,
                kwargs: Mapping[str, Any]) -> Any:
    extra: dict[str, Any] = {"folds": folds, "fold": fold}
    if stratify is not None:
        extra["stratify"] = stratify
    if isinstance(data, str):
        from datapipe.registry import load

        dm = load(data, **kwargs, **extra)
    elif callable(data) and not hasattr(data, "setup"):
        dm = data(**kwargs, **extra)
    else:
        raise ConfigError("cross_validate needs a recipe name or a DataModule factory (a "
                          "DataModule class, a functools.partial of one, or a function taking "
                          "folds= and fold=), not a DataModule: each fold needs its own")
    val = getattr(dm, "split_specs", {}).get("val")
    if not isinstance(val, Folds) or (val.k, val.fold) != (folds, fold):
        raise ConfigError(f"the DataModule factory did not pass folds={folds}, fold={fold} on "
                          f"to the DataModule; give it **kwargs and pass them")
    return dm


def _final_metrics(trainer: Any) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith("val_") and not k.endswith(("_step", "_epoch"))}


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cross_validate(
    model_factory: Callable[[Any], Any],
    datamodule: str | Callable[..., Any],
    folds: int,
    *,
    fold: int | None = None,
    stratify: bool | None = None,
    root_dir: str | os.PathLike = "runs",
    trainer_kwargs: Mapping[str, Any] | None = None,
    ckpt_path: str | os.PathLike | None = None,
    **datamodule_kwargs: Any,
) -> CVReport | None:
    """Train a fresh model on each fold (or only ``fold``) and report the folds.

    ``model_factory(dm)`` builds the model of a fold from its DataModule. ``datamodule``
    is a recipe name (``datapipe.load(name, folds=K, fold=I, **datamodule_kwargs)``) or
    a factory called the same way (a DataModule class or ``functools.partial`` of one).
    Each fold gets a new ``Trainer(**trainer_kwargs)`` with ``default_root_dir``
    ``<root_dir>/fold-<I>`` and its own copy of the callbacks. ``ckpt_path="last"``
    continues an interrupted run: a fold that finished (its ``fold.json`` is there, of
    the same plan) is kept, one with a checkpoint resumes from it, the rest start
    fresh; any other ``ckpt_path`` needs ``fold``. Returns the :class:`CVReport` of the
    folds under ``root_dir`` (those of other jobs included); None on processes other
    than global rank 0 of a multi-process run.
    """
    k = Folds(folds, fold).k
    which = range(k) if fold is None else [fold]
    trainer_kwargs = dict(trainer_kwargs or {})
    if "default_root_dir" in trainer_kwargs:
        raise ConfigError("give root_dir to cross_validate, not default_root_dir: each fold "
                          "runs under <root_dir>/fold-<I>")
    if ckpt_path not in (None, "last") and fold is None:
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r} names one checkpoint, so it needs "
                          f"fold=I; to continue every fold use ckpt_path='last'")
    from datapipe.trainer import Trainer
    from datapipe.trainer import checkpoint as ckpt

    for i in which:
        dm = _datamodule(datamodule, k, i, stratify, datamodule_kwargs)
        dm.prepare_data()  # locked and idempotent: the plan id is known before training
        plan = dm.plan_splits()
        _refuse_other_plans(root_dir, plan.plan_id)
        where = fold_dir(root_dir, i)
        resume = ckpt_path
        if ckpt_path == "last":
            done = read_json(where / RESULT_FILE)
            if isinstance(done, dict) and done.get("split_id") == plan.id:
                continue  # finished before; its result is gathered below
            resume = "last" if ckpt.find_last(where) is not None else None
        kwargs = {**trainer_kwargs, "callbacks": copy.deepcopy(trainer_kwargs.get("callbacks"))}
        trainer = Trainer(**kwargs, default_root_dir=where)
        trainer.fit(model_factory(dm), dm, ckpt_path=resume)
        if trainer.is_global_zero:
            result = FoldResult(
                dataset=dm.name, folds=k, fold=i, plan_id=plan.plan_id, split_id=plan.id,
                stratified=bool(dm.split_specs["val"].stratify), sizes=plan.sizes(),
                metrics=_final_metrics(trainer), epochs=trainer.current_epoch,
                steps=trainer.global_step, run_dir=str(trainer.log_dir))
            write_json_atomic(where / RESULT_FILE, result.to_json())
    return gather(root_dir) if _is_global_zero() else None


def _refuse_other_plans(root: str | os.PathLike, plan_id: str) -> None:
    """Refuse, before any training, a folder that holds folds of another K-fold plan."""
    root = Path(root)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        found = read_json(child / RESULT_FILE) if _FOLD_DIR.fullmatch(child.name) else None
        if isinstance(found, dict) and found.get("plan_id") not in (None, plan_id):
            raise ConfigError(f"{child} holds a fold of another K-fold plan "
                              f"({found.get('plan_id')}, this one is {plan_id}: other data, "
                              f"specs, seed or K); give another root folder or remove it")
