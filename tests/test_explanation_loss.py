"""Explanation-guided training (medxai.train.explanation_loss): the penalties on hand-checkable tensors, and a toy set
whose class a corner marker decides while the mask marks the centre object."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medxai.cli import main
from medxai.run_folder import RunFolder

from medxai.config import AugmentConfig, PreprocessConfig
from medxai.data.augment import BatchAugmenter
from medxai.data.prepared import PreparedSplit
from medxai.data.preprocess import Preprocessor
from medxai.errors import ConfigError
from medxai.explain import GradCAM
from medxai.explain.sanity import model_randomisation_check
from medxai.models import create_model
from medxai.train.loop import BatchContext, model_input, place_model, recalibrate_batchnorm, train_one_epoch
from medxai.train.explanation_loss import (
    ExplanationLoss,
    activation_difference,
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


def test_actdiff_runs_masked_copies_of_counted_images_and_compares_their_activations():
    inputs = torch.arange(1.0, 4 * 2 * 2 * 2 + 1).view(4, 2, 2, 2).requires_grad_(True)
    masks = torch.zeros(4, 2, 2)
    masks[0, 0, 0] = masks[2, 1, :] = masks[3, :, :] = 1.0
    has_mask = torch.tensor([True, True, True, False])  # image 1: an empty mask; image 3: no ground truth
    loss = ExplanationLoss("actdiff", 2.0, "layer")
    batch = loss.batch_to_run(inputs, masks, has_mask)
    assert batch.shape == (6, 2, 2, 2)  # the batch, then one masked copy per counted image (0 and 2)
    torch.testing.assert_close(batch[:4], inputs, rtol=0, atol=0)
    torch.testing.assert_close(batch[4], inputs[0] * masks[0], rtol=0, atol=0)  # normalised zero outside
    torch.testing.assert_close(batch[5], inputs[2] * masks[2], rtol=0, atol=0)
    model = nn.Sequential(OrderedDict(layer=nn.Identity(), head=nn.Sequential(nn.Flatten(1), nn.Linear(8, 2))))
    with loss.watching(model) as captured:
        outputs = model(batch)
    value = loss(outputs, inputs, torch.zeros(4, dtype=torch.long), masks, has_mask, captured)
    # Image 0 (values 1..8, squares sum to 204) keeps pixel (0, 0) of each channel, 1 and 5: it loses 2, 3, 4, 6, 7,
    # 8 (squares sum to 178); image 2 (17..24, 3404) keeps its second row: it loses 17, 18, 21, 22 (1538). Each
    # distance relative to the image's own norm, summed, divided by the batch.
    expected = 2.0 * (math.sqrt(178.0 / 204.0) + math.sqrt(1538.0 / 3404.0)) / 4
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()  # differentiable: it pushes the original's activations outside the mask towards the fill
    assert inputs.grad[0, 0, 0, 1] > 0 and inputs.grad[0, 0, 0, 0] == 0 and inputs.grad[1].abs().sum() == 0
    unchanged = ExplanationLoss("cam", 1.0, "layer").batch_to_run(inputs, masks, has_mask)
    assert unchanged is inputs
    assert activation_difference([torch.ones(3, 2)], torch.tensor([True, False, False])).item() == 0.0


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


def _train_toy(kind: str, weight: float, seed: int) -> tuple[dict[str, float], nn.Module, torch.Tensor]:
    """simple_cnn trained 8 short epochs through the real loop (geometric augmentation moving the masks,
    channels-last), then: accuracy on clean and marker-swapped test images, and the share of the Grad-CAM map
    (class of the label, the model's CAM layer) inside the object's mask, over all test images and over class 1's
    (whose evidence is the brighter object; class 0's is its absence, which has no place). Also returns the model
    and the clean test inputs."""
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
    inputs = model_input(test.images.codes(everything), context)
    maps = GradCAM(model)(inputs, target=test.labels).maps
    masks = test.masks.float() / 255
    inside = (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-8)
    figures = {**accuracy, "inside": inside.mean().item(), "inside_class1": inside[test.labels == 1].mean().item()}
    return figures, model, inputs


@pytest.mark.parametrize("seed", [0, 1])
def test_cam_loss_moves_the_map_to_the_object(seed: int):
    plain, _, _ = _train_toy("none", 0.0, seed)
    guided, _, _ = _train_toy("cam", 1.0, seed)
    # The toy does what it is for: the plain model follows the marker (swapping it flips every answer).
    assert plain["clean"] >= 0.95 and plain["swapped"] <= 0.1
    # Measured on seeds 0-2: map share inside the object 0.24-0.25 plain, 0.52 guided; accuracy kept. The model
    # itself stays on the marker (swapped accuracy ~0): the coarse map moved alone; "actdiff" moves the model.
    assert guided["inside"] >= plain["inside"] + 0.15
    assert guided["clean"] >= 0.95 and guided["swapped"] <= 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_actdiff_moves_the_model_off_the_marker_and_the_map_with_it(seed: int):
    plain, _, _ = _train_toy("none", 0.0, seed)
    guided, model, inputs = _train_toy("actdiff", 10.0, seed)
    assert plain["clean"] >= 0.95 and plain["swapped"] <= 0.1
    # Measured (seeds 0, 1): swapped-marker accuracy 0.00 plain, 1.00 and 0.98 guided; clean accuracy 1.00 both.
    assert guided["clean"] >= 0.95 and guided["swapped"] >= 0.8
    # Class 1's map share inside the object: 0.26 -> 0.38, 0.25 -> 0.35. Class 0's falls (to ~0.01): its evidence
    # is a dim object, i.e. no bright one, and Grad-CAM puts that nowhere in particular (documented).
    assert guided["inside_class1"] >= plain["inside_class1"] + 0.06
    # The map did not move without the model: randomising the guided model's layers changes its maps.
    sanity = model_randomisation_check(GradCAM, model, inputs[:32], max_layers=3, seed=0)
    assert sanity.passed and max(sanity.spearman) < 0.5


def _busi_like_folder(root: Path, per_class: int = 10) -> Path:
    """BUSI's layout: ``<class>/<class> (n).png`` beside ``<class> (n)_mask.png``; a bright lesion (brighter for
    malignant) inside the mask, and empty masks for the ``normal`` class."""
    rng = np.random.default_rng(0)
    for label, level in (("benign", 150), ("malignant", 230), ("normal", 0)):
        (root / label).mkdir(parents=True)
        for index in range(1, per_class + 1):
            image = rng.integers(0, 60, size=(32, 40)).astype(np.uint8)
            mask = np.zeros((32, 40), dtype=np.uint8)
            if level:
                mask[10:22, 14:26] = 255
                image[mask > 0] = level
            Image.fromarray(image).save(root / label / f"{label} ({index}).png")
            Image.fromarray(mask).save(root / label / f"{label} ({index})_mask.png")
    return root


def test_medxai_train_with_masks_records_the_loss_and_the_cam_layers_and_refuses_to_resume_without(
        tmp_path, capsys):
    data = _busi_like_folder(tmp_path / "busi")
    layers = "[features.block2, features.block3]"
    arguments = ["train", "--data", str(data), "--out", str(tmp_path), "--name", "guided", "--epochs", "2",
                 "--size", "32", "--set", "train.batch_size=16", "--set", "explain.per_outcome=1",
                 "--set", "train.explanation_loss=input_gradients", "--set", "train.explanation_weight=10",
                 "--set", f"explain.layer={layers}", "--set", "train.bootstrap_resamples=0"]
    assert main(arguments) == 0
    run = RunFolder(tmp_path / "guided")
    config = run.read_config()
    assert (config.train.explanation_loss, config.train.explanation_weight) == ("input_gradients", 10.0)
    assert run.read_card().cam_layer == ["features.block2", "features.block3"]
    # Every image has a mask file (normal ones empty): all have ground truth, the two thirds with a lesion count.
    logged = " ".join(capsys.readouterr().err.split())  # the CLI's log lines, unwrapped
    have, total, lesions = map(int, re.search(r"(\d+) of (\d+) train images have ground truth, (\d+)",
                                              logged).groups())
    assert have == total == len(run.read_splits()["train"]) and lesions == 18
    for change, key in ((["--set", "train.explanation_loss=none"], "train.explanation_loss"),
                        (["--set", "explain.layer=features.block3"], "explain.layer")):
        assert main(["train", "--resume", "--out", str(tmp_path), "--name", "guided", *change]) == 2
        assert key in capsys.readouterr().err


def test_explanation_loss_without_any_mask_is_refused_before_training(tmp_path, capsys):
    data = _busi_like_folder(tmp_path / "busi", per_class=4)
    for mask in data.rglob("*_mask.png"):
        mask.unlink()
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "r", "--epochs", "1",
                 "--size", "16", "--set", "train.explanation_loss=cam"]) == 2
    error = capsys.readouterr().err
    assert "needs lesion masks or boxes" in error and not (tmp_path / "r" / "checkpoints").exists()


def test_geometric_augmentation_moves_the_mask_with_its_image_and_draws_the_same_numbers():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(4, 12, 12, generator=generator) > 0.7).float()
    images = masks.unsqueeze(1).repeat(1, 2, 1, 1)  # each image channel is its mask
    geometric = BatchAugmenter(AugmentConfig(rotation_degrees=30, scale=(0.8, 1.2), translate=0.1, shear_degrees=5,
                                             hflip=0.5, vflip=0.5, brightness=0.0, contrast=0.0))
    moved_images, moved_masks = geometric.with_masks(images, masks, torch.Generator().manual_seed(3))
    assert not torch.equal(moved_masks, masks)
    torch.testing.assert_close(moved_images[:, 0], moved_masks, rtol=0, atol=1e-6)
    # Intensity changes leave the mask alone, and the image is what it is without masks (same random draws).
    full = BatchAugmenter(AugmentConfig(rotation_degrees=30, hflip=0.5, brightness=0.2, contrast=0.2, gamma=0.3,
                                        noise_std=0.05))
    with_masks, kept_masks = full.with_masks(images, masks, torch.Generator().manual_seed(5))
    torch.testing.assert_close(with_masks, full(images, torch.Generator().manual_seed(5)), rtol=0, atol=0)
    same_geometry = BatchAugmenter(AugmentConfig(rotation_degrees=30, hflip=0.5, brightness=0.0, contrast=0.0))
    geometry_only = same_geometry.with_masks(images, masks, torch.Generator().manual_seed(5))
    torch.testing.assert_close(kept_masks, geometry_only[1], rtol=0, atol=0)
    torch.testing.assert_close(geometry_only[0][:, 0], kept_masks, rtol=0, atol=1e-6)


def test_explain_layer_takes_a_name_or_a_list_and_the_card_keeps_either():
    from medxai.config import load_config
    from medxai.models.card import ModelCard

    assert load_config(overrides=["explain.layer=features.block2"]).explain.layer == "features.block2"
    fused = load_config(overrides=["explain.layer=[features.block2, features.block3]"]).explain.layer
    assert fused == ["features.block2", "features.block3"]
    card = {"architecture": "simple_cnn", "num_classes": 2, "label_names": ["a", "b"], "preprocess": {"size": 16},
            "cam_layer": fused}
    assert ModelCard.from_dict(card).cam_layer == fused
    for bad in ([], [3], 5):
        with pytest.raises(Exception, match="cam_layer"):
            ModelCard.from_dict({**card, "cam_layer": bad})


def test_an_explain_layer_the_model_lacks_is_refused_naming_its_stages(tmp_path, capsys):
    data = _busi_like_folder(tmp_path / "busi", per_class=4)
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "r", "--epochs", "1",
                 "--size", "16", "--set", "explain.layer=[features.block2, features.block9]"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "['features.block9'] not a module of simple_cnn" in error and "'features.block1'" in error
    assert not (tmp_path / "r").exists()  # refused before the run folder is made
