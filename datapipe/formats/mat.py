"""Sizes declared inside a MATLAB 5 file, checked against its bytes before scipy reads it.

``scipy.io.loadmat`` allocates a struct or cell array from the dimensions its header
declares before it reads the elements: a 300-byte meta.mat declaring a 30000 x 30000
struct array asks for 13 GiB. A MAT 5 file is a 128-byte header and tagged elements
(type, byte count; compressed elements are zlib streams of elements), so this walks
every element without building anything and refuses a struct or cell array with more
elements than the bytes it holds could encode (each takes at least one 8-byte tag), and
compressed data that would decompress past a cap.
"""

from __future__ import annotations

import math
import struct
import zlib

from datapipe.errors import FormatError

HEADER_BYTES = 128
MI_INT8, MI_INT32, MI_UINT32, MI_MATRIX, MI_COMPRESSED = 1, 5, 6, 14, 15
CELL, STRUCT, OBJECT = 1, 2, 3  # the array classes that hold elements, not numbers
MAX_DEPTH = 16


def check_mat_sizes(data: bytes, name: str, max_bytes: int) -> None:
    """FormatError unless every size ``data`` (a MAT 5 file) declares fits its bytes.

    ``max_bytes`` caps what the compressed elements may decompress to, in all.
    """
    if len(data) < HEADER_BYTES or data[126:128] not in (b"IM", b"MI"):
        return  # not MAT 5 (v4 or v7.3 HDF5): scipy's own checks, or its refusal, apply
    walker = _Walker(name, "<" if data[126:128] == b"IM" else ">", max_bytes)
    walker.elements(memoryview(data)[HEADER_BYTES:], 0)


class _Walker:
    def __init__(self, name: str, order: str, max_bytes: int) -> None:
        self.name, self.order, self.budget = name, order, max_bytes

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.name}: {what}; not a genuine devkit file, download it again")

    def tag(self, buf: memoryview, pos: int) -> tuple[int, int, int, int]:
        """(type, byte count, start of the data, start of the next element)."""
        if pos + 8 > len(buf):
            raise self.fail(f"an element tag at byte {pos} runs past the end")
        first, second = struct.unpack_from(self.order + "II", buf, pos)
        if first >> 16:  # the small format: up to 4 bytes of data inside the tag
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        end = pos + 8 + second
        if end > len(buf):
            raise self.fail(f"an element declares {second} bytes, more than the "
                            f"{len(buf) - pos - 8} that follow")
        padded = end if first == MI_COMPRESSED else pos + 8 + -(-second // 8) * 8
        return first, second, pos + 8, min(padded, len(buf))

    def elements(self, buf: memoryview, depth: int) -> None:
        pos = 0
        while pos < len(buf):
            pos = self.element(buf, pos, depth)

    def element(self, buf: memoryview, pos: int, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise self.fail("elements nested more deeply than any devkit file")
        kind, size, start, following = self.tag(buf, pos)
        if kind == MI_COMPRESSED:
            inflater = zlib.decompressobj()
            try:
                inner = inflater.decompress(bytes(buf[start:start + size]), self.budget + 1)
            except zlib.error as e:
                raise self.fail(f"a corrupt compressed element ({e})") from None
            self.budget -= len(inner)
            if self.budget < 0 or inflater.unconsumed_tail:
                raise self.fail("compressed elements that decompress past the cap")
            self.elements(memoryview(inner), depth + 1)
        elif kind == MI_MATRIX and size:
            self.matrix(buf[start:start + size], depth)
        return following

    def matrix(self, body: memoryview, depth: int) -> None:
        """Check one miMATRIX: flags, dimensions, name, then its class's contents."""
        kind, _, start, pos = self.tag(body, 0)
        if kind != MI_UINT32:
            raise self.fail("an array without its flags")
        array_class = struct.unpack_from(self.order + "I", body, start)[0] & 0xFF
        kind, size, start, pos2 = self.tag(body, pos)
        if kind != MI_INT32 or size % 4:
            raise self.fail("an array without its dimensions")
        dims = struct.unpack_from(f"{self.order}{size // 4}i", body, start)
        if any(d < 0 for d in dims):
            raise self.fail(f"an array of dimensions {dims}")
        _, _, _, pos = self.tag(body, pos2)  # the array's name
        if array_class not in (CELL, STRUCT, OBJECT):
            return  # numbers and text: scipy checks the data against the dimensions
        fields = 1
        if array_class == OBJECT:
            _, _, _, pos = self.tag(body, pos)  # the class name
        if array_class in (STRUCT, OBJECT):
            kind, _, start, pos = self.tag(body, pos)  # the length of each field name
            length = struct.unpack_from(self.order + "i", body, start)[0]
            kind, size, _, pos = self.tag(body, pos)  # the field names
            fields = max(1, size // length) if length > 0 else 1
        count = math.prod(dims) * fields
        if count * 8 > len(body) - pos:
            raise self.fail(f"a {'x'.join(map(str, dims))} array of {fields} field(s) in "
                            f"{len(body) - pos} bytes (each element takes at least 8)")
        for _ in range(count):
            pos = self.element(body, pos, depth + 1)
