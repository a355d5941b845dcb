"""NIfTI volumes (``.nii`` and ``.nii.gz``, NIfTI-1 and NIfTI-2) as 2D slices in the radiological display convention.

A volume is reoriented with its affine to RAS+ (nibabel's ``io_orientation``: the voxel axes are permuted and flipped
to the closest of Right, Anterior, Superior; no resampling), then sliced:

- ``axial`` (the default): a slice at fixed S, seen from the feet: anterior at the top, the patient's right on the
  viewer's LEFT, as CT and MR are read;
- ``coronal``: a slice at fixed A, seen from the front: superior at the top, the patient's right on the viewer's left;
- ``sagittal``: a slice at fixed R, seen from the patient's left: superior at the top, anterior on the viewer's left.

``read_image`` on a NIfTI file gives the MIDDLE axial slice of the first volume (a 4D file's volume 0) in the data's
own dtype, after the header's ``scl_slope``/``scl_inter`` scaling (then float32). Non-finite voxels (NaN outside the
brain in statistical maps) become the slice's smallest finite value, because no later stage can use NaN.
:class:`medxai.data.sources.VolumeSliceSource` makes every slice of a set of volumes a sample of its own.

The header is checked against :mod:`medxai.data.readers.limits` before any voxel is read, and no more bytes than the header
announces are ever inflated from a ``.gz`` file.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data.readers import limits as _limits
from medxai.data.readers.limits import check_image_size, check_volume_size
from medxai.errors import ConfigError, ImageTooLargeError, InvalidImageError

__all__ = [
    "AXES",
    "looks_like_nifti",
    "looks_like_nifti_pair",
    "read_nifti",
    "read_nifti_volume",
    "probe_nifti",
    "volume_slice",
    "native_slice",
    "is_gzip_file",
    "read_prefix",
]

logger = logging.getLogger(__name__)

#: Slicing planes, in the order of the RAS axis each one holds fixed.
AXES = ("sagittal", "coronal", "axial")

_NIFTI1_MAGIC = b"n+1\x00"
_NIFTI2_MAGIC = b"n+2\x00"
_PAIR_MAGICS = (b"ni1\x00", b"ni2\x00")
HEADER_PEEK_BYTES = 544
_MAX_VOXEL_OFFSET = 2**24  # header plus extensions; anything beyond is a damaged header


def _max_decompressed_bytes() -> int:  # read at each call, so run-time changes apply
    return _limits.MAX_DECOMPRESSED_BYTES


def looks_like_nifti(head: bytes) -> bool:
    """Whether a file's first bytes (inflated, for ``.gz``) are a single-file NIfTI-1 or NIfTI-2 header."""
    return _header_layout(head) is not None


