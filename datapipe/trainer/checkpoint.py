"""Checkpoint files: one torch.save'd dict of tensors and plain data, read without running code.

Keys: ``format``, ``module`` (the registered name of the Module class, or None),
``module_type`` (its class, for messages only: never imported), ``hparams``,
``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``scaler``, ``epoch``,
``global_step``, ``loops`` (where in the epoch), ``metrics`` (running epoch sums),
``callbacks``, ``rng``, ``datamodule`` (the loader's position), ``data_card`` (what data
the model saw) and ``precision``. Files are written through a temporary and a rename,
so a crash never leaves half a checkpoint.

``capture`` builds that dict from a trainer and ``restore`` puts it back, so a resumed
run continues mid-epoch with the same batch order and ends with the same weights.

A checkpoint may come from anyone, so reading one never runs code: ``torch.load`` with
``weights_only=True`` (no pickled callables), only zip files whose sizes add up (no
compressed bombs, no legacy format that allocates what it declares), every tensor backed
by bytes present in the file, plain data of bounded size and depth elsewhere, and the
module class looked up by name in a registry (``datapipe.trainer.module``), never
imported from a path the file names.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from datapipe.cache import write_bytes_atomic
from datapipe.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from datapipe.trainer.trainer import Trainer

FORMAT = "datapipe.checkpoint/2"
LEGACY_FORMAT = "datapipe.checkpoint/1"  # numpy RNG state as an ndarray, module as a path
LAST = "last.ckpt"

# Plain data in a checkpoint: far more than any run writes (an optimizer's state is a
# few values per parameter tensor), far less than a pickle of shared references
# ("billion laughs") would make a reader walk, print or compare.
MAX_VALUES = 1_000_000
MAX_DEPTH = 48
_LEAVES = frozenset({type(None), bool, int, float, str, bytes})
_TORCH_LEAVES = (torch.Size, torch.dtype, torch.device)  # weights_only reads these too
_INT_LIMIT = 2**64  # larger ints only come from crafted files (and break str() and JSON)

_MT_KEY = 624  # words in numpy's MT19937 key; python's random keeps 624 + the position


# ------------------------------------------------------------------ plain data


def check_plain(value: Any, what: str, *, tensors: bool = False) -> None:
    """Raise CheckpointError unless ``value`` is plain data (tensors too, if allowed).

    Plain: None, bool, int, float, str, bytes, and lists, tuples and dicts (str or int
    keys) of them, at most MAX_VALUES values and MAX_DEPTH levels (a cycle exceeds it).
    Every tensor must be a dense one whose elements the file's bytes hold.
    """
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    count = 0
    while stack:
        v, where, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise CheckpointError(
                f"{what} holds more than {MAX_VALUES} values or {MAX_DEPTH} levels of "
                f"nesting; no checkpoint datapipe writes does, so it was crafted or damaged")
        kind = type(v)
        if kind in _LEAVES:
            if kind is int and not -_INT_LIMIT < v < _INT_LIMIT:
                raise CheckpointError(f"{what}{_where(where)} is an integer of "
                                      f"{v.bit_length()} bits; checkpoints hold 64-bit ones")
            continue
        if kind is list or kind is tuple:
            stack.extend((item, (*where, i), depth + 1) for i, item in enumerate(v))
        elif kind is dict or kind is OrderedDict:
            for key, item in v.items():
                if type(key) not in (str, int):
                    raise CheckpointError(f"{what}{_where(where)} has a key of type "
                                          f"{type(key).__name__}; keys are str or int")
                stack.append((item, (*where, key), depth + 1))
        elif tensors and isinstance(v, torch.Tensor):
            _check_tensor(v, f"{what}{_where(where)}")
        elif tensors and isinstance(v, _TORCH_LEAVES):
            continue
        else:
            allowed = "tensors and plain data" if tensors else "plain data"
            raise CheckpointError(
                f"{what}{_where(where)} is a {kind.__module__}.{kind.__qualname__}; a "
                f"checkpoint holds {allowed} only (None, bool, int, float, str, lists, "
                f"tuples and dicts)")


def _where(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _check_tensor(t: torch.Tensor, what: str) -> None:
    """A dense tensor whose elements the bytes in the file hold (a stride-0 view of
    10**12 elements over one byte would make any later copy allocate terabytes)."""
    if t.layout is not torch.strided or t.is_quantized or t.is_nested:
        raise CheckpointError(f"{what} is a {t.layout} tensor; checkpoints hold dense ones")
    if t.numel() > t.untyped_storage().nbytes() // max(1, t.element_size()):
        raise CheckpointError(f"{what} declares {t.numel()} elements over "
                              f"{t.untyped_storage().nbytes()} bytes; the file is crafted")


# ------------------------------------------------------------------ writing


def save(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` atomically to ``path``; it must hold tensors and plain data."""
    # Checked before writing: a file that weights_only loading refuses is a run lost.
    check_plain(checkpoint, "the checkpoint", tensors=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path


# ------------------------------------------------------------------ reading


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save`` without running anything in it.

    CheckpointError (one line) if it is missing, damaged, crafted or not datapipe's.
    Files of the previous format (datapipe.checkpoint/1) are read too, through the
    same weights-only loader, and come back in the current format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        with _legacy_numpy():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} is refused: {_refusal(e)}; datapipe reads "
                              f"only tensors and plain data from checkpoints (nothing "
                              f"in it was run)") from None
    except Exception as e:  # torch raises many types for a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: "
                              f"{first}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (FORMAT,
                                                                           LEGACY_FORMAT):
        raise CheckpointError(f"{path} is not a datapipe checkpoint (format {FORMAT})")
    if checkpoint["format"] == LEGACY_FORMAT:
        checkpoint = _upgrade(checkpoint, path)
    check_plain(checkpoint, f"checkpoint {path}", tensors=True)
    _check_layout(checkpoint, path)
    return checkpoint


