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

Every header field that feeds an allocation, an offset or a shape is validated before use (:func:`parse_header`):
the dimensions, the data type and its bit depth, ``vox_offset`` (finite, whole, past the header) and the size the
header implies against :mod:`medxai.data.readers.limits` and against the file's own size (or, for ``.nii.gz``, the
length the stream inflates to: no more bytes than the header announces are ever inflated). Fields that only place
the volume in space (``pixdim``, the qform and sform) may be anything: a volume whose affine cannot be computed or is
not finite is read in its stored axis order. The voxels are read by NumPy from the file's bytes; reading one slice
scales that slice only, so a scaled volume never exists in float64 as a whole.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxai.data.readers.limits import (
    ReadLimits,
    check_decoded_bytes,
    check_image_size,
    check_volume_size,
    resolve,
)
from medxai.errors import ConfigError, InvalidImageError

__all__ = [
    "AXES",
    "HEADER_PEEK_BYTES",
    "NiftiHeader",
    "looks_like_nifti",
    "looks_like_nifti_pair",
    "parse_header",
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
_HEADER_SIZES = {1: 348, 2: 540}
HEADER_PEEK_BYTES = 544
_MAX_VOXEL_OFFSET = 2**24  # header plus extensions; anything beyond is a damaged header

# NIfTI datatype codes (nifti1.h): code -> (NumPy type, bits per voxel). Those medxai reads...
_DATATYPES = {
    2: ("u1", 8), 4: ("i2", 16), 8: ("i4", 32), 16: ("f4", 32), 64: ("f8", 64),
    256: ("i1", 8), 512: ("u2", 16), 768: ("u4", 32), 1024: ("i8", 64), 1280: ("u8", 64),
}
# ... and those it knows but does not read (no grey intensity to classify, or no portable NumPy type).
_UNSUPPORTED_DATATYPES = {
    1: ("binary (1 bit)", 1), 32: ("complex64", 64), 128: ("RGB24", 24), 1536: ("float128", 128),
    1792: ("complex128", 128), 2048: ("complex256", 256), 2304: ("RGBA32", 32),
}


@dataclass(frozen=True)
class NiftiHeader:
    """What a validated NIfTI header says about the data: every field already checked (see :func:`parse_header`).

    Attributes:
        version: 1 or 2.
        shape: the data's dimensions (trailing ones beyond the fourth dropped).
        datatype: the NIfTI datatype code.
        dtype: the voxels' NumPy type, in the file's byte order.
        byte_order: the header's byte order, ``"<"`` or ``">"``.
        voxel_offset: where the voxels start, in bytes from the start of the (inflated) file.
        slope, inter: the value scaling (None and 0.0: none, as for ``scl_slope`` 0 or not finite).
        block: the raw header bytes (for the affine).
    """

    version: int
    shape: tuple[int, ...]
    datatype: int
    dtype: np.dtype
    byte_order: str
    voxel_offset: int
    slope: float | None
    inter: float
    block: bytes

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def end(self) -> int:
        """The bytes a complete file holds at least: the header, the extensions and the voxels."""
        return self.voxel_offset + self.data_bytes


def looks_like_nifti(head: bytes) -> bool:
    """Whether a file's first bytes (inflated, for ``.gz``) are a single-file NIfTI-1 or NIfTI-2 header."""
    return _header_layout(head) is not None


def looks_like_nifti_pair(head: bytes) -> bool:
    """Whether the bytes are the header of a ``.hdr``/``.img`` NIfTI pair (not supported: convert to ``.nii``)."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(f"{order}i", head[:4])[0] == 348 and head[344:348] in _PAIR_MAGICS:
            return True
    return False


def probe_nifti(path: str | Path, head: bytes, *, limits: ReadLimits | None = None,
                file_size: int | None = None) -> dict[str, Any]:
    """Shape and data type from the header bytes alone, plus the middle axial slice's stored size.

    Args:
        path: the file (named in errors).
        head: its first :data:`HEADER_PEEK_BYTES` bytes (inflated, for ``.gz``).
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.
        file_size: the size of an uncompressed file, to find one cut short before reading it.

    Returns:
        ``{"format": "NIfTI", "mode", "original_size", "shape", "decoded_bytes"}``, where ``decoded_bytes`` is what
        reading a slice allocates at most: the (inflated) file and the slice in float64.

    Raises:
        InvalidImageError: the header is damaged, the file shorter than the header says.
        ImageTooLargeError: the header claims more than the limits.
    """
    header = parse_header(path, head, limits)
    if file_size is not None:
        _check_length(path, file_size, header)
    shape = header.shape
    return {
        "format": "NIfTI",
        "mode": f"NIfTI datatype {header.datatype}",
        "original_size": [shape[0], shape[1] if len(shape) > 1 else 1],
        "shape": list(shape),
        "decoded_bytes": header.end + 8 * _largest_slice(shape),
    }


def read_nifti_volume(path: str | Path, *, compressed: bool, data: bytes | None = None,
                      limits: ReadLimits | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a whole volume, reoriented to RAS+ (see the module docstring).

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        compressed: the content is gzip-compressed (``.nii.gz``), whatever its name.
        data: the file's bytes, when already in memory.
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.

    Returns:
        ``(X, Y, Z)`` or ``(X, Y, Z, T)`` array in RAS+ order (2D images get Z = 1) and ``{"format": "NIfTI",
        "shape", "orientation"}`` where orientation is the original axis codes, e.g. ``"LPS"``.

    Raises:
        ImageTooLargeError: the header claims more voxels or bytes than the limits.
        InvalidImageError: a damaged or truncated file, or an unsupported data type.
    """
    header, stored = _stored_volume(path, compressed, data, limits)
    ornt, codes = _orientation(path, header)
    scaled = _scaled(stored, header)
    return _reoriented(scaled, ornt), {"format": "NIfTI", "shape": list(stored.shape), "orientation": codes}


def volume_slice(volume: np.ndarray, axis: str = "axial", index: int | None = None, frame: int = 0) -> np.ndarray:
    """One 2D slice of a RAS+ volume in the radiological display convention (module docstring).

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, T)`` in RAS+ order, as :func:`read_nifti_volume` returns.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: slice index along the axis in RAS order (inferior to superior, posterior to anterior, left to right);
            negative counts from the end; None takes the middle slice.
        frame: which volume of a 4D series.

    Returns:
        A new C-ordered array (never a view of ``volume``).

    Raises:
        ConfigError: an unknown axis.
        IndexError: ``index`` or ``frame`` out of range.
    """
    _check_axis(axis)
    if volume.ndim == 4:
        volume = volume[..., _frame_position(frame, volume.shape[3])]
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
    return np.array(plane, order="C")


def read_nifti(
    path: str | Path,
    *,
    compressed: bool,
    data: bytes | None = None,
    axis: str = "axial",
    slice_index: int | None = None,
    volume: int = 0,
    limits: ReadLimits | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice of a NIfTI file (default: the middle axial slice of the first volume).

    Only that slice is scaled and reoriented: the rest of the volume stays the file's bytes.

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        compressed: the content is gzip-compressed.
        data: the file's bytes, when already in memory.
        axis, slice_index, volume: see :func:`medxai.data.readers.read_image`.
        limits: see :class:`~medxai.data.readers.limits.ReadLimits`.

    Returns:
        The ``(H, W)`` slice in the data's dtype (float64 -> float32) and an info dict ``{"format": "NIfTI", "mode",
        "original_size": [W, H], "shape", "orientation", "axis", "slice", "volume"}``.

    Raises:
        InvalidImageError: see :func:`read_nifti_volume`; also a slice or volume index out of range.
        ConfigError: an unknown axis.
    """
    _check_axis(axis)
    limits = resolve(limits)
    header, stored = _stored_volume(path, compressed, data, limits)
    ornt, codes = _orientation(path, header)
    fixed = AXES.index(axis)
    stored_axis, flipped = (fixed, False) if ornt is None else _stored_axis(ornt, fixed)
    count = stored.shape[stored_axis]
    position = count // 2 if slice_index is None else slice_index
    if not -count <= position < count:
        raise InvalidImageError(path, f"{axis} slice {slice_index} requested but the volume has {count}")
    position %= count
    # The one stored slice that becomes the RAS slice asked for (and the one volume of a series), kept 3D or 4D with
    # a length-1 axis so that reorienting it is the reorientation of the whole volume.
    selection: list[slice] = [slice(None)] * stored.ndim
    stored_index = count - 1 - position if flipped else position
    selection[stored_axis] = slice(stored_index, stored_index + 1)
    if stored.ndim == 4:
        try:
            frame = _frame_position(volume, stored.shape[3])
        except IndexError as error:
            raise InvalidImageError(path, str(error)) from None
        selection[3] = slice(frame, frame + 1)
    part = _reoriented(_scaled(stored[tuple(selection)], header), ornt)
    plane = native_slice(path, volume_slice(part, axis, 0))
    check_image_size(path, plane.shape[1], plane.shape[0], limits)
    info = {
        "format": "NIfTI",
        "mode": str(plane.dtype),
        "original_size": [int(plane.shape[1]), int(plane.shape[0])],
        "shape": list(stored.shape),
        "orientation": codes,
        "axis": axis,
        "slice": int(position),
        "volume": int(volume),
    }
    return plane, info


# -- the header ----------------------------------------------------------------------------------------------------
def parse_header(path: str | Path, head: bytes, limits: ReadLimits | None = None) -> NiftiHeader:
    """Every field of a NIfTI-1 or NIfTI-2 header that decides an allocation, an offset or a shape, validated.

    Raises:
        InvalidImageError: not a NIfTI header, or a damaged one: dim[0] outside 1..7, an empty dimension, an unknown
            datatype or one whose bitpix disagrees, a vox_offset that is not finite, not whole, inside the header or
            beyond 16 MiB; an unsupported datatype (complex, RGB, binary, float128) or more than 4 dimensions.
        ImageTooLargeError: more voxels or data bytes than ``limits`` allow.
    """
    layout = _header_layout(head)
    if layout is None:
        raise InvalidImageError(path, "not a NIfTI-1 or NIfTI-2 header")
    order = "<" if struct.unpack("<i", head[:4])[0] in _HEADER_SIZES.values() else ">"
    if layout == 1:
        dims = struct.unpack(f"{order}8h", head[40:56])
        datatype, bits = struct.unpack(f"{order}hh", head[70:74])
        voxel_offset, slope, inter = struct.unpack(f"{order}3f", head[108:120])
    else:
        datatype, bits = struct.unpack(f"{order}hh", head[12:16])
        dims = struct.unpack(f"{order}8q", head[16:80])
        voxel_offset, slope, inter = struct.unpack(f"{order}q2d", head[168:192])
    shape = _shape(path, dims, limits)
    dtype = _dtype(path, datatype, bits).newbyteorder(order)
    header = NiftiHeader(
        version=layout, shape=shape, datatype=int(datatype), dtype=dtype, byte_order=order,
        voxel_offset=_voxel_offset(path, voxel_offset, _HEADER_SIZES[layout]),
        slope=_slope(slope), inter=float(inter) if math.isfinite(inter) else 0.0,
        block=bytes(head[: _HEADER_SIZES[layout]]),
    )
    check_decoded_bytes(path, header.end, "NIfTI data", limits)
    return header


def _header_layout(head: bytes) -> int | None:
    if len(head) >= 348:
        for order in ("<", ">"):
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == 348 and head[344:348] == _NIFTI1_MAGIC:
                return 1
            if size == 540 and head[4:8] == _NIFTI2_MAGIC and len(head) >= 540:
                return 2
    return None


def _damaged(path: str | Path, detail: str) -> InvalidImageError:
    return InvalidImageError(path, f"NIfTI header is damaged: {detail}")


def _shape(path: str | Path, dims: tuple[int, ...], limits: ReadLimits | None) -> tuple[int, ...]:
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise _damaged(path, f"dim[0] = {ndim} (expected 1 to 7 dimensions)")
    shape = [int(value) for value in dims[1 : 1 + ndim]]
    check_volume_size(path, shape, limits)
    while len(shape) > 4 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise InvalidImageError(path, f"NIfTI with {len(shape)} dimensions {tuple(shape)} is not supported")
    return tuple(shape)


def _dtype(path: str | Path, datatype: int, bits: int) -> np.dtype:
    known = _DATATYPES.get(datatype) or _UNSUPPORTED_DATATYPES.get(datatype)
    if known is None:
        raise _damaged(path, f"unknown datatype {datatype}")
    name, expected_bits = known
    if bits != expected_bits:
        raise _damaged(path, f"bitpix {bits} does not match datatype {datatype} ({expected_bits} bits)")
    if datatype in _UNSUPPORTED_DATATYPES:
        raise InvalidImageError(path, f"NIfTI datatype {datatype} ({name}) is not supported (expected grey numbers)")
    return np.dtype(name)


def _voxel_offset(path: str | Path, value: float | int, header_size: int) -> int:
    if not math.isfinite(value) or value != int(value):
        raise _damaged(path, f"vox_offset {value} (not a whole number of bytes)")
    if not header_size <= value <= _MAX_VOXEL_OFFSET:
        raise _damaged(path, f"vox_offset {int(value)} (expected {header_size} to {_MAX_VOXEL_OFFSET})")
    return int(value)


def _slope(slope: float) -> float | None:
    """The value scaling's slope as nibabel reads it: none for a zero or non-finite slope. (A non-finite intercept,
    which nibabel refuses, counts as 0.)"""
    if slope == 0 or not math.isfinite(slope):
        return None
    return float(slope)


def _check_length(path: str | Path, available: int, header: NiftiHeader) -> None:
    if available < header.end:
        raise InvalidImageError(path, f"truncated NIfTI file: {available} of {header.end} bytes")


def _largest_slice(shape: tuple[int, ...]) -> int:
    spatial = sorted((list(shape) + [1, 1, 1])[:3])
    return spatial[-1] * spatial[-2]


# -- the voxels ----------------------------------------------------------------------------------------------------
def _stored_volume(path: str | Path, compressed: bool, data: bytes | None, limits: ReadLimits | None
                   ) -> tuple[NiftiHeader, np.ndarray]:
    """The validated header and the voxels in stored order: a read-only view of the file's bytes, 3D or 4D."""
    header = parse_header(path, read_prefix(path, HEADER_PEEK_BYTES, compressed, data), limits)
    if compressed:
        content = read_prefix(path, header.end, True, data)
        available = len(content)
    elif data is not None:
        content, available = data, len(data)
    else:
        available = os.stat(path).st_size
        _check_length(path, available, header)  # from the header, before reading a voxel
        content = read_prefix(path, header.end, False)
        available = len(content)
    _check_length(path, available, header)
    count = math.prod(header.shape)
    stored = np.frombuffer(content, dtype=header.dtype, count=count, offset=header.voxel_offset)
    shape = header.shape + (1,) * (3 - len(header.shape))
    return header, stored.reshape(shape, order="F")


