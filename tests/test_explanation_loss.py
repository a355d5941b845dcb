"""Explanation-guided training (medxai.train.explanation_loss): the penalties on hand-checkable tensors, and a toy set
whose class a corner marker decides while the mask marks the centre object."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medxai.config import AugmentConfig, PreprocessConfig
from medxai.data.augment import BatchAugmenter
from medxai.data.prepared import PreparedSplit
from medxai.data.preprocess import Preprocessor
from medxai.errors import ConfigError
from medxai.explain import GradCAM
from medxai.models import create_model
from medxai.train.loop import BatchContext, model_input, place_model, recalibrate_batchnorm, train_one_epoch
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


# --- The toy set: a corner marker decides the class; the mask marks the centre object, which predicts it too. ---

_SIDE = 16


def _marker_toy(count: int, seed: int, *, swap_marker: bool = False) -> PreparedSplit:
    """Noise, a centre object brighter for class 1 (0.6) than class 0 (0.5), inside the mask, and a saturated 3x3
    marker in the top-left corner on class 1 images only (``swap_marker``: on class 0 images only)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.rand(count, 1, _SIDE, _SIDE, generator=generator) * 0.2
    masks = torch.zeros(count, _SIDE, _SIDE)
    masks[:, 5:11, 5:11] = 1.0
    images[:, 0] += masks * torch.where(labels == 1, 0.6, 0.5).view(-1, 1, 1)
    marked = (1 - labels if swap_marker else labels).bool()
    images[marked, 0, 0:3, 0:3] = 1.0
    return PreparedSplit(images.clamp(0, 1), labels, [f"toy/{i}" for i in range(count)], [None] * count,
                         masks=masks, has_mask=torch.ones(count, dtype=torch.bool))


def _train_toy(kind: str, weight: float, seed: int) -> dict[str, float]:
    """simple_cnn trained 8 short epochs through the real loop (geometric augmentation moving the masks,
    channels-last), then: accuracy on clean and marker-swapped test images, and the share of the Grad-CAM map
    (class of the label, the model's CAM layer) inside the object's mask."""
    torch.manual_seed(seed)
    model = create_model("simple_cnn", 2, 1, input_size=_SIDE, dropout=0.0)
    preprocess = PreprocessConfig(size=_SIDE, normalize="fixed", mean=[0.3], std=[0.3])
    context = BatchContext(Preprocessor(preprocess), torch.device("cpu"), 32, amp=False, channels_last=True)
    place_model(model, context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    augmenter = BatchAugmenter(AugmentConfig(rotation_degrees=5, scale=(1.0, 1.0), translate=0.0, contrast=0.0))
    explanation = build_explanation_loss(kind, weight, model.cam_layer)
    train = _marker_toy(96, seed)
    for epoch in range(8):
        train_one_epoch(model, train, context, optimizer=optimizer, scheduler=scheduler,
                        loss_fn=nn.CrossEntropyLoss(), augmenter=augmenter,
                        generator=torch.Generator().manual_seed(seed * 100 + epoch), explanation=explanation)
    recalibrate_batchnorm(model, train, context, len(train), torch.Generator().manual_seed(seed))
    model.eval()
    test, swapped = _marker_toy(64, 1000 + seed), _marker_toy(64, 2000 + seed, swap_marker=True)
    everything = torch.arange(64)
    with torch.no_grad():
        accuracy = {name: (model(model_input(split.images.codes(everything), context)).argmax(1) == split.labels)
                    .float().mean().item() for name, split in (("clean", test), ("swapped", swapped))}
    maps = GradCAM(model)(model_input(test.images.codes(everything), context), target=test.labels).maps
    masks = test.masks.float() / 255
    inside = ((maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-8)).mean().item()
    return {**accuracy, "inside": inside}


@pytest.mark.parametrize("seed", [0, 1])
def test_cam_loss_moves_the_map_to_the_object(seed: int):
    plain = _train_toy("none", 0.0, seed)
    guided = _train_toy("cam", 1.0, seed)
    # The toy does what it is for: the plain model follows the marker (swapping it flips every answer).
    assert plain["clean"] >= 0.95 and plain["swapped"] <= 0.1
    # Measured on seeds 0-2: map share inside the object 0.24-0.25 plain, 0.52 guided; accuracy kept.
    assert guided["inside"] >= plain["inside"] + 0.15
    assert guided["clean"] >= 0.95


@pytest.mark.xfail(strict=True, reason="known limitation: on this toy and in this budget the CAM share is met by "
                   "moving the coarse map alone, not the model (swapped accuracy stays ~0); input_gradients at weight "
                   "300-3000 measured no better (gradients flattened everywhere: gradient masking). The sanity check "
                   "and deletion/insertion must judge any guided run")
def test_guided_model_follows_the_object_when_the_marker_is_swapped():
    assert _train_toy("cam", 1.0, seed=0)["swapped"] >= 0.8
