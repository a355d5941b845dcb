"""Secondary Capture output: the Burned In Annotation rule and the explicit de-identification mode.

Sources are tiny synthetic MONOCHROME2 images written with pydicom; one test checks the rule against real files of
$MEDXAI_DATA_DIR/dicom.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medxai.data.dicom_sc import write_secondary_capture

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME, PATIENT_ID = "Roe^Richard^Q", "MRN-77310-QX"
ABSENT = object()  # marks a source without a BurnedInAnnotation element


class LogCollector(logging.Handler):
    """Collects (level, message) of the dicom_sc logger's records, with or without pytest's logging plugin."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))

    def messages(self, level: int) -> list[str]:
        return [message for levelno, message in self.records if levelno == level]


@contextlib.contextmanager
def collect_logs() -> Iterator[LogCollector]:
    collector, target = LogCollector(), logging.getLogger("medxai.data.dicom_sc")
    previous = target.level
    target.addHandler(collector)
    target.setLevel(logging.DEBUG)
    try:
        yield collector
    finally:
        target.removeHandler(collector)
        target.setLevel(previous)


def make_source(path: Path, burned_in: object = ABSENT) -> Path:
    """A 16x16 8-bit MONOCHROME2 CT image with patient identification and fresh Study/Series/SOP Instance UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Modality = "CT"
    if burned_in is not ABSENT:
        with config.disable_value_validation():  # junk values are the point of some cases
            ds.BurnedInAnnotation = burned_in
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(256, dtype=np.uint8).reshape(16, 16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def overlay() -> np.ndarray:
    return np.zeros((16, 16, 3), np.uint8)


def expected_flag(header_value: object) -> str:
    """The rule, stated independently of the implementation: YES/NO copied, anything else (or nothing) is YES."""
    if header_value is None or header_value is ABSENT:
        return "YES"
    value = str(header_value).strip().upper()
    return value if value in ("YES", "NO") else "YES"


# -- Burned In Annotation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_value", "written"),
    [
        ("YES", "YES"),
        ("NO", "NO"),
        ("no ", "NO"),  # case and padding do not matter
        (ABSENT, "YES"),  # unknown: possibly burned in
        ("MAYBE", "YES"),  # junk: unknown
        ("", "YES"),  # present but empty: unknown
    ],
    ids=["yes", "no", "lower-case-padded-no", "absent", "junk", "empty"],
)
@pytest.mark.parametrize("deidentify", [False, True], ids=["default", "deidentify"])
def test_burned_in_annotation_follows_the_source(tmp_path, source_value, written, deidentify):
    source = make_source(tmp_path / "src.dcm", source_value)
    with collect_logs() as logs:
        sc = pydicom.dcmread(write_secondary_capture(overlay(), source, tmp_path / "sc.dcm", deidentify=deidentify))
    assert sc.BurnedInAnnotation == written == expected_flag(source_value)

    # A YES is logged once: info by default, a warning about the pixels when the header is de-identified.
    info = [message for message in logs.messages(logging.INFO) if "BurnedInAnnotation YES" in message]
    warnings = [message for message in logs.messages(logging.WARNING) if "burned-in identifiers" in message]
    flagged = 1 if written == "YES" else 0
    assert (len(info), len(warnings)) == ((0, flagged) if deidentify else (flagged, 0))
    for _, message in logs.records:  # no log line names the patient or a UID
        assert PATIENT_NAME not in message and PATIENT_ID not in message and "1.2.826" not in message


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("relative", "written"),
    [("pydicom-data/RG1_J2KI.dcm", "YES"), ("pydicom-data/emri_small.dcm", "NO")],
    ids=["RG1_J2KI-absent", "emri_small-NO"],
)
def test_burned_in_annotation_rule_on_real_files(data_dir, tmp_path, relative, written):
    source = data_dir / "dicom" / relative
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert "PixelData" in pydicom.dcmread(source)  # a real image, not a header-only object
    sc = pydicom.dcmread(write_secondary_capture(overlay(), source, tmp_path / "sc.dcm"))
    assert sc.BurnedInAnnotation == expected_flag(header.get("BurnedInAnnotation")) == written


# -- default mode: linked to the source ------------------------------------------------------------------------------
def test_default_mode_files_into_the_source_study_and_references_the_source(tmp_path):
    source = make_source(tmp_path / "src.dcm", "NO")
    original = pydicom.dcmread(source)
    sc = pydicom.dcmread(write_secondary_capture(overlay(), source, tmp_path / "sc.dcm"))
    assert sc.StudyInstanceUID == original.StudyInstanceUID
    assert sc.SeriesInstanceUID != original.SeriesInstanceUID and sc.SOPInstanceUID != original.SOPInstanceUID
    reference = sc.SourceImageSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (CT_IMAGE_STORAGE,
                                                                                    original.SOPInstanceUID)
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == original.SeriesInstanceUID
    assert (sc.PatientName, sc.PatientID) == ("", "")
    assert "PatientIdentityRemoved" not in sc and "DeidentificationMethod" not in sc


# -- deidentify mode: a new study with no way back -------------------------------------------------------------------
def test_deidentify_writes_a_new_study_without_source_references(tmp_path):
    source = make_source(tmp_path / "src.dcm", "NO")
    original = pydicom.dcmread(source)
    written = write_secondary_capture(overlay(), source, tmp_path / "sc.dcm", deidentify=True)
    sc = pydicom.dcmread(written)
    assert sc.StudyInstanceUID != original.StudyInstanceUID
    assert sc.SeriesInstanceUID != original.SeriesInstanceUID and sc.SOPInstanceUID != original.SOPInstanceUID
    assert "SourceImageSequence" not in sc and "ReferencedSeriesSequence" not in sc
    assert sc.PatientIdentityRemoved == "YES"
    assert "medxai" in sc.DeidentificationMethod and len(sc.DeidentificationMethod) <= 64
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert keyword in sc and sc[keyword].value in ("", None), keyword  # type 2: present, empty
    np.testing.assert_array_equal(sc.pixel_array, overlay())

    content = written.read_bytes()
    for value in (PATIENT_NAME, PATIENT_ID, original.StudyInstanceUID, original.SeriesInstanceUID,
                  original.SOPInstanceUID):
        assert str(value).encode("ascii") not in content, value


def test_two_deidentified_outputs_of_one_source_do_not_share_a_study(tmp_path):
    source = make_source(tmp_path / "src.dcm")
    first = pydicom.dcmread(write_secondary_capture(overlay(), source, tmp_path / "a.dcm", deidentify=True))
    second = pydicom.dcmread(write_secondary_capture(overlay(), source, tmp_path / "b.dcm", deidentify=True))
    assert first.StudyInstanceUID != second.StudyInstanceUID  # a shared study UID would link them


def test_copy_patient_and_deidentify_together_are_refused(tmp_path):
    source = make_source(tmp_path / "src.dcm")
    with pytest.raises(ValueError, match="copy_patient and deidentify"):
        write_secondary_capture(overlay(), source, tmp_path / "sc.dcm", copy_patient=True, deidentify=True)
    assert not (tmp_path / "sc.dcm").exists()