def _scaled(values: np.ndarray, header: NiftiHeader) -> np.ndarray:
    """``scl_slope``/``scl_inter`` applied as nibabel applies them (integers become float64)."""
    if header.slope is None:
        return values
    from nibabel.volumeutils import apply_read_scaling

    return apply_read_scaling(values, np.asanyarray(header.slope), np.asanyarray(header.inter))


def _orientation(path: str | Path, header: NiftiHeader) -> tuple[np.ndarray | None, str]:
    """nibabel's orientation of the stored axes (and their codes, e.g. ``"LPS"``), None where the affine is unusable:
    pixdim, qform and sform may hold anything, and then the stored order is kept."""
    import nibabel as nib
    from nibabel import orientations

    header_class = nib.Nifti2Header if header.version == 2 else nib.Nifti1Header
    try:
        with np.errstate(all="ignore"):
            affine = header_class(header.block, endianness=header.byte_order, check=False).get_best_affine()
            if not np.isfinite(affine).all():
                raise ValueError("the affine is not finite")
            ornt = orientations.io_orientation(affine)
            if np.isnan(ornt).any():
                raise ValueError("the affine is degenerate")
            codes = "".join(nib.aff2axcodes(affine))
    except Exception as error:  # noqa: BLE001 - a damaged affine only costs the orientation
        logger.debug("%s: no usable affine (%s); array order kept", path, type(error).__name__)
        return None, "unknown"
    return ornt, codes


