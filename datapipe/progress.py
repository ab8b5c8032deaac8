"""A progress bar in bytes on stderr, shown only where someone can watch it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def progress(label: str, total: int | None, initial: int, quiet: bool | None) -> Iterator[Any]:
    """A tqdm bar in bytes on stderr, disabled when quiet (or, if unset, off a terminal)."""
    from tqdm import tqdm  # only a fetch or a long hash needs it

    show = quiet is False or (quiet is None and _stderr_is_tty())
    with tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not show) as bar:
        yield bar


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
