"""HiResCAM: the element-wise product of gradients and activations, summed over channels.

Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional neural networks",
arXiv:2011.08891, 2020, Eq. 4:

    L = relu(sum_k dS/dA^k (.) A^k)

Unlike Grad-CAM, no average over positions: for a network whose head is global average pooling and a linear layer
the map is exactly each position's contribution to the score (up to the bias and the factor ``1/Z``), which is
what makes it faithful. Same formula as pytorch-grad-cam's ``HiResCAM``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medxai.explain.base import BaseCAM, CAMContext

__all__ = ["HiResCAM"]


class HiResCAM(BaseCAM):
    """HiResCAM (Draelos & Carin, 2020): ``relu(sum_k g^k * A^k)``, position by position."""

    def combine(self, activations: Tensor, gradients: Tensor | None, context: CAMContext) -> Tensor:
        """``(B, C, *spatial)`` activations and gradients -> ``(B, *spatial)`` map."""
        assert gradients is not None  # uses_gradients is True
        return torch.relu((gradients * activations).sum(dim=1))
