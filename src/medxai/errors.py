"""One error hierarchy for everything medxai raises on purpose.

The CLI prints any :class:`MedxaiError` as a single clear line and exits non-zero; batch commands catch
the per-file ones (:class:`InvalidImageError`), list them in ``skipped.csv`` and carry on.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "MedxaiError",
    "InvalidImageError",
    "UnsupportedDicomError",
    "ImageTooLargeError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "ModelError",
    "DistributedError",
]


class MedxaiError(Exception):
    """Base class of every error medxai raises deliberately."""


class InvalidImageError(MedxaiError):
    """A single input file cannot be used as an image.

    Args:
        path: the offending file (or a sample id when there is no file).
        reason: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedDicomError(InvalidImageError):
    """A DICOM file that medxai cannot use as an image: a structured report, a waveform, a presentation state or
    any other object without pixel data, a segmentation, or an unsupported photometric interpretation or bit depth."""


class ImageTooLargeError(InvalidImageError):
    """An image, volume or compressed stream larger than the configured limits (a possible decompression bomb).

    The limits live in :mod:`medxai.data.readers.limits`; raise them there for files you trust.
    """


class DataError(MedxaiError):
    """A dataset as a whole is unusable (empty class folder, one class, missing file, unknown label...)."""


class ConfigError(MedxaiError):
    """A configuration value or key is invalid."""


class CheckpointError(MedxaiError):
    """A run folder or checkpoint is missing, incomplete or does not match its architecture."""


class ModelError(MedxaiError):
    """A model cannot be built as asked (unknown name, missing pretrained weights...)."""


class DistributedError(MedxaiError):
    """A distributed (``torchrun``) job cannot go on: a rank did not join or failed, or the agent is gone."""


# An absolute path: POSIX ("/srv/runs/x", two components at least, so "a/b" ratios and "/" alone are not paths),
# Windows ("C:\runs", "\\server\share"), a home ("~/x") or a file URL. Not preceded by a word character, a dot or a
# colon, so "image/png", "3/4" and "http://..." stay.
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/~-])(?:file://)?(?:~|[A-Za-z]:)?(?:[/\\]{1,2}[^\s/\\:'\"<>|,;()]+){2,}[/\\]?"
    r"|(?<![\w.:/~-])~[/\\][^\s:'\"<>|,;()]+"
)


def scrub_paths(text: str) -> str:
    """``text`` with every absolute file path replaced by ``<path>``: what reaches a user who is not the operator
    (a service's answer, a reason in ``skipped.csv`` quoting an exception) never shows the server's files."""
    return _ABSOLUTE_PATH.sub("<path>", text)
