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

import csv
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medxai.data.readers import is_hidden_or_system, read_image_with_info, special_file_reason
from medxai.errors import DataError, InvalidImageError

if TYPE_CHECKING:  # base.py imports LesionBox from here
    from medxai.data.preprocess import Preprocessor
    from medxai.data.sources.base import Record, Source

__all__ = [
    "LesionBox",
    "GroundTruth",
    "read_ground_truth",
    "read_mask_file",
    "fill_boxes",
    "prepare_masks",
    "MASK_FOLDER_NAMES",
    "ORPHAN_MASK_REASON",
    "mask_name_parts",
    "MaskPairing",
    "pair_mask_files",
    "mask_folder_mirrors_images",
    "ground_truth_summary",
    "BoxColumns",
    "mask_paths",
    "GroundTruthTable",
    "open_ground_truth",
    "attach_ground_truth",
]

logger = logging.getLogger(__name__)

#: How a mask file without its image is listed in a source's ``skipped``.
ORPHAN_MASK_REASON = "mask file without its image"

#: Folder names (any letter case) that may hold mask files mirroring the image names beside or below them.
MASK_FOLDER_NAMES = frozenset({"masks", "mask", "segmentations", "segmentation"})

# "<image stem><separator><kind>[<separator><n>]": BUSI's "benign (4)_mask_1", "x_seg", "x-mask", "X_Label2".
_MASK_SUFFIX = re.compile(r"^(?P<base>.+?)[_-](?P<kind>mask|seg|segmentation|label)(?:[_-]?\d+)?$", re.IGNORECASE)


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
    image_shapes: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' ground-truth masks placed as their images are in the model input.

    Each image's size is ``image_shapes`` (e.g. the prepared split's facts, measured when it was decoded), else the
    image is decoded for it (EXIF orientation included, as the model sees it); its ground truth is read with
    :func:`read_ground_truth` and placed with :meth:`Preprocessor.prepare_mask`.

    Args:
        source: the source the records come from (decodes the images).
        records: the records, in the order of the wanted rows.
        preprocessor: the model's preprocessing.
        skipped: when given, ``(mask or image path, reason)`` is appended for each record whose ground truth could
            not be read (it then counts as having none).
        image_shapes: the decoded images' ``(H, W)``, one per record, when known; saves decoding them again.

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
            image_shape = image_shapes[row] if image_shapes is not None else np.shape(source.load(record).image)
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


# -- pairing mask files with images by name ---------------------------------------------------------------------------
def mask_name_parts(stem: str) -> tuple[str, str] | None:
    """``(image stem, kind)`` when a file stem ends in a mask suffix (``_mask``, ``_mask_1``, ``-mask``, ``_seg``,
    ``_segmentation``, ``_label``, any letter case), else None: ``"benign (4)_mask_1"`` -> ``("benign (4)", "mask")``."""
    match = _MASK_SUFFIX.match(stem)
    return (match["base"], match["kind"].lower()) if match else None


def mask_folder_mirrors_images(mask_folder: Path, parent: Path) -> bool:
    """Whether a file under ``mask_folder`` is named after an image at the mirrored place under ``parent``
    (``parent/masks/benign/x.png`` or ``.../x_mask.png`` -> ``parent/benign/x.*``): the evidence that makes a folder
    called ``masks`` a mask folder rather than a class. Stops at the first pair found."""
    stems_of: dict[Path, set[str]] = {}
    for folder, _, file_names in os.walk(mask_folder):
        mirror = parent / Path(folder).relative_to(mask_folder)
        if mirror not in stems_of:
            stems_of[mirror] = _file_stems(mirror)
        for name in file_names:
            if any(stem in stems_of[mirror] for stem in _image_stems_for(Path(name).stem)):
                return True
    return False


@dataclass
class MaskPairing:
    """Which files are images and which are their masks.

    Attributes:
        images: the files that are images, in the order given.
        masks_of: image path -> its mask paths, sorted.
        orphans: ``(mask path, reason)`` for each mask file whose image is not there.
        kept_as_images: files whose names end in a mask suffix that no file of the data set pairs by (read as images).
        rules: the pairing rules that found at least one pair, in words.
    """

    images: list[Path]
    masks_of: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    orphans: list[tuple[str, str]] = field(default_factory=list)
    kept_as_images: list[Path] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


