"""Files read in place from a folder the user points at: regular files only, bounded walks.

A folder of images (``--source DIR``, an extracted ImageNet tree) may hold anything: a
FIFO named ``x.jpg`` (opening it blocks forever), a device, a link to ``/etc`` or a link
to its own parent (a walk that follows it never ends, or visits the same images many
times). So :func:`walk_files` lists regular files only, follows links only while they
resolve inside the root, never enters a folder twice (by device and inode) and lists
each file once however many links reach it; :func:`read_regular` opens without
blocking and refuses anything that is not a regular file, or larger than a cap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from datapipe.errors import FormatError

log = logging.getLogger("datapipe")


class Walk:
    """One listing of a source root: the files seen (by device and inode) and what was skipped.

    Share one Walk across the folders of a listing so a file reached from two places
    (a link in one class folder to an image of another) is one row, not two.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.realpath(root))
        self.seen_files: set[tuple[int, int]] = set()
        self.seen_dirs: set[tuple[int, int]] = set()
        self.skipped: dict[str, int] = {}  # why -> how many
        with contextlib.suppress(OSError):  # a link back to the root is a loop too
            st = os.stat(self.root)
            self.seen_dirs.add((st.st_dev, st.st_ino))

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def is_dir(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a folder inside the root (a link to one outside is not)."""
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and (not os.path.islink(path) or self._inside(path))

    def files(self, top: str | os.PathLike, keep: Callable[[str], bool],
              recursive: bool = True) -> Iterator[str]:
        """Paths of the regular files under ``top`` whose names ``keep`` accepts, sorted.

        Hidden entries are skipped; links are followed only when they resolve inside
        the root; each folder is entered and each file listed once. ``recursive=False``
        lists ``top``'s own files only.
        """
        top = os.fspath(top)
        try:
            st = os.stat(top)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in self.seen_dirs:
            self._skip("folders reached twice (a link loop)")
            return
        self.seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError as e:
            raise FormatError(f"cannot list {top}: {e.strerror or e}") from None
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() and not self._inside(entry.path):
                self._skip("links leading outside the folder")
                continue
            try:
                st = os.stat(entry.path)
            except OSError:
                self._skip("broken links")
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append(entry.path)
            elif not keep(entry.name):
                continue
            elif not stat.S_ISREG(st.st_mode):
                self._skip("entries that are not regular files (FIFOs, devices, sockets)")
            elif (st.st_dev, st.st_ino) in self.seen_files:
                self._skip("files reached twice through links")
            else:
                self.seen_files.add((st.st_dev, st.st_ino))
                yield entry.path
        for folder in folders if recursive else ():
            yield from self.files(folder, keep)

    def report(self) -> None:
        """Log, once, what the listing skipped and why."""
        for why, n in sorted(self.skipped.items()):
            log.warning("skipped %d %s under %s", n, why, self.root)


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file, never blocking on a FIFO or device; FormatError if not one.

    The file is opened non-blocking (a FIFO without a writer opens at once) and judged
    by ``fstat`` of what was opened, so swapping the file for a FIFO after a listing
    cannot hang the reader either.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path} is not a regular file; remove it from the folder")
        if st.st_size > max_bytes:
            raise FormatError(f"{path} has {st.st_size} bytes, more than the {max_bytes} an "
                              f"image may have; remove it from the folder")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FormatError(f"{path} grew past {max_bytes} bytes while it was read")
    return data
