"""DICOM at the boundary: one frame of a DICOM file -> an array with the intensities a radiologist would see.

The pipeline follows the DICOM grayscale display chain (PS3.3 C.11 and PS3.4 N.2), as torchxrayvision's
``read_xray_dcm`` does for radiographs:

1. **Decode** the stored values of one frame (pydicom 3, with pylibjpeg's libjpeg, OpenJPEG and RLE plugins for the
   compressed transfer syntaxes: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE; Pillow as a second
   JPEG/J2K decoder). Unsigned values above *Bits Stored* are masked off.
2. **Modality transform**: the Modality LUT Sequence, else *Rescale Slope/Intercept* (for enhanced multi-frame
   objects, from the frame's *Pixel Value Transformation Sequence*, per-frame before shared), giving HU for CT.
3. **VOI transform** (``window``): ``"header"`` applies the VOI LUT Sequence, else the first *Window Center/Width*
   (the frame's *Frame VOI LUT Sequence* for enhanced objects) with its *VOI LUT Function* (LINEAR, LINEAR_EXACT,
   SIGMOID), else the full range; ``"full"`` maps the frame's own minimum..maximum; ``(center, width)`` applies that
   fixed linear window (e.g. ``(40, 400)`` for CT soft tissue).
4. **MONOCHROME1** images (white = low values, usual for computed radiography) are inverted, with a log line, so
   that bright always means dense: bones are white.

Grey images come out as float32 ``(H, W)`` in ``[0, 1]`` (0 black, 1 white), which ``PreprocessConfig.intensity =
"dtype"`` keeps exactly and ``"auto"`` percentile-stretches like any other non-8-bit image. Colour images (RGB, YBR_*
converted to RGB, PALETTE COLOR through its lookup table) come out as ``(H, W, 3)`` uint8 (uint16 when stored with more
than 8 bits). A multi-frame object gives one frame: the middle one by default (``frame=`` chooses).

Rejected with :class:`~medxai.errors.UnsupportedDicomError`: objects without pixel data (structured reports,
waveforms, presentation states, DICOMDIRs...), segmentations, unsupported photometric interpretations. Before anything
is decoded, the image attributes that size the pixel data (Rows, Columns, NumberOfFrames, SamplesPerPixel,
BitsAllocated, BitsStored, PixelRepresentation, PlanarConfiguration) are checked to be present, numbers and in range,
the sizes they imply against :class:`~medxai.data.readers.limits.ReadLimits`, native pixel data against its length,
and a compressed frame's own header (:mod:`medxai.data.readers.codestreams`) against the DICOM header and the limits.
A deflated data set is inflated within the limit on decoded bytes.

No patient data leaves this module: the info dict holds only technical facts (modality, photometric interpretation,
transfer syntax, frame, window), pydicom's warnings (which may quote element values) are swallowed and only counted,
and error messages are scrubbed of the file's patient and study identifiers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data.readers._reasons import error_text
from medxai.data.readers.codestreams import (
    CodestreamError,
    FrameHeader,
    check_end_marker,
    j2k_frame_header,
    jpeg_frame_header,
    rle_segment_offsets,
)
from medxai.data.readers.dicom_terms import PHOTOMETRIC_INTERPRETATIONS, known_term
from medxai.data.readers.limits import (
    ReadLimits,
    check_decoded_bytes,
    check_image_size,
    check_volume_size,
    inflate_limited,
    resolve,
)
from medxai.errors import ConfigError, ImageTooLargeError, InvalidImageError, UnsupportedDicomError

__all__ = [
    "looks_like_dicom",
    "read_dicom",
    "read_dicom_dataset",
    "probe_dicom",
    "default_frame_index",
    "HEADER_BYTES",
    "WINDOW_MODES",
    "PHI_KEYWORDS",
    "phi_values",
    "quiet_pydicom",
]

logger = logging.getLogger(__name__)

#: Named ``window`` choices; a ``(center, width)`` pair is the third kind.
WINDOW_MODES = ("header", "full")

#: Attributes that identify a patient, a visit or the people and places involved (after the DICOM basic
#: de-identification profile, PS3.15 Table E.1-1, restricted to what test and real files commonly carry). medxai never
#: writes their values, except the study/series references a Secondary Capture needs (see ``dicom_sc``).
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")

# SOP classes that are never pictures of the patient, whether or not they carry a Pixel Data element.
_NON_IMAGE_SOP_PREFIXES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation (labels, not an image)"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "radiotherapy dose grid"),
    ("1.2.840.10008.1.3.10", "media directory (DICOMDIR)"),
)

_PREAMBLE_LENGTH = 128
#: Most bytes of a compressed (gzip or deflate) DICOM file inflated to read its header alone: real headers, private
#: sequences included, stay far below.
HEADER_BYTES = 4 * 2**20
_VALID_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


# -- recognising -------------------------------------------------------------------------------------------------
def looks_like_dicom(head: bytes) -> bool:
    """Tell from a file's first bytes (at least 132 for the preamble check) whether it is DICOM.

    A Part 10 file has ``DICM`` after a 128-byte preamble. Older files start directly with a data element: group
    0x0002 or 0x0008 (either byte order) followed by a valid explicit VR, or by a plausible implicit-VR length.
    """
    if len(head) >= _PREAMBLE_LENGTH + 4 and head[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + 4] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, element = struct.unpack(f"{order}HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x0100:
            continue
        if head[4:6] in _VALID_VRS:
            return True
        (length,) = struct.unpack(f"{order}I", head[4:8])
        if order == "<" and length < 0x10000 and element in (0x0000, 0x0005, 0x0008, 0x0016, 0x0018):
            return True
    return False


def default_frame_index(frames: int) -> int:
    """The frame a multi-frame object gives when none is asked for: the middle one (``frames // 2``)."""
    return max(0, int(frames)) // 2


# -- reading -----------------------------------------------------------------------------------------------------
def read_dicom_dataset(path: str | Path, data: bytes | None = None, *, stop_before_pixels: bool = False,
                       limits: ReadLimits | None = None) -> Any:
    """Parse a DICOM file (or its bytes) into a ``pydicom.Dataset``, with pydicom's warnings counted, not shown.

    A data set in the Deflated Explicit VR Little Endian transfer syntax is inflated here, at most
    ``limits.max_decoded_bytes`` (pydicom would inflate it whole, however large), and only its first
    :data:`HEADER_BYTES` when ``stop_before_pixels``.

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        data: the file's content when already in memory (e.g. inflated from ``.dcm.gz``, or an upload).
        stop_before_pixels: parse the header only.
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.

    Raises:
        InvalidImageError: the content cannot be parsed as DICOM.
        ImageTooLargeError: a deflated data set inflates past the limit.
    """
    import pydicom

    with quiet_pydicom(path), _opened(path, data) as stream:
        try:
            inflated = _inflated_data_set(path, stream, limits, HEADER_BYTES if stop_before_pixels else None)
            stream.seek(0)
            dataset = pydicom.dcmread(inflated or stream, force=True, stop_before_pixels=stop_before_pixels)
        except InvalidImageError:
            raise
        except MemoryError:
            raise InvalidImageError(path, "not enough memory to parse this DICOM file") from None
        except Exception as error:  # noqa: BLE001 - pydicom reports damaged files with many types
            raise InvalidImageError(path, f"unreadable DICOM data: {_short(error)}") from None
    if len(dataset) == 0:
        raise InvalidImageError(path, "unreadable DICOM data: no data elements")
    if inflated is not None:
        dataset.file_meta = inflated.file_meta
        _check_header_complete(path, dataset, stop_before_pixels and len(inflated.getbuffer()) >= HEADER_BYTES)
    _infer_transfer_syntax(dataset)
    return dataset


@contextlib.contextmanager
def _opened(path: str | Path, data: bytes | None) -> Iterator[Any]:
    if data is not None:
        yield io.BytesIO(data)
        return
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        raise InvalidImageError(path, f"cannot be read ({error.strerror or error})") from None
    with handle:
        yield handle


class _InflatedDataSet(io.BytesIO):
    """A deflated file's data set, inflated within the limit, with the file meta information read before it."""

    def __init__(self, content: bytes, file_meta: Any) -> None:
        super().__init__(content)
        self.file_meta = file_meta


def _inflated_data_set(path: str | Path, stream: Any, limits: ReadLimits | None, prefix: int | None
                       ) -> _InflatedDataSet | None:
    """The data set of a Deflated Explicit VR Little Endian file, inflated at most ``limits.max_decoded_bytes`` (or
    its first ``prefix`` bytes); None for any other transfer syntax (pydicom reads those as they are)."""
    from pydicom import filereader
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        filereader.read_preamble(stream, True)
        # pydicom's own reading of the file meta group, which dcmread runs before it inflates the rest unbounded
        file_meta = filereader._read_file_meta_info(stream)
    except Exception:  # noqa: BLE001 - dcmread reports what is wrong with the file
        return None
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    return _InflatedDataSet(inflate_limited(path, stream.read(), limits, prefix=prefix), file_meta)


def _infer_transfer_syntax(dataset: Any) -> None:
    """Give a file without File Meta Information the transfer syntax its elements were read with (decoders need it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(dataset, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def read_dicom(
    path: str | Path,
    *,
    data: bytes | None = None,
    window: str | Sequence[float] = "header",
    frame: int | None = None,
    limits: ReadLimits | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one frame of a DICOM image (see the module docstring for every step).

    Args:
        path: the file (also used in messages).
        data: the file's bytes, when already in memory.
        window: ``"header"`` (default), ``"full"`` or a ``(center, width)`` pair in modality units.
        frame: frame index of a multi-frame object (negative counts from the end); None takes the middle frame.
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.

    Returns:
        The array (float32 ``(H, W)`` in [0, 1] for grey; ``(H, W, 3)`` uint8/uint16 RGB for colour) and an info dict
        ``{"format": "DICOM", "mode", "original_size": [W, H], "modality", "body_part", "sop_class",
        "transfer_syntax", "frames", "frame", "window", "inverted"}`` with no patient data. ``modality`` and
        ``body_part`` are the header's values (upper case) for the domain checks: never print them, name them only
        through :func:`medxai.data.readers.dicom_terms.known_term`.

    Raises:
        UnsupportedDicomError: no pixel data, a non-image object, an unsupported photometric interpretation.
        ImageTooLargeError: dimensions or decoded bytes beyond the limits, in the header or in a compressed frame.
        InvalidImageError: unreadable, truncated or undecodable data, a missing or absurd image attribute, a
            compressed frame whose own header cannot be read or disagrees with the DICOM header; a frame index out
            of range.
        ConfigError: an invalid ``window`` option.
    """
    window = _check_window_option(window)
    limits = resolve(limits)
    dataset = read_dicom_dataset(path, data, limits=limits)
    with quiet_pydicom(path):
        try:
            return _read_frame(path, dataset, window, frame, limits)
        except (InvalidImageError, ConfigError):
            raise
        except MemoryError:
            raise InvalidImageError(path, "not enough memory to decode this DICOM image") from None
        except Exception as error:  # noqa: BLE001 - a damaged header surfaces as any type on first access
            logger.debug("%s: unexpected %s reading the image attributes", path, type(error).__name__)
            raise InvalidImageError(path, f"invalid DICOM image attributes ({type(error).__name__})") from None


def probe_dicom(path: str | Path, data: bytes | None = None, *, limits: ReadLimits | None = None,
                prefix: bool = False) -> dict[str, Any]:
    """The stored size and photometric interpretation from the header only (no pixel decoding), checked as a read
    would check them.

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        data: the file's bytes, or (``prefix``) its first :data:`HEADER_BYTES` bytes.
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.
        prefix: ``data`` may be cut short of the whole file (the start of an inflated ``.dcm.gz``).

    Returns:
        ``{"format": "DICOM", "mode", "original_size": [W, H], "frames", "decoded_bytes"}``: ``mode`` is the
        photometric interpretation when it is a defined term (else ``"unknown"``), ``decoded_bytes`` about the most
        memory decoding one frame takes.

    Raises:
        InvalidImageError: the header cannot be parsed, or an image attribute is missing or absurd.
        ImageTooLargeError: the header claims more than the limits allow.
    """
    limits = resolve(limits)
    dataset = read_dicom_dataset(path, data, stop_before_pixels=True, limits=limits)
    _check_header_complete(path, dataset, prefix and data is not None and len(data) >= HEADER_BYTES)
    with quiet_pydicom(path):
        try:
            geometry = _geometry(path, dataset, limits)
            mode = known_term(dataset.get("PhotometricInterpretation"), PHOTOMETRIC_INTERPRETATIONS) or "unknown"
        except InvalidImageError:
            raise
        except Exception as error:  # noqa: BLE001
            logger.debug("%s: unexpected %s reading the image attributes", path, type(error).__name__)
            raise InvalidImageError(path, f"DICOM header without a usable image size ({type(error).__name__})") \
                from None
    decoded = geometry.decoded_bytes
    if _is_deflated(dataset):  # the inflated data set holds every frame, natively
        decoded += geometry.frame_bytes * geometry.frames
    return {"format": "DICOM", "mode": mode, "original_size": [geometry.columns, geometry.rows],
            "frames": geometry.frames, "decoded_bytes": decoded}


def _check_header_complete(path: str | Path, dataset: Any, cut: bool) -> None:
    """A header read from the first :data:`HEADER_BYTES` inflated bytes must hold the image attributes."""
    if cut and "Rows" not in dataset:
        raise ImageTooLargeError(path, f"DICOM header larger than the {HEADER_BYTES} bytes read of compressed data "
                                       "(its image attributes lie beyond): not supported")


def _is_deflated(dataset: Any) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return bool(meta is not None and getattr(meta.get("TransferSyntaxUID"), "is_deflated", False))


def phi_values(dataset: Any) -> set[str]:
    """Every non-empty value of a :data:`PHI_KEYWORDS` attribute in ``dataset`` (top level), as text.

    Person names also give their ``^``-separated components of five characters or more. Used to scrub error
    messages, which may quote the values they choked on.
    """
    with quiet_pydicom("<dataset>"):
        return _phi_values(dataset)


def _phi_values(dataset: Any) -> set[str]:
    values: set[str] = set()
    for keyword in PHI_KEYWORDS:
        try:
            value = dataset.get(keyword)
        except Exception:  # noqa: BLE001 - an unparseable value cannot be quoted either
            continue
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for item in items:
            text = str(item).strip()
            if len(text) >= 3:
                values.add(text)
                values.update(part for part in text.split("^") if len(part.strip()) >= 5)
    return values


# -- machinery ---------------------------------------------------------------------------------------------------
def _read_frame(
    path: str | Path, dataset: Any, window: str | tuple[float, float], frame: int | None, limits: ReadLimits
) -> tuple[np.ndarray, dict[str, Any]]:
    sop_class, sop_name = _sop_class(dataset)
    _check_is_image(path, dataset, sop_class, sop_name)
    geometry = _geometry(path, dataset, limits)
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in _GREY + _COLOUR + ("PALETTE COLOR",):
        named = known_term(photometric, PHOTOMETRIC_INTERPRETATIONS)
        what = f"photometric interpretation {named}" if named else "a missing or unknown photometric interpretation"
        raise UnsupportedDicomError(path, f"{what} is not supported")
    index = _frame_index(path, frame, geometry.frames)
    transfer_syntax = _transfer_syntax_name(dataset)
    _check_pixel_data(path, dataset, index, geometry, photometric, limits)
    stored = _decode(path, dataset, index, transfer_syntax)

    info: dict[str, Any] = {
        "format": "DICOM",
        "mode": photometric,
        "original_size": [geometry.columns, geometry.rows],
        "modality": str(dataset.get("Modality", "") or "").strip().upper(),
        "body_part": str(dataset.get("BodyPartExamined", "") or "").strip().upper(),
        # (0028,0301) Burned In Annotation: "YES" when the pixels carry text (the shortcut alarm counts the border)
        "burned_in_annotation": str(dataset.get("BurnedInAnnotation", "") or "").strip().upper() == "YES",
        "sop_class": sop_name,
        "transfer_syntax": transfer_syntax,
        "frames": geometry.frames,
        "frame": index,
        "window": None,
        "inverted": False,
    }
    if photometric in _GREY:
        if stored.ndim != 2:
            raise InvalidImageError(path, f"grey DICOM frame decoded to shape {stored.shape}, expected (rows, columns)")
        values = _mask_bits_stored(path, dataset, stored)
        modality_values = _modality_transform(dataset, values, index)
        display, info["window"] = _voi_transform(path, dataset, modality_values, index, window)
        if photometric == "MONOCHROME1":
            display = 1.0 - display
            info["inverted"] = True
            logger.info("%s: MONOCHROME1 (white = low values) inverted so that bright means dense", path)
        return display.astype(np.float32), info
    colour = _to_rgb(path, dataset, stored, photometric)
    return colour, info


def _check_window_option(window: str | Sequence[float]) -> str | tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOW_MODES:
            raise ConfigError(f"DICOM window must be one of {WINDOW_MODES} or (center, width), got {window!r}")
        return window
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ConfigError(f"DICOM window must be one of {WINDOW_MODES} or (center, width), got {window!r}") from None
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ConfigError(f"DICOM window width must be a positive number, got center {center}, width {width}")
    return (center, width)


def _sop_class(dataset: Any) -> tuple[str, str]:
    """The SOP Class UID and its registered name; an unregistered one is not repeated (a header may hold anything)."""
    try:
        uid = dataset.get("SOPClassUID") or dataset.get("MediaStorageSOPClassUID") or ""
        if not uid and hasattr(dataset, "file_meta"):
            uid = dataset.file_meta.get("MediaStorageSOPClassUID", "") or ""
        return str(uid), _registered_name(uid, "unknown SOP class")
    except Exception:  # noqa: BLE001
        return "", "unknown SOP class"


def _registered_name(uid: Any, unknown: str) -> str:
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(str(uid).strip())
    return entry[0] if entry else unknown


def _check_is_image(path: str | Path, dataset: Any, sop_class: str, sop_name: str) -> None:
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES:
        if sop_class.startswith(prefix):
            raise UnsupportedDicomError(path, f"DICOM {kind} ({sop_name}), not an image")
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        raise UnsupportedDicomError(path, f"DICOM object without pixel data ({sop_name}): nothing to classify")


# -- the image attributes, validated before anything is decoded ------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """The Image Pixel module's numbers, each checked (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame's stored values (1-bit data packed)."""
        return -(-self.rows * self.columns * self.samples * self.bits_allocated // 8)

    @property
    def decoded_bytes(self) -> int:
        """About the most memory decoding one frame takes: the stored values, then the display chain's float64
        working copies (measured on grey frames: about 28 bytes per pixel beside the stored values)."""
        return self.frame_bytes + self.rows * self.columns * self.samples * _WORKING_BYTES_PER_SAMPLE


_WORKING_BYTES_PER_SAMPLE = 28
_MAX_FRAMES = 2**31 - 1  # the largest Integer String


def _geometry(path: str | Path, dataset: Any, limits: ReadLimits) -> _Geometry:
    """Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated, BitsStored, PixelRepresentation and
    PlanarConfiguration: present where required, numbers, in range; then the size limits.

    Raises:
        InvalidImageError: a missing, non-numeric or out-of-range value (never repeated: a header may hold anything).
        ImageTooLargeError: more pixels, voxels or decoded bytes than ``limits`` allow.
    """
    rows = _header_integer(path, dataset, "Rows", 0, 0xFFFF)
    columns = _header_integer(path, dataset, "Columns", 0, 0xFFFF)
    frames = _header_integer(path, dataset, "NumberOfFrames", 1, _MAX_FRAMES, default=1)
    samples = _header_integer(path, dataset, "SamplesPerPixel", 1, 3, default=1)
    if samples == 2:
        raise InvalidImageError(path, "DICOM SamplesPerPixel must be 1 or 3")
    bits = _header_integer(path, dataset, "BitsAllocated", 1, 64)
    if bits != 1 and bits % 8:
        raise InvalidImageError(path, "DICOM BitsAllocated must be 1 or a multiple of 8")
    if not _holds_float_pixels(dataset):  # integer values; float pixel data has neither attribute
        _header_integer(path, dataset, "BitsStored", 1, bits)
        _header_integer(path, dataset, "PixelRepresentation", 0, 1)
    if samples > 1:
        _header_integer(path, dataset, "PlanarConfiguration", 0, 1, default=0)
    check_image_size(path, columns, rows, limits)
    check_volume_size(path, (frames, rows, columns, samples), limits)
    geometry = _Geometry(rows, columns, frames, samples, bits)
    check_decoded_bytes(path, geometry.decoded_bytes, "decoding one DICOM frame", limits)
    return geometry


def _holds_float_pixels(dataset: Any) -> bool:
    """Float or Double Float Pixel Data, or (header alone, pixel data not read) a Parametric Map, which holds them."""
    if any(keyword in dataset for keyword in _PIXEL_KEYWORDS[1:]):
        return True
    return "PixelData" not in dataset and str(dataset.get("SOPClassUID", "")) == _PARAMETRIC_MAP


_PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _header_integer(path: str | Path, dataset: Any, keyword: str, low: int, high: int,
                    default: int | None = None) -> int:
    """One integer attribute of the header, checked; ``default`` when absent (None: required)."""
    try:
        value = dataset.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        raise InvalidImageError(path, f"DICOM {keyword} is unreadable") from None
    if value is None or value == "":
        if default is None:
            raise InvalidImageError(path, f"DICOM image without {keyword}")
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        raise InvalidImageError(path, f"DICOM {keyword} holds several values")
    try:
        number = int(value)
        exact = number == float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidImageError(path, f"DICOM {keyword} is not a number") from None
    if not exact or not low <= number <= high:
        raise InvalidImageError(path, f"DICOM {keyword} is out of range (expected a whole number from {low} to "
                                      f"{high})")
    return number


def _frame_index(path: str | Path, frame: int | None, frames: int) -> int:
    if frame is None:
        return default_frame_index(frames)
    index = int(frame) + frames if int(frame) < 0 else int(frame)
    if not 0 <= index < frames:
        raise InvalidImageError(path, f"frame {frame} requested but the file has {frames} frame(s)")
    return index


def _transfer_syntax_name(dataset: Any) -> str:
    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        return "implicit VR little endian (no file meta)"
    return _registered_name(uid, "an unregistered transfer syntax")


def _decode(path: str | Path, dataset: Any, index: int, transfer_syntax: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        array = pixel_array(dataset, index=index)
    except MemoryError:
        raise InvalidImageError(path, "not enough memory to decode this DICOM image") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    # Decoders and plugins raise many types for bad data, and the Rust ones (pylibjpeg-rle) panic with pyo3's
    # PanicException, a BaseException: found by the fuzz test, caught here like any decoding failure.
    except BaseException as error:  # noqa: BLE001
        reason = f"cannot decode the pixel data ({transfer_syntax}): {_short(error, dataset)}"
        raise InvalidImageError(path, reason) from None
    return np.asarray(array)


def _mask_bits_stored(path: str | Path, dataset: Any, values: np.ndarray) -> np.ndarray:
    """Clear bits above Bits Stored in unsigned data (some writers leave overlay or garbage bits there)."""
    if not np.issubdtype(values.dtype, np.unsignedinteger):
        return values
    bits_stored = int(dataset.get("BitsStored", 0) or 0)
    if not 0 < bits_stored < values.dtype.itemsize * 8:
        return values
    mask = (1 << bits_stored) - 1
    if values.size and int(values.max()) > mask:
        logger.debug("%s: values above Bits Stored = %d masked off", path, bits_stored)
        return values & np.asarray(mask, dtype=values.dtype)
    return values


def _functional_group_item(dataset: Any, index: int, sequence: str) -> Any | None:
    """The first item of ``sequence`` in the frame's per-frame functional group, else in the shared group."""
    groups = []
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _modality_transform(dataset: Any, values: np.ndarray, index: int) -> np.ndarray:
    """Stored values -> modality values (HU for CT), float64."""
    if dataset.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(values, dataset), dtype=np.float64)
    item = _functional_group_item(dataset, index, "PixelValueTransformationSequence") or dataset
    slope = _first_number(item.get("RescaleSlope"))
    intercept = _first_number(item.get("RescaleIntercept"))
    result = values.astype(np.float64)
    if slope is not None and slope != 0 and slope != 1:
        result *= slope
    if intercept:
        result += intercept
    return result


def _voi_transform(
    path: str | Path, dataset: Any, values: np.ndarray, index: int, window: str | tuple[float, float]
) -> tuple[np.ndarray, str]:
    """Modality values -> display values in [0, 1]; also says which transform was used."""
    if not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
        values = np.nan_to_num(values, nan=finite.min() if finite.size else 0.0, posinf=0.0, neginf=0.0)
    if isinstance(window, tuple):
        return _linear_window(values, *window), f"fixed window {window[0]:g}/{window[1]:g}"
    if window == "header":
        lut = _voi_lut(path, dataset, values)
        if lut is not None:
            return lut, "header VOI LUT"
        item = _functional_group_item(dataset, index, "FrameVOILUTSequence") or dataset
        center, width = _first_number(item.get("WindowCenter")), _first_number(item.get("WindowWidth"))
        function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if center is not None and width is not None and width > 0:
            if function == "SIGMOID":
                display = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
            elif function == "LINEAR_EXACT":
                display = np.clip((values - center) / width + 0.5, 0.0, 1.0)
            else:
                display = _linear_window(values, center, width)
            return display, f"header window {center:g}/{width:g} {function}"
        logger.debug("%s: no usable window in the header; using the full range", path)
        return _full_range(values), "full range (no window in the header)"
    return _full_range(values), "full range"


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR window (PS3.3 C.11.2.1.2.1) with output range [0, 1]; widths below 1 act as 1."""
    width = max(width, 1.0 + 1e-9)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _full_range(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _voi_lut(path: str | Path, dataset: Any, values: np.ndarray) -> np.ndarray | None:
    sequence = dataset.get("VOILUTSequence")
    if not sequence:
        return None
    try:
        from pydicom.pixels import apply_voi

        descriptor = sequence[0].LUTDescriptor
        bits = int(descriptor[2])
        mapped = apply_voi(np.rint(values).astype(np.int64), dataset, index=0)
        return np.clip(np.asarray(mapped, dtype=np.float64) / float((1 << bits) - 1), 0.0, 1.0)
    except Exception:  # noqa: BLE001 - a broken LUT falls back to the window, as viewers do
        logger.debug("%s: unusable VOI LUT Sequence; trying the window instead", path)
        return None


def _to_rgb(path: str | Path, dataset: Any, stored: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        if stored.ndim != 2:
            raise InvalidImageError(path, f"palette DICOM frame decoded to shape {stored.shape}")
        from pydicom.pixels import apply_color_lut

        try:
            rgb = np.asarray(apply_color_lut(stored, dataset))
        except Exception as error:  # noqa: BLE001
            reason = f"unusable palette colour lookup table: {_short(error, dataset)}"
            raise UnsupportedDicomError(path, reason) from None
        if rgb.dtype == np.uint16 and not np.any(rgb & 0xFF):
            return (rgb >> 8).astype(np.uint8)  # 8-bit colours stored in the high byte of 16-bit entries
        return rgb
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise InvalidImageError(path, f"colour DICOM frame decoded to shape {stored.shape}, expected (rows, cols, 3)")
    if stored.dtype.itemsize == 1:
        return stored.astype(np.uint8, copy=False)
    if np.issubdtype(stored.dtype, np.integer) and stored.min() >= 0 and stored.max() <= 0xFFFF:
        return stored.astype(np.uint16)
    return stored.astype(np.float32)


# -- the pixel data against the header, before decoding ------------------------------------------------------------
# Encapsulated transfer syntaxes whose frame header medxai can read, by the parser of that header.
_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                           "1.2.840.10008.1.2.4.203"})
_RLE_SYNTAX = "1.2.840.10008.1.2.5"
_FRAME_HEADERS: dict[str, Callable[[bytes], FrameHeader]] = {
    **{uid: jpeg_frame_header for uid in _JPEG_SYNTAXES}, **{uid: j2k_frame_header for uid in _J2K_SYNTAXES}}


def _check_pixel_data(path: str | Path, dataset: Any, index: int, geometry: _Geometry, photometric: str,
                      limits: ReadLimits) -> None:
    """Refuse pixel data that would make a decoder allocate more than the header says, or read past its end.

    Native data must hold every frame the header announces. A compressed frame's own header (JPEG SOF, JPEG 2000
    SIZ, RLE segment table) is read to its end and must agree with the DICOM header: decoders allocate what the
    codestream claims, so a small header over a huge codestream would otherwise bypass the limits. A frame whose
    header cannot be read is refused, never decoded blind.
    """
    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not getattr(uid, "is_encapsulated", False):
        _check_native_length(path, dataset, geometry, photometric)
        return
    if "PixelData" not in dataset:
        return
    from pydicom.encaps import get_frame

    try:
        fragment = get_frame(dataset.PixelData, index, number_of_frames=geometry.frames)
    except Exception as error:  # noqa: BLE001
        raise InvalidImageError(path, f"corrupt encapsulated pixel data: {_short(error, dataset)}") from None
    try:
        if str(uid) == _RLE_SYNTAX:
            _check_rle_segments(path, fragment, geometry)
            return
        parse = _FRAME_HEADERS.get(str(uid))
        if parse is None:
            raise UnsupportedDicomError(path, f"compressed pixel data in {_transfer_syntax_name(dataset)} cannot be "
                                              "checked before decoding: not supported")
        header = parse(fragment)
        check_end_marker(fragment)
    except CodestreamError as error:
        raise InvalidImageError(path, f"compressed frame cannot be read: {error}") from None
    _check_frame_header(path, header, geometry, limits)


def _check_native_length(path: str | Path, dataset: Any, geometry: _Geometry, photometric: str) -> None:
    keyword = next(keyword for keyword in _PIXEL_KEYWORDS if keyword in dataset)
    expected = geometry.frame_bytes * geometry.frames
    if photometric == "YBR_FULL_422" and geometry.samples == 3:
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    available = len(dataset[keyword].value or b"")
    if available < expected:
        raise InvalidImageError(path, f"truncated DICOM pixel data: {available} of {expected} bytes")


def _check_rle_segments(path: str | Path, fragment: bytes, geometry: _Geometry) -> None:
    segments = len(rle_segment_offsets(fragment))
    expected = geometry.samples * max(1, geometry.bits_allocated // 8)
    if segments != expected:
        raise InvalidImageError(path, f"RLE frame has {segments} segments, the header implies {expected} "
                                      "(samples per pixel x bytes per sample)")


def _check_frame_header(path: str | Path, header: FrameHeader, geometry: _Geometry, limits: ReadLimits) -> None:
    check_image_size(path, header.width, header.height, limits)
    if header.width > geometry.columns or header.height > geometry.rows:
        raise InvalidImageError(path, f"compressed frame claims {header.width}x{header.height} pixels, larger than "
                                      f"the header's {geometry.columns}x{geometry.rows}")
    if header.components != geometry.samples:
        raise InvalidImageError(path, f"compressed frame has {header.components} components, the header says "
                                      f"SamplesPerPixel {geometry.samples}")
    if header.precision > max(geometry.bits_allocated, 8):
        raise InvalidImageError(path, f"compressed frame has {header.precision}-bit samples, more than the header's "
                                      f"BitsAllocated {geometry.bits_allocated}")


# -- messages without patient data -----------------------------------------------------------------------------------
def _short(error: BaseException, dataset: Any | None = None, limit: int = 240) -> str:
    text = error_text(error, limit=100_000)
    if dataset is not None:
        for value in sorted(phi_values(dataset), key=len, reverse=True):
            text = text.replace(value, "<redacted>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DropRecords(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False


@contextlib.contextmanager
def quiet_pydicom(path: str | Path) -> Iterator[None]:
    """Keep pydicom from repeating element values while medxai works on a file.

    pydicom reports malformed values (a birth date written ``1990/01/``, a name with a bad character) by quoting
    them, both as a warning and on its ``pydicom`` loggers: patient data would reach the user's logs and terminal.
    Inside this context value validation is off, pydicom's warnings are caught and its log records dropped; only
    their number is logged (debug). Not thread-safe, like pydicom's own validation setting.
    """
    from pydicom import config

    names = ["pydicom"] + [name for name in logging.root.manager.loggerDict if name.startswith("pydicom.")]
    dropper = _DropRecords()
    for name in names:
        logging.getLogger(name).addFilter(dropper)
    try:
        with warnings.catch_warnings(record=True) as caught, config.disable_value_validation():
            warnings.simplefilter("always")
            yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(dropper)
    if caught or dropper.count:
        logger.debug("%s: pydicom reported %d warning(s) and %d log record(s), withheld: they may quote patient "
                     "data", path, len(caught), dropper.count)
