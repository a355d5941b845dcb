"""Explanations: class activation maps computed in the same forward pass as the prediction, and overlays.

Example:
    >>> from medxai.explain import GradCAM, overlay_heatmap  # doctest: +SKIP
    >>> result = GradCAM(model)(batch)  # model.cam_layer, each sample's predicted class
    >>> rgb = overlay_heatmap(original_image, result.maps[0].cpu().numpy())
"""

from __future__ import annotations

from medxai.errors import ConfigError
from medxai.explain.base import BaseCAM, CAMResult
from medxai.explain.grad_cam import GradCAM
from medxai.explain.overlay import overlay_heatmap, save_heatmap_npy, save_overlay
from medxai.explain.targets import (
    BinaryLogitTarget,
    ClassTarget,
    PredictedClassTarget,
    SoftmaxProbabilityTarget,
    Target,
)

__all__ = [
    "BaseCAM",
    "GradCAM",
    "CAMResult",
    "CAM_METHODS",
    "get_cam_method",
    "Target",
    "ClassTarget",
    "PredictedClassTarget",
    "BinaryLogitTarget",
    "SoftmaxProbabilityTarget",
    "overlay_heatmap",
    "save_overlay",
    "save_heatmap_npy",
]

#: CAM method name (as used by the CLI and configs) -> class. One entry per method file; keys are lower case
#: without "-" or "_" (e.g. "gradcamplusplus", "hirescam"), as get_cam_method looks them up.
CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
}


def get_cam_method(name: str) -> type[BaseCAM]:
    """The CAM class registered under ``name``; case, ``-`` and ``_`` are ignored (``"Grad-CAM"`` -> GradCAM).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    key = name.lower().replace("-", "").replace("_", "")
    try:
        return CAM_METHODS[key]
    except KeyError:
        raise ConfigError(f"unknown CAM method {name!r}; available: {', '.join(sorted(CAM_METHODS))}") from None
