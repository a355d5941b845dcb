"""Readers: bytes on disk -> NumPy arrays, with typed errors naming the file.

One module per format family (:mod:`.image` dispatches on content: DICOM, NIfTI, else Pillow), :mod:`.limits` for the
size limits every decoder checks before allocating, and :mod:`.files` for what may be opened at all (regular files,
not FIFOs, sockets, devices or broken links; no hidden or system clutter).
"""

from medxai.data.readers.files import is_hidden_or_system, special_file_reason
from medxai.data.readers.image import probe_image, read_image, read_image_bytes, read_image_with_info

__all__ = ["read_image", "read_image_with_info", "read_image_bytes", "probe_image", "is_hidden_or_system", "special_file_reason"]
