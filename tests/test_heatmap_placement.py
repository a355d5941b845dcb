"""A heatmap lands on the right pixels of the ORIGINAL image: letterbox padding cut off, axes not swapped, no flip.

The network's evidence is local brightness: a 3x3 mean filter (positive fixed weights) -> ReLU (the CAM layer) ->
global average pool -> ``Linear(1, 2)`` with weights ``[[-1], [1]]``, so ``z_1 - z_0 = 2 * mean(A)``. The default
target explains the reported label (argmax: class 1, since ``A >= 0``) by its log-odds, whose gradient is
``d (z_1 - z_0) / d A(p) = 2 / N`` at every position p; the Grad-CAM map is therefore ``relu(2 / N * A)``, i.e.
proportional to the local brightness, and its peak is on the one bright patch of the image.

Each original is non-square (tall or wide), with a dark noisy background and one bright rectangle near a corner, so
that a heatmap that keeps the padding (pad mode), swaps the axes or flips them puts its mass outside the rectangle.
The placement check is one helper, :func:`placement_problems`; the last tests replace
``medxai.classifier._to_original_size`` by such broken versions and show that the helper then reports problems.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import nn

import medxai.classifier as classifier_module
from medxai.classifier import Classifier
from medxai.config import PreprocessConfig
from medxai.data.preprocess import ContentBox
from medxai.models.card import ModelCard

PATCH_FRACTION = 0.3  # the patch's side as a fraction of the image's height / width
CORNER_GAP = 0.05  # distance of the patch from the image edges, same units

# (height, width): tall and wide, several aspect ratios; each with the corner its patch sits in. Only the top-right
# and bottom-left corners are used: a patch there is NOT mapped onto itself by a transpose in relative coordinates
# (a bottom-right or top-left one would be), so the transposed variant below must fail on every shape.
SHAPES = {
    "tall_300x120": ((300, 120), "top-right"),
    "wide_120x300": ((120, 300), "bottom-left"),
    "tall_517x233": ((517, 233), "bottom-left"),
    "wide_64x200": ((64, 200), "top-right"),
}
# image kind -> model input channels
KINDS = {
    "grey_uint8": 1,
    "rgb_uint8_rgb_model": 3,
    "rgb_uint8_grey_model": 1,  # colour turned to luminance by the preprocessing
    "grey_uint16": 1,  # 16-bit, values up to 4000: percentile intensity scaling ("auto")
}


class BrightnessNet(nn.Module):
    """3x3 mean filter -> ReLU (CAM layer) -> global average pool -> logits ``(-mean A, +mean A)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        self.cam_layer = "relu"
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (9 * channels))
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def make_classifier(size: int, resize_mode: str, channels: int) -> Classifier:
    card = ModelCard(
        architecture="brightness_net",
        num_classes=2,
        label_names=["dark", "bright"],
        preprocess=PreprocessConfig(size=size, resize_mode=resize_mode, channels=channels, normalize="none"),
        cam_layer="relu",
        positive_label="bright",
    )
    return Classifier(BrightnessNet(channels), card, device="cpu")


