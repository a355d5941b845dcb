"""Where labelled images come from: image folders, CSV manifests, MedMNIST files and volume slices, behind one
protocol; one small class per source, one file each.

Every source lists lightweight :class:`Record` objects (no pixels) and decodes one at a time with ``load``, which
returns a :class:`~medxai.data.sources.base.Sample`. :func:`open_source` picks the right source for a path or name::

    source = open_source("pneumoniamnist")                       # MedMNIST subset, found or downloaded
    source = open_source("/data/chest_xray", patient_pattern=KERMANY_PATIENT_PATTERN)
    source = open_source("labels.csv")                           # manifest
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medxai.data.sources.base import SPLIT_NAMES, Record, Sample, Source
from medxai.data.sources.folder import KERMANY_PATIENT_PATTERN, ImageFolderSource
from medxai.data.sources.manifest import ManifestSource
from medxai.data.sources.medmnist import MEDMNIST_SIZES, MEDMNIST_SUBSETS, MedMNISTSource, is_medmnist_name
from medxai.data.sources.volume import VolumeSliceSource
from medxai.errors import ConfigError, DataError

__all__ = [
    "Sample",
    "Record",
    "Source",
    "SPLIT_NAMES",
    "open_source",
    "ImageFolderSource",
    "MedMNISTSource",
    "ManifestSource",
    "VolumeSliceSource",
    "KERMANY_PATIENT_PATTERN",
    "MEDMNIST_SUBSETS",
    "MEDMNIST_SIZES",
]

_OPTIONS_BY_KIND: dict[type, frozenset[str]] = {
    ImageFolderSource: frozenset({"patient_pattern", "split_folders"}),
    ManifestSource: frozenset({"root", "label_names", "patient_pattern"}),
    MedMNISTSource: frozenset({"size", "data_dir", "download"}),
}

_SPEC_HELP = (
    "expected an image folder, a .csv manifest, a MedMNIST .npz file or a MedMNIST subset name "
    f"({', '.join(sorted(MEDMNIST_SUBSETS))})"
)


def _resolve_in_data_dir(path: Path) -> Path:
    """A relative path that does not exist here is looked up in ``$MEDXAI_DATA_DIR`` (presets name data that way)."""
    data_dir = os.environ.get("MEDXAI_DATA_DIR")
    if path.exists() or path.is_absolute() or not data_dir:
        return path
    candidate = Path(data_dir) / path
    return candidate if candidate.exists() else path


def open_source(spec: str | Path, **options: Any) -> Source:
    """Open the data source that ``spec`` names.

    - a MedMNIST subset name (``"pneumoniamnist"``, any case) or an ``.npz`` file -> :class:`MedMNISTSource`;
      a bare subset name wins over a folder of the same name (write ``./pneumoniamnist`` for the folder);
    - a ``.csv`` file -> :class:`ManifestSource`;
    - a folder -> :class:`ImageFolderSource`.

    Args:
        spec: the name or path.
        **options: keyword options of the chosen source class (``patient_pattern``, ``split_folders``; ``root``,
            ``label_names``, ``patient_pattern``; ``size``, ``data_dir``, ``download``). An option the chosen class
            does not take is ignored when it is None (so callers can pass their whole configuration), and an error
            otherwise.

    Returns:
        The source.

    Raises:
        DataError: ``spec`` names nothing usable.
        ConfigError: an option does not apply to the chosen kind of source.
    """
    text = str(spec)
    path = _resolve_in_data_dir(Path(text).expanduser())
    spec = path if path.exists() else spec
    if isinstance(spec, str) and is_medmnist_name(text):
        kind: type = MedMNISTSource
    elif path.suffix.lower() == ".npz":
        kind = MedMNISTSource
    elif path.suffix.lower() == ".csv":
        kind = ManifestSource
    elif path.is_dir():
        kind = ImageFolderSource
    elif not path.exists():
        raise DataError(f"no such file or folder: {text}; {_SPEC_HELP}")
    else:
        raise DataError(f"cannot use {text} as a data source; {_SPEC_HELP}")

    accepted = _OPTIONS_BY_KIND[kind]
    unknown = sorted(name for name, value in options.items() if name not in accepted and value is not None)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} do not apply to {kind.__name__} "
            f"(it accepts: {', '.join(sorted(_OPTIONS_BY_KIND[kind]))})"
        )
    return kind(spec, **{name: value for name, value in options.items() if name in accepted})
