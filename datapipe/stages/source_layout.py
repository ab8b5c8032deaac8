"""Where a recipe's files lie in a folder the user points at (``--source DIR``), in any form.

Users point at what they already have, and that is often not the file as published:
torchvision's ``MNIST/raw/`` holds the IDX files decompressed (next to, or instead of,
the ``.gz``), and its CIFAR root the extracted ``cifar-10-batches-py/``. A resource
declares those other forms -- :class:`Decompressed`, :class:`Extracted` -- with digests
recorded from the official files, so such a form is checked as strictly as the
published file. A form without recorded digests can only be taken unverified.

The folders searched, in order: DIR itself, then the recipe's ``source_folders`` under
it (for MNIST torchvision's ``raw`` and ``MNIST/raw``), so DIR may be the raw folder,
its parent or torchvision's root. An extracted folder also matches DIR itself when DIR
holds its files (the user pointed at ``cifar-10-batches-py/``).

Pure look-ups and judgements: no digest is computed here (the caller passes the
function that does, with its memo), and nothing imports the download stage.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapipe.errors import ConfigError

_HEX_LENGTHS = {"md5": 32, "sha256": 64}


def _plain_name(name: object, what: str) -> str:
    if (not isinstance(name, str) or name in ("", ".", "..")
            or any(c in name for c in "/\\\0")):
        raise ConfigError(f"{what} {name!r} must be a plain file name (no folders)")
    return name


def _hex_or_none(value: object, algorithm: str, what: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if len(text) != _HEX_LENGTHS[algorithm] or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"{algorithm} of {what} must be {_HEX_LENGTHS[algorithm]} hex "
                          f"digits, got {value!r}")
    return text


def check_subfolder(relative: object) -> str:
    """``relative`` if it is a relative folder path of plain names (``MNIST/raw``)."""
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"source folder {relative!r} must be a relative path like MNIST/raw")
    for part in relative.split("/"):
        _plain_name(part, f"source folder {relative!r} part")
    return relative


@dataclass(frozen=True)
class Decompressed:
    """The published (gzipped) file, decompressed: ``filename`` and the recorded digests of
    the decompressed official file (what torchvision's MNIST leaves in ``raw/``)."""

    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        _plain_name(self.filename, "decompressed file name")
        for algorithm in _HEX_LENGTHS:
            object.__setattr__(self, algorithm, _hex_or_none(
                getattr(self, algorithm), algorithm, self.filename))

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hexdigest) of the strongest recorded digest, or None."""
        if self.sha256:
            return ("sha256", self.sha256)
        return ("md5", self.md5) if self.md5 else None


@dataclass(frozen=True)
class Extracted:
    """The published archive, extracted: ``folder`` holding the files the recipe reads,
    each with the md5 of the official file (None where none is published)."""

    folder: str
    files: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        _plain_name(self.folder, "extracted folder name")
        files = tuple((_plain_name(name, f"file of {self.folder}"),
                       _hex_or_none(md5, "md5", f"{self.folder}/{name}"))
                      for name, md5 in (self.files.items() if isinstance(self.files, dict)
                                        else self.files))
        if not files:
            raise ConfigError(f"extracted folder {self.folder} must name the files it holds")
        object.__setattr__(self, "files", files)


Form = Decompressed | Extracted
FORM_TYPES = {"Decompressed": Decompressed, "Extracted": Extracted}


def form_from(value: Any) -> Form:
    """A form from itself or from its config (a dict with its ``type``, as stages write)."""
    if isinstance(value, (Decompressed, Extracted)):
        return value
    if isinstance(value, dict) and value.get("type") in FORM_TYPES:
        fields = {k: v for k, v in value.items() if k != "type"}
        if "files" in fields:
            fields["files"] = tuple(tuple(pair) for pair in fields["files"])
        return FORM_TYPES[value["type"]](**fields)
    raise ConfigError(f"{value!r} is not a Decompressed or Extracted form of a resource")


def is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (a link to one counts; a FIFO or device does not)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Found:
    """Where a resource is in a --source folder: the file as published (``form`` None),
    or one of its declared forms."""

    path: Path
    form: Form | None = None

    @property
    def how(self) -> str:
        """A few words for messages and the manifest's origin."""
        if isinstance(self.form, Decompressed):
            return "decompressed"
        if isinstance(self.form, Extracted):
            return "extracted"
        return "as published"


