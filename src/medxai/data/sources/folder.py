"""An image collection laid out as folders named after the classes (optionally inside split folders)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from medxai.data.ground_truth import (
    MASK_FOLDER_NAMES,
    ground_truth_summary,
    mask_folder_mirrors_images,
    pair_mask_files,
)
from medxai.data.readers import is_hidden_or_system, special_file_reason
from medxai.data.readers.files import FOLDER_REASON, LINKED_FOLDER_REASON
from medxai.data.sources.base import (
    Sample,
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
from medxai.errors import ConfigError, DataError

__all__ = ["ImageFolderSource", "KERMANY_PATIENT_PATTERN"]

logger = logging.getLogger(__name__)

#: Patient ids in the Kermany chest X-ray file names: ``person123_bacteria_456.jpeg`` -> ``person123``,
#: ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.
KERMANY_PATIENT_PATTERN = r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)"

_LAYOUT_HELP = (
    "expected ROOT/<class>/<images> or ROOT/<split>/<class>/<images> with split folders such as train/val/test, "
    "Training/Testing, train_set/valid/holdout"
)
_OVERRIDE_HELP = (
    "say which folder is which split with data.split_folders, e.g. --set data.split_folders='{train: Training, "
    "test: Testing}' (top-level folders not named there are left out and listed as skipped), or "
    "--set data.split_folders='{}' to read every top-level folder as a class"
)


class ImageFolderSource:
    """Images in class folders: ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*``.

    Split folders are recognised by name in any letter case, with the spellings public datasets ship with: train,
    training, train_set; val, valid, validation, dev; test, testing, test_set, holdout (see
    :func:`~medxai.data.sources.base.canonical_split_name`). They become the source's official splits. When the
    top-level folders mix such names with others, the folder is ambiguous and an error says which folders were taken
    for what; ``split_folders`` then settles it. Class names are the sorted union of the class folders of all
    splits, so label indices agree across splits; a class absent from one split is allowed and logged.

    Every file inside a class folder belongs to that class, including files in its subfolders at any depth
    (split and class folders may be symbolic links; links to folders inside a class folder are not followed, and
    are listed). Hidden and system entries (``.DS_Store``,
    ``Thumbs.db``, ``__MACOSX``...) are skipped and listed in :attr:`skipped`, as are files lying outside any class
    folder (``README``, checksum lists) and entries that are not regular files (named pipes, sockets, devices,
    broken or looping links), which are never opened. Every other file is listed whatever its extension: whether
    it is an image is decided from its content by :meth:`load`, which raises
    :class:`~medxai.errors.InvalidImageError` for one that is not.

    Lesion masks are never images of a class: files named ``<image>_mask*`` (``_seg``, ``_label``, ``-mask``...)
    beside their image, and ``masks/`` or ``segmentations/`` folders mirroring the image names (beside the class
    folders, inside one, or inside a split folder) become their images' :attr:`Record.masks`, once the data set shows
    the convention (see :func:`~medxai.data.ground_truth.pair_mask_files`); a mask without its image is listed in
    :attr:`skipped`, and ``layout["masks"]`` counts the pairs.

    Args:
        root: the dataset folder.
        patient_pattern: optional regular expression searched in each file name; group 1 (or the whole match when
            the pattern has no group) is the record's patient id, which keeps a patient's images in one split.
            For the Kermany chest X-rays use :data:`KERMANY_PATIENT_PATTERN`.
        split_folders: which top-level folder holds which split, ``{"train": "Training", "test": "Testing"}``;
            other top-level folders are then left out (and listed in :attr:`skipped`). ``{}`` reads every top-level
            folder as a class; None (the default) recognises split folders by name.

    Raises:
        DataError: the root is missing, has no class folders, has an empty class folder or fewer than two classes,
            mixes split-like folders with other folders, or ``split_folders`` names a folder that is not there.
        ConfigError: ``patient_pattern`` is not a valid regular expression, or ``split_folders`` uses a split name
            other than train, val and test.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        patient_pattern: str | None = None,
        split_folders: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.description = f"image folder {self.root}"
        self.skipped: list[tuple[str, str]] = []
        self._patient_regex = compile_patient_pattern(patient_pattern)
        self._mask_folders: list[tuple[Path, Path]] = []  # (mask folder, the folder whose layout it mirrors)

        top_folders = self._set_aside_mask_folders(self.root, self._top_folders())
        if not top_folders:
            raise DataError(f"image folder {self.root} has no class folders; {_LAYOUT_HELP}")
        folder_of_split = self._split_folders(split_folders, top_folders)
        class_folders_by_split = self._class_folders(folder_of_split, top_folders)
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
        self.layout = {
            "kind": "split folders" if folder_of_split else "class folders",
            "splits": {split: folder_of_split[split].name for split in self._official_splits},
            "classes": list(self.label_names),
            "chosen_by": "data.split_folders" if split_folders is not None else "folder names",
        }
        self._records = self._list_records(class_folders_by_split)
        if self._pairing.masks_of or self._pairing.orphans:
            self.layout["masks"] = ground_truth_summary(self._records, self._pairing.rules, self._pairing.orphans)
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

    def _top_folders(self) -> list[Path]:
        if not self.root.exists():
            raise DataError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder")
        top_folders = self._visible_subfolders(self.root)
        if not top_folders:
            raise DataError(f"image folder {self.root} has no class folders; {_LAYOUT_HELP}")
        return top_folders

    def _split_folders(self, requested: Mapping[str, str] | None, top_folders: list[Path]) -> dict[str, Path]:
        """The split folders by canonical split name; {} when the top-level folders are the classes."""
        if requested is not None:
            return self._requested_split_folders(requested, top_folders)

        split_of = {folder.name: canonical_split_name(folder.name) for folder in top_folders}
        split_like = [folder for folder in top_folders if split_of[folder.name] is not None]
        if not split_like:
            return {}
        others = [folder.name for folder in top_folders if split_of[folder.name] is None]
        if others:
            taken = ", ".join(f"{folder.name} -> {split_of[folder.name]}" for folder in split_like)
            raise DataError(
                f"image folder {self.root} is ambiguous: top-level folders {taken} look like splits, but "
                f"{', '.join(others)} do not (are they classes or more splits?); {_OVERRIDE_HELP}"
            )
        folders: dict[str, Path] = {}
        for folder in split_like:
            split = split_of[folder.name]
            if split in folders:
                raise DataError(
                    f"image folder {self.root} has two folders for the {split!r} split ({folders[split].name} and "
                    f"{folder.name}); keep one of them, or {_OVERRIDE_HELP}"
                )
            folders[split] = folder
        logger.info("%s: split folders %s", self.description,
                    ", ".join(f"{folder.name} -> {split}" for split, folder in folders.items()))
        return {split: folders[split] for split in SPLIT_NAMES if split in folders}

    def _requested_split_folders(self, requested: Mapping[str, str], top_folders: list[Path]) -> dict[str, Path]:
        unknown = sorted(set(requested) - set(SPLIT_NAMES))
        if unknown:
            raise ConfigError(f"data.split_folders: unknown split name(s) {unknown}; use train, val and test")
        by_name = {folder.name: folder for folder in top_folders}
        missing = sorted(name for name in requested.values() if name not in by_name)
        if missing:
            raise DataError(
                f"data.split_folders names {missing}, which are not top-level folders of {self.root} "
                f"(it has {sorted(by_name)})"
            )
        chosen = set(requested.values())
        for folder in top_folders:
            if requested and folder.name not in chosen:
                self._skip(str(folder), "top-level folder not named in data.split_folders")
        return {split: by_name[requested[split]] for split in SPLIT_NAMES if split in requested}

    def _class_folders(
        self, folder_of_split: dict[str, Path], top_folders: list[Path]
    ) -> dict[str | None, dict[str, Path]]:
        """Map each split (None without split folders) to its class folders by class name."""
        if not folder_of_split:
            return {None: {folder.name: folder for folder in top_folders}}
        class_folders_by_split: dict[str | None, dict[str, Path]] = {}
        for split, split_folder in folder_of_split.items():
            class_folders = self._set_aside_mask_folders(split_folder, self._visible_subfolders(split_folder))
            if not class_folders:
                raise DataError(f"split folder {split_folder} has no class folders; {_LAYOUT_HELP}")
            class_folders_by_split[split] = {folder.name: folder for folder in class_folders}
        return class_folders_by_split

    def _visible_subfolders(self, folder: Path) -> list[Path]:
        """Subfolders of ``folder``, sorted; hidden entries, loose files and special files are recorded as skipped."""
        subfolders = []
        for entry in sorted(os.scandir(folder), key=lambda item: item.name):
            reason = special_file_reason(entry.path)
            if is_hidden_or_system(entry.name):
                reason = "hidden or system entry"
            elif reason in (FOLDER_REASON, LINKED_FOLDER_REASON):  # a linked split or class folder is followed
                subfolders.append(Path(entry.path))
                continue
            elif reason is None:
                reason = "not inside a class folder"
            self._skip(entry.path, reason)
        return subfolders

    def _set_aside_mask_folders(self, parent: Path, folders: list[Path]) -> list[Path]:
        """``folders`` without the mask folders among them: those named like one (``masks``, ``segmentations``, any
        case) whose files are named after images at the mirrored place under ``parent``. A folder so named that
        mirrors no image stays a class (a data set may have a class called "masks"), with a note."""
        kept = []
        for folder in folders:
            if folder.name.lower() not in MASK_FOLDER_NAMES:
                kept.append(folder)
            elif mask_folder_mirrors_images(folder, parent):
                logger.info("%s: folder %r holds masks of the images it mirrors", self.description, folder.name)
                self._mask_folders.append((folder, parent))
            else:
                logger.info("%s: folder %r names no image's mask: read as a class", self.description, folder.name)
                kept.append(folder)
        return kept

    def _list_records(self, class_folders_by_split: dict[str | None, dict[str, Path]]) -> list[Record]:
        """Every image's record with its masks; mask files become their images' ``masks``, orphans are skipped."""
        label_of = {name: index for index, name in enumerate(self.label_names)}
        where_of: dict[Path, tuple[str | None, int]] = {}
        for split, class_folders in class_folders_by_split.items():
            for class_name, class_folder in class_folders.items():
                files = self._list_files(class_folder)
                if not files:
                    raise DataError(f"class folder {class_folder} has no files")
                where_of.update(dict.fromkeys(files, (split, label_of[class_name])))
        self._pairing = pair_mask_files(list(where_of), self._mask_folder_files())
        for orphan in self._pairing.orphans:
            self._skip(*orphan)
        records = [
            Record(
                id=file.relative_to(self.root).as_posix(),
                label=where_of[file][1],
                path=str(file),
                patient_id=patient_id_from_file_name(self._patient_regex, file.name),
                split=where_of[file][0],
                masks=self._pairing.masks_of.get(file, ()),
            )
            for file in self._pairing.images
        ]
        with_images = {where_of[file] for file in self._pairing.images}
        for split, class_folders in class_folders_by_split.items():
            for class_name, class_folder in class_folders.items():
                if (split, label_of[class_name]) not in with_images:
                    raise DataError(f"class folder {class_folder} has only mask files, no images")
        records.sort(key=lambda record: record.id)
        return records

    def _mask_folder_files(self) -> list[tuple[Path, Path]]:
        """``(mask file, folder its image should be in)`` for every file of the mask folders found."""
        pairs = []
        for mask_folder, parent in self._mask_folders:
            for file in self._list_files(mask_folder):
                pairs.append((file, parent / file.parent.relative_to(mask_folder)))
        return pairs

    def _list_files(self, class_folder: Path) -> list[Path]:
        """Every non-hidden regular file under ``class_folder`` at any depth; special entries are listed as skipped."""
        files = []
        for folder, subfolder_names, file_names in os.walk(class_folder):
            for name in sorted(subfolder_names):
                path = os.path.join(folder, name)
                if is_hidden_or_system(name):
                    self._skip(path, "hidden or system folder")
                    subfolder_names.remove(name)
                elif name.lower() in MASK_FOLDER_NAMES and mask_folder_mirrors_images(Path(path), Path(folder)):
                    self._mask_folders.append((Path(path), Path(folder)))
                    subfolder_names.remove(name)
                elif os.path.islink(path):  # os.walk does not descend into it; say so rather than lose it
                    self._skip(path, special_file_reason(path) or LINKED_FOLDER_REASON)
            for name in file_names:
                path = os.path.join(folder, name)
                reason = "hidden or system file" if is_hidden_or_system(name) else special_file_reason(path)
                if reason is None:
                    files.append(Path(path))
                else:
                    self._skip(path, reason)
        return files

    def _skip(self, path: str, reason: str) -> None:
        logger.debug("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

