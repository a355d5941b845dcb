"""The model-randomisation sanity check: a heatmap that does not change when the model is destroyed explains nothing.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, Sec. 3 (cascading randomisation): re-initialise
the weights of the layers from the top (logits) down, one more layer at each step, recompute the maps on the same
images for the same classes, and compare them with the original maps by Spearman rank correlation and SSIM
(Wang et al., "Image quality assessment: from error visibility to structural similarity", IEEE TIP 13(4), 2004).
Maps of a method that explains the model decorrelate; maps that stay alike reflect the image (edges, intensity),
not what the model learned.

Choices (stated, as the paper leaves them open or they differ by paper section):

* Layers: every convolution and linear layer, in reverse order of definition (``named_modules``), re-initialised by
  its own ``reset_parameters()`` (PyTorch's default initialisation) from ``seed``. Normalisation layers keep their
  weights: their re-initialisation is the identity, not random, in PyTorch.
* The randomised model is a deep copy: the user's model is never touched.
* Maps are compared at the input size, after min-max normalisation (what a user sees). Spearman uses average ranks
  for ties (a CAM is exactly 0 on much of the image); a constant map against a non-constant one counts as rank
  correlation 0, two constant maps as 1. SSIM uses an 11-pixel Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03,
  data range 1, averaged over the positions the window fits (no padding), as the reference implementation.
* Pass criterion (the paper reads its figures by eye and sets none): the mean rank correlation, averaged over the
  steps of the cascade, is below ``threshold`` (0.5), and so is the last step's. The average catches a map that
  ignores many of the top layers (Adebayo et al.'s finding for guided back-propagation), the last step a map that
  merely reflects the input. No single step is required to drop: with a two-class head, randomising the logit
  layer alone can leave a CAM largely in place (rank correlation 0.9 for Grad-CAM on a small CNN trained on
  synthetic blobs) while the deeper steps move it. The per-step values are reported so a reader can judge.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain.base import BaseCAM
from medxai.explain.targets import ClassTarget, TargetLike, as_target

__all__ = ["SanityCheckResult", "model_randomisation_check", "randomisation_layers", "spearman_correlation", "ssim"]

logger = logging.getLogger(__name__)

_RANDOMISED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class SanityCheckResult:
    """Outcome of the cascading model-randomisation check.

    Attributes:
        passed: the maps changed enough (see the module docstring's criterion).
        layers: module names, randomised cumulatively from the top: step ``i`` has layers ``0..i`` randomised.
        spearman: mean Spearman rank correlation with the original maps after each step.
        ssim: mean SSIM with the original maps after each step.
        threshold: the rank correlation a step must stay below.
        n_images: number of images compared.
    """

    passed: bool
    layers: list[str]
    spearman: list[float]
    ssim: list[float]
    threshold: float
    n_images: int
    per_image_spearman: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``passed``, ``layers``, ``spearman``, ``ssim``, ``threshold``, ``n_images``."""
        return {
            "passed": self.passed,
            "layers": list(self.layers),
            "spearman": [round(value, 6) for value in self.spearman],
            "ssim": [round(value, 6) for value in self.ssim],
            "threshold": self.threshold,
            "n_images": self.n_images,
        }


# ---------------------------------------------------------------------------------------------------- similarity


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks ``(B, N)`` per row, ties sharing their average rank (as ``scipy.stats.rankdata``, minus one)."""
    b, n = values.shape
    sorted_values, order = values.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1 + torch.arange(b, device=values.device)[:, None] * n
    positions = torch.arange(n, device=values.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b * n, device=values.device, dtype=torch.float64).scatter_add_(0, group.flatten(),
                                                                                      positions.flatten())
    counts = torch.zeros(b * n, device=values.device, dtype=torch.float64).scatter_add_(
        0, group.flatten(), torch.ones(b * n, device=values.device, dtype=torch.float64))
    average = (sums / counts.clamp_min(1.0))[group]
    ranks = torch.empty_like(average)
    ranks.scatter_(1, order, average)
    return ranks


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation per sample of two ``(B, *spatial)`` batches of maps: ``(B,)``.

    Ties get average ranks. A constant map against a non-constant one gives 0; two constant maps give 1.
    """
    if first.shape != second.shape:
        raise ConfigError(f"cannot correlate maps of shapes {tuple(first.shape)} and {tuple(second.shape)}")
    b = first.shape[0]
    ranks = [_average_ranks(maps.reshape(b, -1)) for maps in (first, second)]
    centred = [r - r.mean(dim=1, keepdim=True) for r in ranks]
    norms = [c.norm(dim=1) for c in centred]
    covariance = (centred[0] * centred[1]).sum(dim=1)
    both_flat = (norms[0] == 0) & (norms[1] == 0)
    one_flat = (norms[0] == 0) ^ (norms[1] == 0)
    correlation = covariance / (norms[0] * norms[1]).clamp_min(torch.finfo(torch.float64).tiny)
    correlation = torch.where(one_flat, torch.zeros_like(correlation), correlation)
    correlation = torch.where(both_flat, torch.ones_like(correlation), correlation)
    return correlation.float()


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-0.5 * (x / sigma) ** 2)
    return window / window.sum()