def pair_mask_files(files: Sequence[Path], folder_masks: Iterable[tuple[Path, Path]] = ()) -> MaskPairing:
    """Tell masks from images among a data set's files, and pair each mask with its image.

    A file whose name ends in a mask suffix (see :func:`mask_name_parts`) is a mask when that suffix is established
    in the data set, that is when at least one file with it lies beside an image of the same stem; a mask of an
    established suffix without its image is an orphan (never an image). Where no file pairs by a suffix, files with
    it stay images (a class of ``x_label.png`` files is data, not masks), and a note is logged.

    Args:
        files: every file listed in the class folders.
        folder_masks: ``(mask file, folder its image should be in)`` for the files of mask folders; a mask file there
            pairs with the image of the same stem, or of its stem without a mask suffix.

    Returns:
        The pairing.
    """
    by_place: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for file in files:
        by_place[(file.parent, file.stem)].append(file)
    suffixed = {file: parts for file in files if (parts := mask_name_parts(file.stem))}
    established = {kind for file, (base, kind) in suffixed.items()
                   if any(other not in suffixed for other in by_place[(file.parent, base)])}
    is_mask = {file for file, (_, kind) in suffixed.items() if kind in established}
    pairing = MaskPairing(images=[file for file in files if file not in is_mask])
    pairing.kept_as_images = [file for file in suffixed if file not in is_mask]
    images_at: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for image in pairing.images:
        images_at[(image.parent, image.stem)].append(image)

    found: dict[Path, list[str]] = defaultdict(list)
    candidates = [(file, file.parent, f"<image>_{suffixed[file][1]}* beside the image", "beside it")
                  for file in sorted(is_mask)]
    candidates += [(file, folder, "a mask folder mirroring the image names", "in the folder it mirrors")
                   for file, folder in folder_masks]
    for mask, folder, rule, where in candidates:
        stems = _image_stems_for(mask.stem)
        images = next((images_at[(folder, stem)] for stem in stems if (folder, stem) in images_at), [])
        if not images:
            pairing.orphans.append((str(mask), f"{ORPHAN_MASK_REASON}: no image named {stems[-1]!r} {where}"))
            continue
        for image in images:
            found[image].append(str(mask))
        if rule not in pairing.rules:
            pairing.rules.append(rule)
    pairing.masks_of = {image: tuple(sorted(paths)) for image, paths in found.items()}
    if pairing.kept_as_images:
        logger.info("%d files have a mask-like name (e.g. %s) but no file of that kind lies beside its image: read "
                    "as images", len(pairing.kept_as_images), pairing.kept_as_images[0].name)
    return pairing


def ground_truth_summary(records: Sequence[Record], paired_by: Sequence[str],
                         orphans: Sequence[tuple[str, str]] = ()) -> dict[str, object]:
    """How a source paired ground truth with its images, for its ``layout`` (``medxai check-data`` prints it)."""
    with_masks = sum(1 for record in records if record.masks)
    mask_files = {mask for record in records for mask in record.masks}
    return {
        "paired_by": list(paired_by),
        "mask_files": len(mask_files) + len(orphans),
        "images_with_masks": with_masks,
        "images_with_boxes": sum(1 for record in records if record.boxes),
        "images_without_masks": len(records) - with_masks,
        "masks_without_image": len(orphans),
        "missing_mask_files": sum(1 for mask in mask_files if not os.path.isfile(mask)),
    }


def _image_stems_for(mask_stem: str) -> list[str]:
    """The image stems a mask stem may belong to: itself (a mask folder mirroring names) and, with a mask suffix,
    its stem without it."""
    parts = mask_name_parts(mask_stem)
    return [mask_stem, parts[0]] if parts else [mask_stem]


def _file_stems(folder: Path) -> set[str]:
    try:
        return {Path(entry.name).stem for entry in os.scandir(folder) if entry.is_file()}
    except OSError:
        return set()


