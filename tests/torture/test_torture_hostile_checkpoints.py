"""Hostile checkpoints: files crafted to run code, allocate, delete or crash, read 5 ways.

Each file of the corpus goes through ``datapipe info --ckpt``, ``datapipe test --ckpt``,
``Trainer.fit(ckpt_path=...)`` (resume), ``datapipe.load_module`` and
``ImageClassifier.load_from_checkpoint``. Every reading must end in one line (exit 2 from
the CLI, a DatapipeError from the API) and run nothing: the payloads write a marker
file, and the marker must never appear. Each (file, reader) is one attack in the
figures. A checkpoint of the previous format, as the first release wrote it, is read
through the same weights-only loader and resumes exactly.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torture_kit as kit
from torture_kit import error_lines

import datapipe
from datapipe.cli import main
from datapipe.datamodules import MNISTDataModule
from datapipe.errors import DatapipeError
from datapipe.models import ImageClassifier
from datapipe.trainer import ModelCheckpoint, Trainer
from datapipe.trainer import checkpoint as ckpt

world, figures = kit.world, kit.figures  # the suite's shared fixtures


def write_marker(path: str) -> None:
    """What a payload calls if unpickling ever runs code: the test then fails."""
    Path(path).write_text("code ran")


class _Payload:
    """Pickles as a call of ``func(*args)`` (REDUCE): what a crafted checkpoint holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ------------------------------------------------------------------ the good files


@pytest.fixture(scope="module")
def place(world, tmp_path_factory):
    """A prepared cache, a trained checkpoint and what a reader needs around it."""
    root = tmp_path_factory.mktemp("hostile-checkpoints")
    cache = root / "cache"
    assert main(["prepare", "mnist", "--source", str(world.source), "--no-verify", "--quiet",
                 "--cache-dir", str(cache)]) == 0
    saver = ModelCheckpoint(dirpath=root / "good", save_last=True)
    Trainer(max_steps=4, logger=False, enable_progress_bar=False, accelerator="cpu", seed=0,
            default_root_dir=root, callbacks=[saver]).fit(_model(), _dm(cache))
    return {"root": root, "cache": cache, "good": Path(saver.last_model_path),
            "marker": root / "MARKER"}


def _dm(cache: Path) -> MNISTDataModule:
    return MNISTDataModule(cache_dir=cache, verify=False, val_split=0, batch_size=100)


def _model() -> ImageClassifier:
    return ImageClassifier(model="mlp", hidden=16)


def _good(place) -> dict:
    return ckpt.load(place["good"])


def _save(obj, path: Path, **kwargs) -> Path:
    with open(path, "wb") as f:
        torch.save(obj, f, **kwargs)
    return path


def _rezip(data: bytes, path: Path, *, pkl=None, compression=zipfile.ZIP_STORED) -> Path:
    """``data`` (a torch zip) written again, data.pkl changed by ``pkl`` if given."""
    source = zipfile.ZipFile(io.BytesIO(data))
    with zipfile.ZipFile(path, "w", compression) as out:
        for info in source.infolist():
            body = source.read(info.filename)
            if pkl is not None and info.filename.endswith("/data.pkl"):
                body = pkl(body)
            out.writestr(info.filename, body)
    return path


def _legacy(place) -> dict:
    """The good checkpoint as the first release wrote it (datapipe.checkpoint/1)."""
    good = _good(place)
    old = {k: v for k, v in good.items() if k not in ("module", "module_type")}
    old["format"] = ckpt.LEGACY_FORMAT
    old["module_class"] = "datapipe.models:ImageClassifier"
    n, p = good["rng"]["numpy"], good["rng"]["python"]
    old["rng"] = {**good["rng"],
                  "numpy": (n["bit_generator"], np.array(n["key"], dtype=np.uint32), n["pos"],
                            n["has_gauss"], n["cached_gaussian"]),
                  "python": (p["version"], tuple(p["state"]), p["gauss_next"])}
    return old


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------ the corpus


def _code(func_name: str):
    """A checkpoint whose unpickling calls ``func_name`` with a payload writing the marker."""

    def make(place, path):
        marker = str(place["marker"])
        shell = f"touch {marker}"
        payload = {
            "os.system": _Payload(os.system, shell),
            "subprocess.Popen": _Payload(subprocess.Popen, ["touch", marker]),
            "subprocess.check_call": _Payload(subprocess.check_call, ["touch", marker]),
            "builtins.eval": _Payload(eval, f"open({marker!r}, 'w').write('x')"),
            "builtins.exec": _Payload(exec, f"open({marker!r}, 'w').write('x')"),
            "marker function": _Payload(write_marker, marker),
            "pathlib touch": _Payload(Path.touch, Path(marker)),
        }[func_name]
        good = _good(place)
        # Where a reader would look first, and deep inside the state dict.
        return _save({**good, "hparams": {**good["hparams"], "x": payload},
                      "state_dict": OrderedDict(good["state_dict"], extra=payload)}, path)

    return make


