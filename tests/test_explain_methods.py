"""The CAM family: hand-derived values, equality with pytorch-grad-cam and Captum, targets, hygiene, memory.

Hand derivations use a toy network whose head is a fixed linear layer over the *flattened* feature map,
``logit_k = sum_{c,p} V[k, c, p] A_c(p) + b_k``, so that ``d logit_k / d A_c(p) = V[k, c, p]`` varies with the
position and every method's formula gives a different, hand-computable map (with a global-average-pooling head all
gradients are constant over positions, and XGrad-CAM, HiResCAM and Grad-CAM coincide).

What is compared with pytorch-grad-cam (``pytorch_grad_cam`` 1.5.x, a test-only dependency): its output, i.e. each
layer's map ``relu(cam)`` min-max normalised at the feature resolution, resized to the input with ``cv2.resize``
(bilinear, half-pixel centres), then min-max normalised again, against medxai's ``CAMResult.maps``: the feature
map bilinearly upsampled in torch (``align_corners=False``), then min-max normalised. Min-max normalisation is an
affine map and bilinear resizing is linear and reproduces constants, so the two pipelines compute the same function
up to float rounding and pytorch-grad-cam's ``1e-7`` in its denominators; the maps are compared directly. Where its
defaults differ from the papers' (Grad-CAM++'s ``1e-6`` denominator, Score-CAM's ``align_corners=True`` masks),
the documented medxai option that reproduces them is used, and the default is checked against the hand derivation.
"""

from __future__ import annotations

import gc
import resource
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medxai.errors import ConfigError
from medxai.explain import (
    CAM_METHODS,
    BaseCAM,
    BinaryLogitTarget,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    InputAttribution,
    LayerCAM,
    ScoreCAM,
    SoftmaxProbabilityTarget,
    XGradCAM,
    get_cam_method,
)
from medxai.explain.base import normalize_per_sample
from medxai.models import create_model

from toy_cam import X2D, conv_by_hand, toy_volume  # noqa: E402

torchvision = pytest.importorskip("torchvision")

METHODS = (GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM, ScoreCAM)


def _kernels(ndim: int) -> torch.Tensor:
    """Channel 0 copies the input; channel 1 is ``x[..., j] - x[..., j + 1]`` along the last axis (zero padded)."""
    kernels = torch.zeros((2, 1) + (3,) * ndim)
    centre = (1,) * ndim
    kernels[(0, 0) + centre] = 1.0
    kernels[(1, 0) + centre] = 1.0
    kernels[(1, 0) + centre[:-1] + (2,)] = -1.0
    return kernels


def _head_weights(num_outputs: int, spatial: tuple[int, ...], seed: int = 39) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.5, size=(num_outputs, 2, *spatial)).astype(np.float32)


