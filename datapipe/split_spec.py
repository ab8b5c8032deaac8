"""Split specs: which rows of which source splits a part (train / val / ...) holds.

TFDS-style specs: ``train``, ``train[:90%]``, ``train[10%:20%]``, ``train[-5000:]``,
``train[:54000]+test``. A slice has Python slice semantics on ``range(size)`` (bounds
are clipped, negatives count from the end); percent bounds become absolute with
``round(size * p / 100)`` (TFDS's default "closest" rounding, Python's
round-half-to-even), and fractional percents (``train[:12.5%]``) are allowed. Terms
joined by ``+`` are concatenated in order. :class:`SplitSpec` is the one home of the
split defaults (train/val/test/predict and the seed).

Pure: standard library and numpy only.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from datapipe.errors import ConfigError, SplitSpecError

#: The parts a plan may hold, in this order.
PARTS = ("train", "val", "test", "predict")

_VALID_FORMS = (
    "valid forms: 'train', 'train[:90%]', 'train[10%:20%]', 'train[-5000:]', 'train+test'"
)
_NAME_RE = re.compile(r"[A-Za-z_][\w-]*", re.ASCII)
_TERM_RE = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\[(?P<body>[^\[\]]*)\])?", re.ASCII)
_ABS_RE = re.compile(r"-?\d+", re.ASCII)
_PCT_RE = re.compile(r"(?P<num>-?\d+(?:\.\d+)?)%", re.ASCII)

Bound = int | float | None


@dataclass(frozen=True)
class SliceSpec:
    """One term of a split spec: ``split[start:stop]`` in absolute rows or percent."""

    split: str
    start: Bound = None
    stop: Bound = None
    unit: Literal["abs", "%"] = "abs"

    def __str__(self) -> str:
        """The canonical text of this term (``train``, ``train[:90%]``, ...)."""
        if self.start is None and self.stop is None:
            return self.split
        suffix = "%" if self.unit == "%" else ""

        def fmt(b: Bound) -> str:
            if b is None:
                return ""
            text = np.format_float_positional(b, trim="-") if isinstance(b, float) else str(b)
            return text + suffix

        return f"{self.split}[{fmt(self.start)}:{fmt(self.stop)}]"

    def bounds(self, size: int) -> tuple[int, int]:
        """The absolute ``(start, stop)`` rows of this term in a split of ``size`` rows.

        Percent bounds become ``round(size * p / 100)`` (TFDS "closest" rounding), then
        Python slice semantics on ``range(size)`` apply (clipping, negatives from the
        end). The term selects ``range(start, stop)``; an empty one may have stop < start.
        """

        def absolute(b: Bound) -> int | None:
            if b is None or self.unit == "abs":
                return b  # type: ignore[return-value]
            return round(size * b / 100)

        r = range(size)[slice(absolute(self.start), absolute(self.stop))]
        return r.start, r.stop

    def indices(self, size: int) -> np.ndarray:
        """The int64 row indices this term selects from a split of ``size`` rows."""
        start, stop = self.bounds(size)
        return np.arange(start, max(start, stop), dtype=np.int64)


def _spec_error(spec: Any, problem: str) -> SplitSpecError:
    return SplitSpecError(f"invalid split spec {spec!r}: {problem}; {_VALID_FORMS}")


def _parse_bound(spec: str, term: str, text: str) -> tuple[Bound, str | None]:
    text = text.strip()
    if not text:
        return None, None
    if _ABS_RE.fullmatch(text):
        return int(text), "abs"
    m = _PCT_RE.fullmatch(text)
    if m:
        num = m["num"]
        value: int | float = float(num) if "." in num else int(num)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not -100 <= value <= 100:
            raise _spec_error(spec, f"percent bound {text!r} in {term!r} is outside -100%..100%")
        return value, "%"
    raise _spec_error(
        spec, f"slice bound {text!r} in {term!r} is not an integer or a percent like '90%'"
    )


def _parse_term(spec: str, term: str) -> SliceSpec:
    m = _TERM_RE.fullmatch(term)
    if m is None:
        if term.startswith("["):
            problem = f"term {term!r} has no split name before '['"
        elif "[" in term and "]" not in term[term.index("[") :]:
            problem = f"term {term!r} has an unclosed '['"
        elif "]" in term and "[" not in term:
            problem = f"term {term!r} has a ']' without '['"
        elif "]" in term and not term.endswith("]"):
            problem = f"term {term!r} has text after ']'"
        elif not _NAME_RE.match(term):
            problem = f"term {term!r} does not start with a split name ([A-Za-z_][A-Za-z0-9_-]*)"
        else:
            problem = f"term {term!r} is not 'name' or 'name[start:stop]'"
        raise _spec_error(spec, problem)
    name, body = m["name"], m["body"]
    if body is None:
        return SliceSpec(name)
    pieces = body.split(":")
    if len(pieces) == 1:
        raise _spec_error(spec, f"slice in {term!r} needs a ':' (single indices are not splits)")
    if len(pieces) > 2:
        raise _spec_error(
            spec, f"slice in {term!r} has more than one ':' (steps are not supported)"
        )
    start, start_unit = _parse_bound(spec, term, pieces[0])
    stop, stop_unit = _parse_bound(spec, term, pieces[1])
    if start_unit and stop_unit and start_unit != stop_unit:
        raise _spec_error(
            spec, f"slice in {term!r} mixes a percent and an absolute bound; use one unit"
        )
    return SliceSpec(name, start, stop, start_unit or stop_unit or "abs")


def parse_split_spec(spec: str) -> tuple[SliceSpec, ...]:
    """Parse a TFDS-style split spec into its terms.

    Grammar: one or more terms joined by ``+`` (spaces allowed around ``+``); a term is
    ``name`` or ``name[start:stop]`` where a name is ``[A-Za-z_][A-Za-z0-9_-]*`` and
    the optional bounds are both absolute integers (possibly negative) or both
    percents (``90%``, ``-10%``, ``12.5%``; within -100%..100%). Anything else raises
    :class:`SplitSpecError` with a one-line message.
    """
    if not isinstance(spec, str):
        raise _spec_error(spec, f"a split spec is a string, not {type(spec).__name__}")
    if not spec.strip():
        raise _spec_error(spec, "the spec is empty")
    terms = []
    for raw in spec.split("+"):
        term = raw.strip()
        if not term:
            raise _spec_error(spec, "empty term (a '+' with nothing on one side)")
        terms.append(_parse_term(spec, term))
    return tuple(terms)


def canonical_spec(spec: str) -> str:
    return "+".join(str(t) for t in parse_split_spec(spec))


def check_sizes(sizes: Mapping[str, int]) -> None:
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ConfigError(
                f"size of split {name!r} must be a non-negative integer, not {size!r}"
            )


def resolve_terms(
    spec: str, terms: tuple[SliceSpec, ...], sizes: Mapping[str, int]
) -> tuple[tuple[str, np.ndarray], ...]:
    out = []
    for term in terms:
        if term.split not in sizes:
            available = ", ".join(repr(s) for s in sorted(sizes)) or "none"
            raise SplitSpecError(
                f"split spec {spec!r} names split {term.split!r}, which this dataset does "
                f"not have; available splits: {available}"
            )
        size = int(sizes[term.split])
        idx = term.indices(size)
        if idx.size == 0:
            start, stop = term.bounds(size)
            raise SplitSpecError(
                f"split spec {spec!r}: the slice {str(term)!r} of split {term.split!r} "
                f"({size} rows) is empty (rows {start}:{stop}); choose bounds that select rows"
            )
        out.append((term.split, idx))
    return tuple(out)


def resolve_split_spec(spec: str, sizes: Mapping[str, int]) -> tuple[tuple[str, np.ndarray], ...]:
    """Resolve ``spec`` against split ``sizes``: per term, (source split, int64 indices).

    Indices are rows of the source split, in increasing order, with Python slice
    semantics on ``range(size)``; percent bounds are rounded with
    ``round(size * p / 100)`` (TFDS's default "closest" rounding). A name not in
    ``sizes`` or a term selecting no rows raises :class:`SplitSpecError`.
    """
    terms = parse_split_spec(spec)
    check_sizes(sizes)
    return resolve_terms(spec, terms, sizes)


@dataclass(frozen=True)
class SplitSpec:
    """What each part of a plan holds, and the seed: the one home of the split defaults.

    ``train``, ``test`` and ``predict`` are split specs (``"train[:90%]"``) or None (no
    such part; ``predict=None`` serves test's rows). ``val`` is a count or a fraction
    carved from train with ``seed`` (0.2 is lightning-bolts' default), a split spec that
    train then loses, :class:`PerClass`, :class:`Stratified`, :class:`Folds`, or 0/None
    for no val part. Every function of this module and the DataModule take their
    defaults from here.
    """

    train: str | None = "train"
    val: Any = 0.2
    test: str | None = "test"
    predict: str | None = None
    seed: int = 42

    @classmethod
    def of(cls, spec: SplitSpec | None = None, **fields: Any) -> SplitSpec:
        """``spec`` (default: the defaults) with ``fields`` replaced."""
        return replace(spec if spec is not None else cls(), **fields)

    def parts(self) -> dict[str, Any]:
        """The four part specs by part name, in :data:`PARTS` order."""
        return {part: getattr(self, part) for part in PARTS}

    def has_val(self) -> bool:
        """Whether a val part is asked for (0 and None ask for none)."""
        return self.val is not None and not (
            isinstance(self.val, numbers.Real) and not isinstance(self.val, bool)
            and self.val == 0)

    def carves_val(self) -> bool:
        """Whether val is carved out of train (a count, a fraction, per class, folds)."""
        return self.has_val() and not isinstance(self.val, str)

    def sources(self) -> set[str]:
        """The source splits the specs name (parsing only): what has to be prepared."""
        names: set[str] = set()
        for spec in (self.train, self.val, self.test, self.predict):
            if isinstance(spec, str):
                names.update(t.split for t in parse_split_spec(spec))
        return names

    def for_parts(self, parts: Any) -> SplitSpec:
        """The specs that the rows of ``parts`` depend on; the others None.

        A predict part left at None takes test's rows, a carved val needs train, and
        train loses val's rows: those specs come along, so each part keeps the rows the
        whole spec gives it.
        """
        keep = set(parts)
        if "predict" in keep and self.predict is None:
            keep.add("test")
        if "val" in keep and self.carves_val():
            keep.add("train")
        if "train" in keep:
            keep.add("val")
        return replace(self, **{part: getattr(self, part) if part in keep else None
                                for part in PARTS})


#: The defaults, for signatures that name one of them.
DEFAULT_SPLITS = SplitSpec()
