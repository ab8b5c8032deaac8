"""Split specs and seeded, cached split indices.

A split is a pure function of (data fingerprint, spec, seed). Two kinds of input say
which samples a part (train / val / test / predict) holds:

* TFDS-style *split specs*: ``train``, ``train[:90%]``, ``train[10%:20%]``,
  ``train[-5000:]``, ``train[:54000]+test``. A slice has Python slice semantics on
  ``range(size)`` (bounds are clipped, negatives count from the end); percent bounds
  become absolute with ``round(size * p / 100)`` (TFDS's default "closest" rounding,
  Python's round-half-to-even), and fractional percents (``train[:12.5%]``) are
  allowed. Terms joined by ``+`` are concatenated in order.
* a lightning-bolts style ``val_split``: an int (that many samples) or a float in
  [0, 1) (``int(n * val_split)`` samples) carved out of train with a seeded
  permutation (:func:`carve`); or :class:`PerClass` (that many samples of every
  class, as lightning-bolts' ImageNet ``num_imgs_per_val_class``), carved with
  :func:`carve_per_class` from the train labels.

Layout of the module: the math is pure (:func:`parse_split_spec`,
:func:`resolve_split_spec`, :func:`carve`, :func:`plan_splits`); persistence lives at
the edge (:func:`load_or_create_plan`), which stores each plan once under
``<cache>/splits/<name>/<id>.json`` so every process and every later run reads the
same indices.

This module imports only the standard library and numpy (plus datapipe.cache and
datapipe.errors): never torch.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from datapipe.cache import (
    Cache,
    fingerprint,
    now_iso,
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
)
from datapipe.errors import CacheError, ConfigError, SplitSpecError

log = logging.getLogger("datapipe")

__all__ = [
    "ALGORITHM",
    "PARTS",
    "PER_CLASS_ALGORITHM",
    "PerClass",
    "SliceSpec",
    "SplitPlan",
    "carve",
    "carve_per_class",
    "load_or_create_plan",
    "parse_split_spec",
    "plan_provenance",
    "plan_splits",
    "resolve_split_spec",
    "source_splits_needed",
]

#: Names the permutation used by :func:`carve`; part of every plan's provenance, so a
#: change of algorithm gives new plan ids instead of silently different indices.
ALGORITHM = "numpy-pcg64-permutation-v1"
#: Names the per-class carve (:func:`carve_per_class`); recorded with a PerClass val.
PER_CLASS_ALGORITHM = "numpy-pcg64-permutation-stable-by-label-v1"
#: The parts a plan may hold, in this order.
PARTS = ("train", "val", "test", "predict")
#: Version of the JSON written by :meth:`SplitPlan.to_json`.
PLAN_FORMAT = 1

_VALID_FORMS = (
    "valid forms: 'train', 'train[:90%]', 'train[10%:20%]', 'train[-5000:]', 'train+test'"
)
_NAME_RE = re.compile(r"[A-Za-z_][\w-]*", re.ASCII)
_TERM_RE = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\[(?P<body>[^\[\]]*)\])?", re.ASCII)
_ABS_RE = re.compile(r"-?\d+", re.ASCII)
_PCT_RE = re.compile(r"(?P<num>-?\d+(?:\.\d+)?)%", re.ASCII)
_PLAN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)

Bound = int | float | None


# --------------------------------------------------------------------- split specs


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


def _canonical_spec(spec: str) -> str:
    return "+".join(str(t) for t in parse_split_spec(spec))


def _check_sizes(sizes: Mapping[str, int]) -> None:
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ConfigError(
                f"size of split {name!r} must be a non-negative integer, not {size!r}"
            )


def _resolve_terms(
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
    _check_sizes(sizes)
    return _resolve_terms(spec, terms, sizes)


# ------------------------------------------------------------------------- carving


def _val_count(n: int, val_split: Any) -> int:
    """How many of ``n`` samples ``val_split`` asks for; raises ConfigError if unusable."""
    if isinstance(val_split, (bool, np.bool_)):
        raise ConfigError(
            f"val_split={val_split!r} is a bool; give a number of samples (5000) or a "
            f"fraction in [0, 1) (0.1)"
        )
    if isinstance(val_split, numbers.Integral):
        v = int(val_split)
        if v < 0:
            raise ConfigError(f"val_split={v} is negative; give a number of samples >= 0")
        if v > 0 and v >= n:
            raise ConfigError(
                f"val_split={v} leaves no training samples out of {n}; give fewer than {n} "
                f"samples or a fraction in [0, 1)"
            )
        return v
    if isinstance(val_split, numbers.Real):
        f = float(val_split)
        if not (0.0 <= f < 1.0):  # also rejects nan
            raise ConfigError(
                f"val_split={val_split!r} is a fraction outside [0, 1); give a fraction like "
                f"0.1 or a number of samples like 5000"
            )
        v = int(n * f)
        if f > 0 and v == 0:
            raise ConfigError(
                f"val_split={f:g} of {n} samples gives an empty validation set; give a "
                f"larger fraction or a number of samples"
            )
        return v
    raise ConfigError(
        f"val_split={val_split!r} is not a number; give a number of samples (5000) or a "
        f"fraction in [0, 1) (0.1)"
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")
    return int(seed)


def carve(indices: np.ndarray, val_split: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (train, val) with a seeded permutation.

    lightning-bolts semantics: an int ``val_split`` is the number of val samples, a
    float in [0, 1) the fraction ``int(n * val_split)``. With
    ``perm = np.random.default_rng(seed).permutation(n)``, the first ``n - n_val``
    positions of ``perm`` are train and the rest val (the shape of torch's
    ``random_split([n - v, v])``). Both parts are returned sorted (the loader
    shuffles anyway; sorted rows read memory maps with better locality) as int64.
    ``val_split=0`` gives an empty val. Unusable values raise :class:`ConfigError`.
    """
    arr = np.asarray(indices)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ConfigError(
            f"carve needs a 1-D array of integer indices, got shape {arr.shape} dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64, copy=False)
    n = int(arr.size)
    n_val = _val_count(n, val_split)
    perm = np.random.default_rng(_check_seed(seed)).permutation(n)
    train = np.sort(arr[perm[: n - n_val]])
    val = np.sort(arr[perm[n - n_val :]])
    return train, val


@dataclass(frozen=True)
class PerClass:
    """A val split of ``count`` samples of every class, carved from train (seeded)."""

    count: int

    def __post_init__(self) -> None:
        if (isinstance(self.count, (bool, np.bool_)) or not isinstance(self.count, numbers.Integral)
                or self.count < 0):
            raise ConfigError(f"a per-class val count must be an integer >= 0, got "
                              f"{self.count!r}")


def carve_per_class(labels: np.ndarray, per_class: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (train, val) with ``per_class`` val samples per class.

    With ``perm = np.random.default_rng(seed).permutation(n)``, the positions are
    grouped by label, stably, in ``perm`` order, and the first ``per_class`` of each
    class go to val: lightning-bolts' shuffle-then-take-the-first-k, seeded. Both
    parts are returned sorted (int64). A class with no more than ``per_class``
    samples would leave train without it: :class:`ConfigError`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
        raise ConfigError(f"carve_per_class needs 1-D integer labels, got shape {labels.shape} "
                          f"dtype {labels.dtype}")
    per_class = PerClass(per_class).count
    values, counts = np.unique(labels, return_counts=True)
    short = values[counts <= per_class]
    if per_class and short.size:
        raise ConfigError(
            f"{per_class} validation samples per class would take every sample of class "
            f"{int(short[0])} ({int(counts[values == short[0]][0])} samples); give a smaller count"
        )
    n = labels.size
    perm = np.random.default_rng(_check_seed(seed)).permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    grouped = labels[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    val = np.sort(order[rank < per_class]).astype(np.int64)
    train = np.sort(order[rank >= per_class]).astype(np.int64)
    return train, val


# -------------------------------------------------------------------------- plans


Part = tuple[tuple[str, np.ndarray], ...]
#: The labels of every row of each source split, or a function that returns them.
Labels = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Which rows of which source split every part (train/val/test/predict) holds.

    ``id`` is ``datapipe.cache.fingerprint(provenance)``; equal ids mean equal plans.
    Index arrays are int64 and read-only.
    """

    id: str
    provenance: dict
    parts: dict[str, Part] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SplitPlan) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def sizes(self) -> dict[str, int]:
        """Number of samples per part."""
        return {name: sum(int(idx.size) for _, idx in part) for name, part in self.parts.items()}

    def to_json(self) -> dict:
        """A JSON-able dict: format, id, provenance, sizes and the indices (lists of ints)."""
        return {
            "format": PLAN_FORMAT,
            "id": self.id,
            "provenance": self.provenance,
            "sizes": self.sizes(),
            "parts": {
                name: [{"split": src, "indices": idx.tolist()} for src, idx in part]
                for name, part in self.parts.items()
            },
        }

    @classmethod
    def from_json(cls, d: Any) -> SplitPlan:
        """Rebuild a plan from :meth:`to_json`'s dict, checking that it is whole.

        Raises :class:`CacheError` when anything is missing or inconsistent: wrong
        format, an id that is not the fingerprint of the provenance, indices that are
        not integers or fall outside their source split, sizes that do not add up.
        """
        try:
            return cls._from_json(d)
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(f"split plan JSON is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_json(cls, d: Any) -> SplitPlan:
        def bad(why: str) -> CacheError:
            return CacheError(f"split plan JSON is not usable: {why}")

        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise bad(f"expected a dict with format {PLAN_FORMAT}")
        plan_id, prov = d["id"], d["provenance"]
        if not isinstance(prov, dict) or fingerprint(prov) != plan_id:
            raise bad(f"id {plan_id!r} is not the fingerprint of its provenance")
        source_sizes = {s: int(info["size"]) for s, info in prov["sources"].items()}
        parts: dict[str, Part] = {}
        for name, entries in d["parts"].items():
            if name not in PARTS or not isinstance(entries, list) or not entries:
                raise bad(f"part {name!r} is unknown or empty")
            part = []
            for entry in entries:
                src, raw = entry["split"], entry["indices"]
                if src not in source_sizes or not isinstance(raw, list) or not raw:
                    raise bad(f"part {name!r} has an entry for unknown split {src!r} or no rows")
                idx = np.array(raw)
                if idx.ndim != 1 or idx.dtype.kind not in "iu":
                    raise bad(f"indices of {name!r}/{src!r} are not a list of integers")
                idx = idx.astype(np.int64)
                if idx.min() < 0 or idx.max() >= source_sizes[src]:
                    raise bad(
                        f"indices of {name!r}/{src!r} fall outside its {source_sizes[src]} rows"
                    )
                idx.setflags(write=False)
                part.append((src, idx))
            parts[name] = tuple(part)
        plan = cls(plan_id, prov, parts)
        if "sizes" in d and d["sizes"] != plan.sizes():
            raise bad("recorded sizes do not match the indices")
        return plan


def _check_sources(sources: Mapping[str, tuple[str, int]]) -> dict[str, int]:
    if not isinstance(sources, Mapping):
        raise ConfigError(
            f"sources must map split name -> (fingerprint, size), not {type(sources).__name__}"
        )
    sizes = {}
    for name, value in sources.items():
        try:
            fp, size = value
        except (TypeError, ValueError):
            raise ConfigError(
                f"source split {name!r} must be (fingerprint, size), not {value!r}"
            ) from None
        if not isinstance(fp, str) or not fp:
            raise ConfigError(f"fingerprint of source split {name!r} must be a non-empty string")
        sizes[name] = size
    _check_sizes(sizes)
    return {k: int(v) for k, v in sizes.items()}


def _normalize_val(val: Any) -> int | float | str | None:
    """``val`` as recorded in provenance: None for no val, canonical text for a spec."""
    if val is None:
        return None
    if isinstance(val, str):
        return _canonical_spec(val)
    if isinstance(val, PerClass):
        return {"per_class": val.count, "algorithm": PER_CLASS_ALGORITHM} if val.count else None
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Real):
        raise ConfigError(
            f"val={val!r} must be a number of samples, a fraction in [0, 1), a split spec "
            f"like 'train[-5000:]', or None"
        )
    if isinstance(val, numbers.Integral):
        if val < 0:
            raise ConfigError(f"val={val} is negative; give a number of samples >= 0")
        return int(val) or None
    f = float(val)
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"val={val!r} is a fraction outside [0, 1); give e.g. 0.1 or 5000")
    return f or None


def source_splits_needed(
    *,
    train: str | None = "train",
    val: int | float | str | None = 5000,
    test: str | None = "test",
    predict: str | None = None,
) -> set[str]:
    """The source splits the specs name (parsing only): what has to be prepared."""
    names: set[str] = set()
    for spec in (train, val, test, predict):
        if isinstance(spec, str):
            names.update(t.split for t in parse_split_spec(spec))
    return names


def plan_provenance(
    sources: Mapping[str, tuple[str, int]],
    *,
    train: str | None = "train",
    val: int | float | str | None = 5000,
    test: str | None = "test",
    predict: str | None = None,
    seed: int = 42,
) -> dict:
    """What a plan is a function of; its fingerprint is the plan id. Pure and cheap.

    Specs are recorded in canonical text (``train[ :90%]`` and ``train[:90%]`` give one
    id); ``predict=None`` is recorded as the test spec; ``val`` of 0 is recorded as None.
    Only the source splits the specs name are recorded, so extra splits in ``sources``
    do not change the id.
    """
    sizes = _check_sources(sources)
    seed = _check_seed(seed)
    specs = {
        "train": None if train is None else _canonical_spec(train),
        "val": _normalize_val(val),
        "test": None if test is None else _canonical_spec(test),
    }
    specs["predict"] = specs["test"] if predict is None else _canonical_spec(predict)
    if specs["train"] is None and isinstance(specs["val"], (int, float, dict)):
        raise ConfigError(f"val={val!r} is carved out of train, but train=None; give a train spec")
    needed = source_splits_needed(train=train, val=val, test=test, predict=predict)
    missing = sorted(needed - set(sizes))
    if missing:
        available = ", ".join(repr(s) for s in sorted(sizes)) or "none"
        raise SplitSpecError(
            f"the split specs name split(s) {', '.join(map(repr, missing))}, which this "
            f"dataset does not have; available splits: {available}"
        )
    return {
        "algorithm": ALGORITHM,
        "seed": seed,
        "specs": specs,
        "sources": {s: {"fingerprint": sources[s][0], "size": sizes[s]} for s in sorted(needed)},
    }


def _group_by_source(part: Part) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = {}
    for src, idx in part:
        groups.setdefault(src, []).append(idx)
    return {src: np.concatenate(arrs) for src, arrs in groups.items()}


def _overlap(a: Part, b: Part) -> int:
    ga, gb = _group_by_source(a), _group_by_source(b)
    return sum(int(np.isin(ga[s], gb[s]).sum()) for s in ga.keys() & gb.keys())


def _carve_part(
    train: Part, val_split: int | float | dict, seed: int, train_spec: str,
    labels: Labels | None = None,
) -> tuple[Part, Part]:
    for src, idx in _group_by_source(train).items():
        if np.unique(idx).size != idx.size:
            raise SplitSpecError(
                f"train spec {train_spec!r} selects some rows of {src!r} more than once, so a "
                f"carved val would share samples with train; make the terms disjoint or give "
                f"val as a split spec"
            )
    lengths = [idx.size for _, idx in train]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Carve positions in the concatenation, then map each back to its term.
    if isinstance(val_split, dict):  # PerClass, as recorded in provenance
        if callable(labels):
            labels = labels()
        if labels is None or any(src not in labels for src, _ in train):
            raise ConfigError("a per-class val split needs the labels of the train split")
        try:
            train_labels = np.concatenate([np.asarray(labels[src])[idx] for src, idx in train])
        except IndexError:
            raise ConfigError("the labels given for a per-class val split are fewer than the "
                              "rows of the train split") from None
        train_pos, val_pos = carve_per_class(train_labels, val_split["per_class"], seed)
    else:
        train_pos, val_pos = carve(np.arange(offsets[-1], dtype=np.int64), val_split, seed)

    def split_back(pos: np.ndarray) -> Part:
        cuts = np.searchsorted(pos, offsets)
        out = []
        for t, (src, idx) in enumerate(train):
            sel = pos[cuts[t] : cuts[t + 1]] - offsets[t]
            if sel.size:
                out.append((src, idx[sel]))
        return tuple(out)

    return split_back(train_pos), split_back(val_pos)


def _subtract(part: Part, remove: Part) -> Part:
    gone = _group_by_source(remove)
    out = []
    for src, idx in part:
        kept = idx[~np.isin(idx, gone[src])] if src in gone else idx
        if kept.size:
            out.append((src, kept))
    return tuple(out)


def plan_splits(
    sources: Mapping[str, tuple[str, int]],
    *,
    train: str | None = "train",
    val: int | float | str | None = 5000,
    test: str | None = "test",
    predict: str | None = None,
    seed: int = 42,
    labels: Labels | None = None,
) -> SplitPlan:
    """Compute the split plan (pure: same inputs, same plan, in any process).

    ``sources`` maps each source split to (data fingerprint, size). ``train``, ``test``
    and ``predict`` are split specs or None (part absent); ``predict=None`` means the
    same rows as test. ``val``:

    * an int or a float in [0, 1): carved with :func:`carve` (seeded) out of the
      concatenation of the train spec's terms; train keeps the rest. A train spec that
      selects a row twice is refused (the carve could not be disjoint).
    * a split spec: val is that spec and train loses every row that val holds (per
      source split), so the two are disjoint by construction.
    * :class:`PerClass`: carved with :func:`carve_per_class` out of the train spec's
      rows, given ``labels`` (source split -> label of every row, or a function
      returning that mapping, called only here).
    * 0 or None: no val part.

    Empty parts raise :class:`SplitSpecError`. Overlaps of test with train or val are
    allowed (the user asked for them) but logged as a warning.
    """
    prov = plan_provenance(sources, train=train, val=val, test=test, predict=predict, seed=seed)
    specs = prov["specs"]
    sizes = {s: info["size"] for s, info in prov["sources"].items()}

    def resolve(spec: str | None) -> Part | None:
        return None if spec is None else _resolve_terms(spec, parse_split_spec(spec), sizes)

    parts: dict[str, Part] = {}
    train_part = resolve(specs["train"])
    val_spec = specs["val"]
    val_part: Part | None = None
    if isinstance(val_spec, str):
        val_part = resolve(val_spec)
        if train_part is not None:
            train_part = _subtract(train_part, val_part)
            if not train_part:
                raise SplitSpecError(
                    f"train spec {specs['train']!r} minus val spec {val_spec!r} is empty; "
                    f"val must leave some training rows"
                )
    elif val_spec is not None:
        assert train_part is not None  # plan_provenance refuses a carve without train
        train_part, val_part = _carve_part(train_part, val_spec, prov["seed"], specs["train"],
                                           labels)
    if train_part is not None:
        parts["train"] = train_part
    if val_part is not None:
        parts["val"] = val_part
    test_part = resolve(specs["test"])
    if test_part is not None:
        parts["test"] = test_part
    predict_part = test_part if specs["predict"] == specs["test"] else resolve(specs["predict"])
    if predict_part is not None:
        parts["predict"] = predict_part
    for name in ("train", "val"):
        if test_part is not None and name in parts:
            shared = _overlap(parts[name], test_part)
            if shared:
                log.warning("split plan: %d sample(s) of %s are also in test", shared, name)
    for part in parts.values():
        for _, idx in part:
            idx.setflags(write=False)
    return SplitPlan(fingerprint(prov), prov, parts)


# -------------------------------------------------------------------- persistence


def _read_plan(path: os.PathLike, plan_id: str) -> SplitPlan | None:
    """The plan stored at ``path`` if it is whole and has ``plan_id``; else None."""
    data = read_json(path)  # None when absent or not JSON
    if data is None:
        return None
    try:
        plan = SplitPlan.from_json(data)
    except CacheError as e:
        log.warning("ignoring unusable split plan %s: %s", path, e)
        return None
    if plan.id != plan_id:
        log.warning("ignoring split plan %s: it holds id %s", path, plan.id)
        return None
    return plan


def load_or_create_plan(
    cache: Cache | str | os.PathLike,
    name: str,
    sources: Mapping[str, tuple[str, int]],
    *,
    train: str | None = "train",
    val: int | float | str | None = 5000,
    test: str | None = "test",
    predict: str | None = None,
    seed: int = 42,
    labels: Labels | None = None,
) -> SplitPlan:
    """The plan for these arguments, read from ``<cache>/splits/<name>/<id>.json``.

    The id comes from :func:`plan_provenance` (no indices computed). A whole stored
    plan is returned as is; otherwise the plan is computed with :func:`plan_splits`
    under the lock ``splits-<name>-<id>`` (looking for the file again once the lock is
    held) and written atomically. A corrupt file is recomputed and replaced.
    ``labels`` (for a :class:`PerClass` val) is used only when the plan is computed.
    """
    if not isinstance(cache, Cache):
        cache = Cache.at(cache)
    if not isinstance(name, str) or not _PLAN_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"dataset name {name!r} cannot name a splits folder; use letters, digits, '_', '-', '.'"
        )
    kwargs = dict(train=train, val=val, test=test, predict=predict, seed=seed)
    plan_id = fingerprint(plan_provenance(sources, **kwargs))
    path = cache.under("splits", name, f"{plan_id}.json")
    plan = _read_plan(path, plan_id)
    if plan is not None:
        return plan
    with cache.lock(f"splits-{name}-{plan_id}", what=f"splits of {name}"):
        plan = _read_plan(path, plan_id)
        if plan is not None:
            return plan
        remove_stale_temporaries(path)
        plan = plan_splits(sources, **kwargs, labels=labels)
        if plan.id != plan_id:  # would be a bug: plan_splits fingerprints the same provenance
            raise AssertionError(f"split plan id {plan.id} != expected {plan_id}")
        write_json_atomic(path, {**plan.to_json(), "created_at": now_iso()}, compact=True)
        log.info("wrote split plan %s of %s: %s", plan_id, name, plan.sizes())
    return plan
