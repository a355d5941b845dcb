"""The frame headers of compressed pixel data, parsed before any decoder sees the stream.

Decoders allocate what a compressed stream's own header claims, not what the DICOM header around it says: a DICOM file
of 20 x 20 pixels may carry a JPEG that claims 20000 x 20000. So each stream's frame header is found by walking the
stream's structure from its first byte, as a decoder would, never by searching for a pattern in its first bytes:

- **JPEG** (baseline, extended, lossless, JPEG-LS; ITU T.81 B.1 and T.87): SOI, then marker segments skipped by their
  lengths (fill bytes allowed before a marker) up to the first SOF marker (SOF0-SOF15, JPEG-LS SOF55); a stream
  that reaches its scan (SOS) or its end first has no frame header and is refused.
- **JPEG 2000 / HTJ2K** (ITU T.800 A.5.1, T.814): SOC, immediately followed by SIZ; a JP2 file is first unwrapped to
  its contiguous codestream box (``jp2c``).
- **RLE** (DICOM PS3.5 G.3.1): the 64-byte header of segment count (1-15) and offsets, which must start at 64,
  increase and stay inside the fragment.

A JPEG or JPEG 2000 stream must also end with its end marker (EOI, EOC: both ``FFD9``), padding aside
(:func:`check_end_marker`): decoders fill a cut stream with grey and report success, and a cut image is not one to
classify.

Every function raises :class:`CodestreamError` with a reason in words when the structure is not what the standard
says; callers refuse such a stream rather than decode it blind.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "CodestreamError",
    "FrameHeader",
    "check_end_marker",
    "jpeg_frame_header",
    "j2k_frame_header",
    "rle_segment_offsets",
]

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-RST7: no length field
_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_RLE_HEADER_BYTES = 64


class CodestreamError(ValueError):
    """A compressed stream whose structure is not what its standard says (the message is the reason)."""


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame will decode to: its size, its components (samples per pixel) and the most bits of
    any component."""

    width: int
    height: int
    components: int
    precision: int


def jpeg_frame_header(stream: bytes) -> FrameHeader:
    """The frame header (SOF segment) of a JPEG or JPEG-LS stream, wherever it is before the first scan.

    Raises:
        CodestreamError: no SOI, a damaged or cut segment, no SOF before SOS or the end, or an SOF without a size.
    """
    if stream[:2] != b"\xff\xd8":
        raise CodestreamError("JPEG stream without its start-of-image marker")
    position, end = 2, len(stream)
    while True:
        if position >= end:
            raise CodestreamError("JPEG stream ends before its frame header (SOF)")
        if stream[position] != 0xFF:
            raise CodestreamError(f"corrupt JPEG stream: no marker at byte {position} before the frame header")
        while position < end and stream[position] == 0xFF:  # fill bytes may precede any marker
            position += 1
        if position >= end:
            raise CodestreamError("JPEG stream ends before its frame header (SOF)")
        marker = stream[position]
        position += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == _SOS:
            raise CodestreamError("JPEG stream reaches its scan (SOS) without a frame header (SOF)")
        if marker in (_SOI, _EOI, 0x00):
            raise CodestreamError(f"corrupt JPEG stream: marker 0xFF{marker:02X} before the frame header")
        if position + 2 > end:
            raise CodestreamError("JPEG stream ends inside a marker segment")
        (length,) = struct.unpack(">H", stream[position : position + 2])
        if length < 2 or position + length > end:
            raise CodestreamError(f"JPEG marker segment 0xFF{marker:02X} with a bad or cut length ({length})")
        if marker in _SOF_MARKERS:
            return _jpeg_sof(stream[position + 2 : position + length], marker)
        position += length


def _jpeg_sof(body: bytes, marker: int) -> FrameHeader:
    if len(body) < 6:
        raise CodestreamError("JPEG frame header (SOF) too short")
    precision, height, width, components = struct.unpack(">BHHB", body[:6])
    if len(body) != 6 + 3 * components or components == 0:
        raise CodestreamError(f"JPEG frame header (SOF 0xFF{marker:02X}) with {components} components does not "
                              "match its length")
    if height == 0:
        raise CodestreamError("JPEG frame header gives no height (a DNL marker): not supported")
    if width == 0 or precision == 0:
        raise CodestreamError("JPEG frame header gives no width or no precision")
    return FrameHeader(width, height, components, precision)


