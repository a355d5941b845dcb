"""LayerCAM: each position's activations weighted by that position's positive gradient.

Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization", IEEE TIP 30, 2021,
Eq. 4-5:

    w_ij^k = relu(dS/dA_ij^k)        L = relu(sum_k w^k (.) A^k)

Position-wise weights keep fine detail, so LayerCAM is meant for shallow layers too. Deviation: when several
target layers are given, the paper rescales the maps of shallow layers with ``tanh(2 L / max L)`` before fusing
them; here every method fuses layers the same way (the mean of per-layer min-max normalised maps, see
:class:`~medxai.explain.base.BaseCAM`), as pytorch-grad-cam's ``LayerCAM`` does. With one layer the two agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medxai.explain.base import BaseCAM, CAMContext

__all__ = ["LayerCAM"]


class LayerCAM(BaseCAM):
    """LayerCAM (Jiang et al., IEEE TIP 2021): ``relu(sum_k relu(g^k) * A^k)``, position by position."""

    def combine(self, activations: Tensor, gradients: Tensor | None, context: CAMContext) -> Tensor:
        """``(B, C, *spatial)`` activations and gradients -> ``(B, *spatial)`` map."""
        assert gradients is not None  # uses_gradients is True
        return torch.relu((torch.relu(gradients) * activations).sum(dim=1))
