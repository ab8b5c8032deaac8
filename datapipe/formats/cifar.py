"""The CIFAR-10/100 "python version": pickled batches in a gzipped tarball.

Each batch is a dict pickled by Python 2 (protocol 2) with byte-string keys:
``data`` (a uint8 numpy array, N x 3072, one image per row as 1024 red, 1024 green,
then 1024 blue values, rows of 32), the labels (``labels``; CIFAR-100:
``fine_labels`` and ``coarse_labels``, lists of int), ``filenames`` and
``batch_label``. The meta file (``batches.meta``; CIFAR-100: ``meta``) holds the
class names (``label_names``; ``fine_label_names``, ``coarse_label_names``).

A pickle can name any importable callable and have it called, so these files are
read by :func:`load_pickle`, whose unpickler resolves only the four globals a
numpy array needs, refuses every other one, and checks each array's declared size
against the bytes it carries before anything is allocated; what comes out must then
be plain data (dicts, lists, bytes, str, int, numeric arrays). :func:`encode_pickle` writes
what Python 2's cPickle wrote, so tests and benchmarks can build files in the exact
format.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from datapipe.errors import FormatError
from datapipe.folders import read_regular
from datapipe.formats.tar import check_member

# The largest member of a CIFAR archive is CIFAR-100's train batch, 155 MB; a member
# declaring more is refused before its bytes are read (see datapipe.formats.tar).
MAX_MEMBER_BYTES = 256 << 20

IMAGE_SHAPE = (3, 32, 32)
ROW_BYTES = 3 * 32 * 32
PLAIN_DATA = "dicts, lists, bytes, str, int and numpy arrays"

try:  # numpy >= 1.26 (and 2.x, where numpy.core is a deprecated alias)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct

# A pickle cannot describe more distinct objects than it has bytes; more nodes than that
# means shared references multiplied out (a "billion laughs"), refused before any walk.
NODE_SLACK = 1024
# What numpy writes for a dtype's state: (version, byte order, subarray, names, fields,
# elsize, alignment, flags); anything with a subarray, names or fields is refused.
_BYTE_ORDERS = ("<", ">", "|", "=", b"<", b">", b"|", b"=")  # bytes from Python 2


def _refused_dtype(what: Any, name: str) -> FormatError:
    label = "object" if isinstance(what, np.dtype) and what.kind == "O" else what
    return FormatError(f"{name}: refused a numpy array of dtype {label}; a CIFAR file holds "
                       f"only numeric arrays")


def _numeric_dtype(value: Any, name: str) -> np.dtype:
    """``value`` (a dtype or its spelling, e.g. b'u1') as a plain numeric dtype, or refused."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        if len(value) > 8:
            raise _refused_dtype(value[:8] + "...", name)
        try:
            value = np.dtype(value)
        except (TypeError, ValueError):
            raise _refused_dtype(value, name) from None
    if (not isinstance(value, np.dtype) or value.kind not in "biuf" or value.fields is not None
            or value.subdtype is not None or value.itemsize > 16):
        raise _refused_dtype(value, name)
    return value