def j2k_frame_header(stream: bytes) -> FrameHeader:
    """The image size, components and precision of a JPEG 2000 or HTJ2K codestream (or JP2 file) from its SIZ.

    Raises:
        CodestreamError: no SOC, SIZ not right after it, a cut or inconsistent SIZ, an empty image area.
    """
    if stream.startswith(_JP2_SIGNATURE):
        stream = _jp2_codestream(stream)
    if stream[:2] != b"\xff\x4f":
        raise CodestreamError("JPEG 2000 stream without its start-of-codestream marker (SOC)")
    if stream[:4] != _SOC_SIZ:
        raise CodestreamError("JPEG 2000 image and tile size segment (SIZ) does not follow SOC")
    if len(stream) < 6:
        raise CodestreamError("JPEG 2000 stream ends inside its SIZ segment")
    (length,) = struct.unpack(">H", stream[4:6])
    if length < 41 or len(stream) < 4 + length:
        raise CodestreamError(f"JPEG 2000 SIZ segment with a bad or cut length ({length})")
    (x_size, y_size, x_offset, y_offset, tile_width, tile_height, _, _, components) = struct.unpack(
        ">IIIIIIIIH", stream[8:42])
    if components == 0 or length != 38 + 3 * components:
        raise CodestreamError(f"JPEG 2000 SIZ segment with {components} components does not match its length")
    if x_offset >= x_size or y_offset >= y_size or tile_width == 0 or tile_height == 0:
        raise CodestreamError("JPEG 2000 SIZ segment gives an empty image or tile area")
    precision = 0
    for index in range(components):
        depth, x_step, y_step = stream[42 + 3 * index : 45 + 3 * index]
        if x_step == 0 or y_step == 0:
            raise CodestreamError("JPEG 2000 SIZ segment gives a component subsampling of 0")
        precision = max(precision, (depth & 0x7F) + 1)
    return FrameHeader(x_size - x_offset, y_size - y_offset, components, precision)


def _jp2_codestream(stream: bytes) -> bytes:
    """The contents of a JP2 file's contiguous codestream box (ISO 15444-1 I.4), boxes walked by their lengths."""
    position = 0
    while position + 8 <= len(stream):
        length, kind = struct.unpack(">I4s", stream[position : position + 8])
        header = 8
        if length == 1:
            if position + 16 > len(stream):
                break
            (length,) = struct.unpack(">Q", stream[position + 8 : position + 16])
            header = 16
        elif length == 0:
            length = len(stream) - position
        if length < header:
            raise CodestreamError(f"JP2 box {kind!r} with a bad length ({length})")
        if kind == b"jp2c":
            return stream[position + header : position + length]
        position += length
    raise CodestreamError("JP2 file without a contiguous codestream box (jp2c)")


def check_end_marker(stream: bytes) -> None:
    """Refuse a JPEG or JPEG 2000 stream that does not end with ``FFD9`` (EOI / EOC), once the padding that DICOM
    fragments and some writers add (``00`` or ``FF`` bytes) is set aside.

    Raises:
        CodestreamError: the stream was cut short.
    """
    if not stream.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise CodestreamError("the stream does not end with its end-of-image marker: truncated")


def rle_segment_offsets(fragment: bytes) -> list[int]:
    """The segment offsets of a DICOM RLE frame, checked against its header's rules and the fragment's length.

    Raises:
        CodestreamError: a header cut short, a segment count outside 1..15, offsets that do not start at 64, do not
            increase or point past the fragment.
    """
    if len(fragment) < _RLE_HEADER_BYTES:
        raise CodestreamError(f"RLE frame shorter than its {_RLE_HEADER_BYTES}-byte header ({len(fragment)} bytes)")
    count, *offsets = struct.unpack("<16I", fragment[:_RLE_HEADER_BYTES])
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header gives {count} segments (expected 1 to 15)")
    used = offsets[:count]
    if used[0] != _RLE_HEADER_BYTES:
        raise CodestreamError("RLE header: the first segment does not start right after the header")
    if any(later <= earlier for earlier, later in zip(used, used[1:])) or used[-1] >= len(fragment):
        raise CodestreamError("RLE header: segment offsets do not increase within the frame")
    return used
