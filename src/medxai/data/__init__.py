"""Data: sources that list and decode labelled images, and the splits they are trained and evaluated on."""

from medxai.data.sample import Sample
from medxai.data.sources import (
    ImageFolderSource,
    ManifestSource,
    MedMNISTSource,
    Record,
    Source,
    is_hidden_or_system,
    open_source,
    read_image,
)
from medxai.data._nifti import VolumeSliceSource
from medxai.data.splits import carve_splits, read_split_lists, resolve_splits, write_split_lists

__all__ = [
    "Sample",
    "Record",
    "Source",
    "open_source",
    "ImageFolderSource",
    "MedMNISTSource",
    "ManifestSource",
    "VolumeSliceSource",
    "read_image",
    "is_hidden_or_system",
    "carve_splits",
    "resolve_splits",
    "write_split_lists",
    "read_split_lists",
]
