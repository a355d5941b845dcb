"""Explanation-guided training: a second loss term that penalises evidence outside the annotated lesion.

Three penalties (``train.explanation_loss``), each weighted by ``train.explanation_weight`` (lambda) and added to the
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

* ``"actdiff"``, ActDiff (Viviano, Simpson, Dutil, Bengio & Cohen, "Saliency is a possible red herring when
  diagnosing poor generalization", ICLR 2021, arXiv:2107.09055): the L2 distance
  ``||A(x) - A(x * mask)||_2`` between the CAM layer's activations ``A`` of the image and of its masked copy, whose
  every pixel outside the mask is the normalised-space zero (the training mean; black when nothing is normalised).
  The paper shows that the gradient penalties (RRR, GradMask) leave a shortcut in place while ActDiff removes it:
  a representation that must not change when everything outside the lesion is removed cannot use what lies there.
  Deviations, for reasons given in docs/training.md: the CAM layer (the last feature map, which the run's maps read)
  rather than every layer's pre-activations; a constant fill rather than the paper's code's shuffled pixels (which
  keep a marker's bright pixels); the copies run in the same forward pass as the batch (:meth:`ExplanationLoss.
  batch_to_run`: one BatchNorm statistic for both, one forward for DDP), and are not classified. Several CAM layers
  average their distances.

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
    "masked_copies",
    "activation_difference",
]

#: ``train.explanation_loss`` values.
EXPLANATION_LOSSES = ("none", "input_gradients", "cam", "actdiff")


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


def masked_copies(inputs: Tensor, masks: Tensor, counted: Tensor) -> Tensor:
    """The counted images with everything outside their mask set to the normalised-space zero.

    Args:
        inputs: ``(B, C, *spatial)`` the model's input (normalised).
        masks: ``(B, *spatial)`` lesion masks in [0, 1] (soft after a geometric augmentation: the edge blends).
        counted: ``(B,)`` bool (:func:`counted_images`).

    Returns:
        ``(M, C, *spatial)``, ``M = counted.sum()``: ``inputs * mask`` of the counted images.
    """
    kept = counted.nonzero().squeeze(1)
    return inputs[kept] * masks[kept].unsqueeze(1).to(inputs.dtype)


def activation_difference(activations: Sequence[Tensor], counted: Tensor) -> Tensor:
    """ActDiff (Viviano et al. 2021): the L2 distance between each counted image's activations and those of its
    masked copy, relative to the norm of the image's own activations, summed over the counted images and divided by
    the batch size.

    Relative, where the paper's distance is absolute: an absolute distance grows with the layer's size and the scale
    of its activations (about 87 for simple_cnn's last block on BUSI at 64 px against a cross-entropy near 1), so a
    weight that suits one model swamps the classification loss of another; relative, it lies near [0, 1] whatever
    the layer, and ``train.explanation_weight`` means the same everywhere. The norm is taken without gradient, so
    the model cannot lower the term by inflating its activations.

    Args:
        activations: one ``(B + M, C, *map_spatial)`` tensor per CAM layer, from one forward pass of the batch
            followed by its ``M`` masked copies (:func:`masked_copies`), in the order of ``counted``.
        counted: ``(B,)`` bool (:func:`counted_images`).

    Returns:
        A differentiable scalar (float32); several layers average their distances.
    """
    if not activations:
        raise ConfigError("train.explanation_loss 'actdiff': the CAM layer(s) did not run in the model's forward pass")
    batch = counted.shape[0]
    kept = counted.nonzero().squeeze(1)
    total = activations[0].new_zeros((), dtype=torch.float32)
    for activation in activations:
        original, masked = activation[:batch][kept].float(), activation[batch:].float()
        scale = original.detach().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).eps)
        total = total + ((original - masked).flatten(1).norm(dim=1) / scale).sum()
    return total / (len(activations) * batch)


class ExplanationLoss:
    """The explanation term of a training step: ``weight * penalty`` (see the module docstring).

    Args:
        kind: ``"input_gradients"``, ``"cam"`` or ``"actdiff"``.
        weight: lambda, > 0.
        cam_layers: the module name(s) whose maps ``"cam"`` penalises and whose activations ``"actdiff"`` compares
            (the run's CAM layer).
    """

    def __init__(self, kind: str, weight: float, cam_layers: str | Sequence[str] = ()) -> None:
        self.kind = kind
        self.weight = float(weight)
        self.cam_layers = [cam_layers] if isinstance(cam_layers, str) else list(cam_layers)
        if kind in ("cam", "actdiff") and not self.cam_layers:
            raise ConfigError(f"train.explanation_loss {kind!r} needs a CAM layer")

    @property
    def needs_input_gradient(self) -> bool:
        return self.kind == "input_gradients"

    def batch_to_run(self, inputs: Tensor, masks: Tensor, has_mask: Tensor) -> Tensor:
        """What the step's forward pass runs: the batch, followed (``"actdiff"``) by the masked copies of its
        counted images (:func:`masked_copies`), so that BatchNorm normalises an image and its copy with the same
        statistics and DDP sees one forward pass per step."""
        if self.kind != "actdiff":
            return inputs
        copies = masked_copies(inputs, masks, counted_images(masks, has_mask))
        if not copies.shape[0]:
            return inputs
        memory_format = torch.channels_last if inputs.is_contiguous(memory_format=torch.channels_last) and \
            inputs.dim() == 4 else torch.contiguous_format
        return torch.cat([inputs, copies]).contiguous(memory_format=memory_format)

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[list[Tensor]]:
        """Keep the CAM layers' outputs of the forward passes run inside (graph attached; ``"cam"`` and
        ``"actdiff"``)."""
        captured: list[Tensor] = []
        if self.kind not in ("cam", "actdiff"):
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

    def __call__(self, outputs: Tensor, inputs: Tensor, labels: Tensor, masks: Tensor, has_mask: Tensor,
                 captured: Sequence[Tensor]) -> Tensor:
        """``weight * penalty`` for one batch; zero (no graph work) when no image of the batch counts.

        ``outputs`` are the logits of :meth:`batch_to_run` (the batch's ``B`` rows first), ``inputs`` the batch.
        """
        counted = counted_images(masks, has_mask)
        if not bool(counted.any()):
            return outputs.new_zeros((), dtype=torch.float32)
        logits = outputs[: labels.shape[0]]
        if self.kind == "input_gradients":
            penalty = input_gradient_penalty(logits, inputs, masks, counted)
        elif self.kind == "cam":
            penalty = cam_energy_outside(logits, captured, labels, masks, counted)
        else:
            penalty = activation_difference(captured, counted)
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
