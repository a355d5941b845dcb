"""Ground truth for localisation: the lesion masks and boxes an expert drew on an image.

A :class:`~medxai.data.sources.base.Record` carries where its ground truth lives (``masks``: mask files, unioned;
``boxes``: :class:`LesionBox` objects), never the pixels, so records stay small for DataLoader workers.
:func:`read_ground_truth` turns them into one boolean mask at the image's ORIGINAL resolution, and
:func:`prepare_masks` places those masks exactly where preprocessing places the images in the model input.

**How a mask file is read.** Through :func:`medxai.data.readers.read_image_with_info`, so the same size limits,
format sniffing and EXIF orientation apply as to any image. Any PNG mode works: ``1``, ``L``, ``P``, ``RGB``,
``RGBA`` (the alpha channel is dropped, as for images: a mask drawn only in alpha reads as empty), 16-bit grey.
A pixel is lesion where its largest channel value exceeds HALF THE FILE'S OWN MAXIMUM: 0/1, 0/255 and 0/65535 masks
all read as drawn, anti-aliased or JPEG-blurred edges are cut at the midpoint, and an all-zero file is an empty mask
("no lesion", as for BUSI's normal images). A label map with several lesion values (1, 2, 3...) is not a binary
mask: only values above half its largest are kept, so give such data one mask file per lesion instead. Several mask
files of one image are unioned. A mask whose size differs from its image's is rejected
(:class:`~medxai.errors.InvalidImageError` naming the mask file): it is never resized, because a mask saved at
another resolution or orientation is as likely to be misaligned as merely scaled.

**How a box is filled** (when an image has boxes and no mask file): a pixel belongs to a box when its centre lies
inside it, ``x0 <= col + 0.5 < x1`` and ``y0 <= row + 0.5 < y1`` (end exclusive, as :class:`LesionBox` is); integer
boxes therefore cover exactly columns ``x0 .. x1 - 1``. Parts outside the image are clipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from medxai.data.readers import read_image_with_info
from medxai.errors import InvalidImageError

if TYPE_CHECKING:  # base.py imports LesionBox from here
    from medxai.data.preprocess import Preprocessor
    from medxai.data.sources.base import Record, Source

__all__ = ["LesionBox", "GroundTruth", "read_ground_truth", "read_mask_file", "fill_boxes", "prepare_masks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LesionBox:
    """A lesion's bounding box in pixel coordinates of the ORIGINAL image, end exclusive (``x1 = x0 + width``).

    Attributes:
        x0, y0: top-left corner (column, row).
        x1, y1: bottom-right corner, exclusive.
        label: the finding's name (``"Nodule"``), or None.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"box coordinates must be finite numbers, got {values}")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) has no area: need x0 < x1 and y0 < y1")

    @classmethod
    def from_xywh(cls, x: float, y: float, width: float, height: float, label: str | None = None) -> LesionBox:
        """A box given by its corner and size (NIH's ``Bbox [x,y,w,h]``)."""
        return cls(x, y, x + width, y + height, label)


@dataclass(frozen=True)
class GroundTruth:
    """One image's ground truth at its original resolution.

    Attributes:
        mask: bool (H, W): the union of the mask files; when there are none, the filled boxes. All False means "no
            lesion" (a normal image), which is ground truth too.
        boxes: the record's boxes (kept for box metrics such as IoBB).
        from_boxes: True when ``mask`` was filled from the boxes rather than read from mask files.
    """

    mask: np.ndarray
    boxes: tuple[LesionBox, ...]
    from_boxes: bool


