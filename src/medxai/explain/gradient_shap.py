"""GradientSHAP (expected gradients): Integrated Gradients averaged over random baselines and interpolation points.

Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017 (arXiv:1705.07874), and
Erion et al., "Improving performance of deep learning models with axiomatic attribution priors and expected
gradients", Nature Machine Intelligence 3, 2021 (arXiv:1906.10670):

    phi_i(x) = E_{x' ~ D, a ~ U(0, 1), e ~ N(0, s^2)} [ (x + e - x')_i * d F(x' + a (x + e - x')) / d x_i ]

estimated with ``n_samples`` draws per image by Captum's ``GradientShap`` (a baseline drawn from the reference
distribution ``D``, an interpolation point ``a``, optional SmoothGrad noise of standard deviation ``stdevs`` on the
input). ``F`` is the explained target's score.

Choices and where medxai differs from a plain Captum call:

* References ``D``: by default each image's own ``"zero"`` image (0 in the normalised space, the training mean) and
  its ``"blur"`` (see :mod:`medxai.explain.integrated_gradients`), drawn with equal probability; or a tensor
  ``(R, C, *spatial)`` of reference images shared by all images, such as a sample of training images (Erion et al.'s
  expected gradients proper).
* Each image is attributed by its own Captum call (its ``n_samples`` copies in one forward), under global generators
  seeded with ``seed`` (:func:`~medxai.explain._attribution.seeded_global_generators`): an image's map does not
  depend on the batch it comes in, and two calls give the same map.
* Map: summed over channels, then the absolute value, as for Integrated Gradients (``sign`` overrides it).
* ``n_samples=32`` (Captum's default is 5; the variance of the estimate falls as ``1 / n_samples``), sized for CPU;
  ``stdevs=0`` (Captum's default: no SmoothGrad noise).

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
    seeded_global_generators,
)

__all__ = ["GradientSHAP"]


class GradientSHAP(InputAttribution):
    """GradientSHAP / expected gradients (Lundberg & Lee 2017; Erion et al. 2021) through Captum, called like a CAM.

    Args:
        model: see :class:`~medxai.explain._attribution.InputAttribution`.
        target_layers: ignored.
        baselines: reference kinds drawn per image (``"zero"``, ``"blur"``, ``"mean"``), or a tensor
            ``(R, C, *spatial)`` of reference images in the model's normalised space.
        n_samples: random draws per image.
        stdevs: standard deviation of the Gaussian noise added to the input (SmoothGrad); 0 for none.
        batch_size: unused (each image's ``n_samples`` copies go in one forward); accepted for a uniform signature.
        seed: seed of the draws.
        sign: override the map's sign rule (default ``"absolute"``).

    Raises:
        ConfigError: ``n_samples`` not positive, negative ``stdevs``, no or unknown reference kinds.
    """

    channels = "sum"
    default_sign = "absolute"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        baselines: Sequence[ReferenceKind] | Tensor = ("zero", "blur"),
        n_samples: int = 32,
        stdevs: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        super().__init__(model, target_layers, batch_size=batch_size, seed=seed, sign=sign)
        if int(n_samples) < 1:
            raise ConfigError(f"GradientSHAP n_samples must be positive, got {n_samples}")
        if float(stdevs) < 0:
            raise ConfigError(f"GradientSHAP stdevs must not be negative, got {stdevs}")
        if not isinstance(baselines, Tensor):
            baselines = tuple(check_reference_kind(kind) for kind in baselines)
            if not baselines:
                raise ConfigError("GradientSHAP needs at least one baseline kind")
        self.baselines = baselines
        self.n_samples = int(n_samples)
        self.stdevs = float(stdevs)

    def references(self, image: Tensor) -> Tensor:
        """The reference distribution of one ``(1, C, *spatial)`` image: ``(R, C, *spatial)``."""
        if isinstance(self.baselines, Tensor):
            return self.baselines.to(device=image.device, dtype=image.dtype)
        return torch.cat([reference_images(image, kind) for kind in self.baselines])

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        from captum.attr import GradientShap

        explainer = GradientShap(scorer)
        attributions = []
        for index in range(inputs.shape[0]):
            image = inputs[index : index + 1]
            sample_index = torch.tensor([index], device=inputs.device)
            with seeded_global_generators(self.seed, inputs.device):
                attributions.append(explainer.attribute(
                    image, baselines=self.references(image), n_samples=self.n_samples, stdevs=self.stdevs,
                    additional_forward_args=(sample_index,),
                ))
        return torch.cat(attributions)