def _check_archive(path: Path) -> None:
    """A zip archive (torch.save's format) whose members are stored, not compressed.

    torch also reads a legacy tar/pickle format that allocates the sizes it declares
    before reading them, and a compressed member could inflate far beyond the file;
    datapipe writes neither, so both are refused before torch sees the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: it is damaged or "
                              f"truncated ({e})") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"checkpoint {path} cannot be read: it is not a torch zip "
                              f"archive ({size} bytes, starting {magic!r})")
    declared = sum(m.file_size for m in members)
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or declared > size:
        raise CheckpointError(f"checkpoint {path} holds compressed members ({declared} bytes "
                              f"declared in a {size}-byte file); torch.save never writes "
                              f"those, so it is refused")


def _refusal(error: Exception) -> str:
    """The line of torch's weights-only refusal that names what the file wanted."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "unpickling failed")
    return line.split(" was not an allowed global")[0].rstrip(".")[:200]


def _is_nonneg_int(value: Any) -> bool:
    return type(value) is int and value >= 0


def _check_layout(checkpoint: dict[str, Any], path: Path) -> None:
    """The keys every reader uses, with the types they must have."""
    for key in ("module", "hparams", "state_dict"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; it is damaged or was not "
                                  f"written by datapipe")
    if checkpoint["module"] is not None and type(checkpoint["module"]) is not str:
        raise CheckpointError(f"checkpoint {path}: 'module' must be a registered name")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(
            type(k) is str and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path}: 'state_dict' must map names to tensors")
    hparams = checkpoint["hparams"]
    if not isinstance(hparams, dict) or not all(type(k) is str for k in hparams):
        raise CheckpointError(f"checkpoint {path}: 'hparams' must be a dict with str keys")
    check_plain(hparams, f"checkpoint {path}: hparams")
    card = checkpoint.get("data_card")
    if card is not None:
        if not isinstance(card, dict):
            raise CheckpointError(f"checkpoint {path}: 'data_card' must be a dict")
        check_plain(card, f"checkpoint {path}: data_card")
    for key, kind in (("epoch", int), ("global_step", int), ("loops", dict),
                      ("optimizer_states", list), ("lr_schedulers", list), ("metrics", dict),
                      ("callbacks", dict), ("datamodule", dict), ("rng", dict),
                      ("precision", str), ("module_type", str)):
        if key in checkpoint and type(checkpoint[key]) is not kind:
            raise CheckpointError(f"checkpoint {path}: {key!r} must be of type "
                                  f"{kind.__name__}, not {type(checkpoint[key]).__name__}")
    for key in ("epoch", "global_step"):
        if key in checkpoint and not _is_nonneg_int(checkpoint[key]):
            raise CheckpointError(f"checkpoint {path}: {key!r} must be >= 0")
    loops = checkpoint.get("loops")
    if loops is not None and (type(loops.get("epoch_finished")) is not bool
                              or not _is_nonneg_int(loops.get("batches_in_epoch"))):
        raise CheckpointError(f"checkpoint {path}: 'loops' must hold epoch_finished (a bool) "
                              f"and batches_in_epoch (an int >= 0)")
    if "rng" in checkpoint:
        _check_rng(checkpoint["rng"], path)


