"""Explanation-guided training (medxai.train.explanation_loss): the penalties on hand-checkable tensors, and a toy set
whose class a corner marker decides while the mask marks the centre object."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medxai.errors import ConfigError
from medxai.train.explanation_loss import (
    ExplanationLoss,
    build_explanation_loss,
    cam_energy_outside,
    counted_images,
    input_gradient_penalty,
)


class _LinearTwoLogits(nn.Module):
    """Logits ``[w . x, 0]``: the input gradient of ``sum_k log p_k`` is ``(1 - 2 sigmoid(w . x)) w``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weight).flatten(1).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def _ross_case():
    """One 1x2x2 image with w . x = ln 3 (sigmoid = 3/4, so the gradient is -w/2) and a mask on pixel (0, 0)."""
    weight = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    inputs = torch.zeros(1, 1, 2, 2)
    inputs[0, 0, 0, 0] = math.log(3.0)  # w . x = 1 * ln 3
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    return _LinearTwoLogits(weight), inputs, mask


def test_input_gradient_penalty_equals_the_hand_derivation():
    model, inputs, mask = _ross_case()
    inputs.requires_grad_(True)
    logits = model(inputs)
    penalty = input_gradient_penalty(logits, inputs, mask, torch.tensor([True]))
    # gradient = -w / 2 = [-0.5, -1, -1.5, -2]; outside the mask: 1 + 2.25 + 4 = 7.25
    assert penalty.item() == pytest.approx(7.25, abs=1e-6)
    penalty.backward()  # differentiable in the weights (double backward)
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_input_gradient_penalty_counts_only_masked_nonempty_images_and_divides_by_the_batch():
    model, one, mask = _ross_case()
    inputs = one.repeat(4, 1, 1, 1).requires_grad_(True)
    masks = torch.stack([mask[0], mask[0], torch.zeros(2, 2), mask[0]])
    has_mask = torch.tensor([True, False, True, True])  # image 1: no ground truth; image 2: empty (normal)
    counted = counted_images(masks, has_mask)
    assert counted.tolist() == [True, False, False, True]
    loss = ExplanationLoss("input_gradients", 2.0)(model(inputs), inputs, torch.zeros(4, dtype=torch.long), masks,
                                                  has_mask, [])
    assert loss.item() == pytest.approx(2.0 * 2 * 7.25 / 4, abs=1e-5)


class _IdentityCAM(nn.Module):
    """The CAM layer's output is the input itself (one channel), then global average pooling and a linear head with
    weight ``H*W`` for class 0: the Grad-CAM map of class 0 is ``relu(x)``."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[float(side * side)], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=(2, 3)))


def test_cam_energy_outside_is_the_share_of_the_map_outside_the_mask():
    model = _IdentityCAM(4)
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, :2] = 1.0  # two units of energy inside the mask
    image[0, 0, 3, :3] = 1.0  # three outside
    image[0, 0, 2, 3] = -5.0  # negative evidence: removed by the ReLU
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0
    loss = ExplanationLoss("cam", 1.0, "layer")
    image.requires_grad_(True)
    with loss.watching(model) as captured:
        logits = model(image)
    value = loss(logits, image, torch.tensor([0]), mask, torch.tensor([True]), captured)
    assert value.item() == pytest.approx(3 / 5, abs=1e-6)
    value.backward()
    # Raising a pixel outside the mask raises the share, raising one inside lowers it.
    assert image.grad[0, 0, 3, 0] > 0 > image.grad[0, 0, 0, 0]


def test_cam_share_of_a_coarse_constant_map_is_the_area_outside_the_mask():
    activations = torch.ones(2, 3, 2, 2, requires_grad=True)
    logits = activations.mean(dim=(2, 3)) @ torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    masks = torch.zeros(2, 8, 8)
    masks[:, :2, :] = 1.0  # a quarter of the image
    value = cam_energy_outside(logits, [activations], torch.tensor([0, 0]), masks, torch.tensor([True, False]))
    assert value.item() == pytest.approx(0.75 / 2, abs=1e-6)  # one counted image of two


def test_no_counted_image_costs_nothing_and_off_builds_nothing():
    model, inputs, _ = _ross_case()
    loss = ExplanationLoss("input_gradients", 1.0)
    value = loss(model(inputs), inputs, torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 2), torch.tensor([True]),
                 [])
    assert value.item() == 0.0 and not value.requires_grad
    assert build_explanation_loss("none", 1.0, "layer") is None
    with pytest.raises(ConfigError, match="explanation_loss must be one of"):
        build_explanation_loss("gain", 1.0, "layer")
    with pytest.raises(ConfigError, match="explanation_weight must be > 0"):
        build_explanation_loss("cam", 0.0, "layer")
