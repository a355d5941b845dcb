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
medxai's output folder without the patient's name or ID, while its UIDs still let the clinic reconcile it. Those
UIDs are themselves identifiers (PS3.15 E.1-1): the default output is linkable to the patient, not de-identified.
A PACS usually wants the patient module for an object filed into a study: ``copy_patient=True`` (``medxai explain
--dicom-sc --dicom-sc-copy-patient``) copies it from the source, which makes the output PHI and is a deliberate
choice.

De-identification is explicit: ``deidentify=True`` (``--dicom-sc-deidentify``) writes the overlay into a NEW study
(a generated Study Instance UID), with no Source Image Sequence and no Referenced Series Sequence (their UIDs lead
back to the patient's study), the patient and study identification empty, ``PatientIdentityRemoved = YES`` and a
*De-identification Method* saying so. It cannot be combined with ``copy_patient``. It covers the header only.

*Burned In Annotation* follows the source, because the overlay is drawn over the source's pixels and shows any text
burned into them: the source's ``YES`` or ``NO`` is copied; a source that lacks the attribute, or holds anything
else, gives ``YES`` (unknown is treated as possibly burned in). A ``YES`` is logged (info), and, with
``deidentify=True``, warned about: the de-identified header does not make such pixels anonymous.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data.readers.dicom import default_frame_index, looks_like_dicom, quiet_pydicom, read_dicom_dataset
from medxai.data.readers.limits import peek_gzip, read_gzip_limited
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

#: *De-identification Method* (LO, at most 64 characters) of ``deidentify=True`` output.
_DEIDENTIFICATION_METHOD = "medxai: new study, no source references, no patient/study IDs"


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
    deidentify: bool = False,
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
        deidentify: write a new study with no reference to the source's UIDs and no patient or study
            identification, marked ``PatientIdentityRemoved = YES`` (see the module docstring).
        description: *Derivation Description* and *Series Description* text.
        series_number: *Series Number* of the new series.

    Returns:
        The path written.

    Raises:
        InvalidImageError: the source is not a readable DICOM file, or (unless ``deidentify``) lacks its
            Study/Series/SOP Instance UIDs or SOP Class UID.
        ValueError: ``overlay`` is not an ``(H, W, 3)`` uint8 array, or ``copy_patient`` and ``deidentify`` are
            both set.
    """
    if copy_patient and deidentify:
        raise ValueError("copy_patient and deidentify contradict each other: de-identified output cannot carry the "
                         "source's patient and study identification; choose one")
    overlay = np.asarray(overlay)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"overlay must be (H, W, 3) uint8, got {overlay.shape} {overlay.dtype}")
    source_path = Path(source)
    data = read_gzip_limited(source_path) if _is_gzip(source_path) else None
    original = read_dicom_dataset(source_path, data, stop_before_pixels=True)
    with quiet_pydicom(source_path):
        return _write(overlay, source_path, original, Path(out_path), frame=frame, copy_patient=copy_patient,
                      deidentify=deidentify, description=description, series_number=series_number)


def _write(
    overlay: np.ndarray,
    source_path: Path,
    original: Any,
    out_path: Path,
    *,
    frame: int | None,
    copy_patient: bool,
    deidentify: bool,
    description: str,
    series_number: int,
) -> Path:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from medxai import __version__

    # The references are read first so that a source the output cannot point at is rejected before anything else.
    references = None if deidentify else _source_references(source_path, original)

    ds = Dataset()
    _set_instance(ds)
    _set_identification(ds, original, out_path, copy_patient=copy_patient, deidentify=deidentify)
    ds.StudyInstanceUID = generate_uid() if deidentify else references["StudyInstanceUID"]
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
    origin = "a source image it does not reference" if deidentify else "the referenced image"
    ds.DerivationDescription = f"{description} computed by medxai {__version__} from {origin}"[:1024]
    ds.BurnedInAnnotation = _burned_in_annotation(original)
    _log_burned_in(ds.BurnedInAnnotation, deidentify=deidentify)
    ds.LossyImageCompression = "01" if str(original.get("LossyImageCompression", "00")) == "01" else "00"
    if references is not None:
        _set_source_references(ds, references, frames=_frames(original), frame=frame)
    _set_pixels(ds, overlay)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    logger.debug("wrote DICOM secondary capture %s", out_path)
    return out_path


def _burned_in_annotation(source: Any) -> str:
    """The *Burned In Annotation* an image drawn over ``source``'s pixels must carry.

    Args:
        source: the source ``pydicom.Dataset`` (the header is enough).

    Returns:
        The source's ``"YES"`` or ``"NO"`` (case and padding ignored); ``"YES"`` when the source lacks the attribute
        or holds any other value, since unknown pixels may show burned-in patient text.
    """
    value = str(source.get("BurnedInAnnotation", "") or "").strip().upper()
    return value if value in ("YES", "NO") else "YES"


def _log_burned_in(flag: str, *, deidentify: bool) -> None:
    if flag != "YES":
        return
    if deidentify:
        logger.warning("de-identified secondary capture: its pixels come from the source image and may show "
                       "burned-in identifiers (BurnedInAnnotation YES); only the header is de-identified")
    else:
        logger.info("secondary capture marked BurnedInAnnotation YES: the source does not declare itself free of "
                    "burned-in annotation")


def _set_instance(ds: Any) -> None:
    """File meta, SOP class and instance, and creation/content date and time (now)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from medxai import __version__

    now = datetime.datetime.now()
    instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDXAI_{__version__}"[:16]
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime


def _set_identification(ds: Any, original: Any, out_path: Path, *, copy_patient: bool, deidentify: bool) -> None:
    """Patient and study identification: empty type 2 attributes, copied from the source, or marked removed."""
    for keyword in _TYPE2_EMPTY:
        setattr(ds, keyword, "")
    if copy_patient:
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword in original:
                ds[keyword] = original[keyword]
        logger.info("%s: patient and study identification copied from the source (PHI)", out_path)
    if deidentify:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = _DEIDENTIFICATION_METHOD


def _set_source_references(ds: Any, references: dict[str, str], *, frames: int, frame: int | None) -> None:
    """Source Image Sequence and Referenced Series Sequence pointing at the source instance (and frame)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

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


def _set_pixels(ds: Any, overlay: np.ndarray) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(overlay.shape[0]), int(overlay.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(overlay).tobytes()


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
