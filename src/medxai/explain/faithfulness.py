"""Does a heatmap point at what the model uses? Perturbation metrics, each beside the same metric for chance.

A heatmap ranks the pixels (voxels) of an image. The metrics here perturb the image in that order and watch the
model's probability for the explained class; every one is batched (many perturbed images per forward pass) and runs
in torch on the model's device, for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` inputs alike.

* **Deletion / insertion** (Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of Black-box Models",
  BMVC 2018, Sec. 4.1): replace the most relevant pixels by a baseline in ``steps`` equal steps (deletion: the
  probability should fall fast, low area under the curve is good), or start from the baseline and put the most
  relevant pixels back (insertion: high area is good). The baseline is a Gaussian blur of the image (RISE's
  insertion baseline; sigma ``5 * size / 224`` px, RISE's 5 px at 224 px) or the image's per-channel mean.
  RISE's deletion uses zeros; a blurred or mean baseline keeps the perturbed images closer to the data.
* **ROAD** (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022):
  remove a fraction of the pixels, most relevant first (MoRF, low is good) or least relevant first (LeRF, high is
  good), and fill them by *noisy linear imputation*: each removed pixel is the weighted mean of its 8 neighbours
  (weights 1/6 edge-adjacent, 1/12 diagonal; removed neighbours are unknowns too) plus Gaussian noise. That
  imputation leaks no information about the removed shape, which a constant or blurred fill does. The sparse linear
  system is solved by Jacobi-preconditioned conjugate gradients in torch, batched over images and channels,
  started from a coarse-to-fine fill (deviation: the reference code solves it directly with SciPy, on the CPU,
  one image at a time). Reported: the probability averaged over the fractions 0.1, ..., 0.9.
* **Random baseline**: the same metric for a random heatmap of the same smoothness as a CAM (uniform noise on a
  coarse grid, upsampled bilinearly), so a user sees whether a method beats chance.
* Metrics against a lesion mask (pointing game, energy in mask and the rest) live in
  :mod:`medxai.explain.localization`; ``pointing_game`` and ``energy_in_mask`` are re-exported here.

Pixel order: pixels are ranked by decreasing relevance; ties (a CAM is exactly 0 on much of the image) are broken
in a random order drawn from ``seed``, never by position, which would favour one corner of the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain.localization import energy_in_mask, pointing_game  # re-exported: they moved there

__all__ = [
    "PerturbationCurve",
    "FaithfulnessSummary",
    "target_probability",
    "deletion",
    "insertion",
    "road",
    "noisy_linear_imputation",
    "baseline_images",
    "random_saliency",
    "relevance_ranks",
    "pointing_game",
    "energy_in_mask",
    "faithfulness_metrics",
    "faithfulness_summary",
    "ROAD_FRACTIONS",
]

logger = logging.getLogger(__name__)

#: ScoreFunction: ``(logits (N, K), classes (N,)) -> scores (N,)``, what the curves follow.
ScoreFunction = Callable[[Tensor, Tensor], Tensor]
Baseline = Literal["blur", "mean"]

#: The fractions of removed pixels at which ROAD is measured (Rong et al. 2022; pytorch-grad-cam's ROAD averages).
ROAD_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class PerturbationCurve:
    """The model's score along a perturbation of each image.

    Attributes:
        fractions: ``(P,)`` fraction of the pixels removed (deletion, ROAD) or inserted (insertion) at each point.
        scores: ``(B, P)`` the score (by default the explained class's probability) at each point.
        summary: ``(B,)`` the area under the curve over ``fractions`` (trapezoid rule, deletion and insertion) or
            the mean over the fractions (ROAD).
    """

    fractions: Tensor
    scores: Tensor
    summary: Tensor


def target_probability(logits: Tensor, classes: Tensor) -> Tensor:
    """The probability of each row's class: softmax, or sigmoid for a single-logit model (class 1 positive).

    Args:
        logits: ``(N, K)``.
        classes: ``(N,)`` long.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0])
        return torch.where(classes == 1, positive, 1.0 - positive)
    return torch.softmax(logits, dim=1).gather(1, classes.long()[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------------ orderings


def relevance_ranks(saliency: Tensor, *, seed: int = 0) -> Tensor:
    """Each position's place in the order of decreasing relevance: ``(B, *spatial)`` -> ``(B, N)`` long in [0, N).

    Rank 0 is the most relevant pixel. Equal values are ordered by a random permutation drawn from ``seed`` (the
    same for every sample), not by position.
    """
    b = saliency.shape[0]
    flat = saliency.reshape(b, -1).float()
    n = flat.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    permutation = torch.randperm(n, generator=generator).to(flat.device)
    order_in_permuted = torch.argsort(flat[:, permutation], dim=1, descending=True, stable=True)
    order = permutation[order_in_permuted]  # pixel indices, most relevant first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand(b, n))
    return ranks


def random_saliency(
    shape: Sequence[int], *, grid: int = 7, seed: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Random heatmaps as smooth as a CAM: uniform noise on a ``grid``-per-axis lattice, upsampled (bi/tri)linearly.

    A CAM is a coarse feature map upsampled; per-pixel noise would instead remove salt-and-pepper patterns, which
    hurt a CNN in other ways than losing a region, and would make the comparison unfair in either direction.

    Args:
        shape: ``(B, *spatial)`` of the maps.
        grid: lattice points per spatial axis (7: ResNet's last feature map at 224 px).
        seed: random seed.
        device: where the maps are made.
    """
    b, *spatial = (int(s) for s in shape)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    coarse = torch.rand((b, 1, *[min(grid, s) for s in spatial]), generator=generator).to(device)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    return F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=False)[:, 0]


# ------------------------------------------------------------------------------------------------------ baselines


def _gaussian_kernel1d(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` images over every spatial axis (reflect padding)."""
    kernel = _gaussian_kernel1d(sigma, images.device).to(images.dtype)
    b, c, *spatial = images.shape
    out = images.reshape(b * c, 1, *spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    radius = (kernel.numel() - 1) // 2
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = kernel.numel()
        padding = [0, 0] * len(spatial)
        index = 2 * (len(spatial) - 1 - axis)  # F.pad lists the last axis first
        padding[index] = padding[index + 1] = radius
        # Reflect needs an axis longer than the radius; a shorter one is replicated instead.
        padded = F.pad(out, padding, mode="reflect" if spatial[axis] > radius else "replicate")
        out = conv(padded, kernel.reshape(shape))
    return out.reshape(b, c, *spatial)


def baseline_images(images: Tensor, baseline: Baseline = "blur", *, sigma: float | None = None) -> Tensor:
    """What removed pixels become in deletion/insertion: a blurred copy or the per-channel mean of each image.

    Args:
        images: ``(B, C, *spatial)`` model inputs (normalised as the model expects).
        baseline: ``"blur"`` (Gaussian, sigma ``5 * max(spatial) / 224`` px unless given) or ``"mean"``.
        sigma: blur standard deviation in pixels.

    Raises:
        ConfigError: unknown baseline.
    """
    if baseline == "blur":
        sigma = sigma if sigma is not None else 5.0 * max(images.shape[2:]) / 224.0
        return gaussian_blur(images.float(), float(sigma)).to(images.dtype)
    if baseline == "mean":
        dims = tuple(range(2, images.ndim))
        return images.mean(dim=dims, keepdim=True).expand_as(images).clone()
    raise ConfigError(f"unknown baseline {baseline!r}: use 'blur' or 'mean'")


# ------------------------------------------------------------------------------------------------- batched scoring


def _batched_scores(
    model: nn.Module,
    num_variants: int,
    build: Callable[[slice, slice], Tensor],
    classes: Tensor,
    score_fn: ScoreFunction,
    batch_size: int,
) -> Tensor:
    """Score ``num_variants`` perturbed versions of every sample: ``(B, num_variants)``.

    ``build(variants, samples)`` returns the perturbed images ``(len(variants) * len(samples), C, *spatial)``, variant
    major. Several variants share a forward pass when the batch is small; a large batch is split by samples.
    """
    b = classes.shape[0]
    scores = torch.empty(b, num_variants, device=classes.device, dtype=torch.float32)
    samples_per_forward = min(b, batch_size)
    variants_per_forward = max(1, batch_size // samples_per_forward)
    with torch.no_grad():
        for sample_start in range(0, b, samples_per_forward):
            samples = slice(sample_start, min(b, sample_start + samples_per_forward))
            n = samples.stop - samples.start
            for variant_start in range(0, num_variants, variants_per_forward):
                variants = slice(variant_start, min(num_variants, variant_start + variants_per_forward))
                m = variants.stop - variants.start
                logits = model(build(variants, samples))
                if logits.ndim == 1:
                    logits = logits[:, None]
                chunk = score_fn(logits, classes[samples].repeat(m)).float().reshape(m, n)
                scores[samples, variants] = chunk.t()
    return scores


def _check(model: nn.Module, inputs: Tensor, saliency: Tensor, target_class: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if inputs.ndim not in (3, 4, 5):
        raise ConfigError(f"expected (B, C, *spatial) inputs, got shape {tuple(inputs.shape)}")
    if tuple(saliency.shape) != (inputs.shape[0], *inputs.shape[2:]):
        raise ConfigError(f"saliency maps {tuple(saliency.shape)} do not match the inputs {tuple(inputs.shape)}: "
                          "expected (B, *spatial) at the input's size")
    device = next((p.device for p in model.parameters()), inputs.device)
    classes = torch.as_tensor(target_class, device=device).long().reshape(-1)
    if classes.shape[0] != inputs.shape[0] or bool((classes < 0).any()):
        raise ConfigError("target_class needs one non-negative class index per image")
    return inputs.to(device), saliency.to(device), classes


def _step_counts(num_pixels: int, fractions: Tensor) -> Tensor:
    return torch.round(fractions.double() * num_pixels).long()


def _warn_training(model: nn.Module) -> None:
    if model.training:
        logger.warning("faithfulness metrics on a model in training mode: BatchNorm and dropout make the scores "
                       "batch-dependent; call model.eval() first")


def _perturbation_curve(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor,
    *,
    insert: bool,
    steps: int,
    baseline: Baseline,
    batch_size: int,
    score_fn: ScoreFunction,
    seed: int,
) -> PerturbationCurve:
    inputs, saliency, classes = _check(model, inputs, saliency, target_class)
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    _warn_training(model)
    b, c, *spatial = inputs.shape
    n = math.prod(spatial)
    fractions = torch.linspace(0.0, 1.0, steps + 1, device=inputs.device)
    counts = _step_counts(n, fractions).to(inputs.device)
    ranks = relevance_ranks(saliency, seed=seed).reshape(b, 1, *spatial)
    base = baseline_images(inputs, baseline)

    def build(variants: slice, samples: slice) -> Tensor:
        chosen = ranks[samples].unsqueeze(0) < counts[variants].reshape(-1, 1, 1, *([1] * len(spatial)))
        image, fill = inputs[samples].unsqueeze(0), base[samples].unsqueeze(0)
        perturbed = torch.where(chosen, image, fill) if insert else torch.where(chosen, fill, image)
        return perturbed.reshape(-1, c, *spatial)

    scores = _batched_scores(model, steps + 1, build, classes, score_fn, batch_size)
    return PerturbationCurve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))


def deletion(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor | Sequence[int],
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    score_fn: ScoreFunction = target_probability,
    seed: int = 0,
) -> PerturbationCurve:
    """Deletion curve and AUC (Petsiuk et al. 2018): most relevant pixels replaced by the baseline first.

    Args:
        model: the classifier (in eval mode), returning logits.
        inputs: ``(B, C, *spatial)`` preprocessed images, as the model takes them.
        saliency: ``(B, *spatial)`` heatmaps at the input size (higher = more relevant).
        target_class: ``(B,)`` the class each heatmap explains.
        steps: number of equal steps from 0 to all pixels (``steps + 1`` points per image).
        baseline: ``"blur"`` or ``"mean"`` (see :func:`baseline_images`).
        batch_size: perturbed images per forward pass.
        score_fn: ``(logits, classes) -> (N,)`` scores to follow; the class probability by default.
        seed: order of equally relevant pixels.

    Returns:
        The curves; ``summary`` is the AUC over the removed fraction (lower = more faithful).
    """
    return _perturbation_curve(model, inputs, saliency, torch.as_tensor(target_class), insert=False, steps=steps,
                               baseline=baseline, batch_size=batch_size, score_fn=score_fn, seed=seed)


def insertion(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor | Sequence[int],
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    score_fn: ScoreFunction = target_probability,
    seed: int = 0,
) -> PerturbationCurve:
    """Insertion curve and AUC (Petsiuk et al. 2018): from the baseline, most relevant pixels put back first.

    Arguments as :func:`deletion`; ``summary`` is the AUC over the inserted fraction (higher = more faithful).
    """
    return _perturbation_curve(model, inputs, saliency, torch.as_tensor(target_class), insert=True, steps=steps,
                               baseline=baseline, batch_size=batch_size, score_fn=score_fn, seed=seed)


# ----------------------------------------------------------------------------------------------------------- ROAD


def _neighbour_sum(x: Tensor) -> Tensor:
    """ROAD's weighted sum of each position's neighbours inside the image (zero outside), for 2D or 3D maps.

    ROAD's 2D weights (1/6 edge-adjacent, 1/12 diagonal) are the separable kernel ``[1, 2, 1] x [1, 2, 1] / 12``
    without its centre (1/3); in 3D (an extension, ROAD is 2D) the same construction, ``[1, 2, 1]^3 / 24`` without
    its centre, gives 1/6 face, 1/12 edge and 1/24 corner neighbours. Computed with shifted slices, not a
    convolution: a 1-channel 3x3 convolution is a slow path on CPUs, and this runs a hundred times per solve.
    """
    spatial_axes = range(2, x.ndim)
    out = x
    for axis in spatial_axes:
        length = out.shape[axis]
        padding = [0, 0] * (x.ndim - 2)
        index = 2 * (x.ndim - 1 - axis)  # F.pad lists the last axis first
        padding[index] = padding[index + 1] = 1
        padded = F.pad(out, padding)
        out = (padded.narrow(axis, 0, length) + 2.0 * padded.narrow(axis, 1, length)
               + padded.narrow(axis, 2, length))
    ndim = x.ndim - 2
    return out / (3.0 * 2**ndim) - x / 3.0


def _coarse_fill(values: Tensor, known: Tensor) -> Tensor:
    """Fill unknown positions from ever coarser averages of the known ones (pull-push), a start for the solver."""
    spatial = values.shape[2:]
    if bool(known.all()) or max(spatial) <= 2:
        total = known.sum(dim=tuple(range(2, values.ndim)), keepdim=True)
        mean = (values * known).sum(dim=tuple(range(2, values.ndim)), keepdim=True) / total.clamp_min(1e-12)
        return torch.where(known > 0, values, mean.expand_as(values))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(spatial)]
    weight = pool(known, 2, ceil_mode=True)
    coarse = pool(values * known, 2, ceil_mode=True) / weight.clamp_min(1e-12)
    coarse_known = (weight > 0).to(values.dtype)
    filled = _coarse_fill(coarse, coarse_known)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    upsampled = F.interpolate(filled, size=tuple(spatial), mode=mode, align_corners=False)
    return torch.where(known > 0, values, upsampled)


def noisy_linear_imputation(
    images: Tensor,
    removed: Tensor,
    *,
    noise: float = 0.01,
    seed: int = 0,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-6,
    max_iterations: int | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022), batched: removed pixels become the weighted mean of their
    neighbours (a sparse linear system over all removed pixels at once) plus ``noise`` times a standard normal.

    The system ``d_p x_p - sum_{q removed} w_pq x_q = sum_{q kept} w_pq v_q`` (``d_p`` the summed weights of the
    neighbours inside the image) is symmetric positive definite whenever a pixel is kept, and is solved per image
    and channel by Jacobi-preconditioned conjugate gradients, to a relative residual of ``tolerance``.

    Args:
        images: ``(B, C, *spatial)``, 2D or 3D.
        removed: ``(B, *spatial)`` bool, True where a pixel is to be imputed.
        noise: standard deviation of the added noise, in the images' units (ROAD's default 0.01).
        seed: the noise's seed, unless a (CPU) ``generator`` is given.
        generator: draw the noise from this generator instead.
        tolerance: relative residual at which the solver stops.
        max_iterations: cap on solver iterations (default ``8 * max(spatial) + 50``).

    Returns:
        ``(B, C, *spatial)`` images with the removed pixels imputed, the rest unchanged.
    """
    b, c, *spatial = images.shape
    ndim = len(spatial)
    if ndim not in (2, 3):
        raise ConfigError(f"noisy linear imputation is for 2D or 3D images, got shape {tuple(images.shape)}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    values = images.to(dtype).reshape(b * c, 1, *spatial)
    unknown = removed.to(device=images.device, dtype=dtype).unsqueeze(1).repeat_interleave(c, dim=0)
    diagonal = _neighbour_sum(torch.ones_like(values[:1]))  # summed weights of the in-image neighbours
    rhs = unknown * _neighbour_sum(values * (1.0 - unknown))

    def operator(x: Tensor) -> Tensor:
        return unknown * (diagonal * x - _neighbour_sum(unknown * x))

    dims = tuple(range(1, values.ndim))
    x = unknown * _coarse_fill(values, 1.0 - unknown)
    residual = rhs - operator(x)
    z = residual / diagonal
    direction = z
    rz = (residual * z).sum(dim=dims, keepdim=True)
    rhs_norm = rhs.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    limit = max_iterations if max_iterations is not None else 8 * max(spatial) + 50
    iteration = 0
    for iteration in range(1, limit + 1):
        applied = operator(direction)
        curvature = (direction * applied).sum(dim=dims, keepdim=True)
        step = torch.where(curvature > 0, rz / torch.where(curvature > 0, curvature, torch.ones_like(curvature)),
                           torch.zeros_like(curvature))
        x = x + step * direction
        residual = residual - step * applied
        if bool(((residual.flatten(1).norm(dim=1) / rhs_norm) <= tolerance).all()):
            break
        z = residual / diagonal
        rz_next = (residual * z).sum(dim=dims, keepdim=True)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = z + beta * direction
        rz = rz_next
    else:
        logger.debug("noisy linear imputation stopped after %d iterations", limit)
    logger.debug("noisy linear imputation: %d conjugate-gradient iterations", iteration)
    if noise:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=dtype).to(x.device)
    imputed = torch.where(unknown > 0, x, values)
    return imputed.reshape(b, c, *spatial).to(images.dtype)


def road(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor | Sequence[int],
    *,
    order: Literal["morf", "lerf"] = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    batch_size: int = 64,
    score_fn: ScoreFunction = target_probability,
    seed: int = 0,
) -> PerturbationCurve:
    """ROAD (Rong et al., ICML 2022): remove pixels by relevance, impute them linearly with noise, re-score.

    Args:
        model, inputs, saliency, target_class, batch_size, score_fn: as :func:`deletion`.
        order: ``"morf"`` most relevant first (lower = more faithful) or ``"lerf"`` least relevant first (higher =
            more faithful).
        fractions: fractions of the pixels to remove.
        noise: imputation noise (see :func:`noisy_linear_imputation`).
        seed: order of equally relevant pixels, and the noise.

    Returns:
        The curves over ``fractions``; ``summary`` is their mean.
    """
    if order not in ("morf", "lerf"):
        raise ConfigError(f"ROAD order must be 'morf' or 'lerf', got {order!r}")
    inputs, saliency, classes = _check(model, inputs, saliency, torch.as_tensor(target_class))
    _warn_training(model)
    b, c, *spatial = inputs.shape
    n = math.prod(spatial)
    fraction_tensor = torch.tensor(list(fractions), dtype=torch.float32, device=inputs.device)
    counts = _step_counts(n, fraction_tensor).tolist()
    ranks = relevance_ranks(saliency, seed=seed).reshape(b, *spatial)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    scores = torch.empty(b, len(counts), device=inputs.device, dtype=torch.float32)
    # Imputation is the costly part: each chunk of samples is imputed once per fraction, then scored in batches.
    for start in range(0, b, batch_size):
        samples = slice(start, min(b, start + batch_size))
        imputed = torch.stack([
            noisy_linear_imputation(inputs[samples], ranks[samples] < count if order == "morf" else
                                    ranks[samples] >= n - count, noise=noise, generator=generator)
            for count in counts
        ])  # (P, n, C, *spatial)

        def build(variants: slice, chunk: slice, imputed: Tensor = imputed) -> Tensor:
            return imputed[variants, chunk].reshape(-1, c, *spatial)

        scores[samples] = _batched_scores(model, len(counts), build, classes[samples], score_fn, batch_size)
    return PerturbationCurve(fraction_tensor, scores, scores.mean(dim=1))


# ------------------------------------------------------------------------------------------------ lesion masks


# ------------------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class FaithfulnessSummary:
    """Per-image metrics of a method's heatmaps and of random heatmaps, on the same images and pixels.

    Attributes:
        method: ``{"deletion_auc", "insertion_auc", "road_morf", "road_lerf"}`` -> ``(B,)`` per image.
        random: the same for random heatmaps (:func:`random_saliency`).
    """

    method: dict[str, Tensor]
    random: dict[str, Tensor]

    def means(self) -> tuple[dict[str, float], dict[str, float]]:
        """Dataset means, ``(method, random)``."""
        return ({key: float(value.mean()) for key, value in self.method.items()},
                {key: float(value.mean()) for key, value in self.random.items()})

    def beats_random(self) -> dict[str, bool]:
        """Lower deletion AUC, higher insertion AUC, and a wider ROAD gap (LeRF - MoRF) than random heatmaps."""
        method, random = self.means()
        return {
            "deletion": method["deletion_auc"] < random["deletion_auc"],
            "insertion": method["insertion_auc"] > random["insertion_auc"],
            "road": method["road_lerf"] - method["road_morf"] > random["road_lerf"] - random["road_morf"],
        }


def faithfulness_metrics(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor | Sequence[int],
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    score_fn: ScoreFunction = target_probability,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-image ``deletion_auc``, ``insertion_auc``, ``road_morf`` and ``road_lerf`` of one set of heatmaps.

    Arguments as :func:`deletion`.
    """
    common = dict(batch_size=batch_size, score_fn=score_fn, seed=seed)
    curve = dict(steps=steps, baseline=baseline, **common)
    return {
        "deletion_auc": deletion(model, inputs, saliency, target_class, **curve).summary,
        "insertion_auc": insertion(model, inputs, saliency, target_class, **curve).summary,
        "road_morf": road(model, inputs, saliency, target_class, order="morf", **common).summary,
        "road_lerf": road(model, inputs, saliency, target_class, order="lerf", **common).summary,
    }


def faithfulness_summary(
    model: nn.Module,
    inputs: Tensor,
    saliency: Tensor,
    target_class: Tensor | Sequence[int],
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    score_fn: ScoreFunction = target_probability,
    seed: int = 0,
    random_grid: int = 7,
) -> FaithfulnessSummary:
    """Deletion, insertion and ROAD (MoRF, LeRF) for ``saliency`` and for random heatmaps of the same images.

    Arguments as :func:`deletion`; ``random_grid`` sets the random maps' smoothness (:func:`random_saliency`).
    """
    random_maps = random_saliency(saliency.shape, grid=random_grid, seed=seed, device=saliency.device)
    options = dict(steps=steps, baseline=baseline, batch_size=batch_size, score_fn=score_fn, seed=seed)
    return FaithfulnessSummary(
        method=faithfulness_metrics(model, inputs, saliency, target_class, **options),
        random=faithfulness_metrics(model, inputs, random_maps, target_class, **options),
    )

