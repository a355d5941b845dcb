"""XGrad-CAM: channel weights from gradients times activations, normalised by the channel's total activation.

Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs", BMVC 2020
(arXiv:2008.02312), Eq. 13, derived from the sensitivity and conservation axioms:

    w_k = sum_ij (A_ij^k / sum_ab A_ab^k) dS/dA_ij^k                L = relu(sum_k w_k A^k)

A channel whose activations sum to exactly 0 gets weight 0 (the formula's 0/0 for an all-zero ReLU channel);
pytorch-grad-cam's ``XGradCAM`` adds ``1e-7`` to the denominator instead, which changes a weight by a relative
``1e-7 / sum_ab A_ab^k``: nothing, except for channels that are almost silent everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medxai.explain.base import BaseCAM

__all__ = ["XGradCAM"]


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al., BMVC 2020): gradients weighted by the normalised activations of their channel."""

    def channel_weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """``w_k = sum_ij A_ij^k g_ij^k / sum_ab A_ab^k``: ``(B, C, *spatial)`` -> ``(B, C)``."""
        assert gradients is not None  # uses_gradients is True
        flat_activations = activations.flatten(start_dim=2)
        numerator = (gradients.flatten(start_dim=2) * flat_activations).sum(dim=2)
        denominator = flat_activations.sum(dim=2)
        nonzero = denominator != 0
        return torch.where(nonzero, numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)),
                           torch.zeros_like(numerator))
