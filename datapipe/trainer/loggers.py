"""Loggers: where the Trainer sends metrics and hyperparameters.

Each logger owns one run folder, ``save_dir/name/version_<N>``, where ``N`` is one
more than the highest ``version_*`` already there. The folder is chosen when
``version`` or ``log_dir`` is first read and created on the first write, so a logger
that is never used leaves nothing behind.

The Trainer calls loggers on global rank 0 only; loggers carry no rank logic.
This module imports neither torch nor tensorboard until a logger needs them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import tempfile
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datapipe.errors import ConfigError

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger", "create_logger"]


class Logger:
    """Base of loggers: a versioned run folder and four calls the Trainer makes."""

    def __init__(
        self, save_dir: str | os.PathLike = ".", name: str | None = "logs",
        version: int | str | None = None,
    ) -> None:
        self._save_dir = Path(save_dir)
        self._name = name or ""
        self._version = version

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> Path:
        return self._save_dir

    @property
    def root_dir(self) -> Path:
        """The folder that holds this logger's ``version_*`` folders."""
        return self._save_dir / self._name if self._name else self._save_dir

    @property
    def version(self) -> int | str:
        """The run's version: as given, else the next free number (fixed once read)."""
        if self._version is None:
            self._version = _next_version(self.root_dir)
        return self._version

    @property
    def log_dir(self) -> Path:
        version = self.version
        return self.root_dir / (version if isinstance(version, str) else f"version_{version}")

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Write out whatever is buffered."""

    def finalize(self, status: str) -> None:
        """End the run (``status`` is "success", "failed" or "interrupted"): save, close."""
        self.save()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(save_dir={str(self._save_dir)!r}, name={self._name!r})"


class CSVLogger(Logger):
    """Metrics into ``metrics.csv`` and hyperparameters into ``hparams.yaml``.

    Every ``log_metrics`` call is one row with a ``step`` column; the header is the
    sorted union of the names seen so far, and a name that appears later rewrites
    the file with the wider header. Rows are buffered and written on ``save()``,
    on ``finalize()`` and whenever ``flush_logs_every_n_steps`` rows are waiting.
    """

    METRICS_FILE = "metrics.csv"
    HPARAMS_FILE = "hparams.yaml"

    def __init__(
        self, save_dir: str | os.PathLike = ".", name: str | None = "logs",
        version: int | str | None = None, flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name, version)
        if flush_logs_every_n_steps < 1:
            raise ConfigError(
                f"flush_logs_every_n_steps must be at least 1, got {flush_logs_every_n_steps}")
        self._flush_every = flush_logs_every_n_steps
        self._rows: list[dict[str, Any]] = []
        self._header: list[str] | None = None  # what the file on disk has; None: not read
        self.hparams: dict[str, Any] = {}

    @property
    def metrics_file(self) -> Path:
        return self.log_dir / self.METRICS_FILE

    @property
    def experiment(self) -> CSVLogger:
        return self

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        self.hparams.update(_as_dict(params))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.log_dir / self.HPARAMS_FILE, to_yaml(self.hparams))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {name: _scalar(value) for name, value in metrics.items()}
        row["step"] = int(step)
        self._rows.append(row)
        if len(self._rows) >= self._flush_every:
            self.save()

    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._header is None:
            self._header = _read_header(path)
        names = set(self._header).union(*self._rows)
        if names != set(self._header) or not path.is_file():
            header = sorted(names)
            self._rewrite(path, header)
            self._header = header
        with open(path, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=self._header, restval="").writerows(self._rows)
        self._rows.clear()

    def _rewrite(self, path: Path, header: list[str]) -> None:
        """Write the file again with ``header``: earlier rows keep their values."""
        old_rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as file:
                old_rows = list(csv.DictReader(file))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=header, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class TensorBoardLogger(Logger):
    """Metrics as TensorBoard scalars (``events.out.tfevents.*``) in the run folder.

    ``experiment`` is the ``torch.utils.tensorboard.SummaryWriter``, made on first
    use, for images, histograms and the rest. Hyperparameters go to the HPARAMS tab
    and to ``hparams.yaml``; as in Lightning, ``hp_metric`` is logged as -1 with them
    unless ``default_hp_metric=False``.
    """

    HPARAMS_FILE = "hparams.yaml"

    def __init__(
        self, save_dir: str | os.PathLike = ".", name: str | None = "logs",
        version: int | str | None = None, default_hp_metric: bool = True,
        **writer_kwargs: Any,
    ) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                "(or use logger='csv')")
        super().__init__(save_dir, name, version)
        self._default_hp_metric = default_hp_metric
        self._writer_kwargs = writer_kwargs
        self._writer: Any = None
        self.hparams: dict[str, Any] = {}

    @property
    def experiment(self) -> Any:
        """The ``SummaryWriter`` (created, with the run folder, on first use)."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    f"TensorBoardLogger cannot load tensorboard ({err}): pip install tensorboard"
                ) from None
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), **self._writer_kwargs)
        return self._writer

    def log_hyperparams(
        self, params: Mapping[str, Any] | Namespace, metrics: Mapping[str, float] | None = None,
    ) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = _as_dict(params)
        self.hparams.update(params)
        writer = self.experiment
        _write_atomic(self.log_dir / self.HPARAMS_FILE, to_yaml(self.hparams))
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        flat = {name: _hparam_value(value) for name, value in _flatten(params).items()}
        experiment, start, end = hparams(flat, dict(metrics or {}))
        file_writer = writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for name, value in (metrics or {}).items():
            writer.add_scalar(name, _scalar(value), 0)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        writer = self.experiment
        for name, value in metrics.items():
            if isinstance(value, Mapping):
                writer.add_scalars(name, {k: _scalar(v) for k, v in value.items()}, step)
            else:
                writer.add_scalar(name, _scalar(value), step)

    def save(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def create_logger(
    kind: str | bool | Logger | None = "csv", save_dir: str | os.PathLike = ".",
    name: str | None = "logs", version: int | str | None = None,
) -> Logger | None:
    """The logger a Trainer's ``logger=`` argument names: "csv" (also True), "tensorboard"
    (or "tb"), a Logger (returned as is), or False/None for none."""
    if kind is None or kind is False:
        return None
    if isinstance(kind, Logger):
        return kind
    if kind is True:
        kind = "csv"
    kinds = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "tb": TensorBoardLogger}
    if not isinstance(kind, str) or kind.lower() not in kinds:
        raise ConfigError(
            f"unknown logger {kind!r}: use 'csv', 'tensorboard', a Logger, or False for none")
    return kinds[kind.lower()](save_dir, name=name, version=version)