def _replace(**changes):
    def make(place, path):
        good = _good(place)
        for key, value in changes.items():
            if value is _DROP:
                good.pop(key, None)
            else:
                good[key] = value(place) if callable(value) else value
        return _save(good, path)

    return make


_DROP = object()


def _marker_hparams(place):
    return {"command": f"touch {place['marker']}", "source": f"open({str(place['marker'])!r}"
            ", 'w')"}


def _legacy_with(module_class):
    def make(place, path):
        old = _legacy(place)
        old["module_class"] = module_class
        old["hparams"] = _marker_hparams(place)
        return _save(old, path)

    return make


def _nested(kind: str):
    def make(place, path):
        good = _good(place)
        if kind == "laughs":  # 2**60 leaves through shared references: a few KB of pickle
            value: list = ["lol"]
            for _ in range(60):
                value = [value, value]
        elif kind == "deep":
            value = []
            for _ in range(200):
                value = [value]
        else:  # a list that holds itself
            value = []
            value.append(value)
        return _save({**good, "data_card": {**(good["data_card"] or {}), "x": value}}, path)

    return make


def _bad_rng(part: str, value):
    def make(place, path):
        good = _good(place)
        return _save({**good, "rng": {**good["rng"], part: value}}, path)

    return make


def _declared_bigger_than_record(place, path):
    data = _bytes({"format": ckpt.FORMAT, "module": "image-classifier", "hparams": {},
                   "state_dict": {"w": torch.zeros(3)}})
    big = b"\x8a\x08" + (10**12).to_bytes(8, "little")  # LONG1: 10**12 elements

    def grow(pkl: bytes) -> bytes:
        assert b"K\x03t" in pkl
        return pkl.replace(b"K\x03t", big + b"t", 1)

    return _rezip(data, path, pkl=grow)


def _stride_zero(place, path):
    good = _good(place)
    good["state_dict"] = OrderedDict(good["state_dict"])
    good["state_dict"]["net.fc1.weight"] = torch.zeros(1).expand(10**12)
    return _save(good, path)


def _truncated(place, path):
    data = place["good"].read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _deflated(place, path):
    return _rezip(place["good"].read_bytes(), path, compression=zipfile.ZIP_DEFLATED)


