"""Decoding image files into NumPy arrays: DICOM, NIfTI and ordinary images (PNG, JPEG, BMP, TIFF, ...).

Files are recognised by their content, never by their extension: real collections hold PNGs named ``.jpg``.

1. gzip content (``.nii.gz``, ``.dcm.gz``) is looked into: NIfTI is read by :mod:`medxai.data.readers.nifti`; DICOM is
   inflated (up to the limit on decoded bytes) and read like a plain DICOM file, transparently; anything else is
   rejected.
2. DICOM (``DICM`` at offset 128, or a data set starting directly with a group 0002/0008 element) goes to
   :mod:`medxai.data.readers.dicom`.
3. NIfTI-1/NIfTI-2 single-file headers go to :mod:`medxai.data.readers.nifti`.
4. Everything else goes to Pillow.

Files and bytes held in memory (an upload: :func:`read_image_bytes`) take the same path; bytes are never written to
a file, and every message names the input as the caller calls it.

Every failure becomes an :class:`~medxai.errors.InvalidImageError` (or one of its subclasses
:class:`~medxai.errors.UnsupportedDicomError` and :class:`~medxai.errors.ImageTooLargeError`) naming the input, so
batch code can list it and carry on: the readers' own checks give a reason in words, and any exception a reader did
not anticipate is turned into one at this boundary (``unreadable (ValueError: ...)``, with no server path). Sizes
are checked against :class:`~medxai.data.readers.limits.ReadLimits` before decoding.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medxai.data.readers._reasons import error_text, unexpected_error_reason
from medxai.data.readers.dicom import HEADER_BYTES as DICOM_HEADER_BYTES
from medxai.data.readers.dicom import looks_like_dicom, probe_dicom, read_dicom
from medxai.data.readers.files import special_file_reason
from medxai.data.readers.limits import (
    ReadLimits,
    check_decoded_bytes,
    check_image_size,
    gzip_claimed_size,
    peek_gzip,
    read_gzip_limited,
    resolve,
)
from medxai.data.readers.nifti import (
    HEADER_PEEK_BYTES,
    looks_like_nifti,
    looks_like_nifti_pair,
    probe_nifti,
    read_nifti,
)
from medxai.errors import ImageTooLargeError, InvalidImageError, MedxaiError

__all__ = [
    "read_image",
    "read_image_with_info",
    "read_image_bytes",
    "probe_image",
    "probe_image_bytes",
]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
_UINT16_MAX = np.iinfo(np.uint16).max
_HEAD_BYTES = max(HEADER_PEEK_BYTES, 1024)
# Bytes per pixel Pillow holds for a decoded image (three bands are stored in four bytes), and the modes whose array
# goes through a conversion copy on the way out (palette through RGBA, CMYK/YCbCr/LAB/HSV through RGB).
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_CONVERTED_MODES = frozenset({"P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


def read_image(
    path: str | Path,
    *,
    window: str | Sequence[float] = "header",
    frame: int | None = None,
    axis: str = "axial",
    slice_index: int | None = None,
    volume: int = 0,
    limits: ReadLimits | None = None,
) -> np.ndarray:
    """Decode an image file completely into an array.

    The format is recognised from the file's content, whatever its extension (see the module docstring). The whole
    image is decoded, so truncated or corrupt data is reported here rather than later.

    **DICOM** (see :mod:`medxai.data.readers.dicom`): one frame (the middle one of a multi-frame object unless ``frame``
    says otherwise) after the modality and VOI transforms chosen by ``window`` (``"header"``: the header's VOI LUT or
    window, else the full range; ``"full"``; or a ``(center, width)`` pair), MONOCHROME1 inverted: grey images are
    float32 (H, W) in [0, 1] with bright = dense; colour ones (RGB, YBR, palette) (H, W, 3) uint8.

    **NIfTI** (see :mod:`medxai.data.readers.nifti`): one 2D slice after reorientation to RAS+ with the affine, in the
    radiological display convention: by default the MIDDLE AXIAL slice of the first volume (``axis`` =
    axial/coronal/sagittal, ``slice_index``, ``volume`` of a 4D series choose another), in the data's dtype.

    **Other images** (Pillow); pixel modes map to arrays as follows, EXIF orientation applied:

    - grey ``L`` -> (H, W) uint8; 1-bit ``1`` -> (H, W) uint8 with values 0 and 255;
    - ``LA`` -> (H, W) uint8 and ``RGBA``/``RGBX`` -> (H, W, 3) uint8: the alpha channel is dropped (not composited),
      so the stored colour values are kept as they are;
    - palette ``P``/``PA`` -> (H, W) uint8 when every palette colour used is grey, else (H, W, 3) uint8;
    - ``RGB`` -> (H, W, 3) uint8; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> converted to (H, W, 3) RGB uint8;
    - 16-bit grey ``I;16``/``I;16B``/``I;16L`` (16-bit PNG and TIFF) -> (H, W) uint16 with the full stored range;
    - 32-bit integer ``I`` -> (H, W) uint16 when every value lies in 0..65535 (how Pillow sometimes presents 16-bit
      files), else float32; 32-bit float ``F`` -> (H, W) float32.

    Multi-frame ordinary files (TIFF stacks, animated GIFs) give their first frame.

    Args:
        path: the image file.
        window: DICOM VOI choice (ignored for other formats).
        frame: DICOM frame index; None for the middle frame.
        axis: NIfTI slicing plane.
        slice_index: NIfTI slice index along ``axis`` in RAS order; None for the middle slice.
        volume: NIfTI volume index of a 4D series.
        limits: the size limits of this read (:class:`~medxai.data.readers.limits.ReadLimits`); the module
            defaults when None.

    Returns:
        (H, W) for grey images, (H, W, 3) for colour ones.

    Raises:
        InvalidImageError: missing file, a folder, a zero-byte file, content that is not a recognised image format,
            truncated or corrupt data, a damaged header, anything a decoder did not anticipate.
        ImageTooLargeError: more pixels, voxels or decoded bytes than ``limits`` allow (a possible decompression
            bomb), including what a compressed stream inside a DICOM file claims.
        UnsupportedDicomError: a DICOM object that is not a usable image (no pixel data, report, waveform...).
        ConfigError: an invalid option value.
    """
    array, _ = read_image_with_info(
        path, window=window, frame=frame, axis=axis, slice_index=slice_index, volume=volume, limits=limits
    )
    return array


def read_image_with_info(
    path: str | Path,
    *,
    window: str | Sequence[float] = "header",
    frame: int | None = None,
    axis: str = "axial",
    slice_index: int | None = None,
    volume: int = 0,
    limits: ReadLimits | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Same as :func:`read_image`, also returning what the file was.

    Args:
        path: the image file.
        window, frame, axis, slice_index, volume, limits: see :func:`read_image`.

    Returns:
        The array and ``{"format": "PNG", "mode": "RGBA", "original_size": [width, height]}``, where the size is the
        stored one, before EXIF orientation. DICOM and NIfTI add technical facts (modality, frame, window, axis,
        slice...), never patient data.

    Raises:
        InvalidImageError: see :func:`read_image`.
    """
    path = Path(path)
    with _one_input(path):
        _check_is_readable_file(path)
        return _read(str(path), None, _read_head(path), window=window, frame=frame, axis=axis,
                     slice_index=slice_index, volume=volume, limits=resolve(limits))


