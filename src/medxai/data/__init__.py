"""Data: readers that decode files (image, DICOM, NIfTI, with size limits), sources that list and load labelled
images, and the preprocessing, splits and checks between them and the model."""

from medxai.data.ground_truth import GroundTruth, LesionBox, prepare_masks, read_ground_truth
from medxai.data.readers import is_hidden_or_system, probe_image, read_image, read_image_with_info
from medxai.data.sources import (
    ImageFolderSource,
    ManifestSource,
    MedMNISTSource,
    Record,
    Sample,
    Source,
    VolumeSliceSource,
    open_source,
)
from medxai.data.splits import carve_splits, resolve_splits

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
    "read_image_with_info",
    "probe_image",
    "is_hidden_or_system",
    "LesionBox",
    "GroundTruth",
    "read_ground_truth",
    "prepare_masks",
    "carve_splits",
    "resolve_splits",
]
