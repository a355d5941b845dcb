"""Size limits that keep hostile or broken files from exhausting memory, and the checks that enforce them.

A few bytes can claim an enormous image: a PNG header saying 100000 x 100000, a DICOM header with 65535 rows,
columns and frames, a NIfTI header with a billion voxels, a gzip stream that inflates a thousandfold. Every decoder in
medxai checks the claimed size against these limits BEFORE allocating anything and raises
:class:`~medxai.errors.ImageTooLargeError` (an :class:`~medxai.errors.InvalidImageError`) naming the file, the size
and the limit to raise for a file the user trusts.

The limits travel as a :class:`ReadLimits` value passed down explicitly (the service gives each request its own,
tighter ones). Without one, the readers use the module attributes below, read at each call, so batch jobs and
library users can change them at run time::

    from PIL import Image
    Image.MAX_IMAGE_PIXELS = 200_000_000        # one 2D image (also Pillow's own limit)
    medxai.data.readers.limits.MAX_VOLUME_VOXELS = 2**30  # a whole volume or multi-frame object
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from medxai.errors import ImageTooLargeError, InvalidImageError

__all__ = [
    "MAX_VOLUME_VOXELS",
    "MAX_DECOMPRESSED_BYTES",
    "ReadLimits",
    "max_image_pixels",
    "check_image_size",
    "check_volume_size",
    "check_decoded_bytes",
    "read_gzip_limited",
    "peek_gzip",
    "gzip_claimed_size",
    "inflate_limited",
]

#: Most voxels (all frames or slices together) a volume or multi-frame object may claim: 2**28, e.g. 512 x 512 x
#: 1024 slices, 512 MiB as int16. Medical volumes beyond that are rare and should be cropped or resampled first.
MAX_VOLUME_VOXELS: int = 2**28

#: Most bytes decoding one input may produce (1 GiB): what a gzip or deflate stream inflates to, a NIfTI file's data,
#: a DICOM frame's decoded values and their working copy. The same ceiling as a volume of float32 voxels.
MAX_DECOMPRESSED_BYTES: int = 2**30


@dataclass(frozen=True)
class ReadLimits:
    """The limits one read is held to, and what a user changes to raise each (named in the errors).

    Attributes:
        max_pixels: most pixels of one 2D image (None: no limit).
        max_voxels: most voxels of a volume or multi-frame object, all frames together.
        max_decoded_bytes: most bytes decoding may produce (inflated streams, decoded values and their working copy).
        pixels_setting, voxels_setting, bytes_setting: the setting behind each limit, for the messages.
    """

    max_pixels: int | None
    max_voxels: int
    max_decoded_bytes: int
    pixels_setting: str = "PIL.Image.MAX_IMAGE_PIXELS"
    voxels_setting: str = "medxai.data.readers.limits.MAX_VOLUME_VOXELS"
    bytes_setting: str = "medxai.data.readers.limits.MAX_DECOMPRESSED_BYTES"

    @classmethod
    def defaults(cls) -> ReadLimits:
        """The module-level limits as they are now (:data:`MAX_VOLUME_VOXELS`, :data:`MAX_DECOMPRESSED_BYTES`,
        ``PIL.Image.MAX_IMAGE_PIXELS``)."""
        return cls(max_image_pixels(), MAX_VOLUME_VOXELS, MAX_DECOMPRESSED_BYTES)


def resolve(limits: ReadLimits | None) -> ReadLimits:
    """``limits``, or the module defaults when None."""
    return ReadLimits.defaults() if limits is None else limits


def max_image_pixels() -> int | None:
    """The pixel limit of one 2D image: ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit), read at each call."""
    return Image.MAX_IMAGE_PIXELS


def check_image_size(path: str | Path, width: int, height: int, limits: ReadLimits | None = None) -> None:
    """Reject a 2D image with no pixels or more pixels than the limit.

    Raises:
        InvalidImageError: a side is zero or negative.
        ImageTooLargeError: ``width * height`` exceeds ``limits.max_pixels``.
    """
    limits = resolve(limits)
    if width <= 0 or height <= 0:
        raise InvalidImageError(path, f"image has no pixels ({width}x{height})")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise ImageTooLargeError(
            path,
            f"image too large, possible decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"{limits.pixels_setting} = {limits.max_pixels}; raise that limit if you trust this file",
        )


def check_volume_size(path: str | Path, shape: Sequence[int], limits: ReadLimits | None = None) -> None:
    """Reject a volume (or multi-frame object) with an empty axis or more voxels than the limit.

    Args:
        path: the file, for the message.
        shape: every dimension, e.g. ``(frames, rows, columns)`` or a NIfTI ``dim`` list.
        limits: see :class:`ReadLimits`; the module defaults when None.

    Raises:
        InvalidImageError: a dimension is zero or negative.
        ImageTooLargeError: the product exceeds ``limits.max_voxels``.
    """
    limits = resolve(limits)
    dims = [int(value) for value in shape]
    if any(value <= 0 for value in dims):
        raise InvalidImageError(path, f"volume has an empty dimension: {'x'.join(map(str, dims))}")
    voxels = 1
    for value in dims:
        voxels *= value
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(
            path,
            f"volume too large, possible decompression bomb: {'x'.join(map(str, dims))} = {voxels} voxels exceeds "
            f"{limits.voxels_setting} = {limits.max_voxels}; raise that limit if you trust this file",
        )


def check_decoded_bytes(path: str | Path, count: int, what: str, limits: ReadLimits | None = None) -> None:
    """Reject an input whose decoding would produce more than ``limits.max_decoded_bytes`` bytes.

    Args:
        count: the bytes decoding would produce, computed from the header.
        what: what they are, for the message (e.g. ``"NIfTI data"``).

    Raises:
        ImageTooLargeError: ``count`` exceeds the limit.
    """
    limits = resolve(limits)
    if count > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            path,
            f"{what} of {count} bytes exceeds the limit of {limits.max_decoded_bytes} bytes ({limits.bytes_setting}); "
            "raise that limit if you trust this file",
        )


def _gzip_stream(path: str | Path, data: bytes | None) -> BinaryIO:
    return gzip.GzipFile(fileobj=io.BytesIO(data)) if data is not None else gzip.open(path, "rb")


def peek_gzip(path: str | Path, size: int, data: bytes | None = None) -> bytes:
    """The first ``size`` bytes of a gzip stream's inflated content (fewer when it is shorter).

    Args:
        path: the ``.gz`` file (read unless ``data`` is given; named in errors).
        size: how many inflated bytes.
        data: the compressed bytes, when already in memory.

    Raises:
        InvalidImageError: the stream is corrupt or truncated before ``size`` bytes.
    """
    try:
        with _gzip_stream(path, data) as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated gzip data ({error})") from None


def gzip_claimed_size(path: str | Path, data: bytes | None = None) -> int:
    """The inflated size a gzip stream's trailer claims (ISIZE, RFC 1952: modulo 2**32, and only for the last
    member): an estimate from the last four bytes, not a bound; :func:`read_gzip_limited` bounds.

    Raises:
        InvalidImageError: the stream is too short to have a trailer.
    """
    try:
        if data is not None:
            trailer = data[-4:]
        else:
            with open(path, "rb") as handle:
                handle.seek(0, io.SEEK_END)
                handle.seek(max(0, handle.tell() - 4))
                trailer = handle.read(4)
    except OSError as error:
        raise InvalidImageError(path, f"cannot be read ({error.strerror or error})") from None
    if len(trailer) < 4:
        raise InvalidImageError(path, "corrupt or truncated gzip data (no trailer)")
    return int.from_bytes(trailer, "little")


def read_gzip_limited(path: str | Path, limit: int | None = None, data: bytes | None = None,
                      limits: ReadLimits | None = None) -> bytes:
    """Inflate a whole gzip stream, refusing to go past ``limit`` bytes (a gzip bomb stops at the limit).

    Args:
        path: the ``.gz`` file (read unless ``data`` is given; named in errors).
        limit: most bytes to inflate; ``limits.max_decoded_bytes`` when None.
        data: the compressed bytes, when already in memory.
        limits: see :class:`ReadLimits`; the module defaults when None.

    Raises:
        ImageTooLargeError: the content is larger than the limit.
        InvalidImageError: the stream is corrupt or truncated.
    """
    limits = resolve(limits)
    limit = limits.max_decoded_bytes if limit is None else limit
    try:
        with _gzip_stream(path, data) as stream:
            content = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated gzip data ({error})") from None
    if len(content) > limit:
        raise ImageTooLargeError(path, _inflation_reason("gzip", limit, limits))
    return content


def inflate_limited(path: str | Path, compressed: bytes, limits: ReadLimits | None = None, *,
                    prefix: int | None = None) -> bytes:
    """Inflate a raw deflate stream (DICOM's Deflated Explicit VR Little Endian), at most ``limits.max_decoded_bytes``.

    Args:
        prefix: inflate only this many bytes from the start (a header), without judging the rest.

    Raises:
        ImageTooLargeError: the stream inflates past the limit.
        InvalidImageError: the stream is corrupt.
    """
    limits = resolve(limits)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        content = inflater.decompress(compressed, (limits.max_decoded_bytes + 1) if prefix is None else prefix)
    except zlib.error as error:
        raise InvalidImageError(path, f"corrupt deflate data ({error})") from None
    if prefix is None and len(content) > limits.max_decoded_bytes:
        raise ImageTooLargeError(path, _inflation_reason("deflate", limits.max_decoded_bytes, limits))
    return content


def _inflation_reason(kind: str, limit: int, limits: ReadLimits) -> str:
    return (f"{kind} content inflates past {limit} bytes (possible decompression bomb); raise {limits.bytes_setting} "
            "if you trust this file")