def _stored_axis(ornt: np.ndarray, ras_axis: int) -> tuple[int, bool]:
    """The stored axis that becomes RAS axis ``ras_axis``, and whether it runs backwards."""
    stored = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
    return stored, bool(ornt[stored, 1] < 0)


def _reoriented(values: np.ndarray, ornt: np.ndarray | None) -> np.ndarray:
    if ornt is None:
        return values
    from nibabel import orientations

    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    return orientations.apply_orientation(values, transform)


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ConfigError(f"NIfTI axis must be one of {AXES}, got {axis!r}")


def _frame_position(frame: int, frames: int) -> int:
    if not -frames <= frame < frames:
        raise IndexError(f"volume {frame} requested but the series has {frames}")
    return frame % frames


# -- machinery ---------------------------------------------------------------------------------------------------
def is_gzip_file(path: str | Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def read_prefix(path: str | Path, size: int, compressed: bool, data: bytes | None = None) -> bytes:
    """At most ``size`` bytes from the start of the (inflated) content: never more, whatever the file holds.

    Args:
        path: the file (named in errors; read unless ``data`` is given).
        size: most bytes to return.
        compressed: inflate the content (gzip).
        data: the file's bytes, when already in memory.
    """
    try:
        if compressed:
            source = gzip.GzipFile(fileobj=io.BytesIO(data)) if data is not None else gzip.open(path, "rb")
            with source as stream:
                return stream.read(size)
        if data is not None:
            return data[:size]
        with open(path, "rb") as handle:
            return handle.read(min(size, os.fstat(handle.fileno()).st_size))
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidImageError(path, f"corrupt or truncated data ({error})") from None


def native_slice(path: str | Path, plane: np.ndarray) -> np.ndarray:
    """A slice as later stages want it: native byte order, bool as uint8, floats as float32 with non-finite values
    replaced by the smallest finite one."""
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