class _Reconstruct:
    """numpy's ``_reconstruct`` as a CIFAR file may call it: an empty array, built later."""

    def __init__(self, unpickler: _RestrictedUnpickler) -> None:
        self.unpickler = unpickler

    def __call__(self, cls: Any, shape: Any, dtype: Any) -> np.ndarray:
        name = self.unpickler.name
        if cls is not np.ndarray:
            raise FormatError(f"{name}: _reconstruct of something other than a numpy array")
        # numpy pickles an array as an empty one, (0,), whose state (BUILD) brings the
        # data; a non-empty one here would be uninitialized memory, or a huge allocation.
        if (type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape)
                or 0 not in shape):
            raise FormatError(f"{name}: refused _reconstruct of shape {shape!r}: numpy "
                              f"writes an empty array, filled by its state")
        array = _reconstruct(np.ndarray, shape, _numeric_dtype(dtype, name))
        self.unpickler.unbuilt[id(array)] = array
        return array


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only four globals and checks what it builds with them.

    The pure-Python unpickler, so every opcode that calls or allocates can be checked
    before it acts: REDUCE may call only ``_reconstruct`` and ``dtype``; BUILD may give
    only an empty array from ``_reconstruct`` its data, whose declared shape must match
    the bytes actually present, and a dtype only numpy's plain state; the opcodes that
    instantiate classes or reach the extension registry are refused. A CIFAR file of
    30 MB is a few thousand opcodes, so the Python loop costs milliseconds.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self.name = name
        self.unbuilt: dict[int, np.ndarray] = {}  # arrays from _reconstruct awaiting BUILD
        self.allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(self),  # the CIFAR files
            ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(self),  # numpy 2
            ("numpy", "ndarray"): np.ndarray,  # only ever an argument of _reconstruct
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise FormatError(
                f"{self.name}: refused to unpickle the global {module}.{name}: a CIFAR file "
                f"holds only {PLAIN_DATA}; this is not a genuine CIFAR file, delete it and "
                f"download the official archive"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(f"{self.name}: refused a persistent id in the pickle; "
                          f"a CIFAR file holds only {PLAIN_DATA}")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if type(args) is not tuple:
            raise FormatError(f"{self.name}: a call with arguments that are not a tuple")
        if isinstance(func, _Reconstruct):
            self.stack[-1] = func(*args)
        elif func is np.dtype:
            if not 1 <= len(args) <= 3:
                raise FormatError(f"{self.name}: dtype called with {len(args)} arguments")
            self.stack[-1] = _numeric_dtype(args[0], self.name)
        else:
            raise FormatError(f"{self.name}: refused to call {getattr(func, '__name__', func)}"
                              f"; a CIFAR file calls only numpy's _reconstruct and dtype")

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            if (type(state) is not tuple or len(state) != 8 or state[0] != 3
                    or state[1] not in _BYTE_ORDERS or state[2:5] != (None, None, None)):
                raise FormatError(f"{self.name}: refused a dtype state {state!r:.80}; a CIFAR "
                                  f"file holds only plain numeric dtypes")
            inst.__setstate__(state)
            _numeric_dtype(inst, self.name)
        elif type(inst) is np.ndarray and id(inst) in self.unbuilt:
            self._build_array(inst, state)
            del self.unbuilt[id(inst)]
        else:
            raise FormatError(f"{self.name}: refused to set the state of a "
                              f"{type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build

    def _build_array(self, array: np.ndarray, state: Any) -> None:
        """Check an array's state against the bytes it carries, then let numpy apply it."""
        if type(state) is not tuple or len(state) != 5:
            raise FormatError(f"{self.name}: an array state that is not numpy's")
        _version, shape, dtype, fortran, raw = state
        if (type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape)
                or len(shape) > 8):
            raise FormatError(f"{self.name}: an array of shape {shape!r:.80}")
        dtype = _numeric_dtype(dtype, self.name)
        if not isinstance(raw, bytes):
            raise FormatError(f"{self.name}: an array whose data is a "
                              f"{type(raw).__name__}, not bytes")
        declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if declared != len(raw):
            raise FormatError(f"{self.name}: an array declares {shape} x {dtype.itemsize} B "
                              f"= {declared} bytes but carries {len(raw)}")
        array.__setstate__((1, shape, dtype, bool(fortran), raw))


def _refuse_opcode(self: _RestrictedUnpickler) -> None:
    raise FormatError(f"{self.name}: refused an opcode that instantiates classes; a CIFAR "
                      f"file holds only {PLAIN_DATA}")


for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1,
            pickle.EXT2, pickle.EXT4, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    _RestrictedUnpickler.dispatch[_op[0]] = _refuse_opcode


def load_pickle(data: bytes, name: str = "pickle") -> Any:
    """Unpickle ``data`` admitting only plain data and numpy arrays; never runs code.

    Python 2 byte strings come back as bytes (``encoding="bytes"``): the arrays'
    raw bytes stay untouched and no text is decoded implicitly. Memory stays within
    a small multiple of ``len(data)``: every array's size is checked against the bytes
    it carries, and a pickle describing more nodes than it has bytes is refused.
    Raises FormatError, naming ``name``, for a refused global or opcode, a corrupt
    pickle, or an object that is not plain data.
    """
    unpickler = _RestrictedUnpickler(io.BytesIO(data), name)
    try:
        value = unpickler.load()
    except FormatError:
        raise
    except RecursionError:
        raise FormatError(f"{name}: nested more deeply than any CIFAR file") from None
    except Exception as e:  # UnpicklingError, EOFError, and numpy's errors on bad state
        raise FormatError(f"{name}: not a readable pickle ({type(e).__name__}: {e})") from None
    if unpickler.unbuilt:
        raise FormatError(f"{name}: refused an array made by _reconstruct that was never "
                          f"given its data (uninitialized memory)")
    _check_plain(value, name, [len(data) + NODE_SLACK])
    return value


def _check_plain(value: Any, name: str, budget: list[int], depth: int = 0) -> None:
    """Refuse anything but dicts, lists, bytes, str, int and numeric numpy arrays.

    ``budget`` holds the nodes left to visit: shared references count each time.
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise FormatError(f"{name}: the pickle describes more objects than it has bytes "
                          f"(shared references multiplied out); not a CIFAR file")
    if depth > 8:
        raise FormatError(f"{name}: nested more deeply than any CIFAR file")
    if isinstance(value, (bytes, str, int)):
        return
    if type(value) is np.ndarray:
        if value.dtype.kind not in "biuf" or value.dtype.fields is not None:
            raise _refused_dtype(value.dtype, name)
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, (bytes, str)):
                raise FormatError(f"{name}: a dict key of type {type(key).__name__}; "
                                  f"CIFAR files have byte-string keys")
            _check_plain(item, name, budget, depth + 1)
        return
    if type(value) is list:
        for item in value:
            _check_plain(item, name, budget, depth + 1)
        return
    raise FormatError(f"{name}: unpickled a {type(value).__name__}; a CIFAR file holds "
                      f"only {PLAIN_DATA}")


def _fields(value: Any, name: str) -> dict[str, Any]:
    """A batch or meta dict with its keys as str (Python 2 wrote them as byte strings)."""
    if type(value) is not dict:
        raise FormatError(f"{name}: expected a pickled dict, found a {type(value).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def _int_list(value: Any, key: str, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    if type(value) is not list or not all(type(v) is int for v in value):
        raise FormatError(f"{name}: {key!r} must be a list of integers")
    return np.asarray(value, dtype=np.int64).reshape(-1)


def parse_batch(data: bytes, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The (images N x 3 x 32 x 32 uint8, labels int64) of one pickled CIFAR batch."""
    fields = _fields(load_pickle(data, name), name)
    missing = [k for k in ("data", label_key) if k not in fields]
    if missing:
        raise FormatError(f"{name}: the batch lacks {', '.join(map(repr, missing))} "
                          f"(it has {', '.join(map(repr, sorted(fields)))})")
    raw = fields["data"]
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2 \
            or raw.shape[1] != ROW_BYTES:
        what = f"{raw.dtype} {raw.shape}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise FormatError(f"{name}: 'data' must be a uint8 array of N x {ROW_BYTES}, "
                          f"found {what}")
    labels = _int_list(fields[label_key], label_key, name)
    if len(labels) != len(raw):
        raise FormatError(f"{name}: {len(raw)} images but {len(labels)} {label_key!r}")
    filenames = fields.get("filenames")
    if isinstance(filenames, list) and len(filenames) != len(raw):
        raise FormatError(f"{name}: {len(raw)} images but {len(filenames)} 'filenames'")
    return raw.reshape(len(raw), *IMAGE_SHAPE), labels


