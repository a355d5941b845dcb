"""Explanations: class activation maps computed in the same forward pass as the prediction, input-attribution
methods (Integrated Gradients, GradientSHAP, Occlusion, RISE, LIME, KernelSHAP) called the same way, and overlays.

Example:
    >>> from medxai.explain import GradCAM, overlay_heatmap  # doctest: +SKIP
    >>> result = GradCAM(model)(batch)  # model.cam_layer, each sample's predicted class
    >>> rgb = overlay_heatmap(original_image, result.maps[0].cpu().numpy())
"""

from __future__ import annotations

from typing import Union

from medxai.errors import ConfigError
from medxai.explain._attribution import InputAttribution
from medxai.explain.base import BaseCAM, CAMResult
from medxai.explain.grad_cam import GradCAM
from medxai.explain.grad_cam_plusplus import GradCAMPlusPlus
from medxai.explain.gradient_shap import GradientSHAP
from medxai.explain.hirescam import HiResCAM
from medxai.explain.integrated_gradients import IntegratedGradients
from medxai.explain.kernel_shap import KernelSHAP
from medxai.explain.layercam import LayerCAM
from medxai.explain.lime import LIME
from medxai.explain.occlusion import Occlusion
from medxai.explain.rise import RISE
from medxai.explain.overlay import overlay_heatmap, save_heatmap_npy, save_overlay
from medxai.explain.score_cam import ScoreCAM
from medxai.explain.ensemble import EnsembleCAM  # noqa: E402  isort: skip
from medxai.models.ensemble import EnsembleModel
from medxai.explain.targets import (
    BinaryLogitTarget,
    ClassTarget,
    DecisionTarget,
    LogOddsTarget,
    PredictedClassTarget,
    SoftmaxProbabilityTarget,
    Target,
)
from medxai.explain.xgrad_cam import XGradCAM

__all__ = [
    "BaseCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "XGradCAM",
    "ScoreCAM",
    "InputAttribution",
    "IntegratedGradients",
    "GradientSHAP",
    "Occlusion",
    "RISE",
    "LIME",
    "KernelSHAP",
    "CAMResult",
    "ExplainMethod",
    "CAM_METHODS",
    "get_cam_method",
    "build_cam",
    "Target",
    "ClassTarget",
    "PredictedClassTarget",
    "LogOddsTarget",
    "DecisionTarget",
    "BinaryLogitTarget",
    "SoftmaxProbabilityTarget",
    "overlay_heatmap",
    "save_overlay",
    "save_heatmap_npy",
]

#: A heatmap method's class: built as ``method(model, target_layers, **options)``, called as
#: ``method(inputs, target) -> CAMResult``. Input-attribution methods accept ``target_layers`` and ignore it.
ExplainMethod = Union[type[BaseCAM], type[InputAttribution]]

#: Heatmap method name (as used by the CLI, configs and the service) -> class. One entry per method file; keys are
#: lower case without "-" or "_" (e.g. "gradcamplusplus", "integratedgradients"), as get_cam_method looks them up.
CAM_METHODS: dict[str, ExplainMethod] = {
    "gradcam": GradCAM,
    "gradcamplusplus": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "scorecam": ScoreCAM,
    "integratedgradients": IntegratedGradients,
    "gradientshap": GradientSHAP,
    "occlusion": Occlusion,
    "rise": RISE,
    "lime": LIME,
    "kernelshap": KernelSHAP,
}


def get_cam_method(name: str) -> ExplainMethod:
    """The CAM class registered under ``name``; case, ``-`` and ``_`` are ignored (``"Grad-CAM"`` -> GradCAM),
    and ``+`` reads as "plus" (``"Grad-CAM++"`` -> GradCAMPlusPlus, ``"integrated_gradients"`` ->
    IntegratedGradients).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    key = name.lower().replace("-", "").replace("_", "").replace("+", "plus")
    try:
        return CAM_METHODS[key]
    except KeyError:
        raise ConfigError(f"unknown CAM method {name!r}; available: {', '.join(sorted(CAM_METHODS))}") from None


def build_cam(model, method: str, layer: str | list[str] | None):
    """The heatmap method ``method`` for ``model`` at ``layer`` (ignored by input-attribution methods); for an
    ensemble, each member at its own layer averaged (:class:`~medxai.explain.ensemble.EnsembleCAM`; ``layer`` is
    then ignored)."""
    cam_class = get_cam_method(method)
    if isinstance(model, EnsembleModel):
        return EnsembleCAM(cam_class, model)
    return cam_class(model, layer or getattr(model, "cam_layer", None))