RESUME_KEYS = ("optimizer_states", "lr_schedulers", "epoch", "global_step", "loops")


def require(checkpoint: dict[str, Any], keys: tuple[str, ...], purpose: str,
            path: Any = "") -> None:
    """CheckpointError naming the first of ``keys`` the checkpoint lacks for ``purpose``."""
    for key in keys:
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}, which {purpose} needs; "
                                  f"it is damaged or was not written by datapipe")


# ------------------------------------------------------------------ a run, saved and restored


def data_card(path: str | os.PathLike) -> dict[str, Any]:
    """The data card the checkpoint at ``path`` carries, checked to lay out as one."""
    from datapipe.card import CARD_FORMAT, compare_cards, format_card, split_options

    card = load(path).get("data_card")
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ConfigError(f"checkpoint {path} holds no data card (it was saved without a "
                          f"datapipe DataModule); there is nothing to show")
    # The loader checked it is plain data; its fields may still be of any kind. Laid out,
    # compared and serialized once here, a malformed card is one line, not a traceback.
    try:
        format_card(card)
        compare_cards(card, card)
        split_options(card)
        json.dumps(card)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(f"checkpoint {path} has a malformed data card ({type(e).__name__}: "
                          f"{str(e)[:200]}); it was damaged or not written by datapipe") from None
    return card


def capture(trainer: Trainer, module_name: str | None) -> dict[str, Any]:
    """Everything needed to continue ``trainer``'s run exactly; ``module_name`` is the
    name its Module class is registered under (None if it is not)."""
    module, progress = trainer.module, trainer.progress.state_dict()
    dm = trainer.datamodule
    scaler = trainer.precision_plugin.scaler
    return {
        "format": FORMAT,
        "module": module_name,
        "module_type": type_name(module),
        "hparams": dict(module.hparams),
        "state_dict": module.state_dict(),
        "optimizer_states": [o.state_dict() for o in trainer.optimizers],
        "lr_schedulers": [c["scheduler"].state_dict() for c in trainer.lr_scheduler_configs],
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": progress["epoch"],
        "global_step": progress["global_step"],
        "loops": {"epoch_finished": progress["epoch_finished"],
                  "batches_in_epoch": progress["batches_in_epoch"]},
        # The running sums of an unfinished epoch; a finished one starts afresh.
        "metrics": trainer.metrics.state_dict() if not progress["epoch_finished"] else {},
        "callbacks": {c.state_key: c.state_dict() for c in trainer.callbacks},
        "rng": rng_states(),
        # The train loader's position (seed, epoch, batches served), asked of it.
        "datamodule": dict(dm.state_dict()) if dm is not None and hasattr(
            dm, "state_dict") else {},
        "data_card": trainer.data_card,
        "precision": trainer.precision,
    }


@dataclass
class Pending:
    """What a resumed run applies once its next epoch starts: the running metrics after
    they are reset, the RNG states once the loader's iterator exists (making one draws
    from torch's generator)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None


@contextlib.contextmanager
def state_of(part: str) -> Iterator[None]:
    """Turn the errors a malformed saved state raises into one CheckpointError line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"the checkpoint's state of {part} cannot be restored: "
                              f"{type(e).__name__}: {first}") from None


