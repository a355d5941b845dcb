"""Images listed in a CSV file: one row per image with its path, label and optionally patient and split."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medxai.data.ground_truth import BoxColumns, LesionBox, ground_truth_summary, mask_paths
from medxai.data.sources.base import (
    Sample,
    SPLIT_NAMES,
    Record,
    canonical_split_name,
    check_split_request,
    compile_patient_pattern,
    fingerprint_file_records,
    load_file_record,
    patient_id_from_file_name,
)
from medxai.errors import DataError

__all__ = ["ManifestSource"]

logger = logging.getLogger(__name__)

_REQUIRED_COLUMNS = ("path", "label")
_OPTIONAL_COLUMNS = ("path", "label", "patient_id", "split", "mask", "finding")


class ManifestSource:
    """Images listed in a CSV manifest.

    The CSV has a header with the columns ``path`` and ``label`` and, optionally, ``patient_id`` and ``split``
    (column names are matched ignoring case and surrounding spaces; other columns are ignored). Paths are relative
    to ``root``, which defaults to the CSV's folder, or absolute; ``\\`` separators are accepted. A record's id is
    its path as written, with ``/`` separators.

    Labels are class names or integers. With ``label_names`` given, a label is looked up among those names first,
    then read as an index into them. Without it, labels that are all integers are indices and the names are
    ``"0"``, ``"1"``, ... up to the largest; otherwise the names are the sorted unique labels. An empty label means
    unknown (``None``), for files to predict on.

    ``split`` values are train, val, valid, validation or test in any case; either every row has one or none does.

    Ground truth for localisation (see :mod:`medxai.data.ground_truth`), optional: a ``mask`` (or ``masks``) column
    of lesion mask files, several separated by ``|`` and unioned, each absolute or relative to ``root`` like the
    image paths (an empty cell: no mask); box columns ``x0,y0,x1,y1`` or ``x,y,w,h`` (a ``bbox_`` prefix allowed;
    see :class:`~medxai.data.ground_truth.BoxColumns`), one box per row, with an optional ``finding`` column naming
    it. Images with several boxes keep them in a separate file (``--masks``, :func:`~medxai.data.ground_truth.open_ground_truth`).
    Listed files are not opened here: a missing or undecodable one makes :meth:`load` raise
    :class:`~medxai.errors.InvalidImageError` (missing ones are also counted in a logged warning).

    Args:
        csv_path: the manifest file.
        root: the folder relative paths start from; defaults to the CSV's folder.
        label_names: the class names, in label-index order.
        patient_pattern: optional regular expression giving the patient id from the file name (as for
            :class:`~medxai.data.sources.ImageFolderSource`) for rows whose ``patient_id`` is empty or absent.

    Raises:
        DataError: naming the CSV (and the line, where there is one) for a missing or empty file, missing columns,
            an empty path, a path listed twice, an unknown split value, a label not in ``label_names``, a split
            column filled in for some rows only, or box cells that are not four numbers of a box with an area.
        ConfigError: ``patient_pattern`` is not a valid regular expression.
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        root: str | Path | None = None,
        label_names: list[str] | None = None,
        patient_pattern: str | None = None,
    ) -> None:
        self.csv_path = Path(csv_path).expanduser().absolute()
        self.root = Path(root).expanduser().absolute() if root is not None else self.csv_path.parent
        self.description = f"manifest {self.csv_path}"
        self.skipped: list[tuple[str, str]] = []
        self._patient_regex = compile_patient_pattern(patient_pattern)
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise DataError(f"label_names for {self.csv_path} repeat a name: {label_names}")

        rows = self._read_rows()
        self.label_names: list[str] = (
            list(label_names) if label_names is not None else _label_names_from_labels([row.label for row in rows])
        )
        self._records = [self._record_from_row(row) for row in rows]
        self._official_splits = self._splits_present()
        self.layout = {
            "kind": "manifest",
            "columns": list(self._columns),
            "splits": {split: "split column" for split in self._official_splits},
            "classes": list(self.label_names),
        }
        ground_truth_columns = [name for name in ("mask", "box") if name in self._columns]
        if ground_truth_columns:
            paired_by = [f"the manifest's {'mask column' if name == 'mask' else 'box columns'}"
                         for name in ground_truth_columns]
            self.layout["masks"] = ground_truth_summary(self._records, paired_by)
        self._log_missing_files()
        logger.info(
            "%s: %d rows in %d classes%s",
            self.description,
            len(self._records),
            len(self.label_names),
            f", official splits {self._official_splits}" if self._official_splits else "",
        )

    def official_splits(self) -> list[str]:
        """The splits named in the ``split`` column, in train, val, test order; [] without that column."""
        return list(self._official_splits)

    def records(self, split: str | None = None) -> list[Record]:
        """All records in file order, or those of one split.

        Raises:
            DataError: ``split`` is not used in the manifest.
        """
        check_split_request(split, self._official_splits, self.description)
        return [record for record in self._records if split is None or record.split == split]

    def load(self, record: Record) -> Sample:
        """Decode a record's file (see :func:`medxai.data.read_image`).

        Raises:
            InvalidImageError: the file is missing or is not a decodable image.
        """
        return load_file_record(record)

    def fingerprint(self) -> str:
        """``sha256:...`` over the CSV's bytes and the listed ids, labels, splits and file sizes."""
        csv_digest = hashlib.sha256(self.csv_path.read_bytes()).hexdigest()
        return fingerprint_file_records(f"manifest {csv_digest}", self.label_names, self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.csv_path)!r}, classes={self.label_names}, splits={self._official_splits})"

    # -- parsing -------------------------------------------------------------------------------------------------

    def _error(self, message: str, line: int | None = None) -> DataError:
        where = f"{self.csv_path}, line {line}" if line is not None else str(self.csv_path)
        return DataError(f"{where}: {message}")

    def _read_rows(self) -> list[_Row]:
        if not self.csv_path.is_file():
            raise DataError(f"manifest {self.csv_path} does not exist")
        try:
            text = self.csv_path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise self._error(f"cannot be read as UTF-8 text: {error}") from None
        if not text.strip():
            raise self._error("the file is empty; expected a header line 'path,label' and one row per image")

        reader = csv.reader(text.splitlines())
        written_header = next(reader)
        header = [name.strip().lower() for name in written_header]
        missing = [name for name in _REQUIRED_COLUMNS if name not in header]
        if missing:
            raise self._error(
                f"missing column(s) {', '.join(missing)} in the header {header}; "
                "expected 'path,label' and optionally 'patient_id,split'",
                line=1,
            )
        column = {name: header.index(name) for name in _OPTIONAL_COLUMNS if name in header}
        if "masks" in header and "mask" not in header:
            column["mask"] = header.index("masks")
        self._box_columns = BoxColumns.find(written_header)
        self._columns = list(column) + (["box"] if self._box_columns else [])

        rows: list[_Row] = []
        first_line_of_id: dict[str, int] = {}
        for row_values in reader:
            line = reader.line_num
            if not any(value.strip() for value in row_values):
                continue  # blank line
            if len(row_values) < len(header):
                row_values = row_values + [""] * (len(header) - len(row_values))
            row = self._parse_row(row_values, column, line)
            if row.id in first_line_of_id:
                raise self._error(f"path {row.id!r} is listed twice (first on line {first_line_of_id[row.id]})", line)
            first_line_of_id[row.id] = line
            rows.append(row)
        if not rows:
            raise self._error("the file has a header but no rows")
        return rows

    def _parse_row(self, values: list[str], column: dict[str, int], line: int) -> _Row:
        written_path = values[column["path"]].strip()
        if not written_path:
            raise self._error("empty path", line)
        record_id = str(PurePosixPath(written_path.replace("\\", "/")))
        split_text = values[column["split"]].strip() if "split" in column else ""
        split = canonical_split_name(split_text) if split_text else None
        if split_text and split is None:
            raise self._error(f"unknown split {split_text!r}; expected train, val or test", line)
        patient_id = values[column["patient_id"]].strip() if "patient_id" in column else ""
        finding = values[column["finding"]].strip() if "finding" in column else ""
        try:
            box = self._box_columns.box(values, finding or None) if self._box_columns else None
        except ValueError as error:
            raise self._error(str(error), line) from None
        return _Row(
            id=record_id,
            path=os.path.normpath(self.root / record_id),
            label=values[column["label"]].strip(),
            patient_id=patient_id or patient_id_from_file_name(self._patient_regex, PurePosixPath(record_id).name),
            split=split,
            line=line,
            masks=tuple(mask_paths(values[column["mask"]], self.root)) if "mask" in column else (),
            boxes=(box,) if box is not None else (),
        )

    def _record_from_row(self, row: _Row) -> Record:
        return Record(
            id=row.id,
            label=self._label_index(row.label, row.line),
            path=row.path,
            patient_id=row.patient_id,
            split=row.split,
            masks=row.masks,
            boxes=row.boxes,
        )

    def _label_index(self, label: str, line: int) -> int | None:
        if not label:
            return None
        if label in self.label_names:
            return self.label_names.index(label)
        if _is_integer(label) and 0 <= int(label) < len(self.label_names):
            return int(label)
        raise self._error(f"label {label!r} is not one of the label names {self.label_names}", line)

    def _splits_present(self) -> list[str]:
        with_split = [record for record in self._records if record.split is not None]
        if with_split and len(with_split) != len(self._records):
            first_row_without = next(
                row_index for row_index, record in enumerate(self._records) if record.split is None
            )
            raise self._error(
                f"the split column is filled in for {len(with_split)} of {len(self._records)} rows "
                f"(row {first_row_without + 1} has none); give every row a split or none"
            )
        present = {record.split for record in with_split}
        return [split for split in SPLIT_NAMES if split in present]

    def _log_missing_files(self) -> None:
        missing = [record.id for record in self._records if not os.path.isfile(record.path or "")]
        if missing:
            logger.warning(
                "%s lists %d files that do not exist (e.g. %s); loading them will fail",
                self.description,
                len(missing),
                ", ".join(missing[:3]),
            )


@dataclass(frozen=True)
class _Row:
    """One parsed CSV row before its label is resolved."""

    id: str
    path: str
    label: str
    patient_id: str | None
    split: str | None
    line: int
    masks: tuple[str, ...] = ()
    boxes: tuple[LesionBox, ...] = ()


def _is_integer(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _label_names_from_labels(labels: list[str]) -> list[str]:
    given = [label for label in labels if label]
    if given and all(_is_integer(label) for label in given):
        largest = max(int(label) for label in given)
        if min(int(label) for label in given) < 0:
            return sorted(set(given))
        return [str(index) for index in range(largest + 1)]
    return sorted(set(given))