# -- box columns of CSV files -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxColumns:
    """Where a CSV keeps a box: four column indices, read as corners (``x0,y0,x1,y1``) or as ``x,y,w,h``."""

    indices: tuple[int, int, int, int]
    corners: bool

    @classmethod
    def find(cls, header: Sequence[str]) -> BoxColumns | None:
        """The box columns of a header, or None: ``x0,y0,x1,y1`` or ``x,y,w,h`` (``width,height`` too; a ``bbox_``
        prefix allowed, any case), or NIH's ``Bbox [x,y,w,h]`` whose four values follow from that column on (the
        bracketed name splits the header into ``Bbox [x``, ``y``, ``w``, ``h]`` and empty names)."""
        names = [_box_column_name(name) for name in header]
        for position, name in enumerate(names):
            if name.startswith("bbox[") or name.startswith("bbox ["):
                return cls(tuple(range(position, position + 4)), corners=False)  # type: ignore[arg-type]
        for wanted, corners in ((("x0", "y0", "x1", "y1"), True), (("x", "y", "w", "h"), False),
                                (("x", "y", "width", "height"), False)):
            if all(name in names for name in wanted):
                return cls(tuple(names.index(name) for name in wanted), corners)  # type: ignore[arg-type]
        return None

    def box(self, values: Sequence[str], label: str | None = None) -> LesionBox | None:
        """The row's box, or None when its four cells are empty.

        Raises:
            ValueError: some cells are empty or not numbers, or the box has no area (the message says which).
        """
        cells = [values[index].strip() if index < len(values) else "" for index in self.indices]
        if not any(cells):
            return None
        try:
            numbers = [float(cell) for cell in cells]
        except ValueError:
            raise ValueError(f"box cells {cells} are not four numbers") from None
        return LesionBox(*numbers, label) if self.corners else LesionBox.from_xywh(*numbers, label)


def _box_column_name(name: str) -> str:
    name = name.strip().lower()
    return name[len("bbox_"):] if name.startswith("bbox_") else name


# -- ground truth kept apart from the data (--masks DIR|CSV) ----------------------------------------------------------
_IMAGE_COLUMNS = ("image index", "image", "path", "file", "filename", "file_name", "image_id", "id")
_MASK_COLUMNS = ("mask", "masks")
_FINDING_COLUMNS = ("finding label", "finding", "finding_label")
_MASK_SEPARATOR = "|"


