"""Split plans: which rows each part (train / val / test / predict) holds, seeded and cached.

A plan is a pure function of (data fingerprint, spec, seed). Two kinds of input say
which samples a part holds, each in its own module and re-exported here:

* TFDS-style *split specs* (``train[:90%]``, ``train+test``) and :class:`SplitSpec`,
  the one home of the split defaults: :mod:`datapipe.split_spec`;
* a val carved out of train (a count, a fraction, :class:`PerClass`,
  :class:`Stratified`) and K folds (:class:`Folds`): :mod:`datapipe.carving`.

This module combines them into a plan (:func:`plan_splits`, pure) and keeps plans at
the edge: :func:`load_or_create_plan` stores each plan once under
``<cache>/splits/<name>/<id>.json`` (indices in the compact form of
:mod:`datapipe.plan_codec`, with a digest) so every process and every later run reads
the same indices; :func:`verify_plans` re-checks the stored plans for ``datapipe verify``.

Standard library and numpy only (plus datapipe's cache floor): never torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from datapipe import layout
from datapipe.cache import (
    HEX_PATTERN,
    NAME_PATTERN,
    Cache,
    canonical_json,
    check_hex,
    check_name,
    fingerprint,
    now_iso,
    remove_stale_temporaries,
    write_json_atomic,
)
from datapipe.carving import (
    ALGORITHM,
    FOLDS_ALGORITHM,
    PER_CLASS_ALGORITHM,
    STRATIFIED_ALGORITHM,
    Folds,
    PerClass,
    Stratified,
    assign_folds,
    carve,
    carve_per_class,
    carve_stratified,
    check_seed,
    val_count,
    val_number,
)
from datapipe.errors import CacheError, ConfigError, DatapipeError, SplitSpecError
from datapipe.plan_codec import (
    MAX_ROWS,
    CodecError,
    decode_assignment,
    decode_rows,
    encode_assignment,
    encode_rows,
)
from datapipe.split_spec import (
    DEFAULT_SPLITS,
    PARTS,
    SliceSpec,
    SplitSpec,
    canonical_spec,
    check_sizes,
    parse_split_spec,
    resolve_split_spec,
    resolve_terms,
)

log = logging.getLogger("datapipe")

__all__ = [  # the plans, and (re-exported) the specs and carving they are made of
    "ALGORITHM",
    "DEFAULT_SPLITS",
    "FOLDS_ALGORITHM",
    "PARTS",
    "PER_CLASS_ALGORITHM",
    "STRATIFIED_ALGORITHM",
    "Folds",
    "PerClass",
    "PlanCheck",
    "SliceSpec",
    "SplitPlan",
    "SplitSpec",
    "Stratified",
    "assign_folds",
    "carve",
    "carve_per_class",
    "carve_stratified",
    "load_or_create_plan",
    "parse_split_spec",
    "plan_provenance",
    "plan_splits",
    "resolve_split_spec",
    "source_splits_needed",
    "val_count",
    "val_record",
    "verify_plans",
]

#: Version of the JSON written by :meth:`SplitPlan.to_json`. 2: compact indices and a
#: digest (files of format 1 are refused and recomputed; plan ids did not change).
PLAN_FORMAT = 2
#: A stored plan larger than this is refused unread (a compact 600k-row plan is ~0.1 MB).
MAX_PLAN_BYTES = 512 << 20
#: At most this many entries (terms) per part in a stored plan.
MAX_TERMS = 4096


# -------------------------------------------------------------------------- plans


Part = tuple[tuple[str, np.ndarray], ...]
#: The labels of every row of each source split, or a function that returns them.
Labels = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]


def _bad(why: str) -> CacheError:
    return CacheError(f"split plan is not usable: {why}")


def _split_back(part: Part, pos: np.ndarray) -> Part:
    """The rows at sorted positions ``pos`` of the concatenation of ``part``'s terms."""
    offsets = np.concatenate([[0], np.cumsum([idx.size for _, idx in part])])
    cuts = np.searchsorted(pos, offsets)
    out = []
    for t, (src, idx) in enumerate(part):
        sel = pos[cuts[t]:cuts[t + 1]] - offsets[t]
        if sel.size:
            rows = idx[sel]
            rows.setflags(write=False)
            out.append((src, rows))
    return tuple(out)