def read_image_bytes(data: bytes, *, name: str = "upload", limits: ReadLimits | None = None,
                     **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_image_with_info` for bytes held in memory (an upload to the service).

    The bytes are decoded where they are: no temporary file is written, and every message and log line names the
    input ``name``. The same content sniffing and size limits apply as to a file.

    Args:
        data: the file's bytes.
        name: what to call the input in errors and logs.
        limits: see :func:`read_image`.
        options: ``window``, ``frame``, ``axis``, ``slice_index``, ``volume``: see :func:`read_image`.

    Raises:
        InvalidImageError: see :func:`read_image`.
    """
    with _one_input(name):
        if not data:
            raise InvalidImageError(name, "empty file (0 bytes)")
        return _read(name, data, data[:_HEAD_BYTES], limits=resolve(limits), **options)


def probe_image(path: str | Path, *, limits: ReadLimits | None = None) -> dict[str, Any]:
    """What an image file is, from its header only (no full decode): format, mode and stored size.

    Cheap enough to run over a whole dataset (a few hundred microseconds per file). DICOM adds ``frames``; NIfTI
    adds ``shape``. Every kind adds ``decoded_bytes``: about the most memory decoding it takes, from its header.
    The size limits are checked as a read would check them.

    Raises:
        InvalidImageError: the file is missing, empty, not a recognised image format, or has a damaged header.
        ImageTooLargeError: the header claims more than the limits allow.
    """
    path = Path(path)
    with _one_input(path):
        _check_is_readable_file(path)
        return _probe(str(path), None, _read_head(path), resolve(limits), file_size=path.stat().st_size)


def probe_image_bytes(data: bytes, *, name: str = "upload", limits: ReadLimits | None = None) -> dict[str, Any]:
    """:func:`probe_image` for bytes held in memory: what decoding them would cost, before it starts.

    Raises:
        InvalidImageError: see :func:`probe_image`.
    """
    with _one_input(name):
        if not data:
            raise InvalidImageError(name, "empty file (0 bytes)")
        return _probe(name, data, data[:_HEAD_BYTES], resolve(limits), file_size=len(data))


# -- the boundary ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_input(name: str | Path) -> Iterator[None]:
    """Whatever goes wrong while reading one input costs that input only: an error medxai raised on purpose passes
    as it is; anything else becomes an :class:`InvalidImageError` naming the input (memory exhaustion included)."""
    try:
        yield
    except MedxaiError:
        raise
    except MemoryError:
        raise InvalidImageError(name, "not enough memory to decode this image") from None
    except Exception as error:  # noqa: BLE001 - the reader boundary: see the docstring
        reason = unexpected_error_reason(error)
        logger.debug("%s: a reader failed unexpectedly: %s", name, reason)
        raise InvalidImageError(name, reason) from None


def _read(name: str, data: bytes | None, head: bytes, *, window: str | Sequence[float] = "header",
          frame: int | None = None, axis: str = "axial", slice_index: int | None = None, volume: int = 0,
          limits: ReadLimits) -> tuple[np.ndarray, dict[str, Any]]:
    """Dispatch on content: ``data`` is the input's bytes, or None to read the file ``name``."""
    if head[:2] == b"\x1f\x8b":
        inner = peek_gzip(name, _HEAD_BYTES, data)
        if looks_like_nifti(inner):
            return read_nifti(name, compressed=True, data=data, axis=axis, slice_index=slice_index, volume=volume,
                              limits=limits)
        if looks_like_dicom(inner):
            content = read_gzip_limited(name, data=data, limits=limits)
            return read_dicom(name, data=content, window=window, frame=frame, limits=limits)
        raise InvalidImageError(name, "gzip-compressed file holding neither a NIfTI volume nor a DICOM file")
    if looks_like_dicom(head):
        return read_dicom(name, data=data, window=window, frame=frame, limits=limits)
    if looks_like_nifti(head):
        return read_nifti(name, compressed=False, data=data, axis=axis, slice_index=slice_index, volume=volume,
                          limits=limits)
    if looks_like_nifti_pair(head):
        raise InvalidImageError(name, "NIfTI .hdr/.img pairs are not supported; convert to a single .nii file")
    return _read_with_pillow(name, data, limits)


def _probe(name: str, data: bytes | None, head: bytes, limits: ReadLimits, *, file_size: int) -> dict[str, Any]:
    if head[:2] == b"\x1f\x8b":
        inner = peek_gzip(name, _HEAD_BYTES, data)
        if looks_like_nifti(inner):
            return probe_nifti(name, inner, limits=limits)
        if looks_like_dicom(inner):
            # the header from the first inflated bytes; the whole file's size from the gzip trailer
            info = probe_dicom(name, peek_gzip(name, DICOM_HEADER_BYTES, data), limits=limits, prefix=True)
            decoded = info["decoded_bytes"] + gzip_claimed_size(name, data)
            check_decoded_bytes(name, decoded, "inflating and decoding a gzip-compressed DICOM file", limits)
            return {**info, "decoded_bytes": decoded}
        raise InvalidImageError(name, "gzip-compressed file holding neither a NIfTI volume nor a DICOM file")
    if looks_like_dicom(head):
        return probe_dicom(name, data, limits=limits)
    if looks_like_nifti(head):
        return probe_nifti(name, head, limits=limits, file_size=file_size)
    if looks_like_nifti_pair(head):
        raise InvalidImageError(name, "NIfTI .hdr/.img pairs are not supported; convert to a single .nii file")
    with _pillow_errors(name, limits), _open_with_pillow(name, data) as image:
        _check_pixels(name, image, limits)
        return {"format": image.format, "mode": image.mode, "original_size": [image.width, image.height],
                "decoded_bytes": _pillow_decoded_bytes(image)}


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(_HEAD_BYTES)
    except PermissionError:
        raise InvalidImageError(path, "permission denied: the file cannot be read") from None
    except OSError as error:
        raise InvalidImageError(path, f"cannot be read ({error.strerror or error})") from None


def _check_is_readable_file(path: Path) -> None:
    reason = special_file_reason(path)
    if reason is not None:
        raise InvalidImageError(path, reason)
    if path.stat().st_size == 0:
        raise InvalidImageError(path, "empty file (0 bytes)")


# -- Pillow --------------------------------------------------------------------------------------------------------
def _open_with_pillow(name: str, data: bytes | None) -> Image.Image:
    return Image.open(io.BytesIO(data) if data is not None else name)


@contextlib.contextmanager
def _pillow_errors(name: str, limits: ReadLimits) -> Iterator[None]:
    try:
        yield
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
        reason = f"image too large, possible decompression bomb ({error_text(str(error)).rstrip('.')}); raise " \
                 f"{limits.pixels_setting} if you trust this file"
        raise ImageTooLargeError(name, reason) from None
    except UnidentifiedImageError:
        raise InvalidImageError(name, "not a recognised image format") from None
    except PermissionError:
        raise InvalidImageError(name, "permission denied: the file cannot be read") from None
    except MemoryError:
        raise InvalidImageError(name, "not enough memory to decode this image") from None
    # Pillow's decoders report damaged data with a zoo of types (OSError, SyntaxError, ValueError, EOFError,
    # struct.error, zlib.error...); at this boundary every one of them means the same thing to the user.
    except Exception as error:  # noqa: BLE001
        raise InvalidImageError(name, f"truncated or corrupt image data ({error_text(str(error))})") from None


def _read_with_pillow(name: str, data: bytes | None, limits: ReadLimits) -> tuple[np.ndarray, dict[str, Any]]:
    with _pillow_errors(name, limits), _open_with_pillow(name, data) as image:
        _check_pixels(name, image, limits)
        image.load()
        info = {"format": image.format, "mode": image.mode, "original_size": [image.width, image.height]}
        oriented = _apply_exif_orientation(image, name)
        array = _pixels_to_array(oriented, name)
    return array, info


def _check_pixels(name: str, image: Image.Image, limits: ReadLimits) -> None:
    # Pillow itself only warns between MAX_IMAGE_PIXELS and twice that; a warning is easy to miss in a batch of
    # thousands, so anything over the limit is rejected here with a reason the user can act on.
    check_image_size(name, image.width, image.height, limits)
    check_decoded_bytes(name, _pillow_decoded_bytes(image), "decoded image", limits)


def _pillow_decoded_bytes(image: Image.Image) -> int:
    """Pillow's decoded image, the array made of it and any conversion copy on the way (from the header)."""
    held = _PILLOW_BYTES.get(image.mode, 4)
    converted = 4 if image.mode in _CONVERTED_MODES else 0
    return image.width * image.height * (held + 4 + converted)


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a decodable image unreadable
        logger.debug("ignoring an unreadable EXIF block in %s", name)
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _pixels_to_array(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode in ("LA", "La"):
        return np.asarray(image, dtype=np.uint8)[:, :, 0].copy()
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(image, dtype=np.uint8)[:, :, :3].copy()
    if mode in ("P", "PA"):
        return _palette_to_array(image)
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= _UINT16_MAX:
            return values.astype(np.uint16)
        return values.astype(np.float32)
    if mode == "F":
        return np.asarray(image, dtype=np.float32).copy()
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    raise InvalidImageError(name, f"unsupported pixel mode {mode!r}")


def _palette_to_array(image: Image.Image) -> np.ndarray:
    # Converting through RGBA honours a transparency entry in the palette; the alpha is then dropped like RGBA's.
    rgb = np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, :3]
    if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
        return rgb[:, :, 0].copy()
    return rgb.copy()