class FlatHeadNet(nn.Module):
    """conv (fixed kernels) -> ReLU -> flatten -> linear (fixed ``V``): gradients vary with the position."""

    def __init__(self, spatial: tuple[int, ...], head: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        ndim = len(spatial)
        self.conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(1, 2, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(head[0].size, head.shape[0])
        self.cam_layer = "relu"
        with torch.no_grad():
            self.conv.weight.copy_(_kernels(ndim))
            self.fc.weight.copy_(torch.from_numpy(head.reshape(head.shape[0], -1)))
            self.fc.bias.copy_(torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def _activations_by_hand(x: np.ndarray) -> np.ndarray:
    return np.maximum(conv_by_hand(x), 0.0)  # (2, *x.shape)


def _logits_by_hand(x: np.ndarray, head: np.ndarray, bias: np.ndarray) -> np.ndarray:
    activations = _activations_by_hand(x)
    return np.tensordot(head, activations, axes=activations.ndim) + bias


def _expected_map(method: type[BaseCAM], x: np.ndarray, head: np.ndarray, bias: np.ndarray, k: int) -> np.ndarray:
    """Each paper's formula in NumPy, for the FlatHeadNet (gradient of logit k w.r.t. A_c(p) is head[k, c, p])."""
    a = _activations_by_hand(x).astype(np.float64)
    g = head[k].astype(np.float64)
    axes = tuple(range(1, a.ndim))
    if method is GradCAM:
        weighted = g.mean(axis=axes)[(...,) + (None,) * (a.ndim - 1)] * a
    elif method is GradCAMPlusPlus:
        sums = a.sum(axis=axes, keepdims=True)
        alpha = np.where(g != 0, g**2 / (2 * g**2 + sums * g**3), 0.0)
        weighted = (alpha * np.maximum(g, 0)).sum(axis=axes)[(...,) + (None,) * (a.ndim - 1)] * a
    elif method is XGradCAM:
        weights = (g * a).sum(axis=axes) / a.sum(axis=axes)
        weighted = weights[(...,) + (None,) * (a.ndim - 1)] * a
    elif method is HiResCAM:
        weighted = g * a
    elif method is LayerCAM:
        weighted = np.maximum(g, 0) * a
    elif method is ScoreCAM:
        flat = a.reshape(2, -1)
        masks = (flat - flat.min(1, keepdims=True)) / (flat.max(1, keepdims=True) - flat.min(1, keepdims=True) + 1e-8)
        scores = np.array([_logits_by_hand(x * masks[c].reshape(x.shape), head, bias)[k] for c in range(2)])
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        weighted = weights[(...,) + (None,) * (a.ndim - 1)] * a
    else:
        raise AssertionError(method)
    return np.maximum(weighted.sum(axis=0), 0.0)


# --------------------------------------------------------------------------------------------- hand derivations


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_method_matches_its_formula_by_hand(method: type[BaseCAM], ndim: int) -> None:
    x = X2D if ndim == 2 else toy_volume()
    head = _head_weights(3, x.shape)
    bias = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    model = FlatHeadNet(x.shape, head, bias).eval()
    inputs = torch.from_numpy(x)[None, None]
    for k in range(3):
        expected = _expected_map(method, x, head, bias, k)
        assert expected.max() > 0 and expected.min() == 0  # structure worth checking, and the ReLU matters

        result = method(model)(inputs, target=k)

        np.testing.assert_allclose(result.raw_maps[0].numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.maps[0].numpy(), (expected - expected.min()) / np.ptp(expected),
                                   atol=1e-5)
        np.testing.assert_allclose(result.logits[0].numpy(), _logits_by_hand(x, head, bias), rtol=1e-5, atol=1e-5)
        assert result.target_class.tolist() == [k]


def test_methods_differ_from_each_other_on_the_toy() -> None:
    """Each file states a different formula: on position-dependent gradients no two maps coincide."""
    head = _head_weights(3, X2D.shape)
    bias = np.zeros(3, dtype=np.float32)
    maps = {m.__name__: _expected_map(m, X2D, head, bias, 1) for m in METHODS}
    names = sorted(maps)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not np.allclose(maps[first], maps[second], atol=1e-4), (first, second)


def test_options_that_reproduce_pytorch_grad_cam_change_the_numbers() -> None:
    """The default Grad-CAM++ divides exactly; eps = 1e-6 (pytorch-grad-cam) visibly changes small gradients."""
    head = _head_weights(2, X2D.shape) * 1e-3  # gradients ~1e-3: g^2 ~1e-6, where the eps dominates
    model = FlatHeadNet(X2D.shape, head, np.zeros(2, dtype=np.float32)).eval()
    inputs = torch.from_numpy(X2D)[None, None]
    exact = GradCAMPlusPlus(model)(inputs, target=0)
    with_eps = GradCAMPlusPlus(model, denominator_eps=1e-6)(inputs, target=0)
    expected = _expected_map(GradCAMPlusPlus, X2D, head, np.zeros(2, dtype=np.float32), 0)
    np.testing.assert_allclose(exact.raw_maps[0].numpy(), expected, rtol=1e-4, atol=1e-12)
    assert float((exact.maps - with_eps.maps).abs().max()) > 1e-2


def test_score_cam_weights_without_channel_softmax_and_softmax_target() -> None:
    """``channel_softmax=False`` with a probability target is the authors' released Score-CAM."""
    head = _head_weights(3, X2D.shape)
    bias = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    model = FlatHeadNet(X2D.shape, head, bias).eval()
    a = _activations_by_hand(X2D).astype(np.float64)
    flat = a.reshape(2, -1)
    masks = (flat - flat.min(1, keepdims=True)) / (np.ptp(flat, axis=1, keepdims=True) + 1e-8)
    probabilities = []
    for c in range(2):
        logits = _logits_by_hand(X2D * masks[c].reshape(X2D.shape), head, bias)
        probabilities.append(np.exp(logits[2]) / np.exp(logits).sum())
    expected = np.maximum(np.tensordot(np.array(probabilities), a, axes=1), 0)

    result = ScoreCAM(model, channel_softmax=False)(torch.from_numpy(X2D)[None, None], SoftmaxProbabilityTarget(2))

    np.testing.assert_allclose(result.raw_maps[0].numpy(), expected, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- reference libraries


def _pgc_classes():
    pgc = pytest.importorskip("pytorch_grad_cam")
    return {
        GradCAM: pgc.GradCAM,
        GradCAMPlusPlus: pgc.GradCAMPlusPlus,
        HiResCAM: pgc.HiResCAM,
        LayerCAM: pgc.LayerCAM,
        XGradCAM: pgc.XGradCAM,
        ScoreCAM: pgc.ScoreCAM,
    }


#: Options that select pytorch-grad-cam's conventions where they differ from the papers' (see each module).
PGC_OPTIONS = {GradCAMPlusPlus: {"denominator_eps": 1e-6}, ScoreCAM: {"mask_align_corners": True, "batch_size": 128}}


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


@pytest.fixture(scope="module")
def densenet121() -> nn.Module:
    """medxai's densenet121 (torchvision's, with the final ReLU as the module ``features.relu5``, not in place), in
    float64: with random weights its Grad-CAM++ and LayerCAM maps have little contrast (max - min is ~5% of max at
    ``relu5``), and min-max normalisation then magnifies float32 rounding (which differs between NumPy/cv2 and torch
    summation orders) to ~1e-5. In float64 both libraries compute the maps exactly enough that only
    pytorch-grad-cam's final float32 cast remains; resnet18 is compared in float32."""
    torch.manual_seed(0)
    return create_model("densenet121", num_classes=5, in_chans=3, pretrained=False).double().eval()


def _compare_with_pgc(model: nn.Module, layer: str, method: type[BaseCAM], x: torch.Tensor, classes: list[int]):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference_class = _pgc_classes()[method]
    with reference_class(model=model, target_layers=[model.get_submodule(layer)]) as reference:
        if method is ScoreCAM:
            reference.batch_size = 128
        expected = reference(x, [ClassifierOutputTarget(c) for c in classes])
    result = method(model, layer, **PGC_OPTIONS.get(method, {}))(x, target=classes)
    assert result.maps.shape == expected.shape and result.maps.dtype == x.dtype
    difference = float(np.abs(result.maps.numpy() - expected).max())
    assert difference <= 1e-5, f"{method.__name__} at {layer}: max |difference| {difference:.2e}"
    assert expected.reshape(len(classes), -1).max(1).min() == pytest.approx(1.0, abs=1e-5)  # non-trivial maps
    return result


@pytest.mark.parametrize("method", [m for m in METHODS if m is not ScoreCAM], ids=lambda m: m.__name__)
def test_equal_to_pytorch_grad_cam_resnet18(method, resnet18) -> None:
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    _compare_with_pgc(resnet18, "layer4", method, x, [0, 3, 4])


@pytest.mark.parametrize("method", [m for m in METHODS if m is not ScoreCAM], ids=lambda m: m.__name__)
def test_equal_to_pytorch_grad_cam_densenet121(method, densenet121) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _compare_with_pgc(densenet121, "features.relu5", method, x, [1, 4])


def test_score_cam_equal_to_pytorch_grad_cam(resnet18, densenet121) -> None:
    """Score-CAM costs one forward per channel and image: layers with few channels keep this test short
    (resnet18 ``layer1``: 64 channels; densenet121's first dense layer: 32)."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _compare_with_pgc(resnet18, "layer1", ScoreCAM, x, [0, 3])
    _compare_with_pgc(densenet121, "features.denseblock1.denselayer1", ScoreCAM, x[:1].double(), [2])


def test_pytorch_grad_cam_densenet_norm5_mixes_rectified_activations_with_unrectified_gradients() -> None:
    """Why the DenseNet comparison uses ``features.relu5``: on the CPU, pytorch-grad-cam keeps torchvision DenseNet's
    ``features.norm5`` output without copying it, and the model's ``F.relu(features, inplace=True)`` then rectifies
    the kept activations, while the gradients are those of the unrectified ones. Its map is Grad-CAM of
    ``relu(A)`` with the gradients of ``A``, which is neither Grad-CAM at norm5 (medxai's) nor at the ReLU; on a GPU
    (``.cpu()`` copies) it would differ again."""
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=5).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    classes = [0, 1, 3, 4]
    with PGCGradCAM(model=model, target_layers=[model.features.norm5]) as reference:
        expected = reference(x, [ClassifierOutputTarget(c) for c in classes])
    with torch.enable_grad():
        features = model.features(x).detach().requires_grad_(True)
        logits = model.classifier(F.adaptive_avg_pool2d(F.relu(features), 1).flatten(1))
        (gradients,) = torch.autograd.grad(logits[torch.arange(4), classes].sum(), features)
    weights = gradients.mean(dim=(2, 3))[:, :, None, None]

    def normalised(activations: torch.Tensor) -> np.ndarray:
        raw = torch.relu((weights * activations.detach()).sum(1, keepdim=True))
        return normalize_per_sample(F.interpolate(raw, size=(64, 64), mode="bilinear")[:, 0]).numpy()

    assert (expected.reshape(4, -1).max(1) > 0.5).sum() >= 2  # at least two maps that are not all zero
    assert np.abs(normalised(F.relu(features)) - expected).max() <= 1e-5  # what pytorch-grad-cam computes
    ours = GradCAM(model, "features.norm5")(x, target=classes).maps.numpy()
    np.testing.assert_allclose(ours, normalised(features), atol=1e-5)  # Grad-CAM of norm5 itself
    assert np.abs(ours - expected).max() > 0.1


@pytest.mark.parametrize("which", ["resnet18", "densenet121"])
def test_equal_to_captum_layer_grad_cam(which, resnet18, densenet121) -> None:
    """Captum's LayerGradCam (relu, interpolated bilinearly to the input) equals medxai's un-normalised maps."""
    captum_attr = pytest.importorskip("captum.attr")
    model, layer = (resnet18, "layer4") if which == "resnet18" else (densenet121, "features.relu5")
    size = 96 if which == "resnet18" else 64
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    x = x.to(next(model.parameters()).dtype)
    classes = torch.tensor([4, 0, 2])
    attributions = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=classes, relu_attributions=True)
    expected = captum_attr.LayerAttribution.interpolate(attributions, (size, size), "bilinear")[:, 0].detach()

    result = GradCAM(model, layer)(x, target=classes)

    scale = float(expected.abs().max())
    assert scale > 0
    assert float((result.raw_maps - expected).abs().max()) <= 1e-5 * scale
    assert float((result.maps - normalize_per_sample(expected)).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------------------------ targets


def test_binary_logit_target_on_negative_logits_for_every_method() -> None:
    """Single-logit model whose logit is negative: BinaryLogitTarget(positive=True) explains the evidence FOR the
    positive class (gradient +V), positive=False the evidence against it (-V). An ``abs(logit)`` target (the change
    pytorch-grad-cam issue #428 proposes) would flip the first into the second whenever the logit is negative."""
    head = _head_weights(1, X2D.shape, seed=25)
    bias = np.array([-6.0], dtype=np.float32)
    model = FlatHeadNet(X2D.shape, head, bias).eval()
    inputs = torch.from_numpy(X2D)[None, None]
    assert _logits_by_hand(X2D, head, bias)[0] < 0
    for method in (GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM):
        positive = method(model)(inputs, target=BinaryLogitTarget(positive=True))
        negative = method(model)(inputs, target=BinaryLogitTarget(positive=False))
        absolute = method(model)(inputs, target=lambda logits: logits[:, 0].abs())
        np.testing.assert_allclose(positive.raw_maps[0].numpy(), _expected_map(method, X2D, head, bias, 0),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(negative.raw_maps[0].numpy(), _expected_map(method, X2D, -head, -bias, 0),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(absolute.raw_maps, negative.raw_maps)  # abs() explains the wrong class here
        assert not torch.allclose(positive.raw_maps, negative.raw_maps)
        assert positive.target_class.tolist() == [1] and negative.target_class.tolist() == [0]


def test_binary_target_agrees_with_pytorch_grad_cam_current_binary_target(resnet18) -> None:
    """pytorch-grad-cam 1.5.x's BinaryClassifierOutputTarget is ``sign * logit``, the same score (issue #428 is
    open and proposes ``abs``); checked on a single-logit ResNet-18 whose logits are negative."""
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None, num_classes=1).eval()
    with torch.no_grad():
        model.fc.bias.fill_(-5.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    for category in (0, 1):
        with PGCGradCAM(model=model, target_layers=[model.layer4]) as reference:
            expected = reference(x, [BinaryClassifierOutputTarget(category)] * 2)
        result = GradCAM(model, "layer4")(x, target=BinaryLogitTarget(positive=bool(category)))
        assert bool((result.logits < 0).all())
        assert float(np.abs(result.maps.numpy() - expected).max()) <= 1e-5


# ------------------------------------------------------------------------------- one pass, 3D, several layers


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_prediction_and_map_from_one_forward(method, resnet18) -> None:
    """Gradient methods: exactly one forward (and one backward) of the model. Score-CAM: the prediction is the
    first forward's; the others see only masked inputs."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    seen: list[torch.Tensor] = []
    handle = resnet18.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    try:  # Score-CAM at layer1 (64 channels), to keep the masked forwards few
        result = method(resnet18, "layer1" if method is ScoreCAM else "layer4")(x)
    finally:
        handle.remove()
    assert torch.equal(seen[0], x)
    if method is ScoreCAM:
        assert all(not torch.equal(batch[: len(x)], x) for batch in seen[1:])
    else:
        assert len(seen) == 1
    with torch.no_grad():
        torch.testing.assert_close(result.logits, resnet18(x))
    assert torch.equal(result.target_class, result.logits.argmax(1))


def test_layers_before_the_target_record_no_graph(resnet18) -> None:
    """Autograd records only from the target layer on: the stem's outputs do not require grad during the call."""
    flags: list[bool] = []
    handle = resnet18.layer1.register_forward_hook(lambda m, a, output: flags.append(output.requires_grad))
    try:
        result = GradCAM(resnet18, "layer4")(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert flags == [False]
    assert result.maps.amax() == 1.0


def test_model_that_switches_autograd_inside_its_forward() -> None:
    """A frozen backbone under ``no_grad`` and a head under ``enable_grad`` inside the model's forward: the target
    layer (in the frozen part) still gets the gradients of the head."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = self.features(x)
            with torch.enable_grad():
                return self.fc(features.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Frozen().eval()
    x = torch.randn(2, 1, 8, 8)
    result = GradCAM(model, "features")(x, target=1)
    with torch.no_grad():
        activations = model.features(x)
    expected = torch.relu((model.fc.weight[1][None, :, None, None] / 64 * activations).sum(1))
    torch.testing.assert_close(result.raw_maps, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_3d_feature_maps_upsampled_trilinearly(method) -> None:
    """A strided 3D conv and a pooled head: each map is the method's map at (3, 4, 5), upsampled trilinearly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 6, 8, 10)
    result = method(model, "1")(x, target=[0, 2])
    with torch.no_grad():
        activations = model[1](model[0](x))  # (2, 4, 3, 4, 5)
    gradients = model[4].weight[[0, 2]][:, :, None, None, None].expand_as(activations) / 60
    if method is GradCAM or method is HiResCAM or method is XGradCAM:  # constant gradients: these coincide
        by_hand = torch.relu((gradients * activations).sum(1))
    elif method is LayerCAM:
        by_hand = torch.relu((torch.relu(gradients) * activations).sum(1))
    else:  # Grad-CAM++, Score-CAM: checked by hand on the toy; here their own map at feature size
        by_hand = None
    if by_hand is not None:
        expected = F.interpolate(by_hand[:, None], size=(6, 8, 10), mode="trilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(result.raw_maps, expected, atol=1e-6, rtol=1e-5)
    assert result.maps.shape == (2, 6, 8, 10)
    assert bool(((result.maps >= 0) & (result.maps <= 1)).all())
    assert bool((result.maps.flatten(1).amax(1) == 1).all())


def test_several_layers_combined_for_every_method(resnet18) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    for method in (GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM):
        both = method(resnet18, ["layer3", "layer4"])(x, target=1)
        first = method(resnet18, "layer3")(x, target=1)
        second = method(resnet18, "layer4")(x, target=1)
        torch.testing.assert_close(both.raw_maps, (first.maps + second.maps) / 2, atol=1e-6, rtol=1e-5)


def test_channels_last_on_cpu_same_maps_and_fallback_for_view_models() -> None:
    """On the CPU the batch goes to the model channels-last (faster oneDNN convolutions): same maps as the usual
    layout; a model that ``.view``s a feature map fails on it, once, and is then explained in the usual layout."""

    class ViewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.relu(self.conv(x))
            return self.fc(features.view(features.shape[0], -1))  # needs a contiguous feature map

    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    model = ViewNet().eval()
    with pytest.raises(RuntimeError, match="view"):
        model(x.contiguous(memory_format=torch.channels_last))
    cam = GradCAM(model, "relu")
    forwards: list[bool] = []
    handle = model.conv.register_forward_pre_hook(
        lambda module, args: forwards.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        first, second = cam(x, target=1), cam(x, target=1)
    finally:
        handle.remove()
    assert forwards == [True, False, False]  # tried once, then remembered
    expected = GradCAM(model, "relu", channels_last=False)(x, target=1)
    torch.testing.assert_close(first.raw_maps, expected.raw_maps)
    torch.testing.assert_close(second.raw_maps, expected.raw_maps)

    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    fast = GradCAM(resnet, "layer4")(x, target=[0, 2])
    plain = GradCAM(resnet, "layer4", channels_last=False)(x, target=[0, 2])
    torch.testing.assert_close(fast.maps, plain.maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- hygiene


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_model_and_grad_mode_untouched(method) -> None:
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=3, in_chans=1, pretrained=False, input_size=28).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        method(model)(x)
        assert not torch.is_grad_enabled()
    method(model)(x)
    assert torch.is_grad_enabled()
    assert _no_hooks(model) and not model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_registry_and_names() -> None:
    assert set(CAM_METHODS) == {"gradcam", "gradcamplusplus", "hirescam", "layercam", "xgradcam", "scorecam",
                                "integratedgradients", "gradientshap", "occlusion", "rise", "lime", "kernelshap"}
    assert get_cam_method("Grad-CAM++") is GradCAMPlusPlus and get_cam_method("Score-CAM") is ScoreCAM
    assert get_cam_method("XGrad_CAM") is XGradCAM and get_cam_method("HiResCAM") is HiResCAM
    assert all(issubclass(cls, (BaseCAM, InputAttribution)) for cls in CAM_METHODS.values())
    with pytest.raises(ConfigError, match="scorecam"):
        get_cam_method("eigencam")
    with pytest.raises(ConfigError, match="batch_size"):
        ScoreCAM(nn.Sequential(nn.Conv2d(1, 1, 1)), "0", batch_size=0)


# ------------------------------------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def test_memory_flat_over_2000_images() -> None:
    """2,000 images through Grad-CAM in batches of 50: resident memory in the last quarter of the calls is no
    higher than in the first quarter (beyond allocator noise), i.e. nothing is kept from call to call
    (pytorch-grad-cam issues #483, #356 report such growth)."""
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=2, in_chans=1, pretrained=False, input_size=32).eval()
    cam = GradCAM(model)
    images = torch.randn(50, 1, 32, 32)
    per_call_activations = 50 * 128 * 8 * 8 * 4  # bytes of the hooked activations of one call
    readings = []
    started = time.perf_counter()
    for index in range(40):
        result = cam(images + 0.01 * index)
        assert result.maps.shape == (50, 32, 32)
        del result
        readings.append(_rss_bytes())
    elapsed = time.perf_counter() - started
    gc.collect()
    first, last = np.mean(readings[2:10]), np.mean(readings[30:])  # skip the first calls' one-off allocations
    growth = last - first
    assert growth < 4 * per_call_activations, f"RSS grew by {growth / 2**20:.1f} MiB over 2,000 images"
    assert elapsed < 60
