"""Decoding image files into NumPy arrays: DICOM, NIfTI and ordinary images (PNG, JPEG, BMP, TIFF, ...).

Files are recognised by their content, never by their extension: real collections hold PNGs named ``.jpg``.

1. gzip content (``.nii.gz``, ``.dcm.gz``) is looked into: NIfTI is read by :mod:`medxai.data.readers.nifti`; DICOM is
   inflated (up to ``_limits.MAX_DECOMPRESSED_BYTES``) and read like a plain DICOM file, transparently; anything else
   is rejected.
2. DICOM (``DICM`` at offset 128, or a data set starting directly with a group 0002/0008 element) goes to
   :mod:`medxai.data.readers.dicom`.
3. NIfTI-1/NIfTI-2 single-file headers go to :mod:`medxai.data.readers.nifti`.
4. Everything else goes to Pillow.

Every failure becomes an :class:`~medxai.errors.InvalidImageError` (or one of its subclasses
:class:`~medxai.errors.UnsupportedDicomError` and :class:`~medxai.errors.ImageTooLargeError`) naming the file, so
batch code can list it and carry on. Sizes are checked against :mod:`medxai.data.readers.limits` before decoding.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medxai.data.readers.dicom import looks_like_dicom, probe_dicom, read_dicom
from medxai.data.readers.files import special_file_reason
from medxai.data.readers.limits import check_image_size, peek_gzip, read_gzip_limited
from medxai.data.readers.nifti import (
    HEADER_PEEK_BYTES,
    looks_like_nifti,
    looks_like_nifti_pair,
    probe_nifti,
    read_nifti,
)
from medxai.errors import ImageTooLargeError, InvalidImageError

__all__ = ["read_image", "read_image_with_info", "read_image_bytes", "probe_image"]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
_UINT16_MAX = np.iinfo(np.uint16).max
_HEAD_BYTES = max(HEADER_PEEK_BYTES, 1024)


def read_image(
    path: str | Path,
    *,
    window: str | Sequence[float] = "header",
    frame: int | None = None,
    axis: str = "axial",
    slice_index: int | None = None,
    volume: int = 0,
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

    Returns:
        (H, W) for grey images, (H, W, 3) for colour ones.

    Raises:
        InvalidImageError: missing file, a folder, a zero-byte file, content that is not a recognised image format,
            truncated or corrupt data.
        ImageTooLargeError: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (or a volume beyond
            ``_limits.MAX_VOLUME_VOXELS``, a gzip stream beyond ``_limits.MAX_DECOMPRESSED_BYTES``).
        UnsupportedDicomError: a DICOM object that is not a usable image (no pixel data, report, waveform...).
        ConfigError: an invalid option value.
    """
    array, _ = read_image_with_info(
        path, window=window, frame=frame, axis=axis, slice_index=slice_index, volume=volume
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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Same as :func:`read_image`, also returning what the file was.

    Args:
        path: the image file.
        window, frame, axis, slice_index, volume: see :func:`read_image`.

    Returns:
        The array and ``{"format": "PNG", "mode": "RGBA", "original_size": [width, height]}``, where the size is the
        stored one, before EXIF orientation. DICOM and NIfTI add technical facts (modality, frame, window, axis,
        slice...), never patient data.

    Raises:
        InvalidImageError: see :func:`read_image`.
    """
    path = Path(path)
    _check_is_readable_file(path)
    head = _read_head(path)
    if head[:2] == b"\x1f\x8b":
        inner = peek_gzip(path, _HEAD_BYTES)
        if looks_like_nifti(inner):
            return read_nifti(path, compressed=True, axis=axis, slice_index=slice_index, volume=volume)
        if looks_like_dicom(inner):
            return read_dicom(path, data=read_gzip_limited(path), window=window, frame=frame)
        raise InvalidImageError(path, "gzip-compressed file holding neither a NIfTI volume nor a DICOM file")
    if looks_like_dicom(head):
        return read_dicom(path, window=window, frame=frame)
    if looks_like_nifti(head):
        return read_nifti(path, compressed=False, axis=axis, slice_index=slice_index, volume=volume)
    if looks_like_nifti_pair(head):
        raise InvalidImageError(path, "NIfTI .hdr/.img pairs are not supported; convert to a single .nii file")
    return _read_with_pillow(path)


def read_image_bytes(data: bytes, *, name: str = "upload", **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_image_with_info` for bytes held in memory (an upload to the service).

    The bytes go to a private temporary file first, because the DICOM, NIfTI and gzip readers work on files, and
    the same content sniffing and size limits apply as to any file. Errors name ``name``, never the temporary path.

    Args:
        data: the file's bytes.
        name: what to call the input in errors.
        options: see :func:`read_image`.

    Raises:
        InvalidImageError: see :func:`read_image`.
    """
    if not data:
        raise InvalidImageError(name, "empty file (0 bytes)")
    with tempfile.TemporaryDirectory(prefix="medxai-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return read_image_with_info(path, **options)
        except InvalidImageError as error:
            reason = error.reason.replace(str(path), name).replace(folder, "")
            raise type(error)(name, reason) from None


def probe_image(path: str | Path) -> dict[str, Any]:
    """What an image file is, from its header only (no full decode): format, mode and stored size.

    Cheap enough to run over a whole dataset (a few hundred microseconds per file). DICOM adds ``frames``; NIfTI
    adds ``shape``.

    Raises:
        InvalidImageError: the file is missing, empty or not a recognised image format.
    """
    path = Path(path)
    _check_is_readable_file(path)
    head = _read_head(path)
    if head[:2] == b"\x1f\x8b":
        inner = peek_gzip(path, _HEAD_BYTES)
        if looks_like_nifti(inner):
            return probe_nifti(path, inner)
        if looks_like_dicom(inner):
            return probe_dicom(path, read_gzip_limited(path))
        raise InvalidImageError(path, "gzip-compressed file holding neither a NIfTI volume nor a DICOM file")
    if looks_like_dicom(head):
        return probe_dicom(path)
    if looks_like_nifti(head):
        return probe_nifti(path, head)
    try:
        with Image.open(path) as image:
            return {"format": image.format, "mode": image.mode, "original_size": [image.width, image.height]}
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(path, _decompression_bomb_reason(str(error))) from None
    except UnidentifiedImageError:
        raise InvalidImageError(path, "not a recognised image format") from None
    except Exception as error:  # noqa: BLE001
        raise InvalidImageError(path, f"unreadable image header ({error})") from None


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(_HEAD_BYTES)
    except PermissionError:
        raise InvalidImageError(path, "permission denied: the file cannot be read") from None
    except OSError as error:
        raise InvalidImageError(path, f"cannot be read ({error.strerror or error})") from None


def _read_with_pillow(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with Image.open(path) as image:
            _check_pixel_count(path, image)
            image.load()
            info = {"format": image.format, "mode": image.mode, "original_size": [image.width, image.height]}
            oriented = _apply_exif_orientation(image)
            array = _pixels_to_array(oriented, path)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(path, _decompression_bomb_reason(str(error))) from None
    except UnidentifiedImageError:
        raise InvalidImageError(path, "not a recognised image format") from None
    except PermissionError:
        raise InvalidImageError(path, "permission denied: the file cannot be read") from None
    except MemoryError:
        raise InvalidImageError(path, "not enough memory to decode this image") from None
    # Pillow's decoders report damaged data with a zoo of types (OSError, SyntaxError, ValueError, EOFError,
    # struct.error, zlib.error...); at this boundary every one of them means the same thing to the user.
    except Exception as error:  # noqa: BLE001
        raise InvalidImageError(path, f"truncated or corrupt image data ({error})") from None
    return array, info


def _check_is_readable_file(path: Path) -> None:
    reason = special_file_reason(path)
    if reason is not None:
        raise InvalidImageError(path, reason)
    if path.stat().st_size == 0:
        raise InvalidImageError(path, "empty file (0 bytes)")


def _check_pixel_count(path: Path, image: Image.Image) -> None:
    # Pillow itself only warns between MAX_IMAGE_PIXELS and twice that; a warning is easy to miss in a batch of
    # thousands, so anything over the limit is rejected here with a reason the user can act on.
    check_image_size(path, image.width, image.height)


def _decompression_bomb_reason(detail: str) -> str:
    return (
        f"image too large, possible decompression bomb ({detail.rstrip('.')}); PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS}; raise that limit if you trust this file"
    )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a decodable image unreadable
        logger.debug("ignoring an unreadable EXIF block in %s", image.filename, exc_info=True)
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _pixels_to_array(image: Image.Image, path: Path) -> np.ndarray:
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
    raise InvalidImageError(path, f"unsupported pixel mode {mode!r}")


def _palette_to_array(image: Image.Image) -> np.ndarray:
    # Converting through RGBA honours a transparency entry in the palette; the alpha is then dropped like RGBA's.
    rgb = np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, :3]
    if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
        return rgb[:, :, 0].copy()
    return rgb.copy()