def read_ground_truth(record: Record, image_shape: Sequence[int]) -> GroundTruth | None:
    """Read a record's ground truth at the size of its image.

    Args:
        record: the record; its ``masks`` and ``boxes`` say where the ground truth is.
        image_shape: the decoded image's shape, ``(H, W)`` or ``(H, W, C)``.

    Returns:
        The ground truth, or None when the record has neither masks nor boxes.

    Raises:
        InvalidImageError: naming the mask file, when it cannot be read or its size differs from the image's.
    """
    if not record.masks and not record.boxes:
        return None
    height, width = int(image_shape[0]), int(image_shape[1])
    if not record.masks:
        return GroundTruth(fill_boxes(record.boxes, (height, width)), tuple(record.boxes), from_boxes=True)
    mask = np.zeros((height, width), dtype=bool)
    for path in record.masks:
        mask |= read_mask_file(path, (height, width))
    return GroundTruth(mask, tuple(record.boxes), from_boxes=False)


def read_mask_file(path: str, image_size: tuple[int, int]) -> np.ndarray:
    """One mask file as a bool (H, W) array (see the module docstring for the rule), checked against the image size.

    Args:
        path: the mask file.
        image_size: ``(H, W)`` of the image it belongs to.

    Raises:
        InvalidImageError: the file cannot be decoded, or its size is not ``image_size``.
    """
    values, _ = read_image_with_info(path)
    if values.shape[:2] != tuple(image_size):
        raise InvalidImageError(
            path,
            f"mask is {values.shape[1]}x{values.shape[0]} pixels but its image is {image_size[1]}x{image_size[0]}; "
            "a mask must have its image's size (it is not resized)",
        )
    if values.ndim == 3:
        values = values.max(axis=2)
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise InvalidImageError(path, "mask contains NaN or infinite values")
    largest = float(values.max()) if values.size else 0.0
    if largest <= 0:
        return np.zeros(values.shape, dtype=bool)
    return values > largest / 2


def fill_boxes(boxes: Sequence[LesionBox], image_size: tuple[int, int]) -> np.ndarray:
    """The union of ``boxes`` as a bool (H, W) mask: the pixels whose centres lie inside a box, clipped."""
    height, width = image_size
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        row_start, row_stop = _covered_pixels(box.y0, box.y1, height)
        col_start, col_stop = _covered_pixels(box.x0, box.x1, width)
        mask[row_start:row_stop, col_start:col_stop] = True
    return mask


def _covered_pixels(start: float, stop: float, length: int) -> tuple[int, int]:
    """Indices ``i`` with ``start <= i + 0.5 < stop``, clipped to ``[0, length)``."""
    first = math.ceil(start - 0.5)
    end = math.ceil(stop - 0.5)
    return min(max(first, 0), length), min(max(end, 0), length)


def prepare_masks(
    source: Source,
    records: Sequence[Record],
    preprocessor: Preprocessor,
    skipped: list[tuple[str, str]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' ground-truth masks placed as their images are in the model input.

    Each image is decoded for its size (EXIF orientation included, as the model sees it), its ground truth read
    with :func:`read_ground_truth` and placed with :meth:`Preprocessor.prepare_mask`.

    Args:
        source: the source the records come from (decodes the images).
        records: the records, in the order of the wanted rows.
        preprocessor: the model's preprocessing.
        skipped: when given, ``(mask or image path, reason)`` is appended for each record whose ground truth could
            not be read (it then counts as having none).

    Returns:
        ``(N, S, S)`` float32 masks in [0, 1] (zeros where there is no ground truth) and an ``(N,)`` bool vector
        saying which records have ground truth (an empty mask of a normal image counts as ground truth).
    """
    size = preprocessor.config.size
    masks = torch.zeros((len(records), size, size), dtype=torch.float32)
    has_ground_truth = torch.zeros(len(records), dtype=torch.bool)
    failures = 0
    for row, record in enumerate(records):
        if not record.masks and not record.boxes:
            continue
        try:
            image_shape = np.shape(source.load(record).image)
            ground_truth = read_ground_truth(record, image_shape)
        except InvalidImageError as error:
            failures += 1
            if skipped is not None:
                skipped.append((error.path, error.reason))
            continue
        masks[row] = preprocessor.prepare_mask(ground_truth.mask)
        has_ground_truth[row] = True
    if failures:
        logger.warning("%d of %d images' ground truth could not be read; they count as having none",
                       failures, len(records))
    return masks, has_ground_truth