def patch_box(shape: tuple[int, int], corner: str) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the bright patch, in original pixels."""
    height, width = shape
    patch_h, patch_w = round(PATCH_FRACTION * height), round(PATCH_FRACTION * width)
    gap_h, gap_w = round(CORNER_GAP * height), round(CORNER_GAP * width)
    vertical, horizontal = corner.split("-")
    top = gap_h if vertical == "top" else height - gap_h - patch_h
    left = gap_w if horizontal == "left" else width - gap_w - patch_w
    return top, left, patch_h, patch_w


def make_image(kind: str, shape: tuple[int, int], patch: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """Dark noisy background, one bright noisy rectangle."""
    rng = np.random.default_rng(seed)
    top, left, height, width = patch
    rows, cols = slice(top, top + height), slice(left, left + width)
    if kind == "grey_uint16":
        image = rng.integers(100, 500, size=shape).astype(np.uint16)
        image[rows, cols] = rng.integers(3500, 4001, size=(height, width))
        return image
    pixel_shape = shape if kind == "grey_uint8" else (*shape, 3)
    image = rng.integers(0, 50, size=pixel_shape).astype(np.uint8)
    image[rows, cols] = rng.integers(200, 256, size=(height, width, *pixel_shape[2:]))
    return image


def model_pixel_margin(shape: tuple[int, int], size: int, resize_mode: str) -> tuple[int, int]:
    """One model pixel's footprint in original pixels (rows, columns), rounded up: the allowed slack.

    Stretch: ``H / S`` by ``W / S``. Pad: the image is scaled by ``S / max(H, W)`` on both axes.
    """
    height, width = shape
    if resize_mode == "stretch":
        return math.ceil(height / size), math.ceil(width / size)
    side = math.ceil(max(height, width) / size)
    return side, side


def placement_problems(
    heatmap: np.ndarray,
    image_shape: tuple[int, ...],
    patch: tuple[int, int, int, int],
    margin: tuple[int, int],
) -> list[str]:
    """What is wrong with where ``heatmap`` puts its mass, for an image whose only evidence is ``patch``.

    Checks, in original pixels (``margin`` = one model pixel's footprint, rows and columns):

    * the heatmap has the image's height and width;
    * its argmax lies in the patch grown by ``margin``;
    * the centroid of its top 10 % pixels lies in the patch itself;
    * at least 90 % of its hot pixels (>= 0.5) lie in the patch grown by ``margin`` (precision);
    * at least 90 % of the patch shrunk by ``margin`` is hot (recall: a map squeezed or shifted inside fails).

    Returns:
        One line per failed check; empty when the heatmap is placed right.
    """
    expected_shape = tuple(image_shape[:2])
    if heatmap.shape != expected_shape:
        return [f"heatmap shape {heatmap.shape} != image shape {expected_shape}"]
    top, left, height, width = patch
    margin_rows, margin_cols = margin
    problems = []

    def region(grow_rows: int, grow_cols: int) -> np.ndarray:
        mask = np.zeros(heatmap.shape, dtype=bool)
        mask[max(0, top - grow_rows) : max(0, top + height + grow_rows),
             max(0, left - grow_cols) : max(0, left + width + grow_cols)] = True
        return mask

    in_patch, grown, shrunk = region(0, 0), region(margin_rows, margin_cols), region(-margin_rows, -margin_cols)
    assert shrunk.any(), "patch too small for the margin: the recall check would be empty"

    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if not grown[peak]:
        problems.append(f"peak at {tuple(int(i) for i in peak)} outside the patch {patch} (+{margin})")

    top_decile = heatmap >= np.quantile(heatmap, 0.9)
    centroid = tuple(round(float(axis.mean())) for axis in np.nonzero(top_decile))
    if not in_patch[centroid]:
        problems.append(f"centroid of the top 10% at {centroid} outside the patch {patch}")

    hot = heatmap >= 0.5
    precision = float(hot[grown].sum()) / max(1, int(hot.sum()))
    if precision < 0.9:
        problems.append(f"only {precision:.0%} of the hot pixels lie in the patch (+{margin})")
    recall = float(hot[shrunk].mean())
    if recall < 0.9:
        problems.append(f"only {recall:.0%} of the patch (-{margin}) is hot")
    return problems


def explain_one(classifier: Classifier, image: np.ndarray):
    (explanation,) = classifier.explain(image)
    return explanation


# ------------------------------------------------------------------------------------------- the unbroken code


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("resize_mode", ["pad", "stretch"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_heatmap_lands_on_the_bright_patch(shape_name: str, kind: str, resize_mode: str, size: int) -> None:
    shape, corner = SHAPES[shape_name]
    patch = patch_box(shape, corner)
    image = make_image(kind, shape, patch)
    classifier = make_classifier(size, resize_mode, KINDS[kind])

    explanation = explain_one(classifier, image)

    assert explanation.prediction.label == explanation.target_label == "bright"
    assert explanation.heatmap.shape == image.shape[:2]
    assert explanation.heatmap.dtype == np.float32
    assert explanation.model_heatmap.shape == (size, size)
    assert 0.0 <= float(explanation.heatmap.min()) and float(explanation.heatmap.max()) <= 1.0
    problems = placement_problems(explanation.heatmap, image.shape, patch, model_pixel_margin(shape, size, resize_mode))
    assert not problems, problems


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_pad_mode_content_box_by_hand(shape_name: str) -> None:
    """The letterbox the crop relies on: scale ``S / max(H, W)``, centred, ``(S - side) // 2`` above / left."""
    (height, width), _ = SHAPES[shape_name]
    size = 32
    scale = size / max(height, width)
    content = (round(height * scale), round(width * scale))
    expected = ContentBox((size - content[0]) // 2, (size - content[1]) // 2, *content)
    classifier = make_classifier(size, "pad", 1)

    tensor, box = classifier.preprocessor.prepare(np.zeros((height, width), dtype=np.uint8))

    assert box == expected
    assert tensor.shape == (1, size, size)
    # The map of the content box alone goes back to the original; the padding rows/columns are cut off.
    heatmap = np.zeros((size, size), dtype=np.float32)
    heatmap[box.top : box.top + box.height, box.left : box.left + box.width] = 1.0
    assert_allclose(classifier_module._to_original_size(heatmap, box, (height, width)), 1.0, atol=1e-6)


# ------------------------------------------------------------------- the check catches a broken _to_original_size


def _bilinear(content: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(content, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(0.0, 1.0).numpy()


def _crop(heatmap: np.ndarray, box: ContentBox) -> np.ndarray:
    top, left, height, width = box.as_tuple()
    return heatmap[top : top + height, left : left + width]


def no_crop(heatmap, box, original):
    """Bug: the padding is not cut off; the whole square map is stretched to the original."""
    return _bilinear(heatmap, tuple(original))


def transposed(heatmap, box, original):
    """Bug: cropped, resized to (W, H), then transposed to get the (H, W) shape back."""
    height, width = original
    return _bilinear(_crop(heatmap, box), (width, height)).T.copy()


def swapped_size(heatmap, box, original):
    """Bug: cropped, resized to (W, H) and returned as is."""
    height, width = original
    return _bilinear(_crop(heatmap, box), (width, height))


def flipped(heatmap, box, original):
    """Bug: cropped and resized right, but upside down (an image-vs-array row-order mix-up)."""
    return np.flipud(_bilinear(_crop(heatmap, box), tuple(original))).copy()


def box_axes_swapped(heatmap, box, original):
    """Bug: the crop reads the box's (top, height) as (left, width) and vice versa."""
    top, left, height, width = box.as_tuple()
    return _bilinear(heatmap[left : left + width, top : top + height], tuple(original))


BROKEN = {
    "no_crop": no_crop,
    "transposed": transposed,
    "swapped_size": swapped_size,
    "flipped": flipped,
    "box_axes_swapped": box_axes_swapped,
}


@pytest.mark.parametrize("kind", ["grey_uint8", "rgb_uint8_rgb_model", "grey_uint16"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("bug", list(BROKEN))
def test_placement_check_fails_for_a_broken_crop(monkeypatch, bug: str, shape_name: str, kind: str) -> None:
    shape, corner = SHAPES[shape_name]
    size = 32
    patch = patch_box(shape, corner)
    image = make_image(kind, shape, patch)
    classifier = make_classifier(size, "pad", KINDS[kind])
    margin = model_pixel_margin(shape, size, "pad")
    assert not placement_problems(explain_one(classifier, image).heatmap, image.shape, patch, margin)

    monkeypatch.setattr(classifier_module, "_to_original_size", BROKEN[bug])
    problems = placement_problems(explain_one(classifier, image).heatmap, image.shape, patch, margin)

    assert problems, f"the placement check did not notice the {bug} bug"
    if bug != "swapped_size":  # right shape, wrong place: the mass itself must be found misplaced
        assert any("hot" in problem or "outside" in problem for problem in problems), problems
    with pytest.raises(AssertionError):
        assert not problems, problems


def test_broken_variants_agree_with_the_library_where_they_should() -> None:
    """The broken versions differ from the library only by their bug: on a square box covering the whole map (stretch
    mode) ``no_crop`` is the library's function, and ``flipped`` is its upside-down copy."""
    rng = np.random.default_rng(3)
    heatmap = rng.random((32, 32)).astype(np.float32)
    full = ContentBox(0, 0, 32, 32)
    letterbox = ContentBox(9, 0, 13, 32)  # a wide image in pad mode
    reference_full = classifier_module._to_original_size(heatmap, full, (120, 300))
    reference_letterbox = classifier_module._to_original_size(heatmap, letterbox, (120, 300))

    assert_allclose(no_crop(heatmap, full, (120, 300)), reference_full, atol=1e-6)
    assert_allclose(flipped(heatmap, letterbox, (120, 300)), reference_letterbox[::-1], atol=1e-6)
    assert not np.allclose(no_crop(heatmap, letterbox, (120, 300)), reference_letterbox, atol=1e-2)
