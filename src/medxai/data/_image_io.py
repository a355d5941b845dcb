"""Decoding ordinary image files (PNG, JPEG, BMP, TIFF, ...) into NumPy arrays, and nothing else.

Files are recognised by their content, never by their extension: real collections hold PNGs named ``.jpg``. Every
failure becomes an :class:`~medxai.errors.InvalidImageError` naming the file, so batch code can list it and carry on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medxai.errors import InvalidImageError

__all__ = ["read_image", "read_image_with_info", "is_hidden_or_system"]

logger = logging.getLogger(__name__)

# Names that operating systems and archivers leave beside real files; never data.
_SYSTEM_FILE_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
_SYSTEM_FOLDER_NAMES = frozenset({"__macosx"})

_EXIF_ORIENTATION_TAG = 0x0112
_UINT16_MAX = np.iinfo(np.uint16).max


def is_hidden_or_system(path: str | Path) -> bool:
    """Tell whether a file or folder name is hidden or operating-system clutter rather than data.

    The rule looks at the last path component only: names starting with ``.`` (``.DS_Store``, ``._x.png``
    AppleDouble files, ``.ipynb_checkpoints``), ``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini`` and ``__MACOSX``
    folders (compared case-insensitively, as the systems that write them do).

    Args:
        path: a file or folder path, or a bare name.

    Returns:
        True when the entry should be skipped.
    """
    name = Path(path).name
    lowered = name.lower()
    return name.startswith(".") or lowered in _SYSTEM_FILE_NAMES or lowered in _SYSTEM_FOLDER_NAMES


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file completely into an array in its native dtype.

    The format is recognised from the file's content by Pillow, whatever its extension. The whole file is decoded,
    so truncated or corrupt data is reported here rather than later. EXIF orientation is applied.

    Pixel modes map to arrays as follows:

    - grey ``L`` -> (H, W) uint8; 1-bit ``1`` -> (H, W) uint8 with values 0 and 255;
    - ``LA`` -> (H, W) uint8 and ``RGBA``/``RGBX`` -> (H, W, 3) uint8: the alpha channel is dropped (not composited),
      so the stored colour values are kept as they are;
    - palette ``P``/``PA`` -> (H, W) uint8 when every palette colour used is grey, else (H, W, 3) uint8;
    - ``RGB`` -> (H, W, 3) uint8; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> converted to (H, W, 3) RGB uint8;
    - 16-bit grey ``I;16``/``I;16B``/``I;16L`` -> (H, W) uint16 with the full stored range;
    - 32-bit integer ``I`` -> (H, W) uint16 when every value lies in 0..65535 (how Pillow sometimes presents 16-bit
      files), else float32; 32-bit float ``F`` -> (H, W) float32.

    Multi-frame files (TIFF stacks, animated GIFs) give their first frame.

    Args:
        path: the image file.

    Returns:
        (H, W) for grey images, (H, W, 3) for colour ones.

    Raises:
        InvalidImageError: missing file, a folder, a zero-byte file, content that is not a recognised image format,
            truncated or corrupt data, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows.
    """
    array, _ = read_image_with_info(path)
    return array


def read_image_with_info(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Same as :func:`read_image`, also returning what the file was.

    Args:
        path: the image file.

    Returns:
        The array and ``{"format": "PNG", "mode": "RGBA", "original_size": [width, height]}``, where the size is the
        stored one, before EXIF orientation.

    Raises:
        InvalidImageError: see :func:`read_image`.
    """
    path = Path(path)
    _check_is_readable_file(path)
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
        raise InvalidImageError(path, _decompression_bomb_reason(str(error))) from None
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
    if not path.exists():
        raise InvalidImageError(path, "file not found")
    if path.is_dir():
        raise InvalidImageError(path, "is a folder, not an image file")
    if not path.is_file():
        raise InvalidImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise InvalidImageError(path, "empty file (0 bytes)")


def _check_pixel_count(path: Path, image: Image.Image) -> None:
    # Pillow itself only warns between MAX_IMAGE_PIXELS and twice that; a warning is easy to miss in a batch of
    # thousands, so anything over the limit is rejected here with a reason the user can act on.
    limit = Image.MAX_IMAGE_PIXELS
    pixel_count = image.width * image.height
    if limit is not None and pixel_count > limit:
        raise InvalidImageError(
            path,
            _decompression_bomb_reason(f"{image.width}x{image.height} = {pixel_count} pixels"),
        )


def _decompression_bomb_reason(detail: str) -> str:
    return (
        f"image too large, possible decompression bomb: {detail} exceeds PIL.Image.MAX_IMAGE_PIXELS = "
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
