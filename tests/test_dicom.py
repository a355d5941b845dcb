"""DICOM at the boundary: the 20 real files of $MEDXAI_DATA_DIR/dicom table-driven, the display chain checked against
pydicom's own implementation and hand-derived numbers, rejected objects, DICOM datasets and Secondary Capture output.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medxai.data import read_image
from medxai.data.readers import limits as _limits
from medxai.data.readers import probe_image, read_image_bytes
from medxai.data.readers.image import read_image_with_info
from medxai.data.dicom_sc import is_dicom_file, write_secondary_capture
from medxai.data.sources import ImageFolderSource, ManifestSource
from medxai.errors import ConfigError, ImageTooLargeError, InvalidImageError, UnsupportedDicomError

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


class LogCollector(logging.Handler):
    """Collects formatted log records (works with or without pytest's logging plugin, unlike caplog)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def collect_logs(level: int = logging.DEBUG, logger_name: str | None = None) -> Iterator[LogCollector]:
    """Every record of ``logger_name`` (default: the root, so every library) at ``level`` or above."""
    target = logging.getLogger(logger_name)
    collector = LogCollector()
    previous = target.level
    loggers = [logging.getLogger(name) for name in ("medxai", "pydicom", "nibabel", "PIL")]
    previous_levels = [item.level for item in loggers]
    target.addHandler(collector)
    target.setLevel(level)
    for item in loggers:
        item.setLevel(level)
    try:
        yield collector
    finally:
        target.removeHandler(collector)
        target.setLevel(previous)
        for item, old in zip(loggers, previous_levels):
            item.setLevel(old)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    sop_class: str = MR_STORAGE,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-0042-XYZ",
    **attributes,
) -> Path:
    """A small valid DICOM file with the given pixels (grey uint8/uint16/int16 or RGB uint8) and attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, "19710203"
    ds.AccessionNumber, ds.InstitutionName = "ACC-998877", "Saint Example Hospital"
    ds.Modality = "MR"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, 8 * pixels.dtype.itemsize)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- the 20 real files ------------------------------------------------------------------------------------------
# Discovered by reading each file with pydicom (Modality, PhotometricInterpretation, NumberOfFrames, window, rescale)
# and then with read_image: shape, dtype, minimum, maximum and mean of what read_image returns with the default
# header window. Grey images are float32 in [0, 1]; colour ones uint8 RGB. Several nibabel test files hold all-zero
# pixel data (stripped for size): a constant image is a correct answer for them. None of the 20 is rejected; rejected
# objects (reports, waveforms, plans, segmentations) come from pydicom's installed test files further down.
REAL_FILES = [
    # file, shape, dtype, min, max, mean, modality, photometric, frames, inverted
    ("nibabel-tests/0.dcm", (256, 256), "float32", 0.0394, 1.0, 0.8856, "MR", "MONOCHROME2", 1, False),
    ("nibabel-tests/decimal_rescale.dcm", (96, 128), "float32", 0.0, 0.0, 0.0, "MR", "MONOCHROME2", 1, False),
    ("nibabel-tests/philips_mprage.dcm.gz", (256, 256), "float32", 0.0, 0.0, 0.0, "MR", "MONOCHROME2", 176, False),
    ("nibabel-tests/siemens_dwi_0.dcm.gz", (896, 896), "float32", 0.0394, 0.0394, 0.0394, "MR", "MONOCHROME2", 1,
     False),
    ("nibabel-tests/slicethickness_empty_string.dcm", (384, 384), "float32", 0.0785, 1.0, 0.1484, "MR", "MONOCHROME2",
     1, False),
    ("pydicom-data/693_UNCR.dcm", (512, 512), "float32", 0.0, 1.0, 0.1574, "CT", "MONOCHROME2", 1, False),
    ("pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm", (484, 484), "float32", 0.0, 1.0, 0.1169, "MR", "MONOCHROME2",
     1, False),
    ("pydicom-data/MR2_J2KR.dcm", (1024, 1024), "float32", 0.0, 1.0, 0.1417, "MR", "MONOCHROME2", 1, False),
    ("pydicom-data/RG1_J2KI.dcm", (1955, 1841), "float32", 0.1162, 0.9732, 0.7536, "CR", "MONOCHROME1", 1, True),
    ("pydicom-data/RG3_J2KR.dcm", (1760, 1760), "float32", 0.0371, 1.0, 0.6961, "CR", "MONOCHROME1", 1, True),
    ("pydicom-data/emri_small.dcm", (64, 64), "float32", 0.0, 1.0, 0.1988, "MR", "MONOCHROME2", 10, False),
    ("pydicom-tests/CT_small.dcm", (128, 128), "float32", 0.0, 1.0, 0.3766, "CT", "MONOCHROME2", 1, False),
    ("pydicom-tests/JPEG2000.dcm", (1024, 256), "float32", 0.0, 1.0, 0.1580, "NM", "MONOCHROME2", 1, False),
    ("pydicom-tests/MR_small.dcm", (64, 64), "float32", 0.2045, 1.0, 0.4434, "MR", "MONOCHROME2", 1, False),
    ("pydicom-tests/MR_small_RLE.dcm", (64, 64), "float32", 0.2045, 1.0, 0.4434, "MR", "MONOCHROME2", 1, False),
    ("pydicom-tests/examples_jpeg2k.dcm", (480, 640, 3), "uint8", 0, 255, 34.5288, "US", "YBR_RCT", 1, False),
    ("pydicom-tests/examples_overlay.dcm", (300, 484), "float32", 0.0, 1.0, 0.1887, "MR", "MONOCHROME2", 1, False),
    ("pydicom-tests/examples_palette.dcm", (350, 800, 3), "uint8", 0, 255, 20.4930, "US", "PALETTE COLOR", 1, False),
    ("pydicom-tests/examples_rgb_color.dcm", (240, 320, 3), "uint8", 0, 255, 34.2666, "US", "RGB", 1, False),
    ("pydicom-tests/examples_ybr_color.dcm", (240, 320, 3), "uint8", 0, 220, 10.6866, "US", "YBR_FULL_422", 30, False),
]


def _dataset(path: Path) -> Dataset:
    if path.suffix == ".gz":
        return pydicom.dcmread(io.BytesIO(gzip.decompress(path.read_bytes())))
    return pydicom.dcmread(path)


@pytest.mark.realdata
def test_the_table_covers_every_dicom_file_in_the_data_folder(data_dir):
    folder = data_dir / "dicom"
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and is_dicom_file(p))
    assert found == sorted(row[0] for row in REAL_FILES)
    assert len(found) == 20
    for other in ("MD5SUMS", "pydicom-tests/README_pydicom_test_files.txt"):
        with pytest.raises(InvalidImageError, match="not a recognised image format"):
            read_image(folder / other)


@pytest.mark.realdata
@pytest.mark.parametrize("row", REAL_FILES, ids=[row[0] for row in REAL_FILES])
def test_real_dicom_files_decode_as_tabulated(data_dir, row):
    name, shape, dtype, low, high, mean, modality, photometric, frames, inverted = row
    with collect_logs(logging.INFO) as logs:
        image, info = read_image_with_info(data_dir / "dicom" / name)
    assert image.shape == shape and str(image.dtype) == dtype
    assert float(image.min()) == pytest.approx(low, abs=1e-4)
    assert float(image.max()) == pytest.approx(high, abs=1e-4)
    assert float(image.mean()) == pytest.approx(mean, abs=1e-3)
    assert (info["format"], info["modality"], info["mode"], info["frames"]) == ("DICOM", modality, photometric, frames)
    assert info["frame"] == frames // 2  # multi-frame objects give their middle frame by default
    assert info["inverted"] is inverted
    assert ("MONOCHROME1" in logs.text) is inverted  # the inversion is logged
    assert info["original_size"] == [shape[1], shape[0]]


@pytest.mark.realdata
@pytest.mark.parametrize("row", [row for row in REAL_FILES if row[7].startswith("MONO")], ids=lambda row: row[0])
def test_grey_display_values_match_pydicoms_own_modality_and_voi_transforms(data_dir, row):
    """An independent reference: pydicom's apply_modality_lut + apply_voi_lut, rescaled from pydicom's output range
    (the stored range mapped through the rescale) to [0, 1], and inverted for MONOCHROME1."""
    path = data_dir / "dicom" / row[0]
    ds = _dataset(path)
    if "WindowCenter" not in ds:
        pytest.skip("window stored in functional groups or absent: pydicom's apply_voi_lut does not read those")
    stored = pixel_array(ds, index=int(ds.get("NumberOfFrames", 1) or 1) // 2)
    reference = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    bits = ds.BitsStored
    low, high = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    expected = (reference - low) / (high - low)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


@pytest.mark.realdata
def test_chest_radiograph_comes_out_with_bright_bones_not_inverted(data_dir):
    """RG1: a PA chest CR stored MONOCHROME1 in JPEG 2000. Displayed right, the spine and mediastinum are bright and
    the lungs dark; read naively (no inversion) it would be the other way round."""
    image = read_image(data_dir / "dicom" / "pydicom-data" / "RG1_J2KI.dcm")
    height, width = image.shape
    rows = slice(int(0.30 * height), int(0.55 * height))
    spine = image[rows, int(0.47 * width) : int(0.53 * width)].mean()
    lungs = (image[rows, int(0.20 * width) : int(0.35 * width)].mean()
             + image[rows, int(0.65 * width) : int(0.80 * width)].mean()) / 2
    assert spine > lungs + 0.2, (spine, lungs)
    stored = pixel_array(_dataset(data_dir / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"))
    stored_spine = stored[rows, int(0.47 * width) : int(0.53 * width)].mean()
    assert stored_spine < stored[rows, int(0.2 * width) : int(0.35 * width)].mean()  # stored inverted: MONOCHROME1

    leg = read_image(data_dir / "dicom" / "pydicom-data" / "RG3_J2KR.dcm")  # extremity CR, MONOCHROME1
    side = leg.shape[0]
    air = leg[int(0.45 * side) : int(0.55 * side), int(0.28 * side) : int(0.31 * side)].mean()
    bone = leg[int(0.3 * side) : int(0.5 * side), int(0.47 * side) : int(0.52 * side)].mean()
    assert air < 0.1 < 0.6 < bone, (air, bone)


@pytest.mark.realdata
def test_colour_photometric_interpretations_match_pydicom(data_dir):
    folder = data_dir / "dicom" / "pydicom-tests"
    rgb = pydicom.dcmread(folder / "examples_rgb_color.dcm")
    np.testing.assert_array_equal(read_image(folder / "examples_rgb_color.dcm"), rgb.pixel_array)
    # JPEG 2000 YBR_RCT (lossless) is the same ultrasound frame as the uncompressed RGB one, larger: not cropped.
    assert read_image(folder / "examples_jpeg2k.dcm")[:240, :320].shape == (240, 320, 3)
    # YBR_FULL_422 JPEG baseline: the middle of 30 frames, converted to RGB.
    ybr = pydicom.dcmread(folder / "examples_ybr_color.dcm")
    expected = pixel_array(ybr, index=15)  # pydicom converts YBR to RGB by default
    np.testing.assert_array_equal(read_image(folder / "examples_ybr_color.dcm"), expected)
    np.testing.assert_array_equal(read_image(folder / "examples_ybr_color.dcm", frame=3), pixel_array(ybr, index=3))
    raw_ybr = pixel_array(ybr, index=15, as_rgb=False)
    assert np.abs(raw_ybr[..., 1].astype(int) - 128).mean() < 5  # chroma of a grey-ish image: the raw data IS YBR
    # PALETTE COLOR through its 16-bit lookup table, 8-bit colours kept in the high byte.
    palette = pydicom.dcmread(folder / "examples_palette.dcm")
    np.testing.assert_array_equal(read_image(folder / "examples_palette.dcm"),
                                  (apply_color_lut(palette.pixel_array, palette) >> 8).astype(np.uint8))


@pytest.mark.realdata
def test_multi_frame_and_enhanced_frame_selection(data_dir):
    enhanced = data_dir / "dicom" / "pydicom-data" / "emri_small.dcm"  # Enhanced MR, 10 frames, no window
    ds = pydicom.dcmread(enhanced)
    for frame in (0, 4, 9, -1):
        stored = pixel_array(ds, index=frame % 10).astype(np.float64)
        image, info = read_image_with_info(enhanced, frame=frame)
        expected = (stored - stored.min()) / (stored.max() - stored.min())
        np.testing.assert_allclose(image, expected, atol=1e-6)
        assert info["frame"] == frame % 10 and info["window"].startswith("full range")
    with pytest.raises(InvalidImageError, match="frame 10 requested but the file has 10"):
        read_image(enhanced, frame=10)
    # Enhanced objects keep their window per frame, in functional groups: frame 0 and frame 88 differ.
    mprage = data_dir / "dicom" / "nibabel-tests" / "philips_mprage.dcm.gz"
    assert read_image_with_info(mprage, frame=0)[1]["window"] == "header window 13/23 LINEAR"
    assert read_image_with_info(mprage)[1]["window"] == "header window 1070/1860 LINEAR"


@pytest.mark.realdata
def test_window_choices_on_ct_hounsfield_units(data_dir):
    path = data_dir / "dicom" / "pydicom-tests" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # Fixed soft-tissue window (40, 400): the DICOM linear formula with output [0, 1].
    expected = np.clip((hounsfield - 39.5) / 399.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(read_image(path, window=(40, 400)), expected, atol=1e-6)
    full = read_image(path, window="full")
    np.testing.assert_allclose(full, (hounsfield - hounsfield.min()) / np.ptp(hounsfield), atol=1e-6)
    np.testing.assert_array_equal(read_image(path), full)  # no window in this header: header falls back to full
    for bad in ("soft-tissue", (40, 0), (40,)):
        with pytest.raises(ConfigError):
            read_image(path, window=bad)


# -- the display chain on synthetic files with hand-derived values ------------------------------------------------
def test_rescale_then_window_then_monochrome1_inversion(tmp_path):
    stored = np.array([[0, 100, 200], [300, 400, 500]], dtype=np.uint16)
    common = dict(RescaleSlope="2", RescaleIntercept="-400", WindowCenter="100", WindowWidth="401")
    mono2 = make_dicom(tmp_path / "m2.dcm", stored, **common)
    # modality values: -400, -200, 0, 200, 400, 600; window [c - 0.5 - 200, c - 0.5 + 200] = [-100.5, 299.5]
    modality = stored * 2.0 - 400
    expected = np.clip((modality - 99.5) / 400.0 + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(mono2), expected, atol=1e-6)
    mono1 = make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **common)
    with collect_logs(logging.INFO) as logs:
        np.testing.assert_allclose(read_image(mono1), 1.0 - expected, atol=1e-6)
    assert "MONOCHROME1" in logs.text and "inverted" in logs.text
    # SIGMOID and LINEAR_EXACT VOI functions.
    sigmoid = make_dicom(tmp_path / "s.dcm", stored, VOILUTFunction="SIGMOID", **common)
    np.testing.assert_allclose(read_image(sigmoid), 1 / (1 + np.exp(-4 * (modality - 100) / 401)), atol=1e-6)
    exact = make_dicom(tmp_path / "e.dcm", stored, VOILUTFunction="LINEAR_EXACT", **common)
    np.testing.assert_allclose(read_image(exact), np.clip((modality - 100) / 401 + 0.5, 0, 1), atol=1e-6)


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16).repeat(2, axis=0)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 0, 8])  # 4 entries from stored value 0, 8-bit output
    lut.add_new("LUTData", "US", [0, 255, 51, 102])  # a deliberately non-monotonic LUT
    path = make_dicom(tmp_path / "lut.dcm", stored, WindowCenter="1", WindowWidth="2", BitsStored=2)
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = [lut]
    ds.save_as(path)
    np.testing.assert_allclose(read_image(path)[0], [0.0, 1.0, 0.2, 0.4], atol=1e-6)


def test_bits_above_bits_stored_are_masked(tmp_path):
    stored = np.array([[0x0FFF, 0xF001], [0x1002, 0x0003]], dtype=np.uint16)  # junk in the top 4 bits
    path = make_dicom(tmp_path / "bits.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    image = read_image(path, window="full")  # masked values: 4095, 1, 2, 3
    np.testing.assert_allclose(image, (np.array([[4095, 1], [2, 3]]) - 1) / 4094.0, atol=1e-6)


def test_dicom_without_preamble_and_gzip_compressed_dicom_read_like_the_original(tmp_path):
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 37) % 1000
    original = make_dicom(tmp_path / "with.dcm", pixels, WindowCenter="500", WindowWidth="1000")
    ds = pydicom.dcmread(original)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "without", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "without").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(tmp_path / "without"), read_image(original))
    (tmp_path / "zipped.dcm.gz").write_bytes(gzip.compress(original.read_bytes()))
    np.testing.assert_array_equal(read_image(tmp_path / "zipped.dcm.gz"), read_image(original))


def test_every_compressed_transfer_syntax_has_a_decoder():
    from pydicom import uid
    from pydicom.pixels import get_decoder

    for syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                   uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless):
        assert get_decoder(syntax).is_available, syntax.name


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_reencoded_copies_decode_identically(name):
    """pydicom's installed test files: the same MR slice in JPEG-LS, JPEG 2000, RLE, big endian, implicit VR."""
    if not (PYDICOM_TEST_FILES / name).is_file():
        pytest.skip(f"pydicom test file {name} not installed")
    reference = read_image(PYDICOM_TEST_FILES / "MR_small.dcm")
    np.testing.assert_array_equal(read_image(PYDICOM_TEST_FILES / name), reference)


