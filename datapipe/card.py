"""The data card: the four answers a DataModule owes its users.

What splits were used (specs, seed, sizes, id)? What transforms? What
normalization? How was the data prepared (sources, checksums, recipe version,
fingerprint, when)? ``data_card`` gathers them as JSON-ready data from the cache,
without importing torch; ``format_card`` lays them out for a terminal.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from datapipe import layout
from datapipe.errors import ConfigError, DatapipeError
from datapipe.prepare import find_prepared
from datapipe.splits import PerClass, val_record

if TYPE_CHECKING:
    from datapipe.datamodule import DataModule

CARD_FORMAT = "datapipe.card/1"


def _prepared_summary(prepared) -> dict[str, Any]:
    m = prepared.manifest
    return {
        "fingerprint": m["fingerprint"],
        "rows": m["rows"],
        "path": str(prepared.path),
        "verified": prepared.verified,
        "created_at": m["created_at"],
        "files": {name: {"bytes": r["bytes"], "sha256": r["sha256"]}  # not the chunk digests
                  for name, r in m["files"].items()},
        "sources": m["sources"],
        "statistics": {k: v for k, v in m.get("statistics", {}).items()},
        "stages": m.get("stages", {}),
    }


def data_card(dm: DataModule) -> dict[str, Any]:
    """The data card of ``dm`` as plain JSON-ready data."""
    recipe = dm.recipe
    prepared = {}
    for split in recipe.splits():
        found = find_prepared(recipe, split, dm.cache, dm.fetch_options)
        prepared[split] = _prepared_summary(found) if found is not None else None
    try:
        # On a partial cache (``prepare --split test``): the parts that are there.
        plan = dm.available_plan()
        splits: dict[str, Any] = {
            "id": plan.id,
            "sizes": plan.sizes(),
            "path": str(dm.cache.root.joinpath(*layout.plan_file(dm.name, plan.plan_id))),
            **plan.provenance,
        }
        if plan.fold is not None:  # one fold of a K-fold plan: the plan all folds share
            splits["plan_id"] = plan.plan_id
        missing = dm.missing_splits()
        if missing:
            splits["not_prepared"] = missing
    except DatapipeError as e:  # not prepared, or specs that do not fit the data
        specs = {**dm.split_specs, "val": val_record(dm.split_specs["val"])}
        splits = {"id": None, "specs": specs, "seed": dm.seed, "status": str(e)}
    info = recipe.info
    return {
        "format": CARD_FORMAT,
        "recipe": {"name": recipe.name, "version": recipe.version},
        "dataset": {
            "description": info.description,
            "homepage": info.homepage,
            "license": info.license,
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "dims": list(info.dims),
        },
        "prepared": prepared,
        "splits": splits,
        "transform": recipe.transform.config(),
        "normalization": dm.normalization(),
        "loader": recipe.wrap.config(),
        "cache": str(dm.cache.root),
    }


def _describe_stage(config: dict[str, Any], width: int = 140) -> str:
    """``Type key=value ...`` of a stage config, on one line of at most ``width``.

    Where the data comes from (``source``, ``root``, ``path``) goes first, then plain
    values, then lists and dicts.
    """
    fields = [(k, v) for k, v in config.items() if k not in ("stage", "type")]
    fields.sort(key=lambda kv: (kv[0] not in ("source", "root", "path"),
                                isinstance(kv[1], (dict, list))))
    items = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in fields]
    text = " ".join([str(config.get("type", "stage")), *items])
    return text if len(text) <= width else text[:width - 3] + "..."


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def format_card(card: dict[str, Any]) -> str:
    """The card as readable text, one section per question."""
    r, d = card["recipe"], card["dataset"]
    lines = [f"{r['name']} (recipe version {r['version']})"]
    if d["description"]:
        lines.append(f"  {d['description']}")
    dims = "x".join(str(x) for x in d["dims"])
    lines.append(f"  {d['num_classes']} classes, samples {dims}"
                 + (f", license {d['license']}" if d["license"] else ""))

    lines += ["", "How was the data prepared?"]
    rows = [["split", "rows", "fingerprint", "verified", "prepared at"]]
    sources = []
    for split, p in card["prepared"].items():
        if p is None:
            rows.append([split, "-", "not prepared", "-", "-"])
            continue
        rows.append([split, str(p["rows"]), p["fingerprint"], "yes" if p["verified"] else "NO",
                     p["created_at"]])
        for s in p["sources"]:
            mark = "verified" if s["verified"] else f"UNVERIFIED (expected {s['expected']})"
            sources.append([s["filename"], f"{s['algorithm']} {s['checksum']}", mark])
        if not p["sources"] and p.get("stages", {}).get("clean"):
            # A clean stage that reads its data in place (a folder, a HF dataset): its
            # config is what identifies the source.
            sources.append([split, _describe_stage(p["stages"]["clean"]), "read in place"])
    lines += _table(rows)
    if sources:
        lines.append("  sources:")
        lines += _table(sources, indent="    ")

    s = card["splits"]
    lines += ["", "What splits?"]
    if s["id"] is None:
        lines.append(f"  not yet known: {s['status']}")
    else:
        lines.append(f"  split id {s['id']} (seed {s['seed']}, {s['algorithm']})")
        specs = s["specs"]
        val = specs.get("val")
        if isinstance(val, dict) and "folds" in val:
            which = f"fold {s['fold']} of {val['folds']}" if s.get("fold") is not None \
                else f"all {val['folds']} folds"
            lines.append(f"  cross-validation: {which}"
                         f"{', stratified by class' if val.get('stratified') else ''}"
                         f" (K-fold plan {s.get('plan_id', s['id'])})")
        rows = [["split", "size", "spec"]]
        for part, size in s["sizes"].items():
            spec = specs.get(part)
            if part == "val" and isinstance(val, dict) and "folds" in val:
                spec = f"fold {s.get('fold')} of {specs.get('train')} cut into {val['folds']} " \
                       f"folds with seed {s['seed']}"
            elif part == "train" and isinstance(val, dict) and "folds" in val:
                spec = f"{spec} minus fold {s.get('fold')}"
            elif part == "val" and isinstance(val, dict) and "stratified" in val:
                spec = f"{val['stratified']} carved from {specs.get('train')}, stratified by " \
                       f"class, with seed {s['seed']}"
            elif part == "val" and not isinstance(spec, str):
                if isinstance(spec, dict) and "per_class" in spec:  # splits.PerClass
                    spec = f"{spec['per_class']} per class"
                spec = f"{spec} carved from {specs.get('train')} with seed {s['seed']}"
            elif part == "train" and specs.get("val") not in (None, 0):
                spec = f"{spec} minus val"
            elif part == "predict" and spec is None:
                spec = specs.get("test")
            rows.append([part, str(size), str(spec)])
        lines += _table(rows)
        if s.get("not_prepared"):
            missing = s["not_prepared"]
            lines.append(f"  only the parts whose data is prepared; {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not (`datapipe prepare "
                         f"{r['name']} " + " ".join(f"--split {m}" for m in missing) + "`)")

    n, t = card["normalization"], card["transform"]
    lines += ["", "What transforms and normalization?"]
    train_ops = t.get("train") or []
    if train_ops:
        ops = ", ".join(
            op.get("type", "?") + "(" + ", ".join(
                f"{k}={v}" for k, v in op.items() if k != "type") + ")" for op in train_ops)
        lines.append(f"  train split, per batch in the loader (seeded per batch): {ops}")
    if t.get("normalize") and n["mean"] is not None:
        mean, std = (" ".join(f"{v:g}" for v in n[k]) for k in ("mean", "std"))
        lines.append(f"  on the device: uint8 -> float32, (x/255 - mean) / std with mean "
                     f"{mean}, std {std} per channel ({n['from']})")
    else:
        lines.append("  on the device: uint8 -> float32 scaled to [0, 1] (no normalization)")
    loader = card["loader"]
    lines.append("  loader: " + ", ".join(
        f"{k}={v}" for k, v in loader.items() if k not in ("stage", "type")))
    lines += ["", f"cache: {card['cache']}"]
    return "\n".join(lines)


def split_options(card: dict[str, Any]) -> dict[str, Any]:
    """The DataModule arguments that rebuild the split plan a card records (specs, seed)."""
    s = card.get("splits", {})
    specs = s.get("specs") or {}
    options: dict[str, Any] = {f"{part}_split": specs[part]
                               for part in ("train", "val", "test", "predict") if part in specs}
    val = specs.get("val")
    if isinstance(val, dict):  # a carve recorded with its algorithm: back to the argument
        if "folds" in val:
            options.update(val_split=None, folds=val["folds"], fold=s.get("fold"),
                           stratify=bool(val.get("stratified")))
        elif "stratified" in val:
            options.update(val_split=val["stratified"], stratify=True)
        elif "per_class" in val:
            options["val_split"] = PerClass(val["per_class"])
    if s.get("seed") is not None:
        options["seed"] = s["seed"]
    for key, value in options.items():  # a card may come from a crafted checkpoint
        if key == "stratify" or isinstance(value, PerClass):
            ok = isinstance(value, (bool, PerClass))
        else:
            kind = (int,) if key in ("seed", "folds", "fold") else (str, int, float, type(None))
            ok = not isinstance(value, bool) and isinstance(value, kind)
        if not ok:
            raise ConfigError(f"the card's {key} is {value!r}, not a split spec or seed")
    return options


def compare_cards(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the data in the cache now differs from what a checkpoint's card records.

    Compares the recipe, each prepared split's fingerprint and the split id; an
    empty list means the cached data is the data the checkpoint was trained on.
    """
    differences = []
    was, now = saved["recipe"], current["recipe"]
    if (was["name"], was["version"]) != (now["name"], now["version"]):
        differences.append(f"recipe: checkpoint {was['name']} version {was['version']}, "
                           f"cache {now['name']} version {now['version']}")
    for split, p in saved.get("prepared", {}).items():
        if p is None:
            continue
        found = current.get("prepared", {}).get(split)
        if found is None:
            differences.append(f"{split}: checkpoint fingerprint {p['fingerprint']}, "
                               f"not prepared in the cache")
        elif found["fingerprint"] != p["fingerprint"]:
            differences.append(f"{split}: checkpoint fingerprint {p['fingerprint']}, "
                               f"cache {found['fingerprint']}")
    was_id, now_id = saved.get("splits", {}).get("id"), current.get("splits", {}).get("id")
    if was_id is not None and was_id != now_id:
        why = now_id or f"none ({current['splits'].get('status', 'not known')})"
        differences.append(f"split id: checkpoint {was_id}, cache {why}")
    return differences
