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
waveforms, presentation states, DICOMDIRs...), segmentations, unsupported photometric interpretations. Sizes are checked
against :mod:`medxai.data.readers.limits` before anything is decoded, including the size a JPEG or JPEG 2000 codestream claims.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data.readers.limits import check_image_size, check_volume_size
from medxai.errors import ConfigError, InvalidImageError, UnsupportedDicomError

__all__ = [
    "looks_like_dicom",
    "read_dicom",
    "read_dicom_dataset",
    "probe_dicom",
    "default_frame_index",
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
def read_dicom_dataset(path: str | Path, data: bytes | None = None, *, stop_before_pixels: bool = False) -> Any:
    """Parse a DICOM file (or its bytes) into a ``pydicom.Dataset``, with pydicom's warnings counted, not shown.

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        data: the file's content when already in memory (e.g. inflated from ``.dcm.gz``).
        stop_before_pixels: parse the header only.

    Raises:
        InvalidImageError: the content cannot be parsed as DICOM.
    """
    import pydicom

    source: Any = io.BytesIO(data) if data is not None else str(path)
    with quiet_pydicom(path):
        try:
            dataset = pydicom.dcmread(source, force=True, stop_before_pixels=stop_before_pixels)
        except MemoryError:
            raise InvalidImageError(path, "not enough memory to parse this DICOM file") from None
        except Exception as error:  # noqa: BLE001 - pydicom reports damaged files with many types
            raise InvalidImageError(path, f"unreadable DICOM data: {_short(error)}") from None
    if len(dataset) == 0:
        raise InvalidImageError(path, "unreadable DICOM data: no data elements")
    _infer_transfer_syntax(dataset)
    return dataset


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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one frame of a DICOM image (see the module docstring for every step).

    Args:
        path: the file (also used in messages).
        data: the file's bytes, when already in memory.
        window: ``"header"`` (default), ``"full"`` or a ``(center, width)`` pair in modality units.
        frame: frame index of a multi-frame object (negative counts from the end); None takes the middle frame.

    Returns:
        The array (float32 ``(H, W)`` in [0, 1] for grey; ``(H, W, 3)`` uint8/uint16 RGB for colour) and an info dict
        ``{"format": "DICOM", "mode", "original_size": [W, H], "modality", "sop_class", "transfer_syntax",
        "frames", "frame", "window", "inverted"}`` with no patient data.

    Raises:
        UnsupportedDicomError: no pixel data, a non-image object, an unsupported photometric interpretation.
        ImageTooLargeError: dimensions beyond the limits.
        InvalidImageError: unreadable, truncated or undecodable data; a frame index out of range.
        ConfigError: an invalid ``window`` option.
    """
    window = _check_window_option(window)
    dataset = read_dicom_dataset(path, data)
    with quiet_pydicom(path):
        try:
            return _read_frame(path, dataset, window, frame)
        except (InvalidImageError, ConfigError):
            raise
        except MemoryError:
            raise InvalidImageError(path, "not enough memory to decode this DICOM image") from None
        except Exception as error:  # noqa: BLE001 - a damaged header surfaces as any type on first access
            raise InvalidImageError(path, f"invalid DICOM image attributes: {_short(error, dataset)}") from None


def probe_dicom(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """The stored size and photometric interpretation from the header only (no pixel decoding).

    Raises:
        InvalidImageError: the header cannot be parsed or lacks Rows/Columns.
    """
    dataset = read_dicom_dataset(path, data, stop_before_pixels=True)
    with quiet_pydicom(path):
        try:
            rows, columns = int(dataset.Rows), int(dataset.Columns)
            mode = str(dataset.get("PhotometricInterpretation", "")).strip().upper() or "unknown"
            frames = _number_of_frames(dataset)
        except Exception as error:  # noqa: BLE001
            reason = f"DICOM header without a usable image size: {_short(error, dataset)}"
            raise InvalidImageError(path, reason) from None
    return {"format": "DICOM", "mode": mode, "original_size": [columns, rows], "frames": frames}


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
    path: str | Path, dataset: Any, window: str | tuple[float, float], frame: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    sop_class, sop_name = _sop_class(dataset)
    _check_is_image(path, dataset, sop_class, sop_name)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = _number_of_frames(dataset)
    check_image_size(path, columns, rows)
    check_volume_size(path, (frames, rows, columns, samples))
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GREY + _COLOUR + ("PALETTE COLOR",):
        raise UnsupportedDicomError(path, f"photometric interpretation {photometric or '(missing)'!r} is not supported")
    index = _frame_index(path, frame, frames)
    transfer_syntax = _transfer_syntax_name(dataset)
    _check_codestream_size(path, dataset, index, frames, rows, columns)
    stored = _decode(path, dataset, index, transfer_syntax)

    info: dict[str, Any] = {
        "format": "DICOM",
        "mode": photometric,
        "original_size": [columns, rows],
        "modality": str(dataset.get("Modality", "") or ""),
        "body_part": str(dataset.get("BodyPartExamined", "") or ""),
        "sop_class": sop_name,
        "transfer_syntax": transfer_syntax,
        "frames": frames,
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
    try:
        uid = dataset.get("SOPClassUID") or dataset.get("MediaStorageSOPClassUID") or ""
        if not uid and hasattr(dataset, "file_meta"):
            uid = dataset.file_meta.get("MediaStorageSOPClassUID", "") or ""
        name = uid.name if hasattr(uid, "name") and uid.name else str(uid)
        return str(uid), str(name) or "unknown SOP class"
    except Exception:  # noqa: BLE001
        return "", "unknown SOP class"


def _check_is_image(path: str | Path, dataset: Any, sop_class: str, sop_name: str) -> None:
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES:
        if sop_class.startswith(prefix):
            raise UnsupportedDicomError(path, f"DICOM {kind} ({sop_name}), not an image")
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        raise UnsupportedDicomError(path, f"DICOM object without pixel data ({sop_name}): nothing to classify")
    for keyword in ("Rows", "Columns"):
        if dataset.get(keyword) in (None, ""):
            raise InvalidImageError(path, f"DICOM image without {keyword}")


def _number_of_frames(dataset: Any) -> int:
    value = dataset.get("NumberOfFrames")
    try:
        frames = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    return max(frames, 1)


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
    return str(uid.name or uid)


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


# -- decompression bombs inside the pixel data ---------------------------------------------------------------------
def _check_codestream_size(
    path: str | Path, dataset: Any, index: int, frames: int, rows: int, columns: int
) -> None:
    """Refuse a JPEG / JPEG 2000 frame whose codestream claims more pixels than the header's Rows x Columns.

    Decoders allocate what the codestream says, not what the header says, so a small header over a huge codestream
    would otherwise bypass the size limits.
    """
    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not getattr(uid, "is_encapsulated", False) or "PixelData" not in dataset:
        return
    from pydicom.encaps import get_frame

    try:
        fragment = get_frame(dataset.PixelData, index, number_of_frames=frames)
    except Exception as error:  # noqa: BLE001
        raise InvalidImageError(path, f"corrupt encapsulated pixel data: {_short(error, dataset)}") from None
    size = _codestream_size(fragment[:65536])
    if size is None:
        return
    width, height = size
    check_image_size(path, width, height)
    if width > columns or height > rows:
        raise InvalidImageError(
            path, f"compressed frame claims {width}x{height} pixels, larger than the header's {columns}x{rows}"
        )


_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS SOF segment or a JPEG 2000 SIZ segment, None when not found."""
    if data[:2] == b"\xff\xd8":
        position = 2
        while position + 9 <= len(data):
            if data[position] != 0xFF:
                return None
            marker = data[position + 1]
            if marker == 0xFF:
                position += 1
                continue
            (length,) = struct.unpack(">H", data[position + 2 : position + 4])
            if marker in _JPEG_SOF_MARKERS:
                height, width = struct.unpack(">HH", data[position + 5 : position + 9])
                return width, height
            position += 2 + length
        return None
    start = data.find(b"\xff\x4f\xff\x51")
    if start >= 0 and start + 22 <= len(data):
        x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", data[start + 8 : start + 24])
        return max(0, x_size - x_offset), max(0, y_size - y_offset)
    return None


# -- messages without patient data -----------------------------------------------------------------------------------
def _short(error: BaseException, dataset: Any | None = None, limit: int = 240) -> str:
    text = f"{type(error).__name__}: {error}".strip()
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