@pytest.mark.parametrize(
    "name, message",
    [
        ("test-SR.dcm", "structured report"),
        ("waveform_ecg.dcm", "waveform"),
        ("rtplan.dcm", "without pixel data"),
        ("rtstruct.dcm", "without pixel data"),
        ("liver_1frame.dcm", "segmentation"),
    ],
)
def test_objects_that_are_not_images_are_rejected_with_a_typed_error(name, message):
    if not (PYDICOM_TEST_FILES / name).is_file():
        pytest.skip(f"pydicom test file {name} not installed")
    with pytest.raises(UnsupportedDicomError, match=message) as caught:
        read_image(PYDICOM_TEST_FILES / name)
    assert isinstance(caught.value, InvalidImageError) and caught.value.path.endswith(name)


def test_synthetic_report_waveform_and_imageless_objects_are_rejected(tmp_path):
    cases = {
        "1.2.840.10008.5.1.4.1.1.88.33": "structured report",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.9.1.1": "waveform",  # 12-lead ECG
        MR_STORAGE: "without pixel data",  # an image class with its pixels missing
    }
    for index, (sop_class, message) in enumerate(cases.items()):
        path = make_dicom(tmp_path / f"{index}.dcm", None, sop_class=sop_class)
        with pytest.raises(UnsupportedDicomError, match=message):
            read_image(path)