def _zip_bomb(place, path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("archive/data.pkl", b"\x80\x02" + b"(" * (16 << 20))
        out.writestr("archive/version", b"3\n")
    return path


def _raw_pickle(place, path):
    path.write_bytes(pickle.dumps(_Payload(write_marker, str(place["marker"])), protocol=2))
    return path


def _bytes_file(data: bytes):
    def make(place, path):
        path.write_bytes(data)
        return path

    return make


READERS = ("info", "test", "resume", "load_module", "load_from_checkpoint")
BUILD = ("test", "load_module", "load_from_checkpoint")  # what builds a module from hparams
NAMED = ("test", "load_module")  # what takes the class from the file's name
# name -> (maker, what the one line says, the readers that must refuse it: the others
# never build a module from the file, or read nothing of what is wrong in it)
CORPUS = {
    "REDUCE os.system": (_code("os.system"), "refused", READERS),
    "REDUCE subprocess.Popen": (_code("subprocess.Popen"), "refused", READERS),
    "REDUCE subprocess.check_call": (_code("subprocess.check_call"), "refused", READERS),
    "REDUCE builtins.eval": (_code("builtins.eval"), "refused", READERS),
    "REDUCE builtins.exec": (_code("builtins.exec"), "refused", READERS),
    "REDUCE a marker-writing function": (_code("marker function"), "refused", READERS),
    "REDUCE pathlib.Path.touch": (_code("pathlib touch"), "refused", READERS),
    "a plain pickle calling a function": (_raw_pickle, "not a torch zip archive", READERS),
    "legacy torch format": (lambda place, path: _save(_good(place), path,
                                                      _use_new_zipfile_serialization=False),
                            "not a torch zip archive", READERS),
    "module os:system": (_replace(module="os:system", hparams=_marker_hparams),
                         "unknown module 'os:system'", NAMED),
    "module builtins:eval": (_replace(module="builtins:eval", hparams=_marker_hparams),
                             "unknown module 'builtins:eval'", NAMED),
    "module named by its import path": (_replace(module="datapipe.models:ImageClassifier"),
                                        "unknown module", NAMED),
    "old format, module_class os:system": (_legacy_with("os:system"),
                                           "not a registered module", NAMED),
    "old format, module_class builtins:eval": (_legacy_with("builtins:eval"),
                                               "not a registered module", NAMED),
    "hparams holding a tensor": (_replace(hparams=lambda p: {"model": torch.zeros(2)}),
                                 "plain data only", READERS),
    "hparams holding a device": (_replace(hparams=lambda p: {"d": torch.device("cpu")}),
                                 "plain data only", READERS),
    "hparams a list": (_replace(hparams=[1, 2]), "'hparams' must be a dict", READERS),
    "hparams with a 100000-bit int": (_replace(hparams=lambda p: {"hidden": 2**100000}),
                                      "refused: Unsupported operand", READERS),
    "hparams sized for 10**12 units": (_replace(hparams=lambda p: {"model": "mlp",
                                                                   "hidden": 10**12}),
                                       "cannot be built", BUILD),
    "hparams sized for a 10**6 x 10**6 image": (
        _replace(hparams=lambda p: {"model": "mlp", "hidden": 16, "image_size": 10**6}),
        "do not fit", BUILD),
    "hparams of the wrong kind": (_replace(hparams=lambda p: {"lr": "fast"}),
                                  "lr must be a finite number", BUILD),
    "hparams unknown keyword": (_replace(hparams=lambda p: {"rm_rf": True}),
                                "cannot be built", BUILD),
    "no state_dict": (_replace(state_dict=_DROP), "lacks 'state_dict'", READERS),
    "no format": (_replace(format=_DROP), "is not a datapipe checkpoint", READERS),
    "no module name": (_replace(module=_DROP), "lacks 'module'", READERS),
    "no optimizer states": (_replace(optimizer_states=_DROP), "lacks 'optimizer_states'",
                            ("resume",)),
    "not a dict": (lambda place, path: _save([1, 2, 3], path), "is not a datapipe checkpoint",
                   READERS),
    "wrong format string": (_replace(format="datapipe.checkpoint/99"),
                            "is not a datapipe checkpoint", READERS),
    "state_dict a string": (_replace(state_dict="weights"), "'state_dict' must map", READERS),
    "state_dict of ints": (_replace(state_dict={"net.fc1.weight": 3}), "'state_dict' must map",
                           READERS),
    "module a number": (_replace(module=5), "registered name", READERS),
    "epoch a string": (_replace(epoch="3"), "'epoch' must be of type int", READERS),
    "negative global_step": (_replace(global_step=-5), "'global_step' must be >= 0", READERS),
    "loops malformed": (_replace(loops={"epoch_finished": "yes"}), "'loops' must hold",
                        READERS),
    "numpy RNG key short": (_bad_rng("numpy", {"bit_generator": "MT19937", "key": [1],
                                               "pos": 0, "has_gauss": 0,
                                               "cached_gaussian": 0.0}), "RNG state", READERS),
    "python RNG state a string": (_bad_rng("python", "seed"), "RNG state", READERS),
    "torch RNG state a float tensor": (_bad_rng("torch", torch.zeros(5)), "RNG state",
                                       READERS),
    "data card a string": (_replace(data_card="card"), "'data_card' must be a dict", READERS),
    "data card malformed": (_replace(data_card={"format": "datapipe.card/1", "recipe": 5}),
                            "malformed data card", ("info",)),
    "optimizer state of the wrong kind": (_replace(optimizer_states=[{"state": 5}]),
                                          "optimizer", ("resume",)),
    "checkpoint callback state of the wrong kind": (
        _replace(callbacks=lambda p: {_saver_key(): {"best_k_models": {"a.ckpt": "x"}}}),
        "ModelCheckpoint state is malformed", ("resume",)),
    "2**60 values through shared references": (_nested("laughs"), "more than", READERS),
    "200 levels of nesting": (_nested("deep"), "more than", READERS),
    "a list that holds itself": (_nested("cycle"), "more than", READERS),
    "tensor declared bigger than its bytes": (_declared_bigger_than_record,
                                              "does not match expected size", READERS),
    "stride-0 tensor of 10**12 elements": (_stride_zero, "elements over", READERS),
    "truncated file": (_truncated, "cannot be read", READERS),
    "zero-byte file": (_bytes_file(b""), "cannot be read", READERS),
    "not a zip": (_bytes_file(os.urandom(4096)), "cannot be read", READERS),
    "zip header then garbage": (_bytes_file(b"PK\x03\x04" + os.urandom(500)),
                                "cannot be read", READERS),
    "compressed members": (_deflated, "compressed members", READERS),
    "a zip bomb": (_zip_bomb, "compressed members", READERS),
}


def _saver_key() -> str:
    return ModelCheckpoint().state_key  # the one a Trainer adds by default


def _read(reader: str, path: Path, place, capsys) -> str:
    """Read ``path`` with ``reader``; the one line it ended in (asserting it is one)."""
    if reader in ("info", "test"):
        argv = (["info", "--ckpt", str(path)] if reader == "info" else
                ["test", "--data", "mnist", "--ckpt", str(path), "--cache-dir",
                 str(place["cache"]), "--no-verify", "--quiet"])
        capsys.readouterr()
        code = main(argv)
        _, err = capsys.readouterr()
        assert code == 2, (reader, err)
        assert "Traceback" not in err, err
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("datapipe: error:"), err
        return lines[0]
    with pytest.raises(DatapipeError) as caught:
        if reader == "resume":
            Trainer(max_steps=6, logger=False, enable_progress_bar=False, accelerator="cpu",
                    default_root_dir=path.parent / "run").fit(  # a ModelCheckpoint too
                _model(), _dm(place["cache"]), ckpt_path=path)
        elif reader == "load_module":
            datapipe.load_module(path)
        else:
            ImageClassifier.load_from_checkpoint(path)
    line = str(caught.value)
    assert "\n" not in line.strip(), line
    return line


@pytest.mark.parametrize("case", list(CORPUS))
def test_a_hostile_checkpoint_is_one_line_and_runs_nothing(case, place, figures, capsys,
                                                           tmp_path):
    make, needle, readers = CORPUS[case]
    path = make(place, tmp_path / "hostile.ckpt")
    marker = place["marker"]
    for reader in readers:
        try:
            line = _read(reader, path, place, capsys)
        finally:
            breach = "code" if marker.exists() else None
            figures.attack("checkpoints", breach)
            marker.unlink(missing_ok=True)
        assert breach is None, f"{case}: reading with {reader} ran the payload"
        assert needle in line, (reader, line)


# ModelCheckpoint options -> the saved state naming the file it would delete next
DELETERS = {
    "kth best (top-k)": ({"monitor": "train_loss", "save_top_k": 1},
                         lambda victim: {"best_k_models": {victim: torch.tensor(1e9)},
                                         "kth_best_model_path": victim,
                                         "kth_value": torch.tensor(1e9)}),
    "best (latest)": ({"save_top_k": 1}, lambda victim: {"best_model_path": victim}),
    "last": ({"save_last": True}, lambda victim: {"last_model_path": victim}),
}


@pytest.mark.parametrize("deleter", list(DELETERS))
@pytest.mark.parametrize("route", ["dotdot", "linked folder"])
def test_saved_paths_never_make_a_resume_delete_outside_its_folder(deleter, route, place,
                                                                   figures, tmp_path):
    """ModelCheckpoint's state names files it deletes later; a crafted one naming a file
    outside its folder, through '..' or a linked folder, must never get it deleted."""
    dirpath = tmp_path / "run" / "ckpts"
    dirpath.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.ckpt").write_text("keep me")
    if route == "dotdot":
        victim = str(dirpath / ".." / ".." / "outside" / "victim.ckpt")
    else:
        (dirpath / "linked").symlink_to(outside)
        victim = str(dirpath / "linked" / "victim.ckpt")
    options, state = DELETERS[deleter]
    saver = ModelCheckpoint(dirpath=dirpath, **options)
    good = _good(place)
    good["callbacks"] = {saver.state_key: {"dirpath": str(dirpath), **state(victim)}}
    path = _save(good, tmp_path / "crafted.ckpt")
    Trainer(max_steps=8, logger=False, enable_progress_bar=False, accelerator="cpu",
            default_root_dir=tmp_path / "run", callbacks=[saver], log_every_n_steps=1).fit(
        _model(), _dm(place["cache"]), ckpt_path=path)
    gone = not (outside / "victim.ckpt").exists()
    figures.attack("checkpoints", "escape" if gone else None)
    assert not gone
    assert list(dirpath.glob("*.ckpt"))  # it did save checkpoints of its own


def test_the_previous_format_is_read_without_its_numpy_globals_and_resumes(place, capsys,
                                                                          tmp_path):
    """Files the first release wrote (numpy's RNG key as an ndarray, the class as an
    import path) load through weights_only, rebuild the registered class and resume to
    the same weights as the current format."""
    old = _save(_legacy(place), tmp_path / "old.ckpt")
    with pytest.raises(Exception, match="numpy"):  # what plain weights_only says of it
        torch.load(old, weights_only=True)
    assert isinstance(datapipe.load_module(old), ImageClassifier)
    capsys.readouterr()
    assert main(["info", "--ckpt", str(old)]) == 0
    assert main(["test", "--data", "mnist", "--ckpt", str(old), "--cache-dir",
                 str(place["cache"]), "--no-verify", "--quiet"]) == 0
    assert "test_acc" in capsys.readouterr().out
    weights = []
    for path in (old, place["good"]):
        model = _model()
        Trainer(max_steps=6, logger=False, enable_progress_bar=False, accelerator="cpu",
                enable_checkpointing=False, default_root_dir=tmp_path).fit(
            model, _dm(place["cache"]), ckpt_path=path)
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