def restore(trainer: Trainer, checkpoint: dict[str, Any]) -> Pending:
    """Put a checkpoint's run state (all but the weights) back into ``trainer``."""
    # Each state comes from the file: a value of the wrong kind ends in one line naming
    # the part, not in a traceback from deep inside torch.
    with state_of("the optimizer or scheduler (does it fit this module's "
                  "configure_optimizers?)"):
        for optimizer, state in zip(trainer.optimizers, checkpoint["optimizer_states"],
                                    strict=True):
            optimizer.load_state_dict(state)
        for config, state in zip(trainer.lr_scheduler_configs, checkpoint["lr_schedulers"],
                                 strict=True):
            config["scheduler"].load_state_dict(state)
    scaler = trainer.precision_plugin.scaler
    if checkpoint.get("scaler") and scaler.is_enabled():
        with state_of("the gradient scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.callbacks:
        if callback.state_key in states:
            with state_of(f"the {type(callback).__name__} callback"):
                callback.load_state_dict(states[callback.state_key])
    loops = checkpoint["loops"]
    trainer.progress.load_state_dict({
        "epoch": checkpoint["epoch"], "global_step": checkpoint["global_step"],
        "epoch_finished": loops["epoch_finished"], "batches_in_epoch": loops["batches_in_epoch"]})
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "load_state_dict") and checkpoint.get("datamodule"):
        saved_split = checkpoint["datamodule"].get("split_id")
        current = getattr(getattr(dm, "plan", None), "id", None)
        if saved_split and current and saved_split != current:
            raise ConfigError(f"the checkpoint was trained on split {saved_split} but this "
                              f"DataModule gives split {current}; use the same split "
                              f"settings and seed to resume")
        with state_of("the DataModule's loader position"):
            dm.load_state_dict(checkpoint["datamodule"])
    metrics = checkpoint.get("metrics") or {}
    with state_of("the running metrics"):
        trainer.metrics.load_state_dict(metrics)  # checked now, applied when the epoch starts
    return Pending(metrics=metrics, rng=checkpoint.get("rng"))


# ------------------------------------------------------------------ RNG states as plain data


def rng_states() -> dict[str, Any]:
    """The RNG states of torch, CUDA, numpy and python, as tensors and plain data."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": "MT19937", "key": key.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _is_words(values: Any, n: int) -> bool:
    return (isinstance(values, (list, tuple)) and len(values) == n
            and all(type(v) is int and 0 <= v < 2**32 for v in values))


def _check_rng(states: dict[str, Any], path: Path) -> None:
    bad = f"checkpoint {path}: its RNG state is malformed"
    t = states.get("torch")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise CheckpointError(f"{bad} (torch)")
    cuda = states.get("cuda", [])
    if not isinstance(cuda, list) or not all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda):
        raise CheckpointError(f"{bad} (cuda)")
    n = states.get("numpy")
    if (not isinstance(n, dict) or n.get("bit_generator") != "MT19937"
            or not _is_words(n.get("key"), _MT_KEY)
            or type(n.get("pos")) is not int or not 0 <= n["pos"] <= _MT_KEY
            or type(n.get("has_gauss")) is not int
            or type(n.get("cached_gaussian")) is not float):
        raise CheckpointError(f"{bad} (numpy)")
    p = states.get("python")
    if (not isinstance(p, dict) or p.get("version") != 3
            or not _is_words(p.get("state"), _MT_KEY + 1)
            or not (p.get("gauss_next") is None or type(p["gauss_next"]) is float)):
        raise CheckpointError(f"{bad} (python)")


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the RNG states ``rng_states`` recorded (checked when the file was loaded)."""
    n, p = states["numpy"], states["python"]
    try:
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32),
                             n["pos"], n["has_gauss"], n["cached_gaussian"]))
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    except (RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"the checkpoint's RNG state cannot be restored: {first}; "
                              f"it was damaged or not written by datapipe") from None


# ------------------------------------------------------------------ the previous format


