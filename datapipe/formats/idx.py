"""The IDX format of MNIST and its siblings (Fashion-MNIST, KMNIST, EMNIST).

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the number
of dimensions -- then one big-endian uint32 per dimension, then the values in
big-endian C order. Files are usually gzipped.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from datapipe.errors import FormatError

# type code -> numpy dtype (big-endian, as stored)
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a native-endian array.

    Raises FormatError, naming ``name``, for a bad magic number, an unknown type
    code, or a body whose size does not match the header's dimensions.
    """
    if len(data) < 4:
        raise FormatError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise FormatError(
            f"{name}: bad IDX magic number {data[:4].hex()} (must start with 0000); "
            "is this an IDX file?"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise FormatError(f"{name}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise FormatError(f"{name}: IDX header declares zero dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise FormatError(f"{name}: truncated IDX header ({len(data)} of {header_size} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header_size
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise FormatError(
            f"{name}: IDX file {what}: header says {shape} x {dtype.itemsize} B "
            f"= {expected} bytes of data, found {body}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gunzipping it when it is gzipped (by content, not name)."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise FormatError(f"{name}: corrupt or truncated gzip stream ({e})") from None
    return parse_idx(raw, name=os.path.basename(name))


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of ``array`` (the inverse of parse_idx; used to build fixtures)."""
    for code, dtype in IDX_TYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            return header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    raise ValueError(f"IDX has no type for dtype {array.dtype}")
