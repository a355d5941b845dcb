"""Tests of medxai.explain: Grad-CAM against hand derivations, batching, hygiene, targets and overlays.

The hand derivation used throughout (captum's toy-network style): for ``logits = W @ GAP(A) + b`` with ``A`` the
target layer's activations (C channels, N positions), ``d logit_k / d A_c(p) = W[k, c] / N`` at every position, so
Grad-CAM's channel weights are ``W[k, c] / N`` and the map is ``relu(sum_c W[k, c] / N * A_c)``.
"""

from __future__ import annotations

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
    CAMResult,
    ClassTarget,
    GradCAM,
    PredictedClassTarget,
    SoftmaxProbabilityTarget,
    get_cam_method,
    overlay_heatmap,
    save_heatmap_npy,
    save_overlay,
)

from toy_cam import X2D, conv_by_hand, toy_volume  # noqa: E402

torchvision = pytest.importorskip("torchvision")

FC_WEIGHT = np.array([[1.0, -0.5], [-0.5, 3.0]], dtype=np.float32)
FC_BIAS = np.array([0.1, -0.2], dtype=np.float32)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts how often it runs (one backward pass per CAM call)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        _CountBackward.calls += 1
        return grad


class CountBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CountBackward.apply(x)


def _kernels(ndim: int) -> torch.Tensor:
    """Channel 0 copies the input; channel 1 is ``x[..., j] - x[..., j + 1]`` along the last axis (zero padded)."""
    shape = (2, 1) + (3,) * ndim
    kernels = torch.zeros(shape)
    centre = (1,) * ndim
    kernels[(0, 0) + centre] = 1.0
    kernels[(1, 0) + centre] = 1.0
    kernels[(1, 0) + centre[:-1] + (2,)] = -1.0
    return kernels


