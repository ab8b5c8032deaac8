"""Tar members judged before their bytes are read: what a hostile archive cannot do.

A tar header declares a member's size, and reading the member allocates that much: a
GNU sparse member of a few hundred bytes expands to any size of zeros, and a gzipped
tar can declare a member of gigabytes that decompresses from kilobytes. So every member
is checked here first: sparse members are refused, a member must fit inside the archive
(an uncompressed tar, where the data lies at known offsets) and under a per-format cap.
Nothing in datapipe extracts a tar to disk; member names are never paths, and
:func:`member_path` refuses the ones that would be (absolute, ``..``).
"""

from __future__ import annotations

import posixpath
import tarfile

from datapipe.errors import FormatError


def member_path(member: tarfile.TarInfo, label: str) -> str:
    """The member's name without a leading ``./``; FormatError if it would leave the tar."""
    name = member.name
    clean = posixpath.normpath(name.removeprefix("./")) if name else ""
    if (not clean or clean.startswith(("/", "../")) or clean == ".." or "\0" in clean
            or "\\" in clean):
        raise FormatError(f"{label}: member {name!r} is not a relative path inside the "
                          f"archive; refusing the archive")
    return clean


def check_member(member: tarfile.TarInfo, label: str, max_bytes: int,
                 archive_bytes: int | None = None) -> None:
    """Refuse a member whose declared size is implausible, before anything is read.

    ``archive_bytes``: the size of an uncompressed tar, which must hold the member's
    data; None for a compressed one, where only ``max_bytes`` bounds it.
    """
    if member.issparse():
        raise FormatError(f"{label}: {member.name} is a sparse member (it would expand to "
                          f"{member.size} bytes); no genuine archive of this dataset has one")
    if member.size > max_bytes:
        raise FormatError(f"{label}: {member.name} declares {member.size} bytes, more than "
                          f"the {max_bytes} any member of this archive may have; is this "
                          f"the right archive?")
    if archive_bytes is not None and member.offset_data + member.size > archive_bytes:
        raise FormatError(f"{label}: {member.name} declares {member.size} bytes at offset "
                          f"{member.offset_data}, past the end of the {archive_bytes}-byte "
                          f"archive; it is truncated or forged")
