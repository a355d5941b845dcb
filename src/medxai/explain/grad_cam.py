"""Grad-CAM: channels weighted by their average gradient.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017
(arXiv:1610.02391), Eq. 1-2:

    alpha_k^c = 1/Z * sum_ij  d y^c / d A^k_ij        L^c = ReLU(sum_k alpha_k^c A^k)

with ``y^c`` the target score (the class logit, before softmax, as in the paper) and ``Z`` the number of positions
of the feature map (``D*H*W`` for 3D feature maps: the average runs over every spatial axis).
"""

from __future__ import annotations

from torch import Tensor

from medxai.explain.base import BaseCAM

__all__ = ["GradCAM"]


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017): each channel weighted by the spatial mean of its gradient.

    Example:
        >>> cam = GradCAM(model, target_layers="layer4")  # doctest: +SKIP
        >>> result = cam(batch)  # explains each sample's predicted class
        >>> result.maps.shape == batch.shape[:1] + batch.shape[2:]  # doctest: +SKIP
        True
    """

    def channel_weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """``alpha_k = mean_ij dy/dA^k_ij``: ``(B, C, *spatial)`` gradients -> ``(B, C)`` weights."""
        assert gradients is not None  # uses_gradients is True
        return gradients.flatten(start_dim=2).mean(dim=2)