class ToyNet(nn.Module):
    """conv (fixed kernels) -> ReLU -> global average pool -> linear (fixed weights), 2D or 3D."""

    def __init__(self, ndim: int = 2, inplace: bool = False, fc_weight=FC_WEIGHT, fc_bias=FC_BIAS) -> None:
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv = conv(1, 2, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1) if ndim == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2, fc_weight.shape[0])
        self.count = CountBackward()
        self.cam_layer = "relu"
        with torch.no_grad():
            self.conv.weight.copy_(_kernels(ndim))
            self.fc.weight.copy_(torch.from_numpy(fc_weight))
            self.fc.bias.copy_(torch.from_numpy(fc_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.count(self.fc(self.pool(self.relu(self.conv(x))).flatten(1)))


def _grad_cam_by_hand(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    weights = gradients.reshape(gradients.shape[0], -1).mean(axis=1)
    return np.maximum(np.tensordot(weights, activations, axes=1), 0.0)


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks and not m._backward_pre_hooks
        for m in model.modules()
    )


# --------------------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("k", [0, 1])
def test_grad_cam_matches_hand_derivation(ndim: int, k: int) -> None:
    x = X2D if ndim == 2 else toy_volume()
    model = ToyNet(ndim).eval()
    activations = np.maximum(conv_by_hand(x), 0.0)  # target layer: the ReLU
    n_positions = x.size
    gradients = np.broadcast_to(FC_WEIGHT[k][:, None] / n_positions, (2, n_positions)).reshape(activations.shape)
    expected = _grad_cam_by_hand(activations, gradients)
    assert expected.max() > 0 and expected.min() == 0  # the map has structure worth checking

    result = GradCAM(model)(torch.from_numpy(x)[None, None], target=k)

    assert isinstance(result, CAMResult)
    assert result.raw_maps.shape == (1, *x.shape) and result.maps.shape == (1, *x.shape)
    np.testing.assert_allclose(result.raw_maps[0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(result.maps[0].numpy(), _minmax(expected), atol=1e-6)
    expected_logits = FC_WEIGHT @ activations.reshape(2, -1).mean(axis=1) + FC_BIAS
    np.testing.assert_allclose(result.logits[0].numpy(), expected_logits, atol=1e-6)
    assert result.target_class.tolist() == [k]


@pytest.mark.parametrize("k", [0, 1])
def test_activation_followed_by_inplace_relu(k: int) -> None:
    """Target = the conv, whose output an in-place ReLU overwrites: activations and gradients are the conv's own."""
    model = ToyNet(2, inplace=True).eval()
    pre_relu = conv_by_hand(X2D)
    gradients = FC_WEIGHT[k][:, None, None] / X2D.size * (pre_relu > 0)  # ReLU's derivative
    expected = _grad_cam_by_hand(pre_relu, gradients)

    result = GradCAM(model, "conv")(torch.from_numpy(X2D)[None, None], target=k)

    np.testing.assert_allclose(result.raw_maps[0].numpy(), expected, atol=1e-6)
    expected_logits = FC_WEIGHT @ np.maximum(pre_relu, 0).reshape(2, -1).mean(axis=1) + FC_BIAS
    np.testing.assert_allclose(result.logits[0].numpy(), expected_logits, atol=1e-6)


def test_densenet_features_overwritten_in_place() -> None:
    """torchvision DenseNet applies F.relu(features, inplace=True) after the hooked block; still hand-derivable."""
    torch.manual_seed(0)
    # A small torchvision DenseNet: same forward (features -> in-place ReLU -> pool -> classifier) as densenet121.
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=3)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.features(x)  # (2, C, 4, 4), before the in-place ReLU
    assert features.shape[2:] == (4, 4) and (features < 0).any()
    k = 2
    gradients = model.classifier.weight[k][None, :, None, None] / 16 * (features > 0)
    weights = gradients.flatten(2).mean(2)
    expected = F.interpolate(
        torch.relu((weights[:, :, None, None] * features).sum(1, keepdim=True)), size=(32, 32), mode="bilinear"
    )[:, 0]

    result = GradCAM(model, "features")(x, target=k)

    torch.testing.assert_close(result.raw_maps, expected, atol=1e-5, rtol=1e-4)


def test_upsampling_to_input_size() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2))
    torch.manual_seed(1)
    x = torch.randn(2, 1, 10, 14)
    layer_only = GradCAM(model, "1")(x, target=1)
    assert layer_only.maps.shape == (2, 10, 14)
    with torch.enable_grad():
        activations = model[1](model[0](x))
    weights = model[4].weight[1] / activations[0, 0].numel()
    at_feature_size = torch.relu((weights[None, :, None, None] * activations).sum(1, keepdim=True))
    expected = F.interpolate(at_feature_size, size=(10, 14), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(layer_only.raw_maps, expected.detach(), atol=1e-6, rtol=1e-5)
    assert float(layer_only.maps.min()) >= 0 and float(layer_only.maps.max()) <= 1


def test_constant_map_gives_zeros_not_nan() -> None:
    result = GradCAM(ToyNet(2).eval())(torch.zeros(2, 1, 4, 4))
    assert torch.equal(result.maps, torch.zeros(2, 4, 4))
    assert not torch.isnan(result.raw_maps).any()


def test_several_layers_average_normalised_maps() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()
    x = torch.randn(3, 1, 12, 12)
    first = GradCAM(model, "1")(x, target=2)
    second = GradCAM(model, "3")(x, target=2)
    both = GradCAM(model, ["1", "3"])(x, target=2)

    expected_raw = (first.maps + second.maps) / 2
    torch.testing.assert_close(both.raw_maps, expected_raw, atol=1e-6, rtol=1e-5)
    flat = expected_raw.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    torch.testing.assert_close(both.maps, ((flat - low) / (high - low)).view_as(expected_raw), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both.logits, first.logits)


# ------------------------------------------------------------------------------------------------ batching, passes


def test_batch_equals_single_samples_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x = torch.randn(4, 3, 64, 64)
    cam = GradCAM(model, "layer4")

    batched = cam(x)
    singles = [cam(x[i : i + 1]) for i in range(4)]

    assert batched.maps.shape == (4, 64, 64)
    torch.testing.assert_close(batched.maps, torch.cat([s.maps for s in singles]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.raw_maps, torch.cat([s.raw_maps for s in singles]), atol=1e-5, rtol=1e-4)
    assert torch.equal(batched.target_class, torch.cat([s.target_class for s in singles]))
    with torch.no_grad():
        expected_logits = model(x)
    torch.testing.assert_close(batched.logits, expected_logits)
    assert torch.equal(batched.target_class, expected_logits.argmax(1))
    for per_sample in (batched.maps, batched.raw_maps):
        assert per_sample.flatten(1).amax(1).gt(0).all()  # the maps are not trivially empty


def test_one_forward_and_one_backward_per_call() -> None:
    model = ToyNet(2).eval()
    forwards = []
    handle = model.register_forward_hook(lambda *args: forwards.append(1))
    _CountBackward.calls = 0
    try:
        GradCAM(model)(torch.from_numpy(np.stack([X2D, -X2D]))[:, None])
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert _CountBackward.calls == 1


# --------------------------------------------------------------------------------------------------------- hygiene


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("training", [False, True])
def test_model_and_input_untouched(training: bool) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2).train(training)
    model.layer1.requires_grad_(False)  # a partly frozen model stays partly frozen
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    before = _snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    x_before = x.clone()

    GradCAM(model, ["layer3", "layer4"])(x, target=[0, 1])

    assert model.training is training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert _no_hooks(model)
    if not training:  # in training mode BatchNorm updates its running stats: the caller's choice, not ours
        after = model.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


def test_hooks_released_after_an_exception() -> None:
    model = ToyNet(2).eval()

    def failing_target(logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        GradCAM(model)(torch.from_numpy(X2D)[None, None], target=failing_target)
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def test_fully_frozen_model_under_no_grad_and_inference_mode() -> None:
    model = ToyNet(2).eval().requires_grad_(False)
    x = torch.from_numpy(X2D)[None, None]
    reference = GradCAM(ToyNet(2).eval())(x, target=1)
    with torch.no_grad():
        frozen = GradCAM(model)(x, target=1)
    with torch.inference_mode():
        inference = GradCAM(model)(x.clone(), target=1)
    torch.testing.assert_close(frozen.raw_maps, reference.raw_maps)
    torch.testing.assert_close(inference.raw_maps, reference.raw_maps)
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------------------- targets


def test_binary_logit_target_right_for_negative_logits() -> None:
    weight = np.array([[1.5, -2.0]], dtype=np.float32)
    model = ToyNet(2, fc_weight=weight, fc_bias=np.array([-3.0], dtype=np.float32)).eval()
    x = torch.from_numpy(X2D)[None, None]
    activations = np.maximum(conv_by_hand(X2D), 0.0)
    cam = GradCAM(model)

    negative = cam(x, target=BinaryLogitTarget(positive=False))
    positive = cam(x, target=BinaryLogitTarget(positive=True))

    assert float(negative.logits[0, 0]) < 0  # the case pytorch-grad-cam issue #428 is about
    by_hand_negative = _grad_cam_by_hand(activations, np.broadcast_to(-weight[0][:, None, None] / 16, (2, 4, 4)))
    by_hand_positive = _grad_cam_by_hand(activations, np.broadcast_to(weight[0][:, None, None] / 16, (2, 4, 4)))
    np.testing.assert_allclose(negative.raw_maps[0].numpy(), by_hand_negative, atol=1e-6)
    np.testing.assert_allclose(positive.raw_maps[0].numpy(), by_hand_positive, atol=1e-6)
    custom = cam(x, target=lambda logits: -logits[:, 0])
    torch.testing.assert_close(negative.raw_maps, custom.raw_maps)
    assert negative.target_class.tolist() == [0] and positive.target_class.tolist() == [1]
    assert custom.target_class.tolist() == [-1]  # a plain callable does not say which class it explains
    predicted = cam(x)  # negative logit -> class 0 -> same evidence as positive=False
    torch.testing.assert_close(predicted.raw_maps, negative.raw_maps)
    assert predicted.target_class.tolist() == [0]
    # Class indices name labels: on a single-logit model, class 0 is the negative class and class 1 the positive.
    torch.testing.assert_close(cam(x, target=0).raw_maps, negative.raw_maps)
    torch.testing.assert_close(cam(x, target=1).raw_maps, positive.raw_maps)
    with pytest.raises(ConfigError, match="out of range"):
        cam(x, target=2)
    with pytest.raises(ConfigError, match="constant"):
        cam(x, target=SoftmaxProbabilityTarget(0))


def test_target_forms_and_errors() -> None:
    model = ToyNet(2).eval()
    x = torch.from_numpy(np.stack([X2D, X2D.T]))[:, None]
    cam = GradCAM(model)
    per_sample = cam(x, target=[0, 1])
    assert per_sample.target_class.tolist() == [0, 1]
    torch.testing.assert_close(per_sample.raw_maps[0], cam(x[:1], target=0).raw_maps[0])
    torch.testing.assert_close(per_sample.raw_maps[1], cam(x[1:], target=ClassTarget(1)).raw_maps[0])
    assert torch.equal(cam(x, target=PredictedClassTarget()).target_class, per_sample.logits.argmax(1))
    softmax = cam(x, target=SoftmaxProbabilityTarget(0))
    assert softmax.target_class.tolist() == [0, 0] and softmax.maps.shape == (2, 4, 4)

    with pytest.raises(ConfigError, match="out of range"):
        cam(x, target=2)
    with pytest.raises(ConfigError, match="2 target classes for a batch of 1"):
        cam(x[:1], target=[0, 1])
    with pytest.raises(ConfigError, match="single-logit"):
        cam(x, target=BinaryLogitTarget())
    with pytest.raises(ConfigError, match="bool"):
        cam(x, target=True)
    assert _no_hooks(model)


def test_unknown_and_unsuitable_layers() -> None:
    model = ToyNet(2)
    with pytest.raises(ConfigError, match="'conv9'.*conv"):
        GradCAM(model, ["relu", "conv9"])
    with pytest.raises(ConfigError, match="not a \\(B, C, \\*spatial\\) feature map"):
        GradCAM(model, "fc")(torch.from_numpy(X2D)[None, None])
    del model.cam_layer
    with pytest.raises(ConfigError, match="cam_layer"):
        GradCAM(model)


def test_registry() -> None:
    assert CAM_METHODS["gradcam"] is GradCAM  # the other methods: tests/test_explain_methods.py
    assert get_cam_method("Grad-CAM") is GradCAM and issubclass(GradCAM, BaseCAM)
    with pytest.raises(ConfigError, match="gradcam"):
        get_cam_method("eigencam")


# --------------------------------------------------------------------------------------------------------- overlay


def _grey_uint16(height: int = 37, width: int = 53) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(200, 60000, size=(height, width), dtype=np.uint16)


def test_overlay_at_original_resolution() -> None:
    image = _grey_uint16()
    heatmap = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)

    out = overlay_heatmap(image, heatmap)

    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    grey = np.rint((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    plain = overlay_heatmap(image, torch.from_numpy(heatmap), alpha=0.0)
    np.testing.assert_array_equal(plain, np.repeat(grey[..., None], 3, axis=2))
    assert not np.array_equal(out, plain)


def test_overlay_crop_box_removes_padding() -> None:
    # A 37x53 image letterboxed into 8x8: content rows 1..6, one padding row above and below.
    image = _grey_uint16()
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[[0, 7], :] = 1.0  # hot only in the padding
    cold = overlay_heatmap(image, np.zeros((6, 8)), alpha=1.0)

    cropped = overlay_heatmap(image, heatmap, alpha=1.0, crop_box=(1, 0, 6, 8))
    uncropped = overlay_heatmap(image, heatmap, alpha=1.0)

    np.testing.assert_array_equal(cropped, cold)  # every pixel the colour of 0
    assert (uncropped[..., 0] > 200).any() and not (cropped[..., 0] > 200).any()  # jet: hot is red
    with pytest.raises(ConfigError, match="crop_box"):
        overlay_heatmap(image, heatmap, crop_box=(4, 0, 6, 8))


def test_overlay_inputs_and_saving(tmp_path) -> None:
    rgb = np.random.default_rng(1).random((20, 30, 3)).astype(np.float32)
    out = overlay_heatmap(rgb, np.full((5, 5), 0.5), colormap="inferno", alpha=0.3)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    with pytest.raises(ConfigError, match="colormap"):
        overlay_heatmap(rgb, np.zeros((5, 5)), colormap="no-such-map")
    with pytest.raises(ConfigError, match="alpha"):
        overlay_heatmap(rgb, np.zeros((5, 5)), alpha=1.5)

    from PIL import Image

    written = save_overlay(tmp_path / "a" / "b" / "overlay.png", rgb, np.full((5, 5), 0.5), colormap="inferno",
                           alpha=0.3)
    np.testing.assert_array_equal(np.asarray(Image.open(written)), out)
    npy = save_heatmap_npy(tmp_path / "c" / "map.npy", torch.full((5, 5), 0.25))
    np.testing.assert_array_equal(np.load(npy), np.full((5, 5), 0.25, dtype=np.float32))


@pytest.mark.parametrize("colormap", ["jet", "viridis", "inferno"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.73, 1.0])
@pytest.mark.parametrize("grey", [True, False])
def test_the_table_blend_is_exactly_the_float_formula(colormap, alpha, grey):
    import matplotlib

    from medxai.explain.overlay import blend_with_colormap

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (60, 40, 1 if grey else 3), dtype=np.uint8).repeat(3 if grey else 1, axis=2)
    heat = rng.random((60, 40)).astype(np.float32)
    heat[0, :2] = (1.0, 0.0)  # both ends of the colormap
    cmap = matplotlib.colormaps[colormap]
    colour = cmap(heat, bytes=True)[..., :3].astype(np.float32)
    formula = np.clip(np.rint((1.0 - alpha) * base.astype(np.float32) + alpha * colour), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(blend_with_colormap(base, heat, cmap, alpha), formula)