@dataclass
class GroundTruthTable:
    """Masks and boxes kept apart from the images, keyed by image: a record id (``benign/x.png``), a file name
    (``00013118_008.png``) or a file stem (``x``, for a folder of masks).

    Attributes:
        description: what it was read from, for messages.
        masks: key -> absolute mask paths.
        boxes: key -> boxes.
        skipped: ``(file or file:line, reason)`` for entries that could not be used.
    """

    description: str
    masks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    boxes: dict[str, tuple[LesionBox, ...]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def keys(self) -> list[str]:
        """Every image key, sorted."""
        return sorted(set(self.masks) | set(self.boxes))

    def match(self, records: Sequence[Record]) -> tuple[dict[str, Record], list[str]]:
        """Which record each key belongs to (by record id, else file name, else file stem), and the keys that
        match no record or several (ambiguous: ``a/x.png`` and ``b/x.png`` for the key ``x``)."""
        by_level: list[dict[str, list[Record]]] = [defaultdict(list) for _ in range(3)]
        for record in records:
            name = record.id.rsplit("/", 1)[-1]
            for level, key in enumerate((record.id, name, Path(name).stem)):
                by_level[level][key].append(record)
        matched, unmatched = {}, []
        for key in self.keys():
            found = next((level[key] for level in by_level if key in level), [])
            if len(found) == 1:
                matched[key] = found[0]
            else:
                unmatched.append(key)
        return matched, unmatched


def open_ground_truth(path: str | Path) -> GroundTruthTable:
    """Read ground truth kept apart from the data: a folder of mask files, or a CSV file.

    - **Folder**: mask files named after the images, ``<stem>.<ext>`` or ``<stem>_mask*.<ext>`` (any mask suffix of
      :func:`mask_name_parts`), in any subfolder; several for one stem are unioned.
    - **CSV**: an image column (``Image Index``, ``image``, ``path``, ``file``, ``filename`` or ``id``) and a
      ``mask`` column (paths separated by ``|``, relative to the CSV's folder or absolute) and/or box columns (see
      :meth:`BoxColumns.find`), with an optional finding column (``Finding Label``, ``finding``) kept as each box's
      label. Several rows per image add up: NIH's ``BBox_List_2017.csv`` is read as shipped (one row per finding).

    Raises:
        DataError: the path is missing, or the CSV lacks an image column or any mask or box column.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        return _ground_truth_folder(path)
    if path.is_file():
        return _ground_truth_csv(path)
    raise DataError(f"ground truth {path} does not exist; expected a folder of mask files or a CSV file")


def attach_ground_truth(records: Sequence[Record], ground_truth: GroundTruthTable, *, replace_own: bool = False
                        ) -> list[Record]:
    """The records with the table's masks and boxes added to their own (matched as :meth:`GroundTruthTable.match`
    says), or instead of their own with ``replace_own`` (the images the table does not name keep theirs); keys that
    match no record, or several, are logged (by count) and left out."""
    matched, unmatched = ground_truth.match(records)
    if unmatched:
        logger.warning("%s: %d of %d images named in the ground truth match no image of the data, or several "
                       "(e.g. %s)", ground_truth.description, len(unmatched), len(ground_truth.keys()),
                       ", ".join(unmatched[:3]))
    extra_masks: dict[str, tuple[str, ...]] = defaultdict(tuple)
    extra_boxes: dict[str, tuple[LesionBox, ...]] = defaultdict(tuple)
    for key, record in matched.items():
        extra_masks[record.id] += ground_truth.masks.get(key, ())
        extra_boxes[record.id] += ground_truth.boxes.get(key, ())
    matched_ids = {record.id for record in matched.values()}
    return [
        replace(record, masks=(() if replace_own else record.masks) + extra_masks[record.id],
                boxes=(() if replace_own else record.boxes) + extra_boxes[record.id])
        if record.id in matched_ids else record
        for record in records
    ]


def _ground_truth_folder(folder: Path) -> GroundTruthTable:
    table = GroundTruthTable(description=f"mask folder {folder}")
    found: dict[str, list[str]] = defaultdict(list)
    for current, subfolders, file_names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not is_hidden_or_system(name))
        for name in sorted(file_names):
            file = Path(current) / name
            if is_hidden_or_system(name) or special_file_reason(file) is not None:
                table.skipped.append((str(file), "hidden, system or special file"))
                continue
            parts = mask_name_parts(file.stem)
            found[parts[0] if parts else file.stem].append(str(file))
    table.masks = {key: tuple(paths) for key, paths in found.items()}
    return table


def _ground_truth_csv(csv_path: Path) -> GroundTruthTable:
    table = GroundTruthTable(description=f"ground truth {csv_path}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{csv_path}: cannot be read as UTF-8 text: {error}") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, [])
    names = [name.strip().lower() for name in header]
    image_column = next((names.index(name) for name in _IMAGE_COLUMNS if name in names), None)
    mask_column = next((names.index(name) for name in _MASK_COLUMNS if name in names), None)
    finding_column = next((names.index(name) for name in _FINDING_COLUMNS if name in names), None)
    box_columns = BoxColumns.find(header)
    if image_column is None or (mask_column is None and box_columns is None):
        raise DataError(
            f"{csv_path}, line 1: expected an image column ({', '.join(_IMAGE_COLUMNS)}) and a mask column or box "
            f"columns (x0,y0,x1,y1 or x,y,w,h or NIH's 'Bbox [x,y,w,h]'), got {header}"
        )
    masks: dict[str, list[str]] = defaultdict(list)
    boxes: dict[str, list[LesionBox]] = defaultdict(list)
    for values in reader:
        if not any(value.strip() for value in values):
            continue
        where = f"{csv_path}:{reader.line_num}"
        key = _cell(values, image_column).replace("\\", "/")
        try:
            row_masks = mask_paths(_cell(values, mask_column), csv_path.parent)
            box = box_columns.box(values, _cell(values, finding_column) or None) if box_columns else None
        except ValueError as error:
            table.skipped.append((where, str(error)))
            continue
        if not key or not (row_masks or box):
            table.skipped.append((where, "row names no image" if not key else "row has neither a mask nor a box"))
            continue
        masks[key] += row_masks
        if box is not None:
            boxes[key].append(box)
    table.masks = {key: tuple(paths) for key, paths in masks.items() if paths}
    table.boxes = {key: tuple(items) for key, items in boxes.items()}
    return table


def mask_paths(cell: str, base: Path) -> list[str]:
    """The mask paths of a CSV cell (``a_mask.png|a_mask_1.png``), made absolute against ``base``."""
    parts = [part.strip().replace("\\", "/") for part in cell.split(_MASK_SEPARATOR)]
    return [os.path.normpath(base / part) for part in parts if part]


def _cell(values: Sequence[str], column: int | None) -> str:
    return values[column].strip() if column is not None and column < len(values) else ""