def parse_meta(data: bytes, name: str, names_key: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The class names under ``names_key`` of a pickled meta file, and all its fields."""
    fields = _fields(load_pickle(data, name), name)
    names = fields.get(names_key)
    if type(names) is not list or not all(isinstance(n, (bytes, str)) for n in names):
        raise FormatError(f"{name}: expected a list of class names under {names_key!r} "
                          f"(it has {', '.join(map(repr, sorted(fields)))})")
    try:
        decoded = tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    except UnicodeDecodeError as e:
        raise FormatError(f"{name}: a class name under {names_key!r} is not text ({e})") from None
    return decoded, fields


def check_class_names(found: Sequence[str], declared: Sequence[str], name: str) -> None:
    """FormatError unless the file's class names are the recipe's, in the same order."""
    if tuple(found) == tuple(declared):
        return
    if len(found) != len(declared):
        raise FormatError(f"{name}: {len(found)} class names in the file, but the recipe "
                          f"declares {len(declared)}; is this the right archive?")
    index = next(i for i, (a, b) in enumerate(zip(found, declared, strict=True)) if a != b)
    raise FormatError(f"{name}: class {index} is {found[index]!r} in the file but "
                      f"{declared[index]!r} in the recipe; is this the right archive?")


def iter_members(archive: str | os.PathLike, wanted: Iterable[str],
                 max_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each wanted regular file in a (gzipped) tar, in tar order.

    One sequential pass, nothing extracted to disk; a leading ``./`` in member names
    is ignored. Raises FormatError for a corrupt archive, a wanted member that is not
    a regular file, is sparse or declares more than ``max_bytes``, or wanted members
    the archive lacks.
    """
    wanted = set(wanted)
    label = os.path.basename(os.fspath(archive))
    left = set(wanted)
    try:
        with tarfile.open(os.fspath(archive), mode="r|*") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                if path not in left:
                    continue
                if not member.isfile():
                    raise FormatError(f"{label}: {path} is not a regular file in the archive")
                check_member(member, label, max_bytes)
                left.discard(path)
                yield path, tar.extractfile(member).read()
                if not left:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise FormatError(f"{label}: not a readable tar archive ({type(e).__name__}: {e}); "
                          f"delete it and download it again") from None
    if left:
        raise FormatError(f"{label}: the archive lacks {', '.join(sorted(left))}; "
                          f"is this the right archive?")


def iter_folder_members(folder: str | os.PathLike, wanted: Iterable[str],
                        max_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each wanted member, read from the folder the archive was
    extracted into: member ``cifar-10-batches-py/data_batch_1`` is ``folder/data_batch_1``.

    Each must be a regular file of at most ``max_bytes`` (never a FIFO: see
    datapipe.folders.read_regular).
    """
    for member in wanted:
        name = member.rsplit("/", 1)[-1]
        yield member, read_regular(os.path.join(os.fspath(folder), name), max_bytes)


# ------------------------------------------------------------------ writing (fixtures)


def encode_pickle(value: Any) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for ``value``, as in the CIFAR files.

    ``bytes`` become Python 2 strings, ``str`` unicode strings; numpy arrays are
    written as ``numpy.core.multiarray._reconstruct`` calls with their raw bytes, as
    numpy 1.x did. Supports dict, list, tuple, bytes, str, int, bool, None and
    little-endian numeric arrays: enough to build CIFAR files for tests.
    """
    out = io.BytesIO()
    out.write(b"\x80\x02")
    _encode(value, out)
    out.write(b".")
    return out.getvalue()


def _encode(value: Any, out: io.BytesIO) -> None:
    if value is None:
        out.write(b"N")
    elif value is True or value is False:
        out.write(b"\x88" if value else b"\x89")
    elif isinstance(value, int):
        if 0 <= value < 256:
            out.write(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            out.write(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            out.write(b"J" + struct.pack("<i", value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            out.write(b"\x8a" + bytes([len(raw)]) + raw)
    elif isinstance(value, bytes):
        if len(value) < 256:
            out.write(b"U" + bytes([len(value)]) + value)
        else:
            out.write(b"T" + struct.pack("<I", len(value)) + value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.write(b"X" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(value, tuple):
        if not value:
            out.write(b")")
            return
        if len(value) > 3:
            out.write(b"(")
        for item in value:
            _encode(item, out)
        out.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(value), b"t"))
    elif isinstance(value, list):
        out.write(b"]")
        for start in range(0, len(value), 1000):  # cPickle's batches of 1000
            out.write(b"(")
            for item in value[start:start + 1000]:
                _encode(item, out)
            out.write(b"e")
    elif isinstance(value, dict):
        out.write(b"}")
        items = list(value.items())
        for start in range(0, len(items), 1000):
            out.write(b"(")
            for key, item in items[start:start + 1000]:
                _encode(key, out)
                _encode(item, out)
            out.write(b"u")
    elif isinstance(value, np.ndarray):
        _encode_array(value, out)
    else:
        raise TypeError(f"encode_pickle cannot write a {type(value).__name__}")


def _encode_array(array: np.ndarray, out: io.BytesIO) -> None:
    """``_reconstruct(ndarray, (0,), 'b')`` then its state, as numpy 1.x pickled arrays."""
    dtype = array.dtype
    if dtype.kind not in "biuf" or dtype.byteorder == ">":
        raise TypeError(f"encode_pickle writes little-endian numeric arrays, not {dtype}")
    out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
    _encode((0,), out)
    _encode(b"b", out)
    out.write(b"\x87R")  # _reconstruct(ndarray, (0,), 'b')
    order = b"|" if dtype.itemsize == 1 else b"<"
    out.write(b"(")
    _encode(1, out)
    _encode(tuple(int(d) for d in array.shape), out)
    out.write(b"cnumpy\ndtype\n")
    _encode((f"{dtype.kind}{dtype.itemsize}".encode(), 0, 1), out)
    out.write(b"R")
    _encode((3, order, None, None, None, -1, -1, 0), out)
    out.write(b"b")
    _encode(False, out)
    _encode(np.ascontiguousarray(array).tobytes(), out)
    out.write(b"tb")


def encode_batch(images: np.ndarray, labels: Mapping[str, Sequence[int]],
                 batch_label: str = "batch", filenames: Sequence[str] | None = None) -> bytes:
    """A pickled CIFAR batch of ``images`` (N x 3 x 32 x 32 uint8) with these label lists."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 N x 3 x 32 x 32, got {images.dtype} "
                         f"{images.shape}")
    if filenames is None:
        filenames = [f"image_{i:05d}.png" for i in range(len(images))]
    batch = {b"batch_label": batch_label.encode()}
    batch.update({key.encode(): [int(v) for v in values] for key, values in labels.items()})
    batch[b"data"] = images.reshape(len(images), ROW_BYTES)
    batch[b"filenames"] = [f.encode() for f in filenames]
    return encode_pickle(batch)
