"""Compact, bounded encodings of the index arrays a split plan stores.

A 600k-image plan held as JSON lists of ints is 4-5 MB and takes ~70 ms to parse. The
rows of one plan entry are always strictly increasing (slices are ranges, carves are
sorted), so they are stored as whichever of two forms is smaller, zlib-compressed and
base64-encoded inside the plan's JSON (one file, published atomically, no pickle):

* ``runs``: little-endian int64 ``(start, stop)`` pairs, one per maximal run of
  consecutive rows (a slice like ``train[:90%]`` is one pair);
* ``bitmap``: one bit per row from ``start`` to ``stop`` (a carve that keeps 590k of
  600k rows, or takes 10k of them, is 75 KB before compression).

Decoding never trusts a declared size: every length is checked against the bounds the
caller gives (the source split's row count) before anything is allocated, and zlib
output is capped at the exact length the header implies, so a few hostile bytes cannot
ask for gigabytes. Decoded rows are strictly increasing and inside ``[0, size)`` by
construction, so a decoded entry has no duplicates and no row out of range.
"""

from __future__ import annotations

import base64
import binascii
import numbers
import zlib
from typing import Any

import numpy as np

#: Upper bound on the rows of one source split that a plan may name: larger values
#: read from a file are refused as implausible before anything is allocated. (Plans
#: read for use are bounded far tighter: by the rows their data really has.)
MAX_ROWS = 1 << 32
#: The dtypes a stored assignment array (fold numbers) may have.
ASSIGNMENT_DTYPES = {"u1": np.uint8, "u2": np.uint16, "u4": np.uint32}


class CodecError(ValueError):
    """A stored array is malformed or implausible (the plan reader makes it a CacheError)."""


def _count(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            not low <= value <= high:
        raise CodecError(f"{what} {value!r} is not an integer in [{low}, {high}]")
    return int(value)


def _pack(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def _unpack(text: Any, length: int) -> bytes:
    """The ``length`` bytes that ``text`` encodes; refused unless it is exactly that."""
    # zlib adds at most ~0.1% + a few bytes to incompressible input; base64 adds a third.
    limit = 4 * ((length + length // 500 + 64) // 3 + 1)
    if not isinstance(text, str) or len(text) > limit:
        raise CodecError("packed data is not a string of a plausible length")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, length + 1)  # never more than one byte too many
    except (binascii.Error, UnicodeEncodeError, zlib.error) as e:
        raise CodecError(f"packed data does not decode ({e})") from None
    if len(raw) != length or not inflater.eof or inflater.unconsumed_tail:
        raise CodecError(f"packed data holds {len(raw)}+ bytes, its header implies {length}")
    return raw


def encode_rows(rows: np.ndarray) -> dict[str, Any]:
    """The compact form of a non-empty, strictly increasing array of row indices."""
    rows = np.asarray(rows, dtype=np.int64)
    starts_here = np.empty(rows.size, dtype=bool)
    starts_here[0] = True
    np.not_equal(np.diff(rows), 1, out=starts_here[1:])
    ends_here = np.append(starts_here[1:], True)
    runs = np.stack([rows[starts_here], rows[ends_here] + 1], axis=1)
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if runs.size * 8 <= (stop - start + 7) // 8:
        return {"encoding": "runs", "count": int(rows.size), "runs": int(runs.shape[0]),
                "data": _pack(runs.astype("<i8").tobytes())}
    mask = np.zeros(stop - start, dtype=bool)
    mask[rows - start] = True
    return {"encoding": "bitmap", "count": int(rows.size), "start": start, "stop": stop,
            "data": _pack(np.packbits(mask, bitorder="little").tobytes())}


def decode_rows(entry: Any, size: int) -> np.ndarray:
    """The int64 rows an :func:`encode_rows` entry holds, all in ``[0, size)``."""
    if not isinstance(entry, dict):
        raise CodecError("an entry is not an object")
    size = _count(size, "source size", 0, MAX_ROWS)
    count = _count(entry.get("count"), "count", 1, max(size, 1))
    encoding = entry.get("encoding")
    if encoding == "runs":
        n_runs = _count(entry.get("runs"), "number of runs", 1, count)
        runs = np.frombuffer(_unpack(entry.get("data"), 16 * n_runs), dtype="<i8")
        starts, stops = runs[0::2].astype(np.int64), runs[1::2].astype(np.int64)
        if (starts[0] < 0 or stops[-1] > size or np.any(stops <= starts)
                or np.any(starts[1:] < stops[:-1])):
            raise CodecError("runs are not increasing, disjoint and inside the split")
        lengths = stops - starts
        if int(lengths.sum()) != count:
            raise CodecError(f"runs hold {int(lengths.sum())} rows, the entry says {count}")
        first = np.cumsum(lengths) - lengths  # position of each run's first row
        return np.arange(count, dtype=np.int64) + np.repeat(starts - first, lengths)
    if encoding == "bitmap":
        start = _count(entry.get("start"), "bitmap start", 0, size)
        stop = _count(entry.get("stop"), "bitmap stop", start + 1, size)
        raw = _unpack(entry.get("data"), (stop - start + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=stop - start,
                             bitorder="little")
        rows = np.flatnonzero(bits).astype(np.int64)
        if rows.size != count:
            raise CodecError(f"bitmap holds {rows.size} rows, the entry says {count}")
        return rows + start
    raise CodecError(f"unknown encoding {encoding!r}")


def encode_assignment(values: np.ndarray, k: int) -> dict[str, Any]:
    """The compact form of an array of small non-negative ints below ``k`` (fold numbers)."""
    code = "u1" if k <= 1 << 8 else "u2" if k <= 1 << 16 else "u4"
    raw = np.asarray(values).astype(ASSIGNMENT_DTYPES[code]).astype("<" + code).tobytes()
    return {"dtype": code, "count": int(np.asarray(values).size), "data": _pack(raw)}


def decode_assignment(entry: Any, count: int, k: int) -> np.ndarray:
    """The ``count`` values below ``k`` that an :func:`encode_assignment` entry holds."""
    if not isinstance(entry, dict) or entry.get("dtype") not in ASSIGNMENT_DTYPES:
        raise CodecError("the assignment is not an object with a known dtype")
    if entry.get("count") != count:
        raise CodecError(f"the assignment holds {entry.get('count')!r} values, "
                         f"the train part has {count} rows")
    code = entry["dtype"]
    width = np.dtype(ASSIGNMENT_DTYPES[code]).itemsize
    values = np.frombuffer(_unpack(entry.get("data"), width * count), dtype="<" + code)
    if values.size and int(values.max()) >= k:
        raise CodecError(f"the assignment names fold {int(values.max())}, there are {k}")
    return values.astype(ASSIGNMENT_DTYPES[code])
