"""Every slice of NIfTI volumes (or every frame of multi-frame DICOM files) as a sample of its own."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from medxai.data.readers import probe_image, read_image_with_info
from medxai.data.readers.nifti import (
    AXES,
    HEADER_PEEK_BYTES,
    is_gzip_file,
    looks_like_nifti,
    native_slice,
    read_nifti_volume,
    read_prefix,
    volume_slice,
)
from medxai.data.sources.base import Record, Sample, check_split_request
from medxai.errors import ConfigError, InvalidImageError

__all__ = ["VolumeSliceSource"]

logger = logging.getLogger(__name__)


class VolumeSliceSource:
    """Every slice of NIfTI volumes (or every frame of multi-frame DICOM files) as a sample of its own.

    Wraps a file source that lists volumes (an :class:`~medxai.data.sources.ImageFolderSource` of ``.nii.gz``
    files in class folders, or a manifest) and lists one record per slice along ``axis``, with id
    ``"<volume id>#<axis><index>"``. Each slice inherits its volume's label and split, and its patient id is the
    volume's (or the volume id): carved splits never put slices of one volume on both sides. A file that cannot be
    read while counting its slices is listed in :attr:`skipped`. The last volume read is kept in memory, so loading
    the slices of one volume in order reads it once.

    Args:
        volumes: the source listing the volume files.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` for NIfTI; multi-frame DICOM files give their frames.
    """

    def __init__(self, volumes: Any, *, axis: str = "axial") -> None:
        if axis not in AXES:
            raise ConfigError(f"NIfTI axis must be one of {AXES}, got {axis!r}")
        self.volumes = volumes
        self.axis = axis
        self.label_names = list(volumes.label_names)
        self.description = f"{axis} slices of {volumes.description}"
        self.skipped: list[tuple[str, str]] = list(volumes.skipped)
        self._cache: tuple[str, np.ndarray] | None = None
        self._records = []
        for record in volumes.records():
            try:
                count, kind = self._count(record.path)
            except InvalidImageError as error:
                self.skipped.append((error.path, error.reason))
                continue
            self._records.extend(
                Record(
                    id=f"{record.id}#{self.axis if kind == 'nifti' else 'frame'}{index:04d}",
                    label=record.label,
                    path=record.path,
                    index=index,
                    patient_id=record.patient_id or record.id,
                    split=record.split,
                )
                for index in range(count)
            )
        self.layout = {**getattr(volumes, "layout", {}), "slices": axis}
        logger.info("%s: %d slices", self.description, len(self._records))

    def official_splits(self) -> list[str]:
        return self.volumes.official_splits()

    def records(self, split: str | None = None) -> list[Any]:
        check_split_request(split, self.official_splits(), self.description)
        return [record for record in self._records if split is None or record.split == split]

    def load(self, record: Any) -> Any:
        """Decode one slice; raises :class:`~medxai.errors.InvalidImageError` for an unreadable volume."""
        if self._kind(record.path) == "nifti":
            if self._cache is None or self._cache[0] != record.path:
                volume, _ = read_nifti_volume(record.path, compressed=is_gzip_file(record.path))
                self._cache = (record.path, volume)
            plane = native_slice(record.path, volume_slice(self._cache[1], self.axis, record.index))
            info = {"format": "NIfTI", "axis": self.axis, "slice": record.index}
        else:
            plane, info = read_image_with_info(record.path, frame=record.index)
        return Sample(image=plane, label=record.label, id=record.id, meta={"path": record.path, **info})

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.volumes.fingerprint()}|{self.axis}|{len(self._records)}".encode())
        return f"sha256:{digest.hexdigest()}"

    def __len__(self) -> int:
        return len(self._records)

    def _kind(self, path: str) -> str:
        head = read_prefix(path, HEADER_PEEK_BYTES, is_gzip_file(path))
        return "nifti" if looks_like_nifti(head) else "other"

    def _count(self, path: str | None) -> tuple[int, str]:
        if path is None:
            raise InvalidImageError("<record>", "record has no file path")
        info = probe_image(path)
        if info["format"] == "NIfTI":
            shape = info["shape"] + [1] * (3 - len(info["shape"]))
            return int(shape[AXES.index(self.axis)]), "nifti"
        return int(info.get("frames", 1)), "other"
