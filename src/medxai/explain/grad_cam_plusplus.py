"""Grad-CAM++: channel weights from positive gradients, each position weighted by a higher-order term.

Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks", WACV 2018
(arXiv:1710.11063), Eq. 19 with the closed form of Eq. 17 for an exponential output ``Y = exp(S)``, where the second
and third derivatives of ``Y`` are powers of the first derivative of the score ``S``:

    alpha_ij^k = g_ij^2 / (2 g_ij^2 + sum_ab A_ab^k g_ij^3)        (g = dS/dA^k)
    w_k = sum_ij alpha_ij^k relu(g_ij)                               L = relu(sum_k w_k A^k)

Deviations, both shared with pytorch-grad-cam's ``GradCAMPlusPlus``:

* ``relu(dS/dA)`` instead of the paper's ``relu(dY/dA) = exp(S) relu(dS/dA)``: the factor ``exp(S)`` is one positive
  number per sample, so it scales the map without changing its shape (and it overflows for large logits).
* ``alpha`` is 0 where the gradient is 0 (the paper's 0/0).

Where the denominator is exactly 0 for a nonzero gradient, ``alpha`` is 0, as in the authors' released code, which
divides only where the denominator is nonzero. pytorch-grad-cam instead adds ``1e-6`` to every denominator, which
dominates when gradients are small (``g^2`` below ``1e-6``, common with many classes or large feature maps) and then
turns the weights into ``~relu(g)^3 / 1e-6``; pass ``denominator_eps=1e-6`` to reproduce its maps exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medxai.explain.base import BaseCAM

__all__ = ["GradCAMPlusPlus"]


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018): positive gradients weighted per position by ``alpha``.

    Args:
        model: see :class:`~medxai.explain.base.BaseCAM`.
        target_layers: see :class:`~medxai.explain.base.BaseCAM`.
        denominator_eps: added to the ``alpha`` denominator; 0 (default) divides only where it is nonzero, as the
            authors' code does; ``1e-6`` reproduces pytorch-grad-cam.
        channels_last: see :class:`~medxai.explain.base.BaseCAM`.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        denominator_eps: float = 0.0,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(model, target_layers, channels_last=channels_last)
        self.denominator_eps = float(denominator_eps)

    def channel_weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """``w_k = sum_ij alpha_ij^k relu(g_ij^k)`` (Eq. 19): ``(B, C, *spatial)`` -> ``(B, C)``."""
        assert gradients is not None  # uses_gradients is True
        b, c = activations.shape[:2]
        grads = gradients.reshape(b, c, -1)
        grads_squared = grads * grads
        activation_sums = activations.reshape(b, c, -1).sum(dim=2, keepdim=True)
        denominator = 2.0 * grads_squared + activation_sums * grads_squared * grads + self.denominator_eps
        usable = (grads != 0) & (denominator != 0)
        alpha = torch.where(usable, grads_squared / torch.where(usable, denominator, torch.ones_like(denominator)),
                            torch.zeros_like(grads))
        return (alpha * torch.relu(grads)).sum(dim=2)
