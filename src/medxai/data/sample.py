"""The unit every data source yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Sample"]


@dataclass
class Sample:
    """One labelled image as a source yields it, before any preprocessing.

    Attributes:
        image: (H, W) or (H, W, C) array in its native dtype and range (uint8, uint16, float).
        label: class index, or None when unknown (prediction on unlabelled files).
        id: stable identifier: a path relative to the dataset root, or ``subset/split/index`` for arrays.
        meta: small dict of non-identifying facts (source path, original size, mode); never patient data.
    """

    image: np.ndarray
    label: int | None
    id: str
    meta: dict[str, Any] = field(default_factory=dict)
