"""Checkpoint files: one torch.save'd dict holding everything a run needs to go on.

Keys: ``format``, ``module_class``, ``hparams``, ``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``scaler``, ``epoch``, ``global_step``, ``loops`` (where in the
epoch), ``metrics`` (running epoch sums), ``callbacks``, ``rng``, ``datamodule`` (the
loader's position) and ``data_card`` (what data the model saw). Files are written
through a temporary and a rename, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import importlib
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datapipe.cache import write_bytes_atomic
from datapipe.errors import ConfigError

FORMAT = "datapipe.checkpoint/1"
LAST = "last.ckpt"


def save(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save``; ConfigError if missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold plain containers, tensors and numpy RNG state only.
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise ConfigError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a datapipe checkpoint (format {FORMAT})")
    return checkpoint


def find_last(root: str | os.PathLike) -> Path | None:
    """The newest ``last.ckpt`` (else newest ``*.ckpt``) under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    for pattern in (f"**/{LAST}", "**/*.ckpt"):
        found = [p for p in root.glob(pattern) if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime_ns)
    return None


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    module, _, name = path.partition(":")
    try:
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import the checkpoint's module class {path}: {e}") from None
    return target


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
