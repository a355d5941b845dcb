"""Integrated Gradients: the path integral of the gradient from a baseline image to the input.

Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017 (arXiv:1703.01365), Eq. 1:

    IG_i(x) = (x_i - x'_i) * integral_0^1  d F(x' + a (x - x')) / d x_i  da

with ``F`` the explained target's score and ``x'`` the baseline; by completeness the attributions of an image add up
to ``F(x) - F(x')``. Computed by Captum's ``IntegratedGradients`` (Gauss-Legendre quadrature with ``n_steps``
points, Captum's default rule, exact for polynomials of degree ``2 n_steps - 1`` along the path), every image's
points batched into forwards of up to ``batch_size`` images on the model's device.

Choices:

* Baseline ``"zero"`` (default): 0 in the model's normalised space, i.e. the training data's mean intensity, Captum's
  default and the "black image" of the paper once inputs are normalised. ``"blur"`` (a Gaussian blur of the image,
  sigma ``5 * max(side) / 224`` px) is the blurred baseline of Sturmfels, Lundberg & Lee, "Visualizing the Impact of
  Feature Attribution Baselines", Distill 2020 (after Fong & Vedaldi, ICCV 2017): it does not ignore pixels that
  happen to equal the constant baseline, at the price of attributing mostly fine structure. ``"mean"``: the image's
  own mean.
* Map: the attributions summed over channels (a pixel's total, as completeness adds them), then the absolute value,
  as the paper's and Captum's visualisations (``visualize_image_attr``, ``sign="absolute_value"``) show them;
  ``sign="positive"`` keeps the evidence for the class only.
* ``n_steps=32``: the paper asks for 20-300 steps; Gauss-Legendre needs fewer than its Riemann sums (sized for CPU).

Works for 2D and 3D inputs alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain._attribution import (
    InputAttribution,
    ReferenceKind,
    RowScorer,
    Sign,
    check_reference_kind,
    reference_images,
)

__all__ = ["IntegratedGradients"]


class IntegratedGradients(InputAttribution):
    """Integrated Gradients (Sundararajan et al., ICML 2017) through Captum, called like a CAM.

    Example:
        >>> result = IntegratedGradients(model, baseline="blur")(batch)  # doctest: +SKIP

    Args:
        model: see :class:`~medxai.explain._attribution.InputAttribution`.
        target_layers: ignored.
        baseline: ``"zero"``, ``"blur"`` or ``"mean"`` (see the module docstring).
        n_steps: quadrature points along the path.
        batch_size: images per forward (at least the batch size: Captum batches whole steps).
        seed: unused (the method is deterministic); accepted for a uniform signature.
        sign: override the map's sign rule (default ``"absolute"``).

    Raises:
        ConfigError: ``n_steps`` or ``batch_size`` not positive, an unknown baseline or sign.
    """

    channels = "sum"
    default_sign = "absolute"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        baseline: ReferenceKind = "zero",
        n_steps: int = 32,
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        super().__init__(model, target_layers, batch_size=batch_size, seed=seed, sign=sign)
        if int(n_steps) < 1:
            raise ConfigError(f"IntegratedGradients n_steps must be positive, got {n_steps}")
        self.baseline = check_reference_kind(baseline)
        self.n_steps = int(n_steps)

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients

        sample_index = torch.arange(inputs.shape[0], device=inputs.device)
        return CaptumIntegratedGradients(scorer).attribute(
            inputs, baselines=reference_images(inputs, self.baseline), additional_forward_args=(sample_index,),
            n_steps=self.n_steps, method="gausslegendre", internal_batch_size=max(self.batch_size, inputs.shape[0]),
        )
