"""Readers: bytes on disk or in memory -> NumPy arrays, with typed errors naming the input.

One module per format family (:mod:`.image` dispatches on content: DICOM, NIfTI, else Pillow; :mod:`.codestreams`
reads the frame headers of compressed DICOM pixel data), :mod:`.limits` for the size limits every decoder checks
before allocating (:class:`ReadLimits`), :mod:`.dicom_terms` for the header values a message may name, and
:mod:`.files` for what may be opened at all (regular files, not FIFOs, sockets, devices or broken links; no hidden or
system clutter).
"""

from medxai.data.readers._reasons import unexpected_error_reason
from medxai.data.readers.files import is_hidden_or_system, special_file_reason
from medxai.data.readers.image import (
    probe_image,
    probe_image_bytes,
    read_image,
    read_image_bytes,
    read_image_with_info,
)
from medxai.data.readers.limits import ReadLimits

__all__ = [
    "ReadLimits",
    "read_image",
    "read_image_with_info",
    "read_image_bytes",
    "probe_image",
    "probe_image_bytes",
    "is_hidden_or_system",
    "special_file_reason",
    "unexpected_error_reason",
]
