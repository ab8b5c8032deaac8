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


# gzip (deflate) cannot expand data more than about 1032 times; a header claiming more
# than that for the compressed bytes present is refused before anything is allocated.
GZIP_MAX_RATIO = 1032
CHUNK = 1 << 20  # bytes decompressed per read while streaming into the array


def _header(head: bytes, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, stored dtype, header size) from the first bytes of an IDX file."""
    if len(head) < 4:
        raise FormatError(f"{name}: {len(head)} bytes is too short for an IDX header")
    if head[0] != 0 or head[1] != 0:
        raise FormatError(
            f"{name}: bad IDX magic number {head[:4].hex()} (must start with 0000); "
            "is this an IDX file?"
        )
    type_code, ndim = head[2], head[3]
    if type_code not in IDX_TYPES:
        raise FormatError(f"{name}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise FormatError(f"{name}: IDX header declares zero dimensions")
    header_size = 4 + 4 * ndim
    if len(head) < header_size:
        raise FormatError(f"{name}: truncated IDX header ({len(head)} of {header_size} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    return shape, IDX_TYPES[type_code], header_size


def _size_error(name: str, shape: tuple[int, ...], dtype: np.dtype, expected: int,
                body: int) -> FormatError:
    what = "truncated" if body < expected else "has trailing bytes"
    return FormatError(
        f"{name}: IDX file {what}: header says {shape} x {dtype.itemsize} B "
        f"= {expected} bytes of data, found {body}"
    )


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a native-endian array.

    Raises FormatError, naming ``name``, for a bad magic number, an unknown type
    code, or a body whose size does not match the header's dimensions.
    """
    shape, dtype, header_size = _header(data[:4 + 4 * data[3]] if len(data) >= 4 else data,
                                        name)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header_size
    if body != expected:
        raise _size_error(name, shape, dtype, expected, body)
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_exactly(stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = stream.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _stream_into(stream, name: str, limit: int) -> np.ndarray:
    """Read an IDX file from ``stream`` straight into its array, one chunk at a time.

    The header is parsed first and the array allocated once (after checking that
    ``limit`` bytes could hold it); the body is then decompressed into it, so peak
    memory is the array plus a chunk, not the file and a copy.
    """
    head = _read_exactly(stream, 4)
    if len(head) == 4:
        head += _read_exactly(stream, 4 * head[3])
    shape, dtype, header_size = _header(head, name)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected > limit:
        raise FormatError(f"{name}: IDX header says {shape} x {dtype.itemsize} B = {expected} "
                          f"bytes of data, more than the file can hold; is it corrupt?")
    array = np.empty(shape, dtype)
    view = memoryview(array.reshape(-1).view(np.uint8))
    filled = 0
    while filled < expected:
        got = stream.readinto(view[filled:filled + CHUNK])
        if not got:
            raise _size_error(name, shape, dtype, expected, filled)
        filled += got
    trailing = len(stream.read(CHUNK))
    if trailing:
        raise _size_error(name, shape, dtype, expected, expected + trailing)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gunzipping it when it is gzipped (by content, not name).

    Streams the (decompressed) body into the array: peak memory is about the
    array's size, whatever the file's.
    """
    name = os.fspath(path)
    short = os.path.basename(name)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gzipped:
            return _stream_into(f, short, size)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                return _stream_into(stream, short, GZIP_MAX_RATIO * size + CHUNK)
        except (OSError, EOFError, zlib.error) as e:
            raise FormatError(f"{name}: corrupt or truncated gzip stream ({e})") from None


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of ``array`` (the inverse of parse_idx; used to build fixtures)."""
    for code, dtype in IDX_TYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            return header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    raise ValueError(f"IDX has no type for dtype {array.dtype}")
