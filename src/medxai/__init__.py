"""medxai: medical image classification with CNNs, honest evaluation and Grad-CAM explanations.

The handful of names most users need::

    import medxai
    classifier = medxai.load("runs/demo")
    classifier.predict(["xray.png"])
    classifier.explain(["xray.png"])[0].overlay()

Names are imported on first use, so ``import medxai`` (and ``medxai --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "medxai.classifier",
    "Classifier": "medxai.classifier",
    "Prediction": "medxai.classifier",
    "Explanation": "medxai.classifier",
    "create_model": "medxai.models",
    "list_models": "medxai.models",
    "MedxaiError": "medxai.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medxai' has no attribute {name!r}")