def bases(folder: Path, subfolders: Iterable[str]) -> list[Path]:
    """The folders searched: ``folder``, then each of ``subfolders`` under it that exists."""
    found = [folder]
    for relative in subfolders:
        candidate = folder.joinpath(*check_subfolder(relative).split("/"))
        if candidate.is_dir() and candidate not in found:
            found.append(candidate)
    return found


def _holds(folder: Path, form: Extracted) -> bool:
    return folder.is_dir() and all(is_regular(folder / name) for name, _ in form.files)


def find(folder: Path, filename: str, forms: Iterable[Form],
         subfolders: Iterable[str] = ()) -> Found | None:
    """Where ``filename`` (or one of its ``forms``) is under ``folder``; None if nowhere.

    In each searched folder the published file wins over a form of it; the first
    searched folder that holds any of them wins.
    """
    forms = tuple(forms)
    for base in bases(folder, subfolders):
        if is_regular(base / filename):
            return Found(base / filename)
        for form in forms:
            if isinstance(form, Decompressed) and is_regular(base / form.filename):
                return Found(base / form.filename, form)
            if isinstance(form, Extracted):
                if _holds(base / form.folder, form):
                    return Found(base / form.folder, form)
                if base == folder and _holds(base, form):
                    return Found(base, form)
    return None


def describe(filename: str, forms: Iterable[Form]) -> str:
    """``name`` with the forms that may stand in for it, for a 'lacks ...' message."""
    others = [f.filename if isinstance(f, Decompressed) else f"{f.folder}/" for f in forms]
    return f"{filename} (or {' or '.join(others)})" if others else filename


@dataclass(frozen=True)
class Judgement:
    """What a found form's bytes are: verified against its recorded digests or not.

    ``identity``: (algorithm, hex) naming the bytes in fingerprints -- the published
    file's checksum when verified (the same data as the published file gives), else a
    digest of what is on disk. ``mismatch``: why it is not verified, or None.
    """

    verified: bool
    identity: tuple[str, str]
    mismatch: str | None
    checkable: bool  # False: nothing recorded to check it against


def judge(found: Found, published: tuple[str, str] | None,
          digest: Callable[[Path, str], str]) -> Judgement:
    """Check a found form against its recorded digests (``digest(path, algorithm)``)."""
    form = found.form
    if isinstance(form, Decompressed):
        recorded = form.checksum
        algorithm = recorded[0] if recorded else "sha256"
        actual = digest(found.path, algorithm)
        size = found.path.stat().st_size
        if recorded is None:
            return Judgement(False, (algorithm, actual), f"no digest of the decompressed "
                             f"{form.filename} is recorded to check it against", False)
        if form.size is not None and size != form.size:
            return Judgement(False, (algorithm, actual), f"it has {size} bytes but the "
                             f"decompressed official file has {form.size}", True)
        if actual != recorded[1]:
            return Judgement(False, (algorithm, actual), f"its {algorithm} is {actual} but the "
                             f"decompressed official file's is {recorded[1]}", True)
        return Judgement(published is not None, published or (algorithm, actual), None, True)
    assert isinstance(form, Extracted)
    listing = hashlib.sha256()
    problems, unrecorded = [], []
    for name, expected in form.files:
        actual = digest(found.path / name, "md5")
        listing.update(f"{name}\tmd5\t{actual}\n".encode())
        if expected is None:
            unrecorded.append(name)
        elif actual != expected:
            problems.append(f"{name} has md5 {actual} but the official file's is {expected}")
    identity = ("sha256", listing.hexdigest())
    if problems:
        return Judgement(False, identity, "; ".join(problems), True)
    if unrecorded:
        return Judgement(False, identity, f"no md5 is recorded for {', '.join(unrecorded)}",
                         False)
    return Judgement(published is not None, published or identity, None, True)
