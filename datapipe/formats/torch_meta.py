"""torchvision's ImageNet ``meta.bin``, read without torch and without running any code.

torchvision's ``ImageNet`` parses the devkit once and saves ``(wnid_to_classes,
val_wnids)`` with ``torch.save``: a zip holding ``<name>/data.pkl``, a protocol-2 pickle
of a dict (wnid -> tuple of class names) and a list (the wnid of each validation image,
in file-number order). That is plain data, so the pickle is read by an unpickler that
resolves no global at all and accepts no persistent id (a tensor would need one), and
what comes out is checked to be exactly that shape before it is used. Sizes are checked
before anything is read: the zip member's declared size against a cap and the file.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

from datapipe.errors import FormatError
from datapipe.folders import read_regular
from datapipe.formats.imagenet import WNID_RE, Devkit, Synset

# The real meta.bin is about 1 MB (50,000 val wnids and 1,000 class names); the cap also
# bounds what one-byte opcodes repeating a memoized object can build (8 bytes each).
MAX_META_BYTES = 16 << 20
ZIP_MAGIC = b"PK\x03\x04"
META_BIN = "meta.bin"  # its name in torchvision's ImageNet root


def is_torch_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a zip file (what torch.save writes since torch 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == ZIP_MAGIC
    except OSError:
        return False


class _NoGlobals(pickle.Unpickler):
    """An unpickler for plain data only: every global and persistent id is refused."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(io.BytesIO(data))
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        raise FormatError(f"{self.name}: refused the global {module}.{name}; meta.bin holds "
                          f"only dicts, lists, tuples and strings")

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(f"{self.name}: refused a persistent id (a tensor?); meta.bin holds "
                          f"only dicts, lists, tuples and strings")


def _data_pickle(path: str | os.PathLike, name: str) -> bytes:
    data = read_regular(path, MAX_META_BYTES)
    if not data.startswith(ZIP_MAGIC):
        raise FormatError(f"{name}: not a zip-format torch file (torch.save of torch >= 1.6)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist()
                       if m.filename.endswith("/data.pkl") and m.filename.count("/") == 1]
            if len(members) != 1:
                raise FormatError(f"{name}: expected one <name>/data.pkl in the torch file, "
                                  f"found {len(members)}")
            (member,) = members
            if member.file_size > MAX_META_BYTES or member.compress_size > len(data):
                raise FormatError(f"{name}: data.pkl declares {member.file_size} bytes, more "
                                  f"than a meta.bin holds")
            with archive.open(member) as f:
                pickled = f.read(MAX_META_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise FormatError(f"{name}: not a readable torch file ({type(e).__name__}: {e})"
                          ) from None
    if len(pickled) > MAX_META_BYTES:
        raise FormatError(f"{name}: data.pkl decompresses past {MAX_META_BYTES} bytes")
    return pickled


def parse_meta_pickle(pickled: bytes, name: str = "meta.bin") -> Devkit:
    """The classes (sorted by wnid) and val wnids of a meta.bin's pickle."""
    try:
        value = _NoGlobals(pickled, name).load()
    except FormatError:
        raise
    except Exception as e:  # a malformed pickle raises many types; none may escape as-is
        raise FormatError(f"{name}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and isinstance(value[0], dict) and isinstance(value[1], list)):
        raise FormatError(f"{name}: expected (wnid_to_classes, val_wnids), a dict and a list")
    wnid_to_classes, val_wnids = value
    synsets = []
    for wnid, names in wnid_to_classes.items():
        if not isinstance(wnid, str) or not WNID_RE.fullmatch(wnid):
            raise FormatError(f"{name}: class key {wnid!r} is not a WordNet id like n01440764")
        if isinstance(names, str):
            names = (names,)
        if (not isinstance(names, (tuple, list)) or not names
                or not all(isinstance(n, str) for n in names)):
            raise FormatError(f"{name}: the names of {wnid} are not a tuple of strings")
        synsets.append(Synset(wnid, 0, ", ".join(names)))
    if not synsets:
        raise FormatError(f"{name}: wnid_to_classes is empty")
    known = set(wnid_to_classes)
    for wnid in val_wnids:
        if not isinstance(wnid, str) or wnid not in known:
            raise FormatError(f"{name}: val wnid {wnid!r} is not one of its classes")
    return Devkit(tuple(sorted(synsets, key=lambda s: s.wnid)), (), tuple(val_wnids))


def read_meta_bin(path: str | os.PathLike) -> Devkit:
    """Parse torchvision's ``meta.bin`` (see the module docstring) into a Devkit."""
    name = os.fspath(path)
    return parse_meta_pickle(_data_pickle(path, name), name)