def ssim(
    first: Tensor, second: Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per sample of two ``(B, *spatial)`` batches (2D or 3D): ``(B,)``.

    Gaussian window (``window_size`` shrunk to the map's smallest side when larger, kept odd), constants
    ``(0.01 L)^2`` and ``(0.03 L)^2`` with ``L = data_range``, mean over the positions where the window fits.
    """
    if first.shape != second.shape:
        raise ConfigError(f"cannot compare maps of shapes {tuple(first.shape)} and {tuple(second.shape)}")
    spatial = first.shape[1:]
    if len(spatial) not in (1, 2, 3):
        raise ConfigError(f"SSIM needs 1-3 spatial axes, got shape {tuple(first.shape)}")
    size = min(window_size, min(spatial))
    size = size if size % 2 == 1 else size - 1
    window = _gaussian_window(size, sigma, first.device)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]

    def local_mean(x: Tensor) -> Tensor:
        out = x.unsqueeze(1)
        for axis in range(len(spatial)):
            shape = [1, 1] + [1] * len(spatial)
            shape[2 + axis] = size
            out = conv(out, window.reshape(shape))
        return out[:, 0]

    x, y = first.double(), second.double()
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    covariance = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).float()


# ------------------------------------------------------------------------------------------------- randomisation


def randomisation_layers(model: nn.Module, *, max_layers: int | None = None) -> list[str]:
    """The convolution and linear layers of ``model`` from the top (last defined) down, at most ``max_layers``."""
    names = [name for name, module in model.named_modules() if name and isinstance(module, _RANDOMISED_TYPES)]
    names.reverse()
    return names if max_layers is None else names[: int(max_layers)]


def _randomise(module: nn.Module, seed: int) -> None:
    devices = [p.device for p in module.parameters(recurse=False) if p.is_cuda][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        module.reset_parameters()


def model_randomisation_check(
    method: type[BaseCAM] | Callable[[nn.Module], BaseCAM],
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    target_layers: str | Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    max_layers: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
) -> SanityCheckResult:
    """Cascading model randomisation (Adebayo et al. 2018) of a CAM method on a batch of images.

    Args:
        method: a CAM class (built as ``method(model, target_layers)``) or a callable ``model -> CAM`` (for
            options, e.g. ``lambda m: ScoreCAM(m, batch_size=32)``).
        model: the trained model, in eval mode; it is copied, never modified.
        inputs: ``(B, C, *spatial)`` preprocessed images.
        target: what to explain (as for any CAM). The randomised models explain the same class per image as the
            original (its predicted class when ``target`` is None), not their own, random, predictions.
        target_layers: the CAM layer(s) when ``method`` is a class (None: ``model.cam_layer``).
        layers: module names to randomise cumulatively, in that order; default :func:`randomisation_layers`.
        max_layers: stop after this many layers (the first steps are the most telling; the cost is one CAM call
            per step).
        threshold: the bound on the mean rank correlation (see the module docstring's criterion).
        seed: seed of the re-initialisation.

    Returns:
        The rank correlation and SSIM after each step, and whether the method passed.

    Raises:
        ConfigError: no layer to randomise, or a name that is not a module of the model.
    """
    build = (lambda m: method(m, target_layers)) if isinstance(method, type) else method
    original = build(model)(inputs, target)
    explained = original.target_class
    fixed_target = as_target(target) if bool((explained < 0).any()) else ClassTarget(explained)

    names = list(layers) if layers is not None else randomisation_layers(model)
    if max_layers is not None:
        names = names[: int(max_layers)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no convolution or linear layer to randomise")
    randomised = copy.deepcopy(model)
    spearman_means, ssim_means, per_image = [], [], []
    for step, name in enumerate(names):
        try:
            module = randomised.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"model {type(model).__name__} has no layer named {name!r} to randomise") from None
        targets = [m for m in module.modules() if isinstance(m, _RANDOMISED_TYPES)] or [module]
        for index, submodule in enumerate(targets):
            if not hasattr(submodule, "reset_parameters"):
                raise ConfigError(f"layer {name!r} ({type(submodule).__name__}) cannot be re-initialised")
            _randomise(submodule, seed * 100_003 + step * 1_009 + index)
        maps = build(randomised)(inputs, fixed_target).maps
        rank = spearman_correlation(original.maps, maps)
        spearman_means.append(float(rank.mean()))
        ssim_means.append(float(ssim(original.maps, maps).mean()))
        per_image.append(rank.tolist())
        logger.debug("randomised %s: spearman %.3f, ssim %.3f", name, spearman_means[-1], ssim_means[-1])
    passed = sum(spearman_means) / len(spearman_means) < threshold and spearman_means[-1] < threshold
    return SanityCheckResult(passed, names, spearman_means, ssim_means, float(threshold), int(inputs.shape[0]),
                             per_image)