# -- hostile headers (issue 17) ------------------------------------------------------------------------------------
CRAFTED = "SMITHJOHN1970"  # a patient's name where a number belongs: never repeated in a reason


def with_element(path: Path, keyword: str, value, vr: str | None = None) -> Path:
    """``path`` with one element set (``vr`` forces another value representation, e.g. text where a number
    belongs), or removed when ``value`` is None."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    if value is None:
        del ds[tag]
    elif vr is None:
        setattr(ds, keyword, value)
    else:
        ds[tag] = DataElement(tag, vr, value)
    ds.save_as(path)
    return path


# keyword, value, forced VR, reason; on an 8 x 8 uint16 MONOCHROME2 file.
DAMAGED_ATTRIBUTES = [
    ("Rows", CRAFTED, "LO", "DICOM Rows is not a number"),
    ("Rows", -8, "SS", "DICOM Rows is out of range"),
    ("Rows", None, None, "DICOM image without Rows"),
    ("Rows", 0, None, "no pixels"),
    ("Columns", "8.5", "DS", "DICOM Columns is out of range"),
    ("Columns", float("nan"), "FD", "DICOM Columns is not a number"),
    ("NumberOfFrames", CRAFTED, "LO", "DICOM NumberOfFrames is not a number"),
    ("NumberOfFrames", "0", "IS", "DICOM NumberOfFrames is out of range"),
    ("NumberOfFrames", "-3", "IS", "DICOM NumberOfFrames is out of range"),
    ("NumberOfFrames", "1000000000", "IS", "MAX_VOLUME_VOXELS"),
    ("NumberOfFrames", "4", "IS", "truncated DICOM pixel data: 128 of 512 bytes"),
    ("SamplesPerPixel", 2, None, "DICOM SamplesPerPixel must be 1 or 3"),
    ("SamplesPerPixel", 0, None, "DICOM SamplesPerPixel is out of range"),
    ("SamplesPerPixel", 300, None, "DICOM SamplesPerPixel is out of range"),
    ("BitsAllocated", None, None, "DICOM image without BitsAllocated"),
    ("BitsAllocated", 0, None, "DICOM BitsAllocated is out of range"),
    ("BitsAllocated", 12, None, "DICOM BitsAllocated must be 1 or a multiple of 8"),
    ("BitsAllocated", 65535, None, "DICOM BitsAllocated is out of range"),
    ("BitsStored", None, None, "DICOM image without BitsStored"),
    ("BitsStored", 0, None, "DICOM BitsStored is out of range"),
    ("BitsStored", 17, None, "DICOM BitsStored is out of range"),
    ("PixelRepresentation", 2, None, "DICOM PixelRepresentation is out of range"),
    ("PixelRepresentation", CRAFTED, "LO", "DICOM PixelRepresentation is not a number"),
    ("PhotometricInterpretation", CRAFTED, None, "unknown photometric interpretation is not supported"),
]


@pytest.mark.parametrize("keyword, value, vr, reason", DAMAGED_ATTRIBUTES,
                         ids=[f"{row[0]}={row[1]}" for row in DAMAGED_ATTRIBUTES])
def test_absurd_image_attributes_get_a_clear_reason_before_decoding(keyword, value, vr, reason, tmp_path):
    path = with_element(make_dicom(tmp_path / "bad.dcm", np.zeros((8, 8), np.uint16)), keyword, value, vr)
    reads = [lambda: read_image(path), lambda: read_image_bytes(path.read_bytes(), name="upload")]
    if keyword != "PhotometricInterpretation" and "truncated" not in reason:  # the probe reads the header alone
        reads.append(lambda: probe_image(path))
    for read in reads:
        with pytest.raises(InvalidImageError, match=reason) as caught:
            read()
        assert CRAFTED not in caught.value.reason


def test_planar_configuration_of_a_colour_image_is_checked(tmp_path):
    path = make_dicom(tmp_path / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    with pytest.raises(InvalidImageError, match="DICOM PlanarConfiguration is out of range"):
        read_image(with_element(path, "PlanarConfiguration", 5))


def test_a_deflated_data_set_is_inflated_within_the_limit(tmp_path, monkeypatch):
    """Deflated Explicit VR Little Endian: pydicom alone inflates the whole data set, however large."""
    path = make_dicom(tmp_path / "plain.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091010, "OB", bytes(8_000_000))  # 8 MB of zeros: a few kB deflated
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < 20_000
    np.testing.assert_array_equal(read_image(tmp_path / "deflated.dcm"), read_image(path))
    monkeypatch.setattr(_limits, "MAX_DECOMPRESSED_BYTES", 1_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="deflate content inflates past 1000000 bytes"):
            read_image(tmp_path / "deflated.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak


def test_an_upload_is_decoded_from_memory_and_logged_by_its_name(tmp_path, monkeypatch):
    """Issue 17, defect 5: no temporary file, so no temporary path in any log line or message."""
    import tempfile

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("a temporary file was made for an upload")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkdtemp", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    data = make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1").read_bytes()
    with collect_logs(logging.DEBUG) as logs:
        image, info = read_image_bytes(data, name="upload")
    assert info["inverted"] and image.shape == (8, 8)
    assert "upload: MONOCHROME1" in logs.text and tempfile.gettempdir() not in logs.text, logs.text
    assert "medxai-upload" not in logs.text


# -- DICOM datasets ------------------------------------------------------------------------------------------------
def test_folders_and_manifests_of_dicom_files_are_datasets(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for label in ("normal", "tumour"):
        for index in range(3):
            pixels = rng.integers(0, 4000, size=(16, 20)).astype(np.uint16)
            name = f"{label}/scan {index}.dcm"
            make_dicom(tmp_path / "folder" / name, pixels, WindowCenter="2000", WindowWidth="4000",
                       photometric="MONOCHROME1" if index == 0 else "MONOCHROME2")
            rows.append(f"{name},{label}")
    (tmp_path / "folder" / "labels.csv").write_text("\n".join(rows))
    for source in (ImageFolderSource(tmp_path / "folder"), ManifestSource(tmp_path / "folder" / "labels.csv")):
        assert source.label_names == ["normal", "tumour"]
        records = [record for record in source.records() if record.id.endswith(".dcm")]
        assert len(records) == 6
        sample = source.load(records[1])
        assert sample.image.dtype == np.float32 and sample.image.shape == (16, 20)
        assert sample.meta["format"] == "DICOM" and sample.id == records[1].id
        assert not {"Doe^Jane", "PID-0042-XYZ", "19710203"} & {str(value) for value in sample.meta.values()}


# -- Secondary Capture ---------------------------------------------------------------------------------------------
def test_secondary_capture_references_the_source_study_and_series_without_patient_data(tmp_path):
    pixels = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40)
    source = make_dicom(tmp_path / "src.dcm", pixels, StudyDate="20240102", LossyImageCompression="01")
    overlay = np.random.default_rng(1).integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
    written = write_secondary_capture(overlay, source, tmp_path / "out" / "sc.dcm", description="gradcam overlay")
    sc, original = pydicom.dcmread(written), pydicom.dcmread(source)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID
    assert sc.SOPInstanceUID != original.SOPInstanceUID and sc.SeriesInstanceUID != original.SeriesInstanceUID
    assert sc.StudyInstanceUID == original.StudyInstanceUID
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and "gradcam overlay" in sc.DerivationDescription
    reference = sc.SourceImageSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (original.SOPClassUID,
                                                                                    original.SOPInstanceUID)
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    series = sc.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == original.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert (sc.PatientName, sc.PatientID, sc.PatientBirthDate, sc.AccessionNumber, sc.StudyDate) == ("",) * 5
    assert sc.LossyImageCompression == "01"  # derived from a lossy source
    np.testing.assert_array_equal(sc.pixel_array, overlay)
    assert read_image(written).shape == (30, 40, 3)  # and medxai reads it back

    copied = pydicom.dcmread(write_secondary_capture(overlay, source, tmp_path / "copy.dcm", copy_patient=True))
    assert (copied.PatientName, copied.PatientID, copied.StudyDate) == ("Doe^Jane", "PID-0042-XYZ", "20240102")


@pytest.mark.realdata
def test_secondary_capture_of_a_multi_frame_source_names_the_frame(data_dir, tmp_path):
    source = data_dir / "dicom" / "nibabel-tests" / "philips_mprage.dcm.gz"
    sc = pydicom.dcmread(write_secondary_capture(np.zeros((256, 256, 3), np.uint8), source, tmp_path / "sc.dcm"))
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 89  # the middle frame read_image used, 1-based
    assert sc.StudyInstanceUID == _dataset(source).StudyInstanceUID


def test_is_dicom_file_judges_by_content(tmp_path):
    source = make_dicom(tmp_path / "scan.png", np.zeros((4, 4), np.uint16))  # DICOM with a misleading name
    shutil.copy(source, tmp_path / "noextension")
    (tmp_path / "text.dcm").write_text("not dicom")
    assert is_dicom_file(tmp_path / "scan.png") and is_dicom_file(tmp_path / "noextension")
    assert not is_dicom_file(tmp_path / "text.dcm") and not is_dicom_file(tmp_path / "missing.dcm")
    assert read_image(tmp_path / "scan.png").dtype == np.float32
