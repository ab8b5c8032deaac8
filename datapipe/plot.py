"""The data card as a picture: sample images of each class and each split's class balance.

    datapipe info mnist --plot mnist.png

Drawn with PIL alone (torchvision already brings it) from the prepared Arrow files
and the cached split plan, so it never imports torch. The file is written through a
temporary and a rename: a failed plot leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.cache import write_bytes_atomic
from datapipe.errors import ConfigError
from datapipe.stages.save import SHAPE_KEY

if TYPE_CHECKING:
    from datapipe.datamodule import DataModule

PER_CLASS = 8  # sample images in each class's row
MAX_CLASSES = 20  # rows of the sample grid; the histograms show every class
CELL = 64  # pixels of a sample's cell
LABEL_WIDTH = 140
PAD = 8
BAR_PANEL = 150  # pixels of a histogram panel's bar area
BACKGROUND, INK, FAINT = (255, 255, 255), (30, 30, 30), (225, 225, 225)
COLORS = {"train": (66, 133, 244), "val": (240, 150, 0), "test": (15, 157, 88),
          "predict": (170, 70, 190)}


def _read_table(path: Path) -> Any:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _image_column(table: Any) -> str:
    import pyarrow as pa

    if "image" in table.column_names:
        return "image"
    for field in table.schema:
        if field.name != "label" and (pa.types.is_binary(field.type)
                                      or pa.types.is_large_binary(field.type)
                                      or pa.types.is_fixed_size_list(field.type)):
            return field.name
    raise ConfigError(f"--plot found no image column among {', '.join(table.column_names)}")


def _thumbnails(table: Any, rows: list[int]) -> list[Any]:
    """The images at ``rows`` of ``table`` as RGB PIL images."""
    import pyarrow as pa
    from PIL import Image

    name = _image_column(table)
    field = table.schema.field(name)
    taken = table.column(name).take(pa.array(rows, pa.int64())).combine_chunks()
    if pa.types.is_fixed_size_list(field.type):
        shape = (json.loads(field.metadata[SHAPE_KEY]) if field.metadata
                 and SHAPE_KEY in field.metadata else [field.type.list_size])
        values = np.asarray(taken.flatten().to_numpy(zero_copy_only=False), np.uint8)
        arrays = values.reshape(len(rows), *shape)
        images = []
        for a in arrays:
            if a.ndim == 3:  # C x H x W
                a = a[0] if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)
            images.append(Image.fromarray(np.ascontiguousarray(a)).convert("RGB"))
        return images
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in taken.to_pylist()]


def _labels(table: Any) -> np.ndarray:
    column = table.column("label")
    return np.concatenate([c.to_numpy(zero_copy_only=False) for c in column.chunks]
                          or [np.empty(0, np.int64)]).astype(np.int64)


def _fit(image: Any, cell: int) -> Any:
    from PIL import Image

    scale = cell / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    small = scale >= 1  # small images are enlarged with crisp pixels
    return image.resize(size, Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR)


def plot_card(dm: DataModule, path: str | os.PathLike) -> Path:
    """Write ``path`` (PNG): a grid of samples per class and each split's class histogram."""
    from PIL import Image, ImageDraw, ImageFont

    plan = dm.available_plan()  # on a partial cache: what is there
    specs = plan.provenance.get("specs", {})
    parts = {name: part for name, part in plan.parts.items()
             if sum(len(rows) for _, rows in part)
             and not (name == "predict" and specs.get("predict") == specs.get("test"))}
    if not parts:
        raise ConfigError(f"{dm.name} has no samples in any split to plot")
    import pyarrow as pa

    sources = sorted({source for part in parts.values() for source, _ in part})
    tables = {}
    for source in sources:  # a sharded split's shards, concatenated without a copy
        files = [_read_table(f) for f in dm._find(source).data_files]
        tables[source] = files[0] if len(files) == 1 else pa.concat_tables(files)
    labels = {s: _labels(t) for s, t in tables.items()}
    classes = dm.classes
    counts = {name: np.bincount(np.concatenate([labels[s][np.asarray(r, np.int64)]
                                                for s, r in part]), minlength=len(classes))
              for name, part in parts.items()}

    # Samples: the first PER_CLASS rows of each class in the first part (train if any),
    # for the first MAX_CLASSES classes that have any there.
    sample_part = "train" if "train" in parts else next(iter(parts))
    shown = [int(k) for k in np.flatnonzero(counts[sample_part])[:MAX_CLASSES]]
    picks: dict[int, list[tuple[str, int]]] = {k: [] for k in shown}
    for source, rows in parts[sample_part]:
        rows = np.asarray(rows, np.int64)
        part_labels = labels[source][rows]
        for k in shown:
            need = PER_CLASS - len(picks[k])
            if need > 0:
                picks[k] += [(source, int(r)) for r in rows[part_labels == k][:need]]
    font = ImageFont.load_default()
    n = len(classes)
    width = max(LABEL_WIDTH + PER_CLASS * (CELL + PAD) + PAD, LABEL_WIDTH + 3 * n + 2 * PAD)
    title_h, row_h, panel_h = 28, CELL + PAD, BAR_PANEL + 44
    height = (title_h + 20 + len(shown) * row_h + PAD + len(parts) * panel_h + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    dims = "x".join(str(d) for d in dm.dims)
    draw.text((PAD, PAD), f"{dm.name}: {n} classes, samples {dims}, split id {plan.id}",
              fill=INK, font=font)
    more = f" ({len(shown)} of {n} classes)" if len(shown) < n else ""
    draw.text((PAD, title_h), f"samples of {sample_part}{more}", fill=INK, font=font)

    y = title_h + 20
    for k in shown:
        name = classes[k]
        label = name if name.startswith(str(k)) else f"{k} {name}"
        draw.text((PAD, y + CELL // 2 - 6), label[:22], fill=INK, font=font)
        by_source: dict[str, list[int]] = {}
        for source, row in picks[k]:
            by_source.setdefault(source, []).append(row)
        images = [img for source, rows in by_source.items()
                  for img in _thumbnails(tables[source], rows)]
        for i, image in enumerate(images):
            thumb = _fit(image, CELL)
            x0 = LABEL_WIDTH + i * (CELL + PAD)
            draw.rectangle((x0 - 1, y - 1, x0 + CELL, y + CELL), outline=FAINT)
            canvas.paste(thumb, (x0 + (CELL - thumb.size[0]) // 2,
                                 y + (CELL - thumb.size[1]) // 2))
        y += row_h

    y += PAD
    bar_w = min(48.0, (width - LABEL_WIDTH - PAD) / max(n, 1))
    for name, count in counts.items():
        total, top = int(count.sum()), max(int(count.max()), 1)
        draw.text((PAD, y), f"{name}: {total} samples, {int(count.min())}..{top} per class",
                  fill=INK, font=font)
        base = y + 18 + BAR_PANEL
        draw.line((LABEL_WIDTH, base, width - PAD, base), fill=INK)
        draw.text((PAD, base - BAR_PANEL), str(top), fill=INK, font=font)
        draw.text((PAD, base - 10), "0", fill=INK, font=font)
        color = COLORS.get(name, (120, 120, 120))
        for k, c in enumerate(count):
            x0 = LABEL_WIDTH + k * bar_w
            h = round(BAR_PANEL * int(c) / top)
            draw.rectangle((x0 + (1 if bar_w > 3 else 0), base - h,
                            max(x0 + bar_w - 1, x0 + 1), base), fill=color)
            if n <= MAX_CLASSES:
                draw.text((x0 + bar_w / 2 - 3, base + 3), str(k), fill=INK, font=font)
                draw.text((x0 + 2, base - h - 12), str(int(c)), fill=INK, font=font)
        y += panel_h

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    out = Path(path)
    write_bytes_atomic(out, buffer.getvalue())
    return out
