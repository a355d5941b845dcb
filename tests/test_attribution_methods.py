"""The input-attribution methods (Integrated Gradients, GradientSHAP, Occlusion, RISE, LIME, KernelSHAP): equal to
Captum's own output, RISE against its formula by hand, seeded, CAM-shaped results, the model untouched, every kind of
target, and through the command line (``explain``, ``explain-eval`` with its sanity check)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from PIL import Image
from torch import nn

from medxai.cli import main
from medxai.errors import ConfigError
from medxai.explain import (
    CAM_METHODS,
    RISE,
    ClassTarget,
    DecisionTarget,
    GradientSHAP,
    IntegratedGradients,
    KernelSHAP,
    LIME,
    LogOddsTarget,
    Occlusion,
    build_cam,
    get_cam_method,
)
from medxai.explain._attribution import RowScorer, pixel_map, reference_images, superpixels
from medxai.explain.base import normalize_per_sample
from medxai.explain.sanity import model_randomisation_check

SEED = 7


def toy_net(in_chans: int = 3, num_classes: int = 3, dims: int = 2) -> nn.Module:
    """A small seeded CNN: two convolutions with non-linearities, global pooling, a linear head."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    net = nn.Sequential(conv(in_chans, 6, 3, padding=1), nn.ReLU(), conv(6, 6, 3, stride=2, padding=1), nn.Tanh(),
                        pool(2), nn.Flatten(), nn.Linear(6 * 2**dims, num_classes))
    torch.random.set_rng_state(generator_state)
    return net.eval()


def toy_images(count: int = 3, in_chans: int = 3, spatial: tuple[int, ...] = (16, 16)) -> torch.Tensor:
    """Normalised-looking images with structure (a bright square per image) and noise."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn((count, in_chans, *spatial), generator=generator) * 0.3
    for index in range(count):
        corner = 2 + 3 * index
        images[(index, slice(None), *[slice(corner, corner + 5)] * len(spatial))] += 2.0
    return images


# Small settings for every method: the tests stay fast; the defaults are documented in each module.
FAST = {
    "integratedgradients": dict(n_steps=8),
    "gradientshap": dict(n_samples=8, seed=SEED),
    "occlusion": dict(window=4, stride=2),
    "rise": dict(n_masks=64, grid_size=4, seed=SEED),
    "lime": dict(n_segments=12, n_samples=48, seed=SEED),
    "kernelshap": dict(n_segments=12, n_samples=48, seed=SEED),
}
NEW_METHODS = sorted(FAST)


def build(name: str, model: nn.Module, **options):
    return get_cam_method(name)(model, None, **{**FAST[name], **options})


# ------------------------------------------------------------------------------------------- Captum's own output


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def captum_attributions(name: str, model: nn.Module, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Captum's own call with the class index as its target, the options of ``FAST[name]`` spelled out."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import GradientShap, IntegratedGradients as CaptumIG, KernelShap, Lime
    from captum.attr import Occlusion as CaptumOcclusion

    targets = torch.tensor(classes)
    if name == "integratedgradients":
        return CaptumIG(model).attribute(images, baselines=torch.zeros_like(images), target=targets, n_steps=8)
    if name == "occlusion":
        return CaptumOcclusion(model).attribute(images, sliding_window_shapes=(images.shape[1], 4, 4),
                                                strides=(images.shape[1], 2, 2), baselines=0.0, target=targets)
    per_image = []
    for index, image in enumerate(images.split(1)):
        if name == "gradientshap":
            _seeded(SEED)
            references = torch.cat([torch.zeros_like(image), reference_images(image, "blur")])
            per_image.append(GradientShap(model).attribute(image, baselines=references, n_samples=8,
                                                           target=classes[index]))
        else:  # LIME and KernelSHAP: one call per image with its own SLIC segments
            explainer = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0)) if name == "lime" else KernelShap(
                model)
            segments = superpixels(image[0], 12, 0.1)
            _seeded(SEED)
            per_image.append(explainer.attribute(image, baselines=0.0, feature_mask=segments[None, None],
                                                 n_samples=48, target=classes[index]))
    return torch.cat(per_image)


@pytest.mark.parametrize("name", [name for name in NEW_METHODS if name != "rise"])  # RISE is not in Captum
def test_equal_to_captum(name: str) -> None:
    model, images, classes = toy_net(), toy_images(), [0, 2, 1]
    method = build(name, model, batch_size=5)  # an odd batch size: Captum's rows do not line up with the images

    result = method(images, ClassTarget(classes))

    reference = captum_attributions(name, model, images, classes).detach()
    expected = pixel_map(reference, method.channels, method.sign)
    scale = float(expected.abs().max())
    assert scale > 0
    assert_allclose(result.raw_maps.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * scale)
    lows = expected.flatten(1).amin(1)[:, None, None]
    highs = expected.flatten(1).amax(1)[:, None, None]
    assert_allclose(result.maps.numpy(), ((expected - lows) / (highs - lows)).numpy(), atol=1e-5)
    assert result.target_class.tolist() == classes


def test_integrated_gradients_blur_baseline_and_completeness() -> None:
    from captum.attr import IntegratedGradients as CaptumIG

    model, images = toy_net(), toy_images()
    result = IntegratedGradients(model, baseline="blur", n_steps=16, sign="signed")(images, 1)
    baseline = reference_images(images, "blur")
    reference = CaptumIG(model).attribute(images, baselines=baseline, target=1, n_steps=16).detach()
    assert_allclose(result.raw_maps.numpy(), reference.sum(1).numpy(), atol=1e-6)
    # Completeness (Sundararajan et al., Eq. 3 / Prop. 1): the attributions add up to F(x) - F(baseline).
    with torch.no_grad():
        difference = model(images)[:, 1] - model(baseline)[:, 1]
    assert_allclose(result.raw_maps.flatten(1).sum(1).numpy(), difference.numpy(), rtol=0.05, atol=1e-4)


# --------------------------------------------------------------------------------------------------------- RISE


class PixelProbe(nn.Module):
    """Two logits: the value of one pixel and its negative."""

    def __init__(self, row: int, column: int) -> None:
        super().__init__()
        self.row, self.column = row, column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, 0, self.row, self.column]
        return torch.stack([value, -value], dim=1)


def test_rise_is_the_papers_sum_over_its_masks_by_hand() -> None:
    """On an all-ones image, the probe's score under mask ``M_i`` is ``M_i(r, c)``, so Eq. 6 gives
    ``S = sum_i M_i(r, c) M_i / (N p)``: computed here in NumPy from the method's own masks."""
    row, column, size = 5, 9, (12, 16)
    rise = RISE(PixelProbe(row, column).eval(), n_masks=300, grid_size=4, p_keep=0.5, seed=SEED, batch_size=32)

    result = rise(torch.ones(1, 1, *size), target=0)

    grids, shifts = rise.draw(size)
    masks = rise.masks(grids, shifts, size).numpy().astype(np.float64)
    assert masks.shape == (300, *size) and masks.min() >= 0.0 and masks.max() <= 1.0 + 1e-6
    assert abs(masks.mean() - 0.5) < 0.05  # each cell kept with p = 0.5
    expected = np.einsum("n,nhw->hw", masks[:, row, column], masks) / (300 * 0.5)
    assert_allclose(result.raw_maps[0].numpy(), expected, rtol=1e-5)
    assert np.unravel_index(int(result.maps[0].argmax()), size) == (row, column)  # the probed pixel stands out


