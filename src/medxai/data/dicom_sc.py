"""Heatmaps back to the clinic: an overlay written as a DICOM Secondary Capture that points at its source image.

The object is a Secondary Capture Image Storage instance (PS3.3 A.8.1) holding the RGB overlay at the source
image's resolution, marked as a derived image (``ImageType = DERIVED\\SECONDARY``, a *Derivation Description* naming
the CAM method), with:

- a NEW SOP Instance UID and a NEW Series Instance UID (a derived image belongs in its own series);
- the source's *Study Instance UID*, so a PACS files it into the same study;
- *Source Image Sequence* (the source SOP class and instance, and frame for multi-frame sources, with purpose of
  reference DCM 121322 "Source image for image processing operation") and *Referenced Series Sequence* (the source
  series and instance, Common Instance Reference module), so viewers can link the two.

Patient identity is NOT copied by default: the Patient and General Study modules' type 2 attributes (name, ID,
birth date, sex, accession number, study date, referring physician...) are written empty, so the file can leave
medxai's output folder without carrying PHI, while its UIDs still let the clinic reconcile it. A PACS usually wants
the patient module for an object filed into a study: ``copy_patient=True`` (``medxai explain --dicom-sc
--dicom-sc-copy-patient``) copies it from the source, which makes the output PHI and is a deliberate choice.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data._dicom import default_frame_index, looks_like_dicom, quiet_pydicom, read_dicom_dataset
from medxai.data._limits import peek_gzip, read_gzip_limited
from medxai.errors import InvalidImageError

__all__ = ["write_secondary_capture", "is_dicom_file", "PATIENT_STUDY_KEYWORDS"]

logger = logging.getLogger(__name__)

#: Copied from the source only with ``copy_patient=True``; otherwise present and empty (they are type 2).
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDs",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "StudyID")

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def is_dicom_file(path: str | Path) -> bool:
    """Whether the file is DICOM (``.dcm.gz`` included), judged from its content."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
        if head[:2] == b"\x1f\x8b":
            head = peek_gzip(path, 1024)
    except (OSError, InvalidImageError):
        return False
    return looks_like_dicom(head)


def write_secondary_capture(
    overlay: np.ndarray,
    source: str | Path,
    out_path: str | Path,
    *,
    frame: int | None = None,
    copy_patient: bool = False,
    description: str = "Grad-CAM heatmap overlay",
    series_number: int = 9900,
) -> Path:
    """Write ``overlay`` as a DICOM Secondary Capture referencing the DICOM file it was computed from.

    Args:
        overlay: ``(H, W, 3)`` uint8 RGB (e.g. ``Explanation.overlay()``), normally at the source's resolution.
        source: the source DICOM file (``.dcm.gz`` accepted).
        out_path: where to write (parent folders are created).
        frame: the source frame the overlay belongs to; None means the frame ``read_image`` uses by default.
        copy_patient: copy the patient and study identification from the source (see the module docstring).
        description: *Derivation Description* and *Series Description* text.
        series_number: *Series Number* of the new series.

    Returns:
        The path written.

    Raises:
        InvalidImageError: the source is not a readable DICOM file or lacks its Study/Series/SOP Instance UIDs.
        ValueError: ``overlay`` is not an ``(H, W, 3)`` uint8 array.
    """
    overlay = np.asarray(overlay)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"overlay must be (H, W, 3) uint8, got {overlay.shape} {overlay.dtype}")
    source_path = Path(source)
    data = read_gzip_limited(source_path) if _is_gzip(source_path) else None
    original = read_dicom_dataset(source_path, data, stop_before_pixels=True)
    with quiet_pydicom(source_path):
        return _write(overlay, source_path, original, Path(out_path), frame=frame, copy_patient=copy_patient,
                      description=description, series_number=series_number)


def _write(
    overlay: np.ndarray,
    source_path: Path,
    original: Any,
    out_path: Path,
    *,
    frame: int | None,
    copy_patient: bool,
    description: str,
    series_number: int,
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from medxai import __version__

    references = _source_references(source_path, original)
    frames = _frames(original)

    now = datetime.datetime.now()
    instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDXAI_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    for keyword in _TYPE2_EMPTY:
        setattr(ds, keyword, "")
    if copy_patient:
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword in original:
                ds[keyword] = original[keyword]
        logger.info("%s: patient and study identification copied from the source (PHI)", out_path)

    ds.StudyInstanceUID = references["StudyInstanceUID"]
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = "medxai"
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = "medxai"
    ds.SecondaryCaptureDeviceSoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"{description} computed by medxai {__version__} from the referenced image"[:1024]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01" if str(original.get("LossyImageCompression", "00")) == "01" else "00"

    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = references["SOPClassUID"]
    source_item.ReferencedSOPInstanceUID = references["SOPInstanceUID"]
    if frames > 1:
        source_item.ReferencedFrameNumber = (default_frame_index(frames) if frame is None else frame % frames) + 1
    source_item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([source_item])

    instance_item = Dataset()
    instance_item.ReferencedSOPClassUID = references["SOPClassUID"]
    instance_item.ReferencedSOPInstanceUID = references["SOPInstanceUID"]
    series_item = Dataset()
    series_item.SeriesInstanceUID = references["SeriesInstanceUID"]
    series_item.ReferencedInstanceSequence = Sequence([instance_item])
    ds.ReferencedSeriesSequence = Sequence([series_item])

    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(overlay.shape[0]), int(overlay.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(overlay).tobytes()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    logger.debug("wrote DICOM secondary capture %s", out_path)
    return out_path


def _is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError as error:
        raise InvalidImageError(path, f"cannot be read ({error})") from None


def _frames(dataset: Any) -> int:
    try:
        return max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _source_references(path: Path, dataset: Any) -> dict[str, str]:
    references = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = str(dataset.get(keyword, "") or "").strip()
        if not value:
            raise InvalidImageError(path, f"source DICOM lacks {keyword}; a secondary capture cannot reference it")
        references[keyword] = value
    return references
