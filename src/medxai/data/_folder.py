"""An image collection laid out as folders named after the classes (optionally inside split folders)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medxai.data._image_io import is_hidden_or_system
from medxai.data._record import (
    SPLIT_NAMES,
    Record,
    canonical_split_name,
    check_split_request,
    compile_patient_pattern,
    fingerprint_file_records,
    load_file_record,
    log_unmatched_patient_ids,
    patient_id_from_file_name,
)
from medxai.data.sample import Sample
from medxai.errors import DataError

__all__ = ["ImageFolderSource", "KERMANY_PATIENT_PATTERN"]

logger = logging.getLogger(__name__)

#: Patient ids in the Kermany chest X-ray file names: ``person123_bacteria_456.jpeg`` -> ``person123``,
#: ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.
KERMANY_PATIENT_PATTERN = r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)"

_LAYOUT_HELP = "expected ROOT/<class>/<images> or ROOT/<split>/<class>/<images> with split folders train/val/test"


class ImageFolderSource:
    """Images in class folders: ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*``.

    A split folder is named train, val, valid, validation or test in any letter case (``Train``, ``TEST``); these
    map to ``train``, ``val`` and ``test`` and become the source's official splits. Class names are the sorted union
    of the class folders of all splits, so label indices agree across splits; a class absent from one split is
    allowed and logged.

    Every file inside a class folder belongs to that class, including files in its subfolders at any depth
    (symbolic links to folders are not followed). Hidden and system entries (``.DS_Store``, ``Thumbs.db``,
    ``__MACOSX``...) are skipped and listed in :attr:`skipped`, as are files lying outside any class folder
    (``README``, checksum lists). Every other file is listed whatever its extension: whether it is an image is
    decided from its content by :meth:`load`, which raises :class:`~medxai.errors.InvalidImageError` for one that
    is not.

    Args:
        root: the dataset folder.
        patient_pattern: optional regular expression searched in each file name; group 1 (or the whole match when
            the pattern has no group) is the record's patient id, which keeps a patient's images in one split.
            For the Kermany chest X-rays use :data:`KERMANY_PATIENT_PATTERN`.

    Raises:
        DataError: the root is missing, has no class folders, has an empty class folder or fewer than two classes,
            or mixes split folders with other folders.
        ConfigError: ``patient_pattern`` is not a valid regular expression.
    """

    def __init__(self, root: str | Path, *, patient_pattern: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.description = f"image folder {self.root}"
        self.skipped: list[tuple[str, str]] = []
        self._patient_regex = compile_patient_pattern(patient_pattern)

        class_folders_by_split = self._find_class_folders()
        all_class_names = {name for folders in class_folders_by_split.values() for name in folders}
        self.label_names: list[str] = sorted(all_class_names)
        if len(self.label_names) < 2:
            raise DataError(
                f"image folder {self.root} has only one class ({', '.join(self.label_names)}); "
                "classification needs at least two classes"
            )
        for split, folders in class_folders_by_split.items():
            missing = sorted(all_class_names - set(folders))
            if missing:
                logger.info("split folder %r of %s has no folder for classes: %s", split, self.root, missing)

        self._official_splits = [split for split in SPLIT_NAMES if split in class_folders_by_split]
        self._records = self._list_records(class_folders_by_split)
        log_unmatched_patient_ids(self._patient_regex, self._records)
        logger.info(
            "%s: %d files in %d classes%s, %d entries skipped",
            self.description,
            len(self._records),
            len(self.label_names),
            f", official splits {self._official_splits}" if self._official_splits else "",
            len(self.skipped),
        )

    def official_splits(self) -> list[str]:
        """The split folders present, as canonical names in train, val, test order; [] for ``ROOT/<class>``."""
        return list(self._official_splits)

    def records(self, split: str | None = None) -> list[Record]:
        """All records sorted by id, or those of one official split.

        Raises:
            DataError: ``split`` is not an official split of this folder.
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
        """``sha256:...`` over the sorted ids, labels, splits and file sizes (see ``fingerprint_file_records``)."""
        return fingerprint_file_records("image-folder", self.label_names, self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, classes={self.label_names}, splits={self._official_splits})"

    # -- listing -------------------------------------------------------------------------------------------------

    def _find_class_folders(self) -> dict[str | None, dict[str, Path]]:
        """Map each split (None without split folders) to its class folders by class name."""
        if not self.root.exists():
            raise DataError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder")

        top_folders = self._visible_subfolders(self.root)
        if not top_folders:
            raise DataError(f"image folder {self.root} has no class folders; {_LAYOUT_HELP}")

        split_folders = [folder for folder in top_folders if canonical_split_name(folder.name) is not None]
        if not split_folders:
            return {None: {folder.name: folder for folder in top_folders}}

        other_folders = [folder.name for folder in top_folders if canonical_split_name(folder.name) is None]
        if other_folders:
            raise DataError(
                f"image folder {self.root} mixes split folders ({', '.join(f.name for f in split_folders)}) "
                f"with other folders ({', '.join(other_folders)}); {_LAYOUT_HELP}"
            )

        class_folders_by_split: dict[str | None, dict[str, Path]] = {}
        for split_folder in split_folders:
            split = canonical_split_name(split_folder.name)
            if split in class_folders_by_split:
                raise DataError(
                    f"image folder {self.root} has two folders for the {split!r} split; keep one of them"
                )
            class_folders = self._visible_subfolders(split_folder)
            if not class_folders:
                raise DataError(f"split folder {split_folder} has no class folders; {_LAYOUT_HELP}")
            class_folders_by_split[split] = {folder.name: folder for folder in class_folders}
        return class_folders_by_split

    def _visible_subfolders(self, folder: Path) -> list[Path]:
        """Subfolders of ``folder``, sorted; hidden entries and loose files are recorded as skipped."""
        subfolders = []
        for entry in sorted(os.scandir(folder), key=lambda item: item.name):
            if is_hidden_or_system(entry.name):
                self._skip(entry.path, "hidden or system entry")
            elif entry.is_dir():
                subfolders.append(Path(entry.path))
            else:
                self._skip(entry.path, "not inside a class folder")
        return subfolders

    def _list_records(self, class_folders_by_split: dict[str | None, dict[str, Path]]) -> list[Record]:
        label_of = {name: index for index, name in enumerate(self.label_names)}
        records = []
        for split, class_folders in class_folders_by_split.items():
            for class_name, class_folder in class_folders.items():
                files = self._list_files(class_folder)
                if not files:
                    raise DataError(f"class folder {class_folder} has no files")
                records.extend(
                    Record(
                        id=file.relative_to(self.root).as_posix(),
                        label=label_of[class_name],
                        path=str(file),
                        patient_id=patient_id_from_file_name(self._patient_regex, file.name),
                        split=split,
                    )
                    for file in files
                )
        records.sort(key=lambda record: record.id)
        return records

    def _list_files(self, class_folder: Path) -> list[Path]:
        """Every non-hidden file under ``class_folder`` at any depth."""
        files = []
        for folder, subfolder_names, file_names in os.walk(class_folder):
            for name in list(subfolder_names):
                if is_hidden_or_system(name):
                    self._skip(os.path.join(folder, name), "hidden or system folder")
                    subfolder_names.remove(name)
            for name in file_names:
                if is_hidden_or_system(name):
                    self._skip(os.path.join(folder, name), "hidden or system file")
                else:
                    files.append(Path(folder, name))
        return files

    def _skip(self, path: str, reason: str) -> None:
        logger.debug("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