def looks_like_nifti_pair(head: bytes) -> bool:
    """Whether the bytes are the header of a ``.hdr``/``.img`` NIfTI pair (not supported: convert to ``.nii``)."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(f"{order}i", head[:4])[0] == 348 and head[344:348] in _PAIR_MAGICS:
            return True
    return False


def probe_nifti(path: str | Path, head: bytes) -> dict[str, Any]:
    """Shape and data type from the header bytes alone, plus the middle axial slice's stored size.

    Raises:
        InvalidImageError: the header is damaged.
    """
    shape, datatype, _, _ = _parse_header(path, head)
    return {
        "format": "NIfTI",
        "mode": f"NIfTI datatype {datatype}",
        "original_size": [shape[0], shape[1] if len(shape) > 1 else 1],
        "shape": list(shape),
    }


def read_nifti_volume(path: str | Path, *, compressed: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a whole volume, reoriented to RAS+ (see the module docstring).

    Args:
        path: the file.
        compressed: the file is gzip-compressed (``.nii.gz``), whatever its name.

    Returns:
        ``(X, Y, Z)`` or ``(X, Y, Z, T)`` array in RAS+ order (2D images get Z = 1) and ``{"format": "NIfTI",
        "shape", "orientation"}`` where orientation is the original axis codes, e.g. ``"LPS"``.

    Raises:
        ImageTooLargeError: the header claims more voxels than the limit.
        InvalidImageError: a damaged or truncated file, or an unsupported data type.
    """
    import nibabel as nib

    head = read_prefix(path, HEADER_PEEK_BYTES, compressed)
    shape, _, voxel_offset, bits_per_voxel = _parse_header(path, head)
    expected = voxel_offset + int(np.prod(shape, dtype=np.int64)) * max(bits_per_voxel, 8) // 8
    content = read_prefix(path, expected, compressed)
    if len(content) < expected:
        raise InvalidImageError(path, f"truncated NIfTI file: {len(content)} of {expected} bytes")
    image_class = nib.Nifti2Image if _header_layout(head) == 2 else nib.Nifti1Image
    try:
        image = image_class.from_bytes(content)
        array = np.asanyarray(image.dataobj)
        affine = image.affine
    except MemoryError:
        raise InvalidImageError(path, "not enough memory to read this NIfTI volume") from None
    except Exception as error:  # noqa: BLE001 - nibabel reports damaged headers with many types
        raise InvalidImageError(path, f"unreadable NIfTI data: {type(error).__name__}: {error}") from None
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise InvalidImageError(path, f"NIfTI voxel type {array.dtype} is not supported (expected numbers)")
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 4:
        raise InvalidImageError(path, f"NIfTI with {array.ndim} dimensions {array.shape} is not supported")
    while array.ndim < 3:
        array = array[..., np.newaxis]
    oriented, codes = _to_ras(path, array, affine)
    return oriented, {"format": "NIfTI", "shape": list(array.shape), "orientation": codes}


def volume_slice(volume: np.ndarray, axis: str = "axial", index: int | None = None, frame: int = 0) -> np.ndarray:
    """One 2D slice of a RAS+ volume in the radiological display convention (module docstring).

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, T)`` in RAS+ order, as :func:`read_nifti_volume` returns.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: slice index along the axis in RAS order (inferior to superior, posterior to anterior, left to right);
            negative counts from the end; None takes the middle slice.
        frame: which volume of a 4D series.

    Raises:
        ConfigError: an unknown axis.
        IndexError: ``index`` or ``frame`` out of range.
    """
    if axis not in AXES:
        raise ConfigError(f"NIfTI axis must be one of {AXES}, got {axis!r}")
    if volume.ndim == 4:
        if not -volume.shape[3] <= frame < volume.shape[3]:
            raise IndexError(f"volume {frame} requested but the series has {volume.shape[3]}")
        volume = volume[..., frame]
    fixed = AXES.index(axis)
    count = volume.shape[fixed]
    position = count // 2 if index is None else index
    if not -count <= position < count:
        raise IndexError(f"{axis} slice {index} requested but the volume has {count}")
    if axis == "axial":  # rows: anterior -> posterior; columns: patient right -> left
        plane = volume[::-1, ::-1, position].T
    elif axis == "coronal":  # rows: superior -> inferior; columns: right -> left
        plane = volume[::-1, position, ::-1].T
    else:  # sagittal; rows: superior -> inferior; columns: anterior -> posterior
        plane = volume[position, ::-1, ::-1].T
    return np.ascontiguousarray(plane)