class _LegacyArray:
    """What an ndarray in a datapipe.checkpoint/1 file becomes: its values as a list.

    Those files hold one kind of array (numpy's RNG key). Reading them through the
    weights-only loader needs numpy's ``_reconstruct`` and ``dtype``; instead of
    allowing the real ones (``_reconstruct`` allocates whatever shape it is given),
    these stand-ins take only 1-D arrays of plain numbers whose bytes are in the file.
    """

    def __init__(self) -> None:
        self.values: list[Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("a numpy array of an unknown layout")
        _, shape, dtype, fortran, raw = state
        if (not isinstance(dtype, _LegacyDtype) or not isinstance(raw, bytes)
                or not isinstance(shape, tuple) or len(shape) != 1
                or type(shape[0]) is not int or fortran is not False
                or shape[0] * dtype.itemsize != len(raw)):
            raise pickle.UnpicklingError("a numpy array that is not a 1-D array of numbers")
        self.values = np.frombuffer(raw, dtype=dtype.numpy()).tolist()


class _LegacyDtype:
    _CODES = ("u1", "i4", "u4", "i8", "u8", "f4", "f8")

    def __init__(self, code: Any) -> None:
        if code not in self._CODES:
            raise pickle.UnpicklingError(f"numpy dtype {code!r}")
        self.code, self.order = code, "<"

    @property
    def itemsize(self) -> int:
        return int(self.code[1:])

    def numpy(self) -> np.dtype:
        return np.dtype(self.order + self.code)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in "<>|="):
            raise pickle.UnpicklingError("a numpy dtype of an unknown layout")
        self.order = {"|": "<", "=": "<"}.get(state[1], state[1])


def _legacy_reconstruct(cls: Any, shape: Any, typecode: Any) -> _LegacyArray:
    if cls is not _LegacyArray:
        raise pickle.UnpicklingError("numpy _reconstruct of something but an ndarray")
    return _LegacyArray()


def _legacy_dtype(code: Any, align: Any = False, copy: Any = True) -> _LegacyDtype:
    return _LegacyDtype(code)


def _legacy_numpy() -> contextlib.AbstractContextManager:
    """The stand-ins above, under the names numpy pickles its arrays with (1.x and 2.x)."""
    names = []
    for core in ("numpy._core.multiarray", "numpy.core.multiarray"):
        names.append((_legacy_reconstruct, f"{core}._reconstruct"))
    names += [(_LegacyArray, "numpy.ndarray"), (_legacy_dtype, "numpy.dtype"),
              (_LegacyDtype, f"{__name__}._LegacyDtype")]
    return torch.serialization.safe_globals(names)


def _upgrade(old: dict[str, Any], path: Path) -> dict[str, Any]:
    """A datapipe.checkpoint/1 dict in the current layout (RNG states as plain data)."""
    checkpoint = dict(old)
    checkpoint["format"] = FORMAT
    module_class = checkpoint.pop("module_class", None)
    if type(module_class) is not str:
        raise CheckpointError(f"checkpoint {path} (format {LEGACY_FORMAT}) lacks its "
                              f"module class")
    # Only a name to look up among registered classes (datapipe.trainer.module); the
    # file's module path is never imported.
    checkpoint["module"] = None
    checkpoint["module_type"] = module_class.replace(":", ".")
    checkpoint["legacy_module_class"] = module_class
    rng = checkpoint.get("rng")
    if isinstance(rng, dict):
        rng = dict(rng)
        n, p = rng.get("numpy"), rng.get("python")
        if (isinstance(n, tuple) and len(n) == 5 and isinstance(n[1], _LegacyArray)):
            rng["numpy"] = {"bit_generator": n[0], "key": n[1].values, "pos": n[2],
                            "has_gauss": n[3], "cached_gaussian": n[4]}
        if isinstance(p, tuple) and len(p) == 3:
            rng["python"] = {"version": p[0], "state": list(p[1]) if isinstance(
                p[1], tuple) else p[1], "gauss_next": p[2]}
        checkpoint["rng"] = rng
    return checkpoint


# ------------------------------------------------------------------ finding


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


def type_name(obj: Any) -> str:
    """``module.qualname`` of ``obj``'s class: for messages, never for importing."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"

