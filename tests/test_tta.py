"""Test-time augmentation: views and their inverses, averaged probabilities, and averaged Grad-CAM maps.

Shifts are checked against an independent implementation (``F.pad`` with ``mode="replicate"`` and a crop); the
TTA map against the hand average of plain Grad-CAM maps of the transformed inputs, brought back by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medxai.errors import ConfigError
from medxai.explain import ClassTarget, DecisionTarget, LogOddsTarget, get_cam_method
from medxai.explain.base import CAMResult, normalize_per_sample
from medxai.explain.tta import TTA_VIEWS, TTACAM, View, parse_tta, shift_pixels, tta_probabilities, tta_views


def _pad_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Content moved by (dy, dx) with edge replication, via F.pad + crop (independent of the module's indexing)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w]


class SymmetricToy(nn.Module):
    """Conv with left-right symmetric kernels + ReLU + global average pool + linear: exactly hflip-invariant."""

    cam_layer = "conv"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class PositionalToy(nn.Module):
    """Conv + ReLU + linear over the flattened map: neither flip- nor shift-invariant, so views disagree."""

    cam_layer = "conv"

    def __init__(self, classes: int = 3, side: int = 8) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _gradcam(model: nn.Module):
    return get_cam_method("gradcam")(model.eval(), channels_last=False)


# --- parse_tta and views ---------------------------------------------------------------------------------------


def test_parse_tta_forms():
    assert parse_tta(None) == parse_tta("") == parse_tta([]) == ()
    assert parse_tta("hflip,shift") == ("hflip", "shift")
    assert parse_tta(" HFlip , shift,hflip,") == ("hflip", "shift")
    assert parse_tta(["vflip", "hflip"]) == ("vflip", "hflip")
    assert parse_tta(TTA_VIEWS) == ("hflip", "vflip", "shift")


@pytest.mark.parametrize("names", ["hflip,rotate", ["rotate", "zoom"], [3]])
def test_parse_tta_errors_name_unknown_and_list_known(names):
    with pytest.raises(ConfigError) as info:
        parse_tta(names)
    message = str(info.value)
    assert all(view in message for view in TTA_VIEWS)
    for bad in ("rotate", "zoom", "3"):
        if bad in str(names):
            assert bad in message


def test_tta_views_identity_first_and_shift_sizes():
    views = tta_views("hflip,shift", height=20, width=224)
    assert views[0] == View("identity")
    assert [v.name for v in views] == ["identity", "hflip", "shift_x+11", "shift_x-11", "shift_y+1", "shift_y-1"]
    assert [v.shift for v in views[2:]] == [(0, 11), (0, -11), (1, 0), (-1, 0)]
    assert tta_views(None, 8, 8) == [View("identity")]
    with pytest.raises(ConfigError):
        tta_views("rotate", 8, 8)
    assert [shift_pixels(side) for side in (1, 9, 10, 30, 50, 224, 512)] == [1, 1, 1, 2, 3, 11, 26]


def test_flips_are_self_inverse_and_exact():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    hflip, vflip = tta_views("hflip,vflip", 5, 7)[1:]
    assert torch.equal(hflip.apply(x), x.flip(-1))
    assert torch.equal(vflip.apply(x), x.flip(-2))
    assert torch.equal(hflip.apply(hflip.apply(x)), x)
    maps = torch.rand(2, 5, 7)
    assert torch.equal(hflip.invert_map(hflip.apply(maps)), maps)
    assert torch.equal(vflip.invert_map(vflip.apply(maps)), maps)
    assert hflip.apply(x).dtype == torch.float64


def test_shift_replicates_edges_and_never_wraps():
    x = torch.randn(2, 3, 20, 40)
    for view in tta_views("shift", 20, 40)[1:]:
        dy, dx = view.shift
        shifted = view.apply(x)
        assert torch.equal(shifted, _pad_shift(x, dy, dx)), view.name
        assert shifted.shape == x.shape and shifted.dtype == x.dtype
    right = View("r", shift=(0, 2)).apply(x)
    assert torch.equal(right[..., 2:], x[..., :-2])
    assert torch.equal(right[..., :2], x[..., :1].expand(-1, -1, -1, 2))  # replicated, not x[..., -2:]


@pytest.mark.parametrize("shift", [(0, 3), (0, -3), (2, 0), (-2, 0)])
def test_shift_invert_map_exact_in_interior(shift):
    dy, dx = shift
    maps = torch.rand(2, 20, 40)
    view = View("s", shift=shift)
    back = view.invert_map(view.apply(maps))
    rows = slice(0, 20 - dy) if dy >= 0 else slice(-dy, 20)
    cols = slice(0, 40 - dx) if dx >= 0 else slice(-dx, 40)
    assert torch.equal(back[:, rows, cols], maps[:, rows, cols])
    # The border whose source lies outside the view repeats the map's nearest valid row/column.
    if dx > 0:
        assert torch.equal(back[:, :, 40 - dx:], back[:, :, 40 - dx - 1:40 - dx].expand(-1, -1, dx))
    if dy < 0:
        assert torch.equal(back[:, :-dy], back[:, -dy:-dy + 1].expand(-1, -dy, -1))
    # A map computed on the shifted image is moved back: invert_map(shift(m)) == m in the interior.
    assert torch.equal(view.invert_map(_pad_shift(maps, dy, dx))[:, rows, cols], maps[:, rows, cols])


def test_views_work_on_volumes_and_other_dtypes():
    volume = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.int64).reshape(2, 1, 3, 4, 5)
    hflip, *shifts = tta_views("hflip,shift", 4, 5)[1:]
    assert torch.equal(hflip.apply(volume), volume.flip(-1))
    assert shifts[0].apply(volume).dtype == torch.int64
    assert torch.equal(shifts[0].apply(volume)[..., 1:], volume[..., :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_stay_on_cuda():
    x = torch.randn(1, 1, 6, 6, device="cuda", dtype=torch.float16)
    for view in tta_views("hflip,vflip,shift", 6, 6):
        assert view.apply(x).device == x.device and view.apply(x).dtype == torch.float16
        assert torch.equal(view.apply(x).cpu(), View(view.name, view.flip_dims, view.shift).apply(x.cpu()))


# --- probabilities ---------------------------------------------------------------------------------------------


def test_tta_probabilities_equal_hand_average_and_softmax_back():
    model = PositionalToy().eval()
    x = torch.randn(2, 2, 8, 8)
    s = shift_pixels(8)
    hand_views = [x, x.flip(-1), x.flip(-2)] + [_pad_shift(x, dy, dx) for dy, dx in ((0, s), (0, -s), (s, 0), (-s, 0))]
    with torch.no_grad():
        hand = torch.stack([torch.softmax(model(v), dim=1) for v in hand_views]).mean(dim=0)
        probabilities, logits = tta_probabilities(model, x, tta_views("hflip,vflip,shift", 8, 8))
    assert torch.allclose(probabilities, hand, atol=1e-7)
    assert torch.allclose(torch.softmax(logits, dim=1), hand, atol=1e-7)
    assert torch.allclose(logits.exp(), hand, atol=1e-7)
    assert not torch.allclose(probabilities, torch.softmax(model(x), 1), atol=1e-3)  # the views do disagree


def test_tta_probabilities_custom_to_probabilities_and_errors():
    model = PositionalToy().eval()
    x = torch.randn(1, 2, 8, 8)
    tempered = lambda z: torch.softmax(z / 2.0, dim=1)  # noqa: E731
    with torch.no_grad():
        probabilities, _ = tta_probabilities(model, x, tta_views("hflip", 8, 8), tempered)
        hand = (tempered(model(x)) + tempered(model(x.flip(-1)))) / 2
    assert torch.allclose(probabilities, hand, atol=1e-7)
    with pytest.raises(ConfigError, match="single-logit"):
        tta_probabilities(lambda b: b.mean(dim=(1, 2, 3))[:, None], x, [View("identity")])
    with pytest.raises(ValueError):
        tta_probabilities(model, x, [])


def test_tta_logits_finite_when_a_probability_underflows():
    views = [View("identity")]
    _, logits = tta_probabilities(lambda b: torch.tensor([[0.0, 200.0]]), torch.zeros(1, 1, 2, 2), views)
    assert torch.isfinite(logits).all()
    assert torch.allclose(torch.softmax(logits, 1), torch.tensor([[0.0, 1.0]]))


# --- TTA Grad-CAM ----------------------------------------------------------------------------------------------


def test_symmetric_model_hflip_tta_is_invariant():
    model = SymmetricToy().eval()
    torch.manual_seed(2)
    x = torch.randn(1, 1, 9, 10)
    symmetric = x + x.flip(-1)
    views = tta_views("hflip", 9, 10)
    cam = _gradcam(model)
    tta = TTACAM(cam, views)
    for image in (symmetric, x):
        with torch.no_grad():
            plain = torch.softmax(model(image), dim=1)
            probabilities, _ = tta_probabilities(model, image, views)
        assert torch.allclose(probabilities, plain, atol=1e-6)
        result = tta(image)
        assert torch.allclose(torch.softmax(result.logits, 1), plain, atol=1e-6)
        assert torch.equal(result.target_class, plain.argmax(1))

    plain_map = cam(symmetric).maps
    assert plain_map.amax() == 1 and plain_map.amin() == 0  # a map with structure
    assert torch.allclose(tta(symmetric).maps, plain_map, atol=1e-6)

    # Non-symmetric input: the TTA map is the normalised mean of the plain map and the flipped-back flipped map.
    classes = ClassTarget(tta(x).target_class)
    hand = normalize_per_sample((cam(x, classes).maps + cam(x.flip(-1), classes).maps.flip(-1)) / 2)
    assert torch.allclose(tta(x).maps, hand, atol=1e-6)


def test_tta_cam_equals_hand_average_over_views():
    model = PositionalToy().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 2, 8, 8)
    views = tta_views("hflip,shift", 8, 8)
    cam = _gradcam(model)
    result = TTACAM(cam, views)(x)
    assert type(result) is CAMResult
    assert result.maps.shape == (2, 8, 8) and result.maps.amin() >= 0 and result.maps.amax() <= 1

    s = shift_pixels(8)
    with torch.no_grad():
        probabilities, logits = tta_probabilities(model, x, views)
    classes = probabilities.argmax(1)
    target = ClassTarget(classes)  # the predicted class's logit, frozen to the TTA decision
    hand_maps = [cam(x, target).maps, cam(x.flip(-1), target).maps.flip(-1)]
    hand_raw = [cam(x, target).raw_maps, cam(x.flip(-1), target).raw_maps.flip(-1)]
    for dy, dx in ((0, s), (0, -s), (s, 0), (-s, 0)):
        shifted = cam(_pad_shift(x, dy, dx), target)
        hand_maps.append(_pad_shift(shifted.maps, -dy, -dx))
        hand_raw.append(_pad_shift(shifted.raw_maps, -dy, -dx))
    assert torch.allclose(result.maps, normalize_per_sample(torch.stack(hand_maps).mean(0)), atol=1e-6)
    assert torch.allclose(result.raw_maps, torch.stack(hand_raw).mean(0), atol=1e-6)
    assert torch.equal(result.target_class, classes)
    assert torch.allclose(result.logits, logits, atol=1e-6)
    assert torch.allclose(torch.softmax(result.logits, 1), probabilities, atol=1e-6)


class _SpyCAM:
    """Records the target each view is explained with; otherwise the real Grad-CAM."""

    def __init__(self, cam):
        self.cam, self.model, self.targets = cam, cam.model, []

    def __call__(self, inputs, target=None):
        self.targets.append(target)
        return self.cam(inputs, target)


def test_decision_target_decided_once_on_averaged_probabilities():
    model = PositionalToy(classes=2).eval()
    torch.manual_seed(4)
    x = torch.randn(6, 2, 8, 8)
    views = tta_views("hflip,vflip,shift", 8, 8)

    def decide(logits):
        return (torch.softmax(logits, 1)[:, 1] > 0.4).long()

    spy = _SpyCAM(_gradcam(model))
    result = TTACAM(spy, views)(x, target=DecisionTarget(decide, "p1 > 0.4"))
    with torch.no_grad():
        probabilities, _ = tta_probabilities(model, x, views)
    expected = (probabilities[:, 1] > 0.4).long()
    assert torch.equal(result.target_class, expected)
    assert len(spy.targets) == len(views)
    assert all(t is spy.targets[0] for t in spy.targets)  # one frozen target for every view
    assert isinstance(spy.targets[0], LogOddsTarget)  # a decision's log-odds stays a log-odds
    assert torch.equal(spy.targets[0].classes(result.logits), expected)


def test_fixed_target_skips_the_decision_pass():
    model = PositionalToy().eval()
    x = torch.randn(1, 2, 8, 8)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    views = tta_views("hflip", 8, 8)
    result = TTACAM(_gradcam(model), views)(x, target=2)
    assert len(calls) == len(views)  # no extra no-grad forwards: the CAM passes give the logits
    assert torch.equal(result.target_class, torch.tensor([2]))
    calls.clear()
    TTACAM(_gradcam(model), views)(x)
    assert len(calls) == 2 * len(views)


def test_tta_cam_rejects_bad_inputs():
    cam = _gradcam(PositionalToy())
    with pytest.raises(ValueError):
        TTACAM(cam, [])
    with pytest.raises(ValueError):
        TTACAM(cam, tta_views(None, 8, 8))(torch.zeros(2, 8, 8))


def test_the_classifier_averages_calibrated_probabilities_and_maps_over_its_views(tmp_path):
    """``Classifier(tta=...)``: predict gives the mean of the CALIBRATED probabilities of the views (the temperature
    applied once, per view), explain reports the same probabilities and explains the class decided on them."""
    from medxai.classifier import Classifier
    from medxai.models import create_model
    from medxai.models.card import ModelCard

    torch.manual_seed(0)
    model = create_model("simple_cnn", 2, 1, input_size=16, dropout=0.0).eval()
    card = ModelCard(architecture="simple_cnn", num_classes=2, label_names=["a", "b"],
                     preprocess={"size": 16, "channels": 1, "normalize": "none"}, cam_layer=model.cam_layer,
                     temperature=2.0, calibration={"method": "temperature", "temperature": 2.0})
    plain = Classifier(model, card, device="cpu")
    augmented = Classifier(model, card, device="cpu", tta=("hflip", "shift"))
    image = (np.random.default_rng(0).uniform(size=(16, 16)) * 255).astype(np.uint8)
    batch = torch.from_numpy(image).float()[None, None] / 255
    with torch.no_grad():
        views = tta_views(("hflip", "shift"), 16, 16)
        expected = torch.stack([torch.softmax(model(view.apply(batch)) / 2.0, dim=1) for view in views]).mean(0)
    predicted = augmented.predict([image])[0]
    assert [predicted.probabilities["a"], predicted.probabilities["b"]] == pytest.approx(expected[0].tolist(),
                                                                                          abs=1e-5)
    assert predicted.probabilities != pytest.approx(plain.predict([image])[0].probabilities, abs=1e-6)
    explained = augmented.explain([image])[0]
    assert explained.prediction.probabilities == pytest.approx(predicted.probabilities, abs=1e-5)
    assert explained.target_label == predicted.label
