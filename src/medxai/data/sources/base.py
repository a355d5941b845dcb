"""What every data source shares: the :class:`Sample` it yields, the :class:`Record` it lists, the :class:`Source`
protocol, and split names."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol, runtime_checkable

import numpy as np

from medxai.data.ground_truth import LesionBox
from medxai.data.readers import read_image_with_info
from medxai.errors import ConfigError, DataError, InvalidImageError

__all__ = [
    "Sample",
    "Record",
    "Source",
    "SPLIT_NAMES",
    "canonical_split_name",
    "check_split_request",
    "load_file_record",
    "fingerprint_file_records",
    "compile_patient_pattern",
    "patient_id_from_file_name",
    "log_unmatched_patient_ids",
]

logger = logging.getLogger(__name__)

#: The canonical split names, in the order they are reported and written.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# Spellings found in the wild for the same three splits, compared after lower-casing and turning spaces and hyphens
# into underscores ("Training", "Train Set", "test-set", "Hold-out").
_SPLIT_ALIASES = {
    **dict.fromkeys(("train", "training", "train_set", "trainset", "training_set"), "train"),
    **dict.fromkeys(("val", "valid", "validation", "dev", "val_set", "valset", "validation_set"), "val"),
    **dict.fromkeys(("test", "testing", "test_set", "testset", "holdout", "hold_out"), "test"),
}


@dataclass
class Sample:
    """One labelled image as a source yields it, before any preprocessing.

    Attributes:
        image: (H, W) or (H, W, C) array in its native dtype and range (uint8, uint16, float).
        label: class index, or None when unknown (prediction on unlabelled files).
        id: stable identifier: a path relative to the dataset root, or ``subset/split/index`` for arrays.
        meta: small dict of non-identifying facts (source path, original size, mode); never patient data.
    """

    image: np.ndarray
    label: int | None
    id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One item a source can load: what it is called and labelled, and where it lives, but no pixels.

    Records are small and picklable, so DataLoader workers can receive them and call the source's ``load``.

    Attributes:
        id: stable identifier: the path relative to the dataset root with ``/`` separators, or
            ``subset/split/index`` for array sources. Split lists (``splits/*.txt``) store these.
        label: class index into the source's ``label_names``, or None when unknown.
        path: absolute file path, for file sources.
        index: row index within its split's arrays, for array sources.
        patient_id: the patient (or other grouping unit) the image belongs to, when known; splits never separate
            the images of one patient.
        split: the split the source itself assigns this record to (``train``, ``val`` or ``test``), if any.
        masks: absolute paths of the image's lesion mask files, unioned (see :mod:`medxai.data.ground_truth`);
            empty when there are none.
        boxes: the image's lesion boxes in original-image pixels; empty when there are none.
    """

    id: str
    label: int | None
    path: str | None = None
    index: int | None = None
    patient_id: str | None = None
    split: str | None = None
    masks: tuple[str, ...] = ()
    boxes: tuple[LesionBox, ...] = ()


@runtime_checkable
class Source(Protocol):
    """A labelled collection of images: lists :class:`Record` objects and loads each into a :class:`Sample`.

    Attributes:
        description: one line for the model card, e.g. ``"image folder /data/xray"`` or
            ``"medmnist pneumoniamnist"``.
        label_names: class names; a record's label indexes this list.
        skipped: ``(path, reason)`` for each entry rejected while listing (hidden or system files, files outside
            any class folder, named pipes, sockets, broken or looping links). Files that fail to decode are not here:
            ``load`` raises for those.
        layout: how the data was read, for people and the data check: ``{"kind": ..., "splits": {split: where},
            "classes": [...], ...}`` (``medxai check-data`` prints it first).
    """

    description: str
    label_names: list[str]
    skipped: list[tuple[str, str]]
    layout: dict[str, Any]

    def official_splits(self) -> list[str]:
        """The splits the data itself provides, a subset of ``["train", "val", "test"]`` in that order."""
        ...

    def records(self, split: str | None = None) -> list[Record]:
        """Every record, or those of one official split, in a stable order."""
        ...

    def load(self, record: Record) -> Sample:
        """Decode one record's pixels; raises ``InvalidImageError(path_or_id, reason)`` when it cannot."""
        ...

    def fingerprint(self) -> str:
        """A cheap fingerprint of the content, for the model card (``"<algorithm>:<hex digest>"``)."""
        ...