def test_rise_masks_depend_on_the_seed_only() -> None:
    model, images = toy_net(), toy_images()
    batched = RISE(model, n_masks=40, grid_size=3, seed=SEED, batch_size=7)(images, 0)
    alone = RISE(model, n_masks=40, grid_size=3, seed=SEED, batch_size=64)(images[1:2], 0)
    other_seed = RISE(model, n_masks=40, grid_size=3, seed=SEED + 1)(images[1:2], 0)
    assert_allclose(alone.raw_maps[0].numpy(), batched.raw_maps[1].numpy(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(alone.raw_maps, other_seed.raw_maps)
    with pytest.raises(ConfigError, match="p_keep"):
        RISE(model, p_keep=0.0)


# ------------------------------------------------------------------------------------------- the CAM contract


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("name", NEW_METHODS)
def test_seeded_cam_shaped_and_the_model_untouched(name: str) -> None:
    model, images = toy_net(), toy_images()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()

    with torch.no_grad():
        first = build(name, model)(images)
        assert not torch.is_grad_enabled()
    second = build(name, model, batch_size=3)(images)

    assert first.maps.shape == (3, 16, 16) and first.raw_maps.shape == (3, 16, 16)
    assert float(first.maps.min()) == 0.0 and float(first.maps.max()) == pytest.approx(1.0)
    torch.testing.assert_close(first.raw_maps, second.raw_maps, rtol=1e-5, atol=1e-7)  # seeded, batch-independent
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(first.logits, logits)
    assert first.target_class.tolist() == logits.argmax(1).tolist()  # None: the predicted class
    assert torch.is_grad_enabled() and not model.training and _no_hooks(model)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    # The caller's random streams are where they were: seeding happens in a fork.
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize("name", ["gradientshap", "rise", "lime", "kernelshap"])
def test_another_seed_gives_another_map(name: str) -> None:
    model, images = toy_net(), toy_images(1)
    assert not torch.allclose(build(name, model)(images).raw_maps, build(name, model, seed=SEED + 1)(images).raw_maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["integratedgradients", "occlusion", "rise", "lime"])
def test_on_the_models_device(name: str) -> None:
    """Inputs on the host, model on the GPU: the work and the maps on the GPU, the maps those of the CPU."""
    model, images = toy_net(), toy_images()
    on_host = build(name, model)(images)
    on_device = build(name, model.cuda())(images)
    assert on_device.maps.is_cuda and on_device.logits.is_cuda
    torch.testing.assert_close(on_device.maps.cpu(), on_host.maps, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_3d_volumes(name: str) -> None:
    model, volume = toy_net(in_chans=1, dims=3), toy_images(1, in_chans=1, spatial=(8, 12, 12))
    result = build(name, model)(volume)
    assert result.maps.shape == (1, 8, 12, 12) and float(result.maps.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_decision_target_explains_the_rules_class_scored_as_log_odds(name: str) -> None:
    """The decision rule's class is decided on the unperturbed forward; perturbed copies are scored for it with
    the log-odds (``frozen``), even where a copy would be decided otherwise."""
    model, images = toy_net(num_classes=2), toy_images(4)
    with torch.no_grad():
        logits = model(images)
    margin = float((logits[:, 1] - logits[:, 0]).median())
    rule = DecisionTarget(lambda z: (z[:, 1] - z[:, 0] > margin).long(), "median margin")
    classes = (logits[:, 1] - logits[:, 0] > margin).long()
    assert 0 < int(classes.sum()) < 4  # both classes are explained

    decided = build(name, model)(images, rule)
    fixed = build(name, model)(images, LogOddsTarget(classes))

    assert decided.target_class.tolist() == classes.tolist()
    torch.testing.assert_close(decided.raw_maps, fixed.raw_maps)


def test_targets_of_every_kind() -> None:
    model, images = toy_net(), toy_images()
    occlusion = Occlusion(model, window=4, stride=2, batch_size=5)
    one = occlusion(images, 2)
    per_sample = occlusion(images, [2, 2, 2])
    assert one.target_class.tolist() == [2, 2, 2] and torch.equal(one.raw_maps, per_sample.raw_maps)
    # A plain callable (no class): scored row by row on the perturbed copies, class reported as -1.
    plain = occlusion(images, lambda logits: logits[:, 2])
    assert plain.target_class.tolist() == [-1, -1, -1] and torch.equal(plain.raw_maps, one.raw_maps)
    with pytest.raises(ConfigError, match="one score per sample"):
        occlusion(images, lambda logits: logits)
    with pytest.raises(ConfigError, match="out of range"):
        occlusion(images, 3)


def test_row_scorer_follows_each_rows_image_whatever_the_layout() -> None:
    reference = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    scorer = RowScorer(nn.Identity(), LogOddsTarget([1, 0, 1]), reference)
    rows = torch.tensor([[1.0, 9.0], [7.0, 2.0], [3.0, 3.5], [0.0, 4.0], [6.0, 1.0]])
    images = torch.tensor([2, 1, 2, 0, 2])  # interleaved, image 2 three times, image 0 once
    expected = [9.0 - 1.0, 7.0 - 2.0, 3.5 - 3.0, 4.0 - 0.0, 1.0 - 6.0]  # log-odds of each row's image's class
    assert scorer.scores(rows, images).tolist() == expected


def test_under_inference_mode_and_for_a_model_without_a_cam_layer() -> None:
    model, images = toy_net(), toy_images(1)
    with torch.inference_mode():
        inside = IntegratedGradients(model, n_steps=4)(images)
    outside = build_cam(model, "Integrated-Gradients", None)
    assert isinstance(outside, IntegratedGradients)
    torch.testing.assert_close(inside.raw_maps, IntegratedGradients(model, n_steps=4)(images).raw_maps)


def test_an_ensemble_explained_member_by_member() -> None:
    from medxai.models.ensemble import EnsembleModel

    members = [toy_net(num_classes=2), toy_net(num_classes=2)]  # EnsembleModel reads what medxai models declare
    for member in members:
        member.num_classes, member.in_chans, member.input_size = 2, 3, 16
        member.cam_layer, member.stage_layers = "2", ("2",)
    with torch.no_grad():
        members[1][6].weight.mul_(-1.0)  # a member that disagrees
    ensemble = EnsembleModel(members).eval()
    images = toy_images()
    result = build_cam(ensemble, "occlusion", None)(images, 1)
    maps = [Occlusion(member)(images, ClassTarget(1)).maps for member in members]  # each member at its own maps
    torch.testing.assert_close(result.maps, normalize_per_sample(torch.stack(maps).mean(0)))


def test_superpixels_are_those_of_the_denormalised_image() -> None:
    image = toy_images(1)[0] + 0.05 * torch.arange(16.0)[None, None, :]  # a ramp: a few dozen segments
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    denormalised = image * std[:, None, None] + mean[:, None, None]
    labels = superpixels(image, 20, 0.1)
    assert torch.equal(labels, superpixels(denormalised, 20, 0.1))
    assert labels.shape == (16, 16) and labels.unique().tolist() == list(range(int(labels.max()) + 1))


@pytest.mark.parametrize("method", [LIME, KernelSHAP])
def test_one_superpixel_gets_the_score_difference(method) -> None:
    """A flat or tiny image may give one superpixel: its Shapley value is ``f(x) - f(reference)`` (Captum's
    KernelSHAP would fail on a single feature)."""
    model, images = toy_net(), toy_images(2)
    result = method(model, n_segments=1, n_samples=8)(images, 1)
    with torch.no_grad():
        expected = model(images)[:, 1] - model(torch.zeros_like(images))[:, 1]
    assert_allclose(result.raw_maps.numpy(), np.maximum(expected.numpy(), 0)[:, None, None].repeat(16, 1).repeat(
        16, 2), rtol=1e-5, atol=1e-7)
    assert float(result.maps.abs().max()) == 0.0  # a constant map normalises to zeros


def test_bad_options_fail_when_built() -> None:
    model = toy_net()
    for build_bad, match in [
        (lambda: IntegratedGradients(model, baseline="black"), "baseline"),
        (lambda: IntegratedGradients(model, n_steps=0), "n_steps"),
        (lambda: GradientSHAP(model, baselines=()), "at least one"),
        (lambda: Occlusion(model, window=1.5), "window"),
        (lambda: LIME(model, n_segments=0), "n_segments"),
        (lambda: KernelSHAP(model, sign="both"), "sign"),
        (lambda: RISE(model, batch_size=0), "batch_size"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_bad()
    assert {"integratedgradients", "gradientshap", "occlusion", "rise", "lime", "kernelshap"} <= set(CAM_METHODS)


# ------------------------------------------------------------------------------------ sanity check, CLI, service


def test_model_randomisation_check_builds_them_with_target_layers() -> None:
    model, images = toy_net(), toy_images()
    result = model_randomisation_check(IntegratedGradients, model, images, target_layers="2", max_layers=2)
    assert len(result.spearman) == 2 and result.layers == ["6", "2"]
    assert result.spearman[-1] < 0.9  # the maps move once the convolutions are re-initialised


@pytest.fixture
def run_copy(demo_like_run, tmp_path):
    """The session's small trained run, copied so that what the commands write stays in this test."""
    return shutil.copytree(demo_like_run, tmp_path / "run"), next(demo_like_run.parent.glob("*.npz"))


def test_explain_and_explain_eval_commands(run_copy, tmp_path, capsys) -> None:
    run, data = run_copy
    image = np.full((40, 56), 20, dtype=np.uint8)
    image[14:24, 8:18] = 230
    Image.fromarray(image).save(tmp_path / "left.png")
    out = tmp_path / "maps"
    assert main(["explain", str(run), str(tmp_path / "left.png"), "--out", str(out), "--method",
                 "integrated_gradients", "--npy", "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["method"] for line in printed if "method" in line] == ["integrated_gradients"]
    (npy,) = out.glob("*.npy")
    heatmap = np.load(npy)
    # At the original size: the model-size map resized (bilinear smooths IG's single-pixel maximum a little).
    assert heatmap.shape == (40, 56) and heatmap.min() >= 0.0 and 0.5 < heatmap.max() <= 1.0

    assert main(["explain-eval", str(run), "--data", str(data), "--split", "test", "--methods",
                 "integrated_gradients", "--max-images", "6", "--steps", "4"]) == 0
    document = json.loads((run / "explain_metrics.json").read_text())
    assert list(document["methods"]) == ["integratedgradients"] and document["n_images"] == 6
    entry = document["methods"]["integratedgradients"]
    assert all(0.0 <= entry[key] <= 1.0 for key in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"))
    sanity = entry["sanity_check"]  # built as method(model, cam_layer) on a randomised copy at each step
    assert sanity["n_images"] == 6 and sanity["layers"][0] == "head.fc" and len(sanity["spearman"]) == 8
