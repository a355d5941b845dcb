"""Size limits that keep hostile or broken files from exhausting memory, and the checks that enforce them.

A few bytes can claim an enormous image: a PNG header saying 100000 x 100000, a DICOM header with 65535 rows,
columns and frames, a NIfTI header with a billion voxels, a gzip stream that inflates a thousandfold. Every decoder in
medxai checks the claimed size against these limits BEFORE allocating anything and raises
:class:`~medxai.errors.ImageTooLargeError` (an :class:`~medxai.errors.InvalidImageError`) naming the file, the size
and the limit to raise for a file the user trusts.

The limits are module attributes, read at each check, so they can be changed at run time::

    from PIL import Image
    Image.MAX_IMAGE_PIXELS = 200_000_000        # one 2D image (also Pillow's own limit)
    medxai.data.readers.limits.MAX_VOLUME_VOXELS = 2**30  # a whole volume or multi-frame object
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from medxai.errors import ImageTooLargeError, InvalidImageError

__all__ = [
    "MAX_VOLUME_VOXELS",
    "MAX_DECOMPRESSED_BYTES",
    "max_image_pixels",
    "check_image_size",
    "check_volume_size",
    "read_gzip_limited",
    "peek_gzip",
]

#: Most voxels (all frames or slices together) a volume or multi-frame object may claim: 2**28, e.g. 512 x 512 x
#: 1024 slices, 512 MiB as int16. Medical volumes beyond that are rare and should be cropped or resampled first.
MAX_VOLUME_VOXELS: int = 2**28

#: Most bytes a gzip-compressed input may inflate to (1 GiB): the same ceiling as a volume of float32 voxels.
MAX_DECOMPRESSED_BYTES: int = 2**30


def max_image_pixels() -> int | None:
    """The pixel limit of one 2D image: ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit), read at each call."""
    return Image.MAX_IMAGE_PIXELS


def check_image_size(path: str | Path, width: int, height: int) -> None:
    """Reject a 2D image with no pixels or more pixels than :func:`max_image_pixels`.

    Raises:
        InvalidImageError: a side is zero or negative.
        ImageTooLargeError: ``width * height`` exceeds the limit.
    """
    if width <= 0 or height <= 0:
        raise InvalidImageError(path, f"image has no pixels ({width}x{height})")
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            path,
            f"image too large, possible decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}; raise that limit if you trust this file",
        )


def check_volume_size(path: str | Path, shape: Sequence[int]) -> None:
    """Reject a volume (or multi-frame object) with an empty axis or more voxels than :data:`MAX_VOLUME_VOXELS`.

    Args:
        path: the file, for the message.
        shape: every dimension, e.g. ``(frames, rows, columns)`` or a NIfTI ``dim`` list.

    Raises:
        InvalidImageError: a dimension is zero or negative.
        ImageTooLargeError: the product exceeds the limit.
    """
    dims = [int(value) for value in shape]
    if any(value <= 0 for value in dims):
        raise InvalidImageError(path, f"volume has an empty dimension: {'x'.join(map(str, dims))}")
    voxels = 1
    for value in dims:
        voxels *= value
    if voxels > MAX_VOLUME_VOXELS:
        raise ImageTooLargeError(
            path,
            f"volume too large, possible decompression bomb: {'x'.join(map(str, dims))} = {voxels} voxels exceeds "
            f"medxai.data.readers.limits.MAX_VOLUME_VOXELS = {MAX_VOLUME_VOXELS}; raise that limit if you trust this file",
        )


def peek_gzip(path: str | Path, size: int) -> bytes:
    """The first ``size`` bytes of a gzip file's inflated content (fewer when it is shorter).

    Raises:
        InvalidImageError: the stream is corrupt or truncated before ``size`` bytes.
    """
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated gzip data ({error})") from None


def read_gzip_limited(path: str | Path, limit: int | None = None) -> bytes:
    """Inflate a whole gzip file, refusing to go past ``limit`` bytes (a gzip bomb stops at the limit).

    Args:
        path: the ``.gz`` file.
        limit: most bytes to inflate; :data:`MAX_DECOMPRESSED_BYTES` when None.

    Raises:
        ImageTooLargeError: the content is larger than the limit.
        InvalidImageError: the stream is corrupt or truncated.
    """
    limit = MAX_DECOMPRESSED_BYTES if limit is None else limit
    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated gzip data ({error})") from None
    if len(data) > limit:
        raise ImageTooLargeError(
            path,
            f"gzip content inflates past {limit} bytes (possible decompression bomb); raise "
            "medxai.data.readers.limits.MAX_DECOMPRESSED_BYTES if you trust this file",
        )
    return data