def canonical_split_name(name: str) -> str | None:
    """Map a split folder or column value to its canonical name, in any letter case: train / training / train_set,
    val / valid / validation / dev, test / testing / test_set / holdout (spaces and hyphens read as underscores).

    Args:
        name: the name as written in the data.

    Returns:
        ``"train"``, ``"val"`` or ``"test"``, or None when the name is not a split name.
    """
    key = "_".join(name.strip().lower().replace("-", " ").split())
    return _SPLIT_ALIASES.get(key)


def check_split_request(split: str | None, official_splits: list[str], description: str) -> None:
    """Raise a clear error when ``records(split)`` asks for a split the source does not have.

    Args:
        split: the requested split, None meaning all records.
        official_splits: what the source provides.
        description: the source's description, for the message.

    Raises:
        DataError: the split is not one of the source's official splits.
    """
    if split is None or split in official_splits:
        return
    available = ", ".join(official_splits) if official_splits else "none"
    raise DataError(
        f"{description} has no official split {split!r} (official splits: {available}); "
        "use medxai.data.resolve_splits to carve missing splits"
    )


def load_file_record(record: Record) -> Sample:
    """Decode the image file behind a record of a file source (image folder, manifest).

    Args:
        record: a record whose ``path`` is set.

    Returns:
        The sample; ``meta`` holds the file path, its format, pixel mode and stored size.

    Raises:
        InvalidImageError: the record has no path, or the file cannot be decoded.
    """
    if record.path is None:
        raise InvalidImageError(record.id, "record has no file path")
    image, info = read_image_with_info(record.path)
    return Sample(image=image, label=record.label, id=record.id, meta={"path": record.path, **info})


def fingerprint_file_records(kind: str, label_names: list[str], records: Iterable[Record]) -> str:
    """Fingerprint a file source by its ids, labels, splits and file sizes, and its records' ground truth (mask file
    names and sizes, boxes) where they have some.

    File modification times are left out on purpose: copying a dataset to another machine changes them, and the
    model card's fingerprint should still match the same data there. A same-size edit inside a file goes unnoticed;
    that is the price of not reading every byte.

    Args:
        kind: the source kind, so that different sources over the same files differ.
        label_names: the class names (a renamed class changes the fingerprint).
        records: the records, in any order.

    Returns:
        ``"sha256:<hex digest>"``.
    """
    digest = hashlib.sha256()
    digest.update(f"{kind}\n{label_names!r}\n".encode())
    for record in sorted(records, key=lambda item: item.id):
        try:
            size = os.stat(record.path).st_size if record.path is not None else -1
        except OSError:
            size = -1
        ground_truth = f"\t{_ground_truth_identity(record)}" if record.masks or record.boxes else ""
        digest.update(f"{record.id}\t{record.label}\t{record.split}\t{size}{ground_truth}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _ground_truth_identity(record: Record) -> str:
    """Mask file names and sizes, and boxes, of a record: what its ground truth adds to the fingerprint (names, not
    paths, so the data may move). Records without ground truth add nothing, so older fingerprints still match."""
    masks = []
    for path in record.masks:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        masks.append(f"{os.path.basename(path)}:{size}")
    boxes = [f"{box.x0},{box.y0},{box.x1},{box.y1},{box.label}" for box in record.boxes]
    return "|".join(masks) + "#" + "|".join(boxes)


def compile_patient_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """Compile a ``patient_pattern`` option.

    Raises:
        ConfigError: the pattern is not a valid regular expression.
    """
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"patient_pattern {pattern!r} is not a valid regular expression: {error}") from None


def patient_id_from_file_name(regex: re.Pattern[str] | None, file_name: str) -> str | None:
    """Group 1 of the first match of ``regex`` in ``file_name`` (the whole match without groups), else None."""
    if regex is None:
        return None
    match = regex.search(file_name)
    if match is None:
        return None
    if regex.groups and match.group(1) is not None:
        return match.group(1)
    return match.group(0)


def log_unmatched_patient_ids(regex: re.Pattern[str] | None, records: list[Record]) -> None:
    """Warn once about records whose file name the patient pattern did not match.

    The file names themselves are not logged: where a pattern finds patient ids in them, they are identifiers.
    """
    if regex is None:
        return
    unmatched = sum(1 for record in records if record.patient_id is None)
    if unmatched:
        logger.warning(
            "patient_pattern %r matched no patient id in %d of %d file names; each of those files counts as its own "
            "patient",
            regex.pattern,
            unmatched,
            len(records),
        )
