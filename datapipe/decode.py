"""The torch side of JPEG shards: decode, crop and resize in the loader's workers.

A batch arrives as a :class:`~datapipe.loader.Batch` of row positions. Its crops are
drawn first, for the whole batch at once, from the stored heights and widths and
``Batch.generator()`` (so a batch's augmentation is the same in any worker layout
and after a resume); then each JPEG is decoded at the smallest draft scale (1/1,
1/2, 1/4, 1/8) that still holds the crop at full output resolution, cropped and
resized by PIL in one pass, and written into one uint8 N x 3 x S x S batch.

With ``JpegTransform(device_decode=True)`` the workers only gather bytes and draw the
crops; the batch travels as an :class:`EncodedBatch`, and ``on_device`` decodes it
on the device it reached (``torchvision.io.decode_jpeg`` of the whole list, nvJPEG on
CUDA) and crops there.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datapipe.formats.jpeg_shards import ShardReader
from datapipe.loader import Batch
from datapipe.shard_order import groups_of

if TYPE_CHECKING:
    from datapipe.stages.jpeg import JpegTransform

# ------------------------------------------------------------------ crop geometry


def random_resized_crop_boxes(heights: np.ndarray, widths: np.ndarray,
                              scale: tuple[float, float], ratio: tuple[float, float],
                              generator: torch.Generator | None,
                              attempts: int = 10) -> np.ndarray:
    """RandomResizedCrop's boxes for a batch: int64 rows (x0, y0, width, height).

    torchvision's rule, vectorized: up to ``attempts`` draws of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; the first that fits is
    placed uniformly; if none fits, the center crop of the clamped aspect ratio.
    """
    n = len(heights)
    draws = torch.rand((n, attempts, 2), generator=generator, dtype=torch.float64).numpy()
    place = torch.rand((n, 2), generator=generator, dtype=torch.float64).numpy()
    h = np.asarray(heights, np.float64)[:, None]
    w = np.asarray(widths, np.float64)[:, None]
    area = h * w * (scale[0] + draws[..., 0] * (scale[1] - scale[0]))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + draws[..., 1] * (log_hi - log_lo))
    cw, ch = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.argmax(axis=1)
    found = fits.any(axis=1)
    rows = np.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    h, w = h[:, 0], w[:, 0]
    # The fallback: the whole image, cut to the nearest allowed aspect ratio.
    in_ratio = w / h
    fw = np.where(in_ratio > max(ratio), np.rint(h * max(ratio)), w)
    fh = np.where(in_ratio < min(ratio), np.rint(w / min(ratio)), h)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    x0 = np.where(found, np.floor(place[:, 0] * (w - cw + 1)), (w - cw) // 2)
    y0 = np.where(found, np.floor(place[:, 1] * (h - ch + 1)), (h - ch) // 2)
    return np.stack([x0, y0, cw, ch], axis=1).astype(np.int64)


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short``: torchvision's Resize(int) rule."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def draft_reduction(width: int, height: int, need_width: float, need_height: float) -> int:
    """The largest JPEG draft reduction (1, 2, 4, 8) that keeps ``need`` pixels each way."""
    for reduction in (8, 4, 2):
        if width / reduction >= need_width and height / reduction >= need_height:
            return reduction
    return 1


# ------------------------------------------------------------------ one image


def decode_crop(data: Any, box: Sequence[int], size: int, draft: bool = True,
                flip: bool = False) -> tuple[np.ndarray, int]:
    """Decode the ``box`` (x0, y0, w, h) of a JPEG, resized to size x size (bilinear).

    Returns the H x W x 3 uint8 array and the draft reduction used (1, 2, 4 or 8).
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    width, height = img.size
    x0, y0, cw, ch = (int(v) for v in box)
    reduction = draft_reduction(width, height, width * size / cw, height * size / ch) \
        if draft else 1
    if reduction > 1:
        img.draft("RGB", (width // reduction, height // reduction))
    sx, sy = img.size[0] / width, img.size[1] / height
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = img.resize((size, size), Image.Resampling.BILINEAR,
                     box=(x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy))
    if flip:  # PIL mirrors in C, several times faster than a negative-stride numpy copy
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out), reduction


def decode_center(data: Any, size: int, resize: int, draft: bool = True) -> tuple[np.ndarray, int]:
    """Decode a JPEG, resize its shorter side to ``resize`` and center-crop size x size.

    Without draft the result equals torchvision's ``CenterCrop(size)(Resize(resize)(img))``
    on the decoded image, bilinear, pixel for pixel.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    width, height = img.size
    new_w, new_h = resized_size(width, height, resize)
    reduction = draft_reduction(width, height, new_w, new_h) if draft else 1
    if reduction > 1:
        img.draft("RGB", (width // reduction, height // reduction))
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size))), reduction


# ------------------------------------------------------------------ the dataset


class JpegDataset(Dataset):
    """Rows of JPEG shards served as (uint8 N x 3 x S x S images, int64 labels) batches.

    The images are in ``torch.channels_last`` memory format (as FFCV's are): the layout
    the decoder writes, kept to save a copy; convolutions on CUDA prefer it, and
    ``.contiguous()`` gives the NCHW strides where a model needs them.

    ``sources`` maps a source split to its shard files, or to a ShardReader of them (one
    bound to its manifest's promise checks what it reads); ``parts`` lists (source split,
    row indices) pairs that make this split, in order. Pickling (for workers) sends
    paths and indices, never the mapped data.
    """

    def __init__(self, sources: Mapping[str, Sequence[Path]],
                 parts: Sequence[tuple[str, np.ndarray]], transform: JpegTransform,
                 train: bool) -> None:
        self.readers = {name: paths if isinstance(paths, ShardReader) else ShardReader(paths)
                        for name, paths in sources.items()}  # a reader: checked (JpegLoad)
        self.transform = transform
        self.train = train
        self.names = [name for name, _ in parts]
        self.rows = np.concatenate([np.asarray(rows, np.int64) for _, rows in parts])
        self.part_of = np.concatenate(
            [np.full(len(rows), i, np.int16) for i, (_, rows) in enumerate(parts)])

    def __len__(self) -> int:
        return len(self.rows)

    def _column(self, column: str, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), np.int64)
        owners = self.part_of[positions]
        for part in np.unique(owners):
            mask = owners == part
            out[mask] = self.readers[self.names[part]].column(column)[self.rows[positions[mask]]]
        return out

    def _image(self, position: int) -> np.ndarray:
        reader = self.readers[self.names[self.part_of[position]]]
        return reader.image(int(self.rows[position]))

    def labels(self) -> np.ndarray:
        """All labels of the split, in order."""
        return self._column("label", np.arange(len(self)))

    def shard_groups(self) -> list[np.ndarray]:
        """This split's positions grouped by the shard file they are read from.

        Group ids run over every shard of every source split, sources in order of first
        use, each's shards in manifest order (so an id names one file); shards no row of
        this split uses are empty groups.
        """
        sources = list(dict.fromkeys(self.names))
        starts = {name: self.readers[name].starts() for name in sources}
        first = np.cumsum([0] + [len(starts[name]) - 1 for name in sources])
        keys = np.empty(len(self), np.int64)
        for part, name in enumerate(self.names):
            mask = self.part_of == part
            shard = np.searchsorted(starts[name], self.rows[mask], side="right") - 1
            keys[mask] = first[sources.index(name)] + shard
        return groups_of(keys, int(first[-1]))

    def __getitems__(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        positions = np.asarray(indices, dtype=np.int64)
        generator = indices.generator() if isinstance(indices, Batch) else None
        t, n = self.transform, len(positions)
        labels = torch.from_numpy(self._column("label", positions))
        heights, widths = self._column("height", positions), self._column("width", positions)
        if self.train:
            boxes = random_resized_crop_boxes(heights, widths, t.scale, t.ratio, generator)
            flips = (torch.rand(n, generator=generator) < 0.5).numpy() if t.flip \
                else np.zeros(n, bool)
        else:
            boxes, flips = None, np.zeros(n, bool)
        if t.device_decode:
            return self._encoded(positions, boxes, flips), labels
        out = np.empty((n, t.image_size, t.image_size, 3), np.uint8)
        for k, position in enumerate(positions):
            data = self._image(int(position))
            if boxes is not None:
                out[k], _ = decode_crop(data, boxes[k], t.image_size, t.draft, bool(flips[k]))
            else:
                out[k], _ = decode_center(data, t.image_size, t.resize_size, t.draft)
        # N x 3 x S x S over the decoder's N x S x S x 3 bytes: channels_last strides, no copy.
        images = torch.from_numpy(out).permute(0, 3, 1, 2)
        if self.train and t.train:
            images = t.augment(images, generator)
        return images, labels

    def __getitem__(self, index: int) -> tuple[Any, int]:
        images, labels = self.__getitems__([index])
        return images[0] if isinstance(images, torch.Tensor) else images, int(labels[0])

    def sample(self, index: int) -> tuple[Any, int]:
        """Row ``index`` as (RGB PIL image at its stored size, label): for a per-sample
        transform, which then does every crop and resize itself."""
        import io

        from PIL import Image

        position = np.asarray([index], dtype=np.int64)
        data = self._image(int(index))
        image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        return image, int(self._column("label", position)[0])

    def _encoded(self, positions: np.ndarray, boxes: np.ndarray | None,
                 flips: np.ndarray) -> EncodedBatch:
        chunks = [self._image(int(p)) for p in positions]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        data = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
        t = self.transform
        return EncodedBatch(
            data=data,
            offsets=torch.from_numpy(offsets),
            boxes=None if boxes is None else torch.from_numpy(boxes),
            flips=torch.from_numpy(np.ascontiguousarray(flips)),
            size=t.image_size,
            resize=t.resize_size,
        )


# ------------------------------------------------------------------ decode on the device


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """A batch of JPEGs still encoded, with its crops: decoded by :meth:`decode`.

    ``boxes`` (x0, y0, w, h per image) for training crops, or None for the eval
    pipeline (resize the shorter side to ``resize``, center-crop ``size``).
    ``to(device)`` only notes the device: the decoder reads the bytes from host memory.
    """

    data: torch.Tensor  # uint8: the JPEG files back to back
    offsets: torch.Tensor  # int64 (n + 1): where each file starts
    boxes: torch.Tensor | None
    flips: torch.Tensor  # bool (n)
    size: int
    resize: int
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to(self, device: Any, non_blocking: bool = False) -> EncodedBatch:
        return dataclasses.replace(self, device=torch.device(device))

    def pin_memory(self, device: Any = None) -> EncodedBatch:
        return dataclasses.replace(self, data=self.data.pin_memory())

    def decode(self) -> torch.Tensor:
        """uint8 N x 3 x size x size on ``device``: one batched decode, then the crops."""
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; still works
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

        ends = self.offsets.tolist()
        files = [self.data[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]
        if not files:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8,
                               device=self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(files), 3, self.size, self.size), dtype=torch.uint8,
                          device=self.device)
        boxes = None if self.boxes is None else self.boxes.tolist()
        flips = self.flips.tolist()
        for k, image in enumerate(decoded):
            if boxes is not None:
                x0, y0, cw, ch = boxes[k]
                out[k] = _resize(image[:, y0:y0 + ch, x0:x0 + cw], self.size, self.size)
            else:
                new_w, new_h = resized_size(image.shape[2], image.shape[1], self.resize)
                resized = _resize(image, new_h, new_w)
                top = int(round((new_h - self.size) / 2.0))
                left = int(round((new_w - self.size) / 2.0))
                out[k] = resized[:, top:top + self.size, left:left + self.size]
            if flips[k]:
                out[k] = out[k].flip(-1)
        return out


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 C x H x W tensor, back to uint8."""
    if image.shape[1:] == (height, width):
        return image
    x = torch.nn.functional.interpolate(image[None].float(), size=(height, width),
                                        mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)