def _size(part: Part) -> int:
    return sum(int(idx.size) for _, idx in part)


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Which rows of which source split every part (train/val/test/predict) holds.

    ``id`` is ``datapipe.cache.fingerprint(provenance)``; equal ids mean equal plans.
    Index arrays are int64 and read-only. A K-fold plan (``Folds`` val) holds the whole
    train part and ``assignment``, the fold of each of its rows (in part order);
    :meth:`for_fold` gives the plan of one fold, whose own id differs per fold while
    :attr:`plan_id` (the K-fold plan's id, the file it is stored in) is shared.
    """

    id: str
    provenance: dict
    parts: dict[str, Part] = field(default_factory=dict)
    assignment: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SplitPlan) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def fold(self) -> int | None:
        """The fold this plan is (its val part), or None."""
        return self.provenance.get("fold")

    @property
    def folds(self) -> int | None:
        """K of a K-fold plan or of one of its folds, else None."""
        val = self.provenance["specs"].get("val")
        return val["folds"] if isinstance(val, dict) and "folds" in val else None

    @property
    def plan_id(self) -> str:
        """The id of the stored plan: this id, or the K-fold plan's for one of its folds."""
        if self.fold is None:
            return self.id
        return fingerprint({k: v for k, v in self.provenance.items() if k != "fold"})

    def sizes(self) -> dict[str, int]:
        """Number of samples per part."""
        return {name: _size(part) for name, part in self.parts.items()}

    def fold_sizes(self) -> list[int]:
        """Samples in each fold of a K-fold plan."""
        if self.assignment is None:
            raise ConfigError("this split plan is not a K-fold plan")
        return np.bincount(self.assignment, minlength=self.folds).tolist()

    def for_fold(self, fold: int) -> SplitPlan:
        """The plan of fold ``fold`` of this K-fold plan: that fold is val, the rest train."""
        if self.assignment is None or self.fold is not None:
            raise ConfigError("for_fold needs a whole K-fold plan (val=Folds(k))")
        fold = Folds(self.folds, fold).fold
        train = self.parts["train"]
        parts = {"train": _split_back(train, np.flatnonzero(self.assignment != fold)),
                 "val": _split_back(train, np.flatnonzero(self.assignment == fold))}
        parts.update({n: p for n, p in self.parts.items() if n not in ("train", "val")})
        provenance = {**self.provenance, "fold": int(fold)}
        return SplitPlan(fingerprint(provenance), provenance, parts)

    def digest(self) -> str:
        """sha256 over the provenance, the layout and every index (encoding-independent)."""
        layout = {name: [[src, int(idx.size)] for src, idx in part]
                  for name, part in sorted(self.parts.items())}
        head = {"format": PLAN_FORMAT, "id": self.id, "provenance": self.provenance,
                "layout": layout,
                "assignment": None if self.assignment is None else int(self.assignment.size)}
        h = hashlib.sha256(canonical_json(head).encode())
        for _, part in sorted(self.parts.items()):
            for _, idx in part:
                h.update(np.ascontiguousarray(idx, dtype="<i8").data)
        if self.assignment is not None:
            h.update(np.ascontiguousarray(self.assignment, dtype="<i8").data)
        return "sha256:" + h.hexdigest()

    def to_json(self, compact: bool = False) -> dict:
        """A JSON-able dict: format, id, provenance, sizes, indices and their digest.

        Indices are lists of ints, or with ``compact`` (how plans are stored) the
        run-length or bitmap form of :mod:`datapipe.plan_codec`.
        """
        def entry(src: str, idx: np.ndarray) -> dict:
            return {"split": src, **(encode_rows(idx) if compact else {"indices": idx.tolist()})}

        d = {
            "format": PLAN_FORMAT,
            "id": self.id,
            "provenance": self.provenance,
            "sizes": self.sizes(),
            "parts": {name: [entry(src, idx) for src, idx in part]
                      for name, part in self.parts.items()},
            "digest": self.digest(),
        }
        if self.assignment is not None:
            d["assignment"] = (encode_assignment(self.assignment, self.folds) if compact
                               else self.assignment.tolist())
        return d

    @classmethod
    def from_json(cls, d: Any, expected_id: str | None = None) -> SplitPlan:
        """Rebuild a plan from :meth:`to_json`'s dict, checking that it is whole and sound.

        Raises :class:`CacheError` (one line) when anything is missing, implausible or
        inconsistent: another format, an id that is not the fingerprint of the provenance
        (or not ``expected_id``), sizes beyond the source splits, indices that do not
        decode or whose digest differs, or indices that break what the provenance
        implies (train and val sharing a row, rows missing from or added to a carve,
        spec parts that are not their specs' rows, fold sizes more than 1 apart). The
        last checks hold even when someone recomputed the digest of an edited plan.
        """
        try:
            return cls._from_json(d, expected_id)
        except CacheError:
            raise
        except CodecError as e:
            raise _bad(str(e)) from None
        except DatapipeError as e:  # a spec in the provenance that does not parse
            raise _bad(f"its provenance does not hold ({e})") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise _bad(f"malformed JSON ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_json(cls, d: Any, expected_id: str | None) -> SplitPlan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            found = d.get("format") if isinstance(d, dict) else None
            old = " (written before plans carried digests)" if found == 1 else ""
            raise _bad(f"format {found!r}{old}, expected format {PLAN_FORMAT}")
        plan_id, prov = check_hex(d["id"], "split plan id"), d["provenance"]
        if not isinstance(prov, dict) or fingerprint(prov) != plan_id:
            raise _bad(f"id {plan_id!r} is not the fingerprint of its provenance")
        if expected_id is not None and plan_id != expected_id:
            raise _bad(f"it holds plan {plan_id}, not {expected_id}")
        sources = prov["sources"]
        if not isinstance(sources, dict):
            raise _bad("its provenance lists no source splits")
        source_sizes = {s: decode_size(info["size"]) for s, info in sources.items()}
        raw_parts = d["parts"]
        if not isinstance(raw_parts, dict):
            raise _bad("it has no parts")
        parts: dict[str, Part] = {}
        for name, entries in raw_parts.items():
            if name not in PARTS or not isinstance(entries, list) or not entries \
                    or len(entries) > MAX_TERMS:
                raise _bad(f"part {name!r} is unknown, empty or has too many entries")
            part = []
            for entry in entries:
                src = entry["split"]
                if src not in source_sizes:
                    raise _bad(f"part {name!r} has an entry for unknown split {src!r}")
                if "indices" in entry:
                    idx = _rows_from_list(entry["indices"], source_sizes[src])
                else:
                    idx = decode_rows(entry, source_sizes[src])
                idx.setflags(write=False)
                part.append((src, idx))
            parts[name] = tuple(part)
        assignment = None
        k = _folds_of(prov)
        if k is not None and prov.get("fold") is None:
            if "train" not in parts:
                raise _bad("a K-fold plan without a train part")
            raw = d["assignment"]
            count = _size(parts["train"])
            assignment = (_assignment_from_list(raw, count, k) if isinstance(raw, list)
                          else decode_assignment(raw, count, k))
            assignment = assignment.astype(np.int64)
            assignment.setflags(write=False)
        plan = cls(plan_id, prov, parts, assignment)
        digest = d.get("digest")
        if not isinstance(digest, str):
            raise _bad("it carries no digest of its indices")
        if digest != plan.digest():
            raise _bad("its digest does not match its indices (edited or damaged)")
        if d.get("sizes") != plan.sizes():
            raise _bad("recorded sizes do not match the indices")
        problem = _inconsistency(plan)
        if problem:
            raise _bad(problem)
        return plan


def decode_size(value: Any) -> int:
    """A source split's row count read from a file, refused when implausible."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROWS:
        raise _bad(f"source size {value!r} is not a plausible number of rows")
    return value


def _rows_from_list(raw: Any, size: int) -> np.ndarray:
    if not isinstance(raw, list) or not raw or len(raw) > size:
        raise _bad("an index list is empty or longer than its source split")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        raise _bad("an index list holds something other than integers")
    idx = np.array(raw, dtype=object)
    if idx[0] < 0 or idx[-1] >= size:
        raise _bad(f"indices fall outside the {size} rows of their source split")
    idx = idx.astype(np.int64)
    if np.any(np.diff(idx) <= 0):
        raise _bad("indices of an entry are not strictly increasing (duplicated or unsorted)")
    return idx


def _assignment_from_list(raw: list, count: int, k: int) -> np.ndarray:
    if len(raw) != count or not all(isinstance(v, int) and not isinstance(v, bool)
                                    and 0 <= v < k for v in raw):
        raise _bad(f"the fold assignment is not {count} integers in 0..{k - 1}")
    return np.array(raw, dtype=np.int64)


def _folds_of(prov: dict) -> int | None:
    val = prov["specs"]["val"]
    if isinstance(val, dict) and "folds" in val:
        return Folds(val["folds"]).k
    return None


def _same(a: Part | None, b: Part | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        sa == sb and np.array_equal(ia, ib) for (sa, ia), (sb, ib) in zip(a, b, strict=True))


def _inconsistency(plan: SplitPlan) -> str | None:
    """What in ``plan``'s indices contradicts its provenance, or None.

    Everything that needs no random draw is recomputed and compared; for a carve, train
    and val must be disjoint and together be exactly the train spec's rows, with a val
    of the size asked for (a fold: within 1 of n/K; the fold numbers: sizes within 1).
    """
    prov, parts = plan.provenance, plan.parts
    specs = prov["specs"]
    sizes = {s: int(info["size"]) for s, info in prov["sources"].items()}

    def resolve(spec: str | None) -> Part | None:
        return None if spec is None else resolve_terms(spec, parse_split_spec(spec), sizes)

    if set(parts) - set(PARTS):
        return "it has unknown parts"
    for name in ("test", "predict"):
        if not _same(parts.get(name), resolve(specs[name])):
            return f"its {name} rows are not those of its spec {specs[name]!r}"
    val, train_all = specs["val"], resolve(specs["train"])
    if isinstance(val, str):
        val_part = resolve(val)
        want_train = None if train_all is None else _subtract(train_all, val_part)
        if not _same(parts.get("val"), val_part) or not _same(parts.get("train"), want_train):
            return f"its train and val rows are not those of the specs {specs['train']!r} " \
                   f"and {val!r}"
        return None
    if val is None or (plan.folds is not None and plan.fold is None):
        if "val" in parts or not _same(parts.get("train"), train_all):
            return f"its train rows are not those of its spec {specs['train']!r}"
        if plan.assignment is not None:
            counts = np.bincount(plan.assignment, minlength=plan.folds)
            if counts.max() - counts.min() > 1:
                return f"its fold sizes {counts.tolist()} differ by more than 1"
        return None
    train, val_part = parts.get("train"), parts.get("val")
    if train is None or val_part is None or train_all is None:
        return "a carved val split needs both its train and val parts"
    want = _group_by_source(train_all)
    have = _group_by_source(train + val_part)
    if set(have) != set(want):
        return "its train and val rows come from other source splits than its train spec"
    for src, rows in have.items():
        if rows.size != want[src].size:
            return (f"its train and val hold {rows.size} rows of {src!r}, its train spec "
                    f"{want[src].size}")
        mark = np.zeros(sizes[src], dtype=bool)
        mark[rows] = True
        shared = rows.size - int(np.count_nonzero(mark))
        if shared:
            return f"train and val share {shared} row(s) of {src!r}"
        if not mark[want[src]].all():
            return f"its train and val hold rows of {src!r} outside its train spec"
    n, n_val = _size(train_all), _size(val_part)
    if plan.folds is not None:
        low = n // plan.folds
        ok = low <= n_val <= low + (1 if n % plan.folds else 0)
    elif isinstance(val, dict) and "per_class" in val:
        ok = n_val % max(1, val["per_class"]) == 0
    else:
        ok = n_val == val_count(n, val["stratified"] if isinstance(val, dict) else val)
    return None if ok else f"its val part has {n_val} rows, which its val spec {val!r} " \
                           f"does not give"


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
    check_sizes(sizes)
    return {k: int(v) for k, v in sizes.items()}


def _normalize_val(val: Any) -> int | float | str | dict | None:
    """``val`` as recorded in provenance: None for no val, canonical text for a spec."""
    if val is None:
        return None
    if isinstance(val, str):
        return canonical_spec(val)
    if isinstance(val, PerClass):
        return {"per_class": val.count, "algorithm": PER_CLASS_ALGORITHM} if val.count else None
    if isinstance(val, Folds):
        return {"folds": int(val.k), "stratified": bool(val.stratify),
                "algorithm": FOLDS_ALGORITHM}
    if isinstance(val, Stratified):
        count = _normalize_val(val.val_split)
        return None if count is None else {"stratified": count,
                                           "algorithm": STRATIFIED_ALGORITHM}
    if not isinstance(val, numbers.Real) or isinstance(val, (bool, np.bool_)):
        raise ConfigError(
            f"val={val!r} must be a number of samples, a fraction in [0, 1), a split spec "
            f"like 'train[-5000:]', PerClass, Stratified, Folds or None"
        )
    return val_number(val, "val") or None


def val_record(val: Any) -> Any:
    """``val`` (any form a DataModule takes) as plain JSON-able data, as provenance has it."""
    try:
        return _normalize_val(val)
    except DatapipeError:
        return repr(val)


def source_splits_needed(spec: SplitSpec | None = None, /, **fields: Any) -> set[str]:
    """The source splits the specs name (parsing only): what has to be prepared."""
    return SplitSpec.of(spec, **fields).sources()


def plan_provenance(
    sources: Mapping[str, tuple[str, int]], spec: SplitSpec | None = None, /, **fields: Any
) -> dict:
    """What a plan is a function of; its fingerprint is the plan id. Pure and cheap.

    ``spec`` (a :class:`SplitSpec`, default its defaults) with ``fields`` replaced
    (``train=``, ``val=``, ``test=``, ``predict=``, ``seed=``) says which rows.

    Specs are recorded in canonical text (``train[ :90%]`` and ``train[:90%]`` give one
    id); ``predict=None`` is recorded as the test spec; ``val`` of 0 is recorded as None.
    Only the source splits the specs name are recorded, so extra splits in ``sources``
    do not change the id. One fold of a K-fold plan (``Folds(k, fold)``) adds ``fold``
    to the K-fold plan's provenance.
    """
    spec = SplitSpec.of(spec, **fields)
    train, val, test, predict = spec.train, spec.val, spec.test, spec.predict
    sizes = _check_sources(sources)
    seed = check_seed(spec.seed)
    specs = {
        "train": None if train is None else canonical_spec(train),
        "val": _normalize_val(val),
        "test": None if test is None else canonical_spec(test),
    }
    specs["predict"] = specs["test"] if predict is None else canonical_spec(predict)
    if specs["train"] is None and isinstance(specs["val"], (int, float, dict)):
        raise ConfigError(f"val={val!r} is carved out of train, but train=None; give a train spec")
    needed = spec.sources()
    missing = sorted(needed - set(sizes))
    if missing:
        available = ", ".join(repr(s) for s in sorted(sizes)) or "none"
        raise SplitSpecError(
            f"the split specs name split(s) {', '.join(map(repr, missing))}, which this "
            f"dataset does not have; available splits: {available}"
        )
    prov = {
        "algorithm": ALGORITHM,
        "seed": seed,
        "specs": specs,
        "sources": {s: {"fingerprint": sources[s][0], "size": sizes[s]} for s in sorted(needed)},
    }
    if isinstance(val, Folds) and val.fold is not None:
        prov["fold"] = int(val.fold)
    return prov


def _group_by_source(part: Part) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = {}
    for src, idx in part:
        groups.setdefault(src, []).append(idx)
    return {src: np.concatenate(arrs) for src, arrs in groups.items()}


def _overlap(a: Part, b: Part) -> int:
    ga, gb = _group_by_source(a), _group_by_source(b)
    return sum(int(np.isin(ga[s], gb[s]).sum()) for s in ga.keys() & gb.keys())


def _train_labels(train: Part, labels: Labels | None, what: str) -> np.ndarray:
    if callable(labels):
        labels = labels()
    if labels is None or any(src not in labels for src, _ in train):
        raise ConfigError(f"{what} needs the labels of the train split")
    try:
        return np.concatenate([np.asarray(labels[src])[idx] for src, idx in train])
    except IndexError:
        raise ConfigError(f"the labels given for {what} are fewer than the rows of the train "
                          f"split") from None


def _check_distinct(train: Part, train_spec: str) -> None:
    terms: dict[str, int] = {}
    for src, _ in train:
        terms[src] = terms.get(src, 0) + 1
    for src, idx in _group_by_source(train).items():
        # One term is a slice: strictly increasing. Several may overlap.
        if terms[src] > 1 and np.any(np.diff(np.sort(idx)) == 0):
            raise SplitSpecError(
                f"train spec {train_spec!r} selects some rows of {src!r} more than once, so a "
                f"carved val would share samples with train; make the terms disjoint or give "
                f"val as a split spec"
            )


def _carve_part(
    train: Part, val_split: int | float | dict, seed: int, train_spec: str,
    labels: Labels | None = None,
) -> tuple[Part, Part]:
    _check_distinct(train, train_spec)
    # Carve positions in the concatenation, then map each back to its term.
    if isinstance(val_split, dict) and "per_class" in val_split:
        train_labels = _train_labels(train, labels, "a per-class val split")
        train_pos, val_pos = carve_per_class(train_labels, val_split["per_class"], seed)
    elif isinstance(val_split, dict):
        train_labels = _train_labels(train, labels, "a stratified val split")
        train_pos, val_pos = carve_stratified(train_labels, val_split["stratified"], seed)
    else:
        train_pos, val_pos = carve(np.arange(_size(train), dtype=np.int64), val_split, seed)
    return _split_back(train, train_pos), _split_back(train, val_pos)


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
    spec: SplitSpec | None = None,
    /,
    *,
    labels: Labels | None = None,
    **fields: Any,
) -> SplitPlan:
    """Compute the split plan (pure: same inputs, same plan, in any process).

    ``sources`` maps each source split to (data fingerprint, size). ``spec`` (a
    :class:`SplitSpec`, default its defaults) with ``fields`` replaced says which rows
    each part holds and the seed. ``train``, ``test`` and ``predict`` are split specs or
    None (part absent); ``predict=None`` means the same rows as test. ``val``:

    * an int or a float in [0, 1): carved with :func:`carve` (seeded) out of the
      concatenation of the train spec's terms; train keeps the rest. A train spec that
      selects a row twice is refused (the carve could not be disjoint).
    * a split spec: val is that spec and train loses every row that val holds (per
      source split), so the two are disjoint by construction.
    * :class:`PerClass`: carved with :func:`carve_per_class` out of the train spec's
      rows, given ``labels`` (source split -> label of every row, or a function
      returning that mapping, called only here).
    * :class:`Stratified`: a count or fraction carved with :func:`carve_stratified`
      (every class keeps its share), given ``labels``.
    * :class:`Folds`: the train spec's rows cut into K folds with :func:`assign_folds`
      (stratified given ``labels``); ``Folds(k)`` gives the K-fold plan, whose train
      part is every row, ``Folds(k, i)`` the plan of fold ``i``.
    * 0 or None: no val part.

    Empty parts raise :class:`SplitSpecError`. Overlaps of test with train or val are
    allowed (the user asked for them) but logged as a warning.
    """
    prov = plan_provenance(sources, SplitSpec.of(spec, **fields))
    fold = prov.pop("fold", None)
    specs = prov["specs"]
    sizes = {s: info["size"] for s, info in prov["sources"].items()}

    def resolve(spec: str | None) -> Part | None:
        return None if spec is None else resolve_terms(spec, parse_split_spec(spec), sizes)

    parts: dict[str, Part] = {}
    train_part = resolve(specs["train"])
    val_spec = specs["val"]
    val_part: Part | None = None
    assignment = None
    if isinstance(val_spec, str):
        val_part = resolve(val_spec)
        if train_part is not None:
            train_part = _subtract(train_part, val_part)
            if not train_part:
                raise SplitSpecError(
                    f"train spec {specs['train']!r} minus val spec {val_spec!r} is empty; "
                    f"val must leave some training rows"
                )
    elif isinstance(val_spec, dict) and "folds" in val_spec:
        assert train_part is not None  # plan_provenance refuses folds without train
        _check_distinct(train_part, specs["train"])
        fold_labels = (_train_labels(train_part, labels, "stratified folds")
                       if val_spec["stratified"] else None)
        assignment = assign_folds(_size(train_part), val_spec["folds"], prov["seed"],
                                  fold_labels)
        assignment.setflags(write=False)
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
    plan = SplitPlan(fingerprint(prov), prov, parts, assignment)
    return plan if fold is None else plan.for_fold(fold)


# -------------------------------------------------------------------- persistence


def _plan_path(cache: Cache, name: str, plan_id: str) -> Path:
    """``<cache>/splits/<name>/<id>.json``, built from checked parts only."""
    return cache.path(layout.plan_file(name, plan_id))


def _load_plan_file(path: Path) -> Any:
    """The JSON at ``path`` (None when absent), refusing anything that cannot be a plan.

    Opened without blocking and judged on the open file: a FIFO put there would block
    a reader forever, a huge file exhaust its memory, deep nesting crash the parser.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _bad(f"{path} cannot be read ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PLAN_BYTES:
            raise _bad(f"{path} is not a regular file of at most {MAX_PLAN_BYTES} bytes")
        try:
            return json.loads(f.read(info.st_size + 1))  # bounded, even if it grows
        except (OSError, ValueError, RecursionError) as e:
            raise _bad(f"{path} is not readable JSON ({type(e).__name__})") from None


def _read_plan(path: Path, plan_id: str, warn: bool = True) -> tuple[SplitPlan | None, bool]:
    """(the plan stored at ``path`` if whole, sound and of ``plan_id``, else None; whether
    a file was there and refused). A refusal is logged in one line when ``warn``."""
    data = None
    try:
        data = _load_plan_file(path)
        if data is None:
            return None, False
        return SplitPlan.from_json(data, expected_id=plan_id), False
    except CacheError as e:
        if not warn:
            pass
        elif isinstance(data, dict) and data.get("format") == 1:
            log.info("split plan %s is in an older format; rewriting it", path.name)
        else:
            log.warning("refusing %s: %s; recomputing it", path, str(e).removeprefix(
                "split plan is not usable: "))
        return None, True


def load_or_create_plan(
    cache: Cache | str | os.PathLike,
    name: str,
    sources: Mapping[str, tuple[str, int]],
    spec: SplitSpec | None = None,
    /,
    *,
    labels: Labels | None = None,
    **fields: Any,
) -> SplitPlan:
    """The plan of ``spec`` with ``fields`` replaced (as :func:`plan_splits`), read from
    ``<cache>/splits/<name>/<id>.json``.

    The id comes from :func:`plan_provenance` (no indices computed). A stored plan that
    is whole and sound (:meth:`SplitPlan.from_json`) is returned as is; otherwise the
    plan is computed with :func:`plan_splits` under the lock ``splits-<name>-<id>``
    (looking for the file again once the lock is held) and written atomically. A
    damaged, edited or older-format file is refused with one logged line and replaced:
    a plan is a pure function of its provenance, so recomputing it loses nothing and
    stops no run. ``labels`` (for a PerClass, Stratified or stratified Folds val) are
    used only when the plan is computed. For one fold of a K-fold plan the file is the
    K-fold plan's, computed once and shared by every fold and process.
    """
    if not isinstance(cache, Cache):
        cache = Cache.at(cache)
    try:
        check_name(name)
    except CacheError:
        raise ConfigError(
            f"dataset name {name!r} cannot name a splits folder; use lowercase letters, "
            f"digits, '_', '-', '.'") from None
    spec = SplitSpec.of(spec, **fields)
    val = spec.val
    fold = val.fold if isinstance(val, Folds) else None
    if fold is not None:
        spec = replace(spec, val=Folds(val.k, None, val.stratify))  # the file holds every fold
    plan_id = fingerprint(plan_provenance(sources, spec))
    path = _plan_path(cache, name, plan_id)
    plan, refused = _read_plan(path, plan_id)
    if plan is None:
        with cache.lock(layout.plan_lock(name, plan_id), what=f"splits of {name}"):
            plan, _ = _read_plan(path, plan_id, warn=not refused)  # said once is enough
            if plan is None:
                remove_stale_temporaries(path)
                plan = plan_splits(sources, spec, labels=labels)
                if plan.id != plan_id:  # a bug: plan_splits fingerprints the same provenance
                    raise AssertionError(f"split plan id {plan.id} != expected {plan_id}")
                write_json_atomic(path, {**plan.to_json(compact=True), "created_at": now_iso()},
                                  compact=True)
                sizes = ", ".join(f"{size} {part}" for part, size in plan.sizes().items())
                log.info("wrote split plan %s of %s: %s", plan_id, name, sizes or "no samples")
    return plan if fold is None else plan.for_fold(fold)


# ------------------------------------------------------------------------ verify


class PlanCheck(NamedTuple):
    """The verdict on one stored split plan (the fields of datapipe.verify.Check after
    its kind)."""

    label: str
    path: Path
    status: str  # "OK", "CORRUPT" or "INCOMPLETE" (never used, needs no action)
    detail: str = ""
    still_trusted: bool = False


def _prepared_rows(cache: Cache, name: str, fp: Any) -> int | None:
    """Rows of the prepared entry of ``name`` with fingerprint ``fp``, if one is published."""
    from datapipe.manifest import read_unchecked

    try:
        fp = check_hex(fp, "source fingerprint")
        versions = sorted(cache.path(layout.recipe_folder(name)).iterdir())
    except (CacheError, OSError):
        return None
    for version in versions:
        manifest = read_unchecked(version / fp) if version.is_dir() else None
        if isinstance(manifest, dict) and isinstance(manifest.get("rows"), int):
            return manifest["rows"]
    return None


def _plan_problem(cache: Cache, name: str, path: Path) -> tuple[str, str]:
    try:
        data = _load_plan_file(path)
        if data is None:
            return "OK", "removed meanwhile"
        if isinstance(data, dict) and data.get("format") == 1:
            return "INCOMPLETE", "in the older format 1 (no digest): never read, recomputed " \
                                 "when next used"
        prov = data.get("provenance") if isinstance(data, dict) else None
        sources = prov.get("sources") if isinstance(prov, dict) else None
        if isinstance(sources, dict):
            for src, info in sources.items():
                rows = _prepared_rows(cache, name, info.get("fingerprint")
                                      if isinstance(info, dict) else None)
                if rows is None:
                    # Bounded only by a size read from the file itself: not decoded here.
                    # It is checked in full against the real data whenever it is read.
                    return "OK", f"not decoded: its {src!r} data is not prepared (it is " \
                                 f"checked in full when next used)"
                if info.get("size") != rows:
                    # Its id covers the sizes, so no run over this data can ask for it
                    # (a plan made while a manifest said otherwise): never used.
                    return "INCOMPLETE", f"never used: it says {src!r} has " \
                                         f"{info.get('size')!r} rows, the prepared data {rows}"
        plan = SplitPlan.from_json(data, expected_id=layout.plan_id_of(path.name))
    except CacheError as e:
        return "CORRUPT", str(e).removeprefix("split plan is not usable: ")
    sizes = ", ".join(f"{k} {v}" for k, v in plan.sizes().items())
    kind = f"{plan.folds} folds, " if plan.folds else ""
    return "OK", f"{kind}{sizes}"


def _quarantine_plan(cache: Cache, name: str, path: Path) -> tuple[str, str]:
    """Re-check under the plan's lock; if still corrupt, move it aside (``.corrupt``)."""
    with cache.lock(layout.plan_lock(name, layout.plan_id_of(path.name)),
                    what=f"verify of splits of {name}"):
        status, detail = _plan_problem(cache, name, path)
        if status == "CORRUPT":
            os.replace(path, path.with_name(layout.set_aside(path.name)))
            detail += "; moved aside, the next run recomputes it"
    return status, detail


def verify_plans(cache: Cache, name: str | None = None) -> list[PlanCheck]:
    """Check every stored split plan (of ``name``); corrupt ones are moved aside.

    A plan is read as :func:`load_or_create_plan` reads it (digest, bounds, consistency
    with its provenance) and its source sizes are compared with the prepared data. A
    corrupt plan is renamed ``<id>.json.corrupt`` under its lock, so it is never read
    again; the next run that needs it recomputes it.
    """
    if name is not None:
        names = [check_name(name)]
    else:
        try:
            names = sorted(p.name for p in cache.splits.iterdir() if p.is_dir()
                           and not p.is_symlink() and NAME_PATTERN.fullmatch(p.name))
        except OSError:
            names = []
    checks = []
    for recipe in names:
        try:
            folder = cache.path(layout.plan_folder(recipe))
            files = sorted(p for p in folder.iterdir() if p.name.endswith(layout.PLAN_SUFFIX)
                           and not layout.is_temporary(p.name))
        except (CacheError, OSError):
            continue
        for path in files:
            label = f"{recipe} {layout.plan_id_of(path.name)}"
            if path.is_symlink() or not HEX_PATTERN.fullmatch(layout.plan_id_of(path.name)):
                checks.append(PlanCheck(label, path, "CORRUPT",
                                        "not a plan file datapipe writes; remove it by hand"))
                continue
            status, detail = _plan_problem(cache, recipe, path)
            if status == "CORRUPT":
                try:
                    status, detail = _quarantine_plan(cache, recipe, path)
                except (CacheError, OSError) as e:
                    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    checks.append(PlanCheck(label, path, status,
                                            f"{detail}; it could NOT be moved aside "
                                            f"({reason}): remove it by hand", True))
                    continue
            checks.append(PlanCheck(label, path, status, detail))
    return checks
