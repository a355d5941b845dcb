"""Explanation-guided training: a second loss term that penalises evidence outside the annotated lesion.

Two penalties (``train.explanation_loss``), each weighted by ``train.explanation_weight`` (lambda) and added to the
classification loss:

* ``"input_gradients"``, "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez, IJCAI 2017, eq. 1):

  .. math:: \\lambda \\sum_d \\Big(A_d \\frac{\\partial}{\\partial x_d} \\sum_{k=1}^K \\log \\hat y_k\\Big)^2

  with the annotation ``A = 1 - mask`` (every pixel outside the lesion, every channel) and the input ``x`` as the
  model sees it (augmented, normalised). It needs the input gradient with a graph (double backward through the whole
  network): about two to three times the cost of a plain step.

* ``"cam"``, the share of the Grad-CAM map's energy outside the mask: for the ground-truth class ``c``,
  ``M = relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``d y_c / d A_k`` (Selvaraju et al. 2017) at the
  model's CAM layer(s), upsampled (bilinear) to the mask, and the penalty
  ``sum_p M_p (1 - mask_p) / sum_p M_p``. It is the complement of the energy-based pointing game (Wang et al. 2020,
  Score-CAM) that ``explain-eval`` reports, made a loss, and it plays the part of the external-supervision term of
  GAIN (Li et al., CVPR 2018, sec. 3.3), which instead regresses the attention map onto the mask pixel by pixel:
  a share leaves the map free to cover only part of a large lesion, which a pointing game does not punish either.
  Only the layers after the CAM layer take a second derivative, so it costs little more than a plain step.
  Several CAM layers (a list) average their shares.

Which images count: only those with ground truth whose mask is not empty (a ``(B,)`` has-mask vector and the mask's
content decide). An empty mask (a normal image) says there is no lesion, not where the evidence for "normal" lies,
which is the absence of a lesion anywhere in the organ; penalising all its evidence would push the input gradients
of normal images to zero (a model blind to them) and the CAM share is 1 whatever the map. The penalty is summed over
the images that count and divided by the whole batch, as the mean cross-entropy is, so under DDP each rank adds its
share and DDP's gradient average gives the single-process value.

Off (``"none"``), :func:`build_explanation_loss` returns None and the training step is the plain one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError

__all__ = [
    "EXPLANATION_LOSSES",
    "ExplanationLoss",
    "build_explanation_loss",
    "check_explanation_settings",
    "input_gradient_penalty",
    "cam_energy_outside",
    "counted_images",
]

#: ``train.explanation_loss`` values.
EXPLANATION_LOSSES = ("none", "input_gradients", "cam")


def counted_images(masks: Tensor, has_mask: Tensor) -> Tensor:
    """``(B,)`` bool: the images the penalty counts, those with ground truth whose mask is not empty."""
    return has_mask.to(torch.bool) & (masks.flatten(1).amax(dim=1) > 0)


def input_gradient_penalty(logits: Tensor, inputs: Tensor, masks: Tensor, counted: Tensor) -> Tensor:
    """Ross et al.'s penalty: squared input gradients of the summed log-probabilities outside the mask.

    Args:
        logits: ``(B, K)`` computed from ``inputs`` (which must require grad).
        inputs: ``(B, C, *spatial)`` the model's input.
        masks: ``(B, *spatial)`` lesion masks in [0, 1], at the input's size.
        counted: ``(B,)`` bool, the images that count (:func:`counted_images`).

    Returns:
        A scalar: the sum over counted images and over every pixel and channel outside the mask, divided by ``B``;
        differentiable (the gradient is taken with a graph).
    """
    log_probabilities = F.log_softmax(logits.float(), dim=1).sum()
    (gradient,) = torch.autograd.grad(log_probabilities, inputs, create_graph=True)
    outside = (1.0 - masks.to(gradient.dtype)).unsqueeze(1) * counted.to(gradient.dtype).view(-1, *[1] * masks.dim())
    return (outside * gradient.float().square()).sum() / logits.shape[0]


def cam_energy_outside(logits: Tensor, activations: Sequence[Tensor], labels: Tensor, masks: Tensor,
                       counted: Tensor) -> Tensor:
    """The share of each counted image's Grad-CAM energy outside its mask, summed and divided by the batch size.

    Args:
        logits: ``(B, K)`` computed from ``activations``.
        activations: one ``(B, C, *map_spatial)`` tensor per CAM layer, part of the graph of ``logits``.
        labels: ``(B,)`` the ground-truth classes, whose logits the maps explain.
        masks: ``(B, *spatial)`` lesion masks in [0, 1].
        counted: ``(B,)`` bool (:func:`counted_images`).

    Returns:
        A differentiable scalar; several layers average their shares. A map that is zero everywhere counts 0.
    """
    if not activations:
        raise ConfigError("train.explanation_loss 'cam': the CAM layer(s) did not run in the model's forward pass")
    scores = logits.float().gather(1, labels.view(-1, 1)).sum()
    gradients = torch.autograd.grad(scores, list(activations), create_graph=True)
    outside = 1.0 - masks.float()
    weight = counted.float()
    total = logits.new_zeros((), dtype=torch.float32)
    for activation, gradient in zip(activations, gradients):
        b, c, *spatial = activation.shape
        channel_weights = gradient.float().mean(dim=tuple(range(2, gradient.dim())), keepdim=True)
        cam = torch.relu((channel_weights * activation.float()).sum(dim=1))
        if tuple(cam.shape[1:]) != tuple(masks.shape[1:]):
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
            cam = F.interpolate(cam.unsqueeze(1), size=masks.shape[1:], mode=mode, align_corners=False).squeeze(1)
        energy = cam.flatten(1).sum(dim=1)
        share = (cam * outside).flatten(1).sum(dim=1) / energy.clamp_min(torch.finfo(torch.float32).tiny)
        total = total + (share * weight).sum()
    return total / (len(activations) * logits.shape[0])


class ExplanationLoss:
    """The explanation term of a training step: ``weight * penalty`` (see the module docstring).

    Args:
        kind: ``"input_gradients"`` or ``"cam"``.
        weight: lambda, > 0.
        cam_layers: the module name(s) whose maps ``"cam"`` penalises (the run's CAM layer).
    """

    def __init__(self, kind: str, weight: float, cam_layers: str | Sequence[str] = ()) -> None:
        self.kind = kind
        self.weight = float(weight)
        self.cam_layers = [cam_layers] if isinstance(cam_layers, str) else list(cam_layers)
        if kind == "cam" and not self.cam_layers:
            raise ConfigError("train.explanation_loss 'cam' needs a CAM layer")

    @property
    def needs_input_gradient(self) -> bool:
        return self.kind == "input_gradients"

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[list[Tensor]]:
        """Keep the CAM layers' outputs of the forward passes run inside (graph attached; ``"cam"`` only)."""
        captured: list[Tensor] = []
        if self.kind != "cam":
            yield captured
            return
        handles = []
        try:
            for name in self.cam_layers:
                module = model.get_submodule(name)
                handles.append(module.register_forward_hook(lambda _m, _a, output: captured.append(output)))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, logits: Tensor, inputs: Tensor, labels: Tensor, masks: Tensor, has_mask: Tensor,
                 captured: Sequence[Tensor]) -> Tensor:
        """``weight * penalty`` for one batch; zero (no graph work) when no image of the batch counts."""
        counted = counted_images(masks, has_mask)
        if not bool(counted.any()):
            return logits.new_zeros((), dtype=torch.float32)
        if self.kind == "input_gradients":
            penalty = input_gradient_penalty(logits, inputs, masks, counted)
        else:
            penalty = cam_energy_outside(logits, captured, labels, masks, counted)
        return self.weight * penalty


def check_explanation_settings(kind: str, weight: float) -> None:
    """Refuse an unknown ``train.explanation_loss`` or, when it is on, a weight that is not positive.

    Raises:
        ConfigError: naming the setting and the allowed values.
    """
    if kind not in EXPLANATION_LOSSES:
        raise ConfigError(f"train.explanation_loss must be one of {list(EXPLANATION_LOSSES)}, got {kind!r}")
    if kind != "none" and not weight > 0:
        raise ConfigError(f"train.explanation_weight must be > 0 with train.explanation_loss {kind!r}, got {weight}")


def build_explanation_loss(kind: str, weight: float, cam_layers: str | Sequence[str]) -> ExplanationLoss | None:
    """The explanation term ``train.explanation_loss`` asks for, or None when it is ``"none"``.

    Raises:
        ConfigError: see :func:`check_explanation_settings`.
    """
    check_explanation_settings(kind, weight)
    return None if kind == "none" else ExplanationLoss(kind, weight, cam_layers)
