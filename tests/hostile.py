"""Hostile inputs built by hand in their real formats: pickles opcode by opcode, tars
header by header. Used by the unit tests and the torture suite's hostile-input corpus.

Every builder returns bytes that the format's own tools accept as well-formed: the
attacks are in what the bytes declare, not in a broken syntax.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib

import numpy as np

from datapipe.formats.cifar import encode_pickle

PROTO = b"\x80\x02"
RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\n"
NDARRAY = b"cnumpy\nndarray\n"


def _short_bytes(data: bytes) -> bytes:
    return b"U" + bytes([len(data)]) + data


def billion_laughs(width: int = 200, depth: int = 6) -> bytes:
    """A batch whose labels are ``depth`` levels of lists of ``width`` references to the
    level below: about 2 * width * depth bytes describing width ** depth integers."""
    out = [PROTO, b"}(", _short_bytes(b"data")]
    out.append(encode_pickle(np.zeros((0, 3072), np.uint8))[2:-1])
    out.append(_short_bytes(b"labels"))
    out.append(b"]K\x01a")  # level 0: [1]
    for level in range(depth):
        out.append(b"q" + bytes([level]) + b"0")  # BINPUT level, POP
        out.append(b"](" + (b"h" + bytes([level])) * width + b"e")  # [ref] * width
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def reconstruct_call(shape: tuple[int, ...], code: bytes) -> bytes:
    """The opcodes of ``_reconstruct(ndarray, shape, code)``, leaving the array on the stack."""
    dims = b"".join(b"J" + struct.pack("<i", d) for d in shape)
    tuple_op = {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(shape)]
    return RECONSTRUCT + NDARRAY + dims + tuple_op + _short_bytes(code) + b"\x87R"


def batch_around(array_ops: bytes, rows: int) -> bytes:
    """A CIFAR batch dict whose 'data' is built by ``array_ops`` and has ``rows`` labels."""
    labels = b"](" + b"K\x01" * rows + b"e"
    return (PROTO + b"}(" + _short_bytes(b"data") + array_ops + _short_bytes(b"labels")
            + labels + b"u.")


def object_array(elements: int = 500_000_000) -> bytes:
    """``_reconstruct`` of an object array of ``elements`` Nones: gigabytes from 80 bytes."""
    return batch_around(reconstruct_call((elements,), b"O"), 1)


def unbuilt_array(rows: int = 60) -> bytes:
    """'data' as ``_reconstruct(ndarray, (rows, 3072), 'B')`` never given its state:
    an uninitialized array, whatever the heap held, served as images."""
    return batch_around(reconstruct_call((rows, 3072), b"B"), rows)


def ndarray_called(rows: int = 60) -> bytes:
    """'data' as ``ndarray((rows, 3072), 'B')`` called directly (REDUCE): uninitialized."""
    call = (NDARRAY + b"(J" + struct.pack("<i", rows) + b"M\x00\x0c\x86" + _short_bytes(b"B")
            + b"tR")
    return batch_around(call, rows)


def ndarray_newobj(rows: int = 60) -> bytes:
    """The same through NEWOBJ: ``ndarray.__new__(ndarray, (rows, 3072), 'B')``."""
    call = (NDARRAY + b"(J" + struct.pack("<i", rows) + b"M\x00\x0c\x86" + _short_bytes(b"B")
            + b"t\x81")
    return batch_around(call, rows)


def huge_state(rows: int = 10**9) -> bytes:
    """An array whose state declares ``rows`` x 3072 bytes and carries 16."""
    state = (b"(K\x01" + b"J" + struct.pack("<i", rows) + b"M\x00\x0c\x86"
             + b"cnumpy\ndtype\n" + _short_bytes(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _short_bytes(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + _short_bytes(b"\0" * 16) + b"tb")
    return batch_around(reconstruct_call((0,), b"b") + state, 1)


# ------------------------------------------------------------------ tars


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return info.tobuf(tarfile.GNU_FORMAT) + data + padding


def sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member ('S'): one 512-byte block of data standing for
    ``real_size`` bytes, the rest a hole of zeros that reading it would materialize."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = tarfile.BLOCKSIZE, 0o644, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = tarfile.itn(real_size - tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)
    header[398:410] = tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)
    header[482] = 0  # no extension blocks
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + b"\x01" * tarfile.BLOCKSIZE


def tar_of(parts: list[bytes], compress: bool = True) -> bytes:
    """A tar of already-encoded member blocks (see _member, sparse_member), gzipped."""
    raw = b"".join(parts) + b"\0" * (2 * tarfile.BLOCKSIZE)
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def members(entries: dict[str, bytes]) -> list[bytes]:
    return [_member(name, data) for name, data in entries.items()]


def zero_bomb_member(name: str, size: int) -> bytes:
    """A gzipped tar whose one member is ``size`` zero bytes: megabytes for a gigabyte.

    Compressed as it is generated, so building it never holds ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: a gzip stream
    out = io.BytesIO()
    out.write(compressor.compress(info.tobuf(tarfile.GNU_FORMAT)))
    block = b"\0" * (1 << 20)
    left = size + (-size % tarfile.BLOCKSIZE) + 2 * tarfile.BLOCKSIZE
    while left:
        piece = block[:min(left, len(block))]
        out.write(compressor.compress(piece))
        left -= len(piece)
    out.write(compressor.flush())
    return out.getvalue()