# ---------------------------------------------------------------------- helpers


def _next_version(root: Path) -> int:
    versions = []
    if root.is_dir():
        for entry in root.iterdir():
            match = re.fullmatch(r"version_(\d+)", entry.name)
            if match and entry.is_dir():
                versions.append(int(match.group(1)))
    return max(versions) + 1 if versions else 0


def _scalar(value: Any) -> Any:
    """A tensor or numpy scalar as a Python number; anything else as it is."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _as_dict(params: Mapping[str, Any] | Namespace | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return dict(vars(params))
    return dict(params)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _hparam_value(value: Any) -> Any:
    """What TensorBoard's HPARAMS tab accepts: bool, int, float or str."""
    value = _scalar(value)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> list[str]:
    """The header of an existing metrics file (so a resumed run appends to it), or []."""
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return next(csv.reader(file), [])


# ---------------------------------------------------------------------- YAML by hand

# Plain (unquoted) YAML keys: identifiers that no YAML 1.1 reader takes for a bool/null.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def to_yaml(params: Mapping[str, Any]) -> str:
    """``params`` as a YAML block mapping whose values are JSON-style flow values.

    Readable by any YAML reader without pyyaml being needed to write it. Values that
    are neither JSON-like nor numbers (paths, classes, ...) are written as strings.
    """
    lines = []
    for key, value in params.items():
        lines.append(f"{_yaml_key(str(key))}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n" if lines else "{}\n"


def _yaml_key(key: str) -> str:
    if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS:
        return key
    return json.dumps(key)


def _yaml_value(value: Any) -> str:
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, numpy arrays and scalars
        value = value.tolist()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads "1e-05" as a string, "1.0e-05" as a float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}: {_yaml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return json.dumps(str(value))
