"""Keep the service's memory from growing with every thread that ever decoded an upload.

glibc's malloc serves an allocation above ``M_MMAP_THRESHOLD`` with a mapping of its own, returned to the system when
freed; smaller ones come from per-thread arenas (up to eight per core), whose freed memory stays with the process.
The threshold starts at 128 KiB, but glibc raises it (up to 32 MiB) each time such a mapping is freed, so a process
that decodes images in a pool of threads soon carves its multi-megabyte buffers out of dozens of arenas and keeps
them. Measured on ``medxai serve`` (2-core CPU dev machine, 64 concurrent clients, 4 rounds of 256 PNG uploads of
1500 x 1500 to 1850 x 1500 pixels, RSS growth after each round): 283-470 MiB with glibc's defaults, 305-354 MiB with
two arenas (``MALLOC_ARENA_MAX=2``), 54-72 MiB with the threshold fixed at 1 MiB from the process's start
(``MALLOC_MMAP_THRESHOLD_=1048576``, which also turns the raising off) and 86-125 MiB when the service fixes it as it
loads the model (:func:`fix_mmap_threshold`), at the same throughput.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

logger = logging.getLogger(__name__)

#: Allocations from this size up get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (see the module docstring).

    Returns:
        True where it was set; False elsewhere (another C library or system), where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    logger.debug("malloc mmap threshold fixed at %d bytes: %s", threshold, done)
    return done