def read_nifti(
    path: str | Path,
    *,
    compressed: bool,
    axis: str = "axial",
    slice_index: int | None = None,
    volume: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice of a NIfTI file (default: the middle axial slice of the first volume).

    Returns:
        The ``(H, W)`` slice in the data's dtype (float64 -> float32, bool -> uint8) and an info dict
        ``{"format": "NIfTI", "mode", "original_size": [W, H], "shape", "orientation", "axis", "slice", "volume"}``.

    Raises:
        InvalidImageError: see :func:`read_nifti_volume`; also a slice or volume index out of range.
        ConfigError: an unknown axis.
    """
    if axis not in AXES:
        raise ConfigError(f"NIfTI axis must be one of {AXES}, got {axis!r}")
    data, info = read_nifti_volume(path, compressed=compressed)
    fixed = AXES.index(axis)
    position = data.shape[fixed] // 2 if slice_index is None else slice_index
    try:
        plane = volume_slice(data, axis, position, volume)
    except IndexError as error:
        raise InvalidImageError(path, str(error)) from None
    plane = native_slice(path, plane)
    check_image_size(path, plane.shape[1], plane.shape[0])
    info.update(
        mode=str(plane.dtype),
        original_size=[int(plane.shape[1]), int(plane.shape[0])],
        axis=axis,
        slice=int(position % data.shape[fixed]),
        volume=int(volume),
    )
    return plane, info


# -- machinery ---------------------------------------------------------------------------------------------------
def is_gzip_file(path: str | Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def read_prefix(path: str | Path, size: int, compressed: bool) -> bytes:
    """At most ``size`` bytes from the start of the (inflated) content: never more, whatever the file holds."""
    try:
        if compressed:
            with gzip.open(path, "rb") as stream:
                return stream.read(size)
        with open(path, "rb") as handle:
            return handle.read(min(size, os.fstat(handle.fileno()).st_size))
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated data ({error})") from None


def _header_layout(head: bytes) -> int | None:
    if len(head) >= 348:
        for order in ("<", ">"):
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == 348 and head[344:348] == _NIFTI1_MAGIC:
                return 1
            if size == 540 and head[4:8] == _NIFTI2_MAGIC and len(head) >= 540:
                return 2
    return None


def _parse_header(path: str | Path, head: bytes) -> tuple[tuple[int, ...], int, int, int]:
    """(shape, datatype code, voxel offset, bits per voxel) read straight from the header bytes."""
    layout = _header_layout(head)
    if layout is None:
        raise InvalidImageError(path, "not a NIfTI-1 or NIfTI-2 header")
    order = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
    if layout == 1:
        dims = struct.unpack(f"{order}8h", head[40:56])
        datatype, bits = struct.unpack(f"{order}hh", head[70:74])
        voxel_offset = int(struct.unpack(f"{order}f", head[108:112])[0])
    else:
        datatype, bits = struct.unpack(f"{order}hh", head[12:16])
        dims = struct.unpack(f"{order}8q", head[16:80])
        voxel_offset = int(struct.unpack(f"{order}q", head[168:176])[0])
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise InvalidImageError(path, f"NIfTI header gives {ndim} dimensions (expected 1 to 7)")
    shape = tuple(int(value) for value in dims[1 : 1 + ndim])
    check_volume_size(path, shape)
    if bits not in (1, 8, 16, 24, 32, 64, 128, 256) or not 0 <= voxel_offset <= _MAX_VOXEL_OFFSET:
        raise InvalidImageError(path, f"NIfTI header is damaged (bitpix {bits}, vox_offset {voxel_offset})")
    data_bytes = int(np.prod(shape, dtype=np.int64)) * max(int(bits), 8) // 8
    if voxel_offset + data_bytes > _max_decompressed_bytes():
        raise ImageTooLargeError(
            path,
            f"NIfTI data of {data_bytes} bytes exceeds medxai.data.readers.limits.MAX_DECOMPRESSED_BYTES = "
            f"{_max_decompressed_bytes()}; raise that limit if you trust this file",
        )
    return shape, int(datatype), voxel_offset, int(bits)


def _to_ras(path: str | Path, array: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, str]:
    import nibabel as nib
    from nibabel import orientations

    if affine is None or not np.isfinite(affine).all():
        logger.debug("%s: no usable affine; array order kept", path)
        return array, "unknown"
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        logger.debug("%s: degenerate affine; array order kept", path)
        return array, "unknown"
    codes = "".join(nib.aff2axcodes(affine))
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    return orientations.apply_orientation(array, transform), codes


def native_slice(path: str | Path, plane: np.ndarray) -> np.ndarray:
    if not plane.dtype.isnative:  # big-endian files: torch and most code want native byte order
        plane = plane.astype(plane.dtype.newbyteorder("="))
    if plane.dtype == bool:
        return plane.astype(np.uint8)
    if np.issubdtype(plane.dtype, np.floating):
        plane = plane.astype(np.float32)
        finite = np.isfinite(plane)
        if not finite.all():
            fill = float(plane[finite].min()) if finite.any() else 0.0
            logger.debug("%s: %d non-finite voxels set to %g", path, int((~finite).sum()), fill)
            plane = np.where(finite, plane, fill).astype(np.float32)
    return plane
