"""Does a heatmap point at the lesion? Localisation metrics of saliency maps against expert masks.

Pure torch functions of ``(maps, masks)``: ``maps`` is a ``(B, *spatial)`` float tensor (any range, e.g. the maps of
:class:`~medxai.explain.CAMResult` placed at the original image resolution), ``masks`` a ``(B, *spatial)`` bool (or
{0, 1}) tensor of the SAME shape. Images of one batch share a size; the caller groups images by size. Every function
runs on the maps' device, is batched over B and written for 2D and 3D alike (``b, *spatial``); each returns one
value per image, NaN where the metric is undefined (above all: an empty mask, i.e. an image without lesion).

Normalisation: metrics that only compare pixels with each other (pointing game, Otsu and top-fraction masks, pixel
AUROC/AUPRC, rank accuracy) are unchanged by any positive affine change of the map, so maps are used as given.
Energy shares (energy pointing game, relevance mass) use the map as given with negative values clipped to 0 (a CAM
is non-negative; for a signed attribution only its positive evidence counts). Fixed VALUE thresholds
(:func:`binarize_at_value`, :func:`choose_thresholds`, IoBB) apply to the per-image min-max normalised map
(:func:`medxai.explain.base.normalize_per_sample`), as Saporta et al. 2022 do, so a threshold means the same on every
image.

Metrics and their sources (deviations stated in each function):

* pointing game: Zhang et al., "Top-down Neural Attention by Excitation Backprop", IJCV 126:1084 (2018);
* energy-based pointing game: Wang et al., "Score-CAM", CVPR-W 2020;
* IoU / Dice of the map binarised at Otsu (Otsu, IEEE TSMC 9:62, 1979), at the top 5/10/20 % of pixels, or at a
  value chosen per class on validation (Saporta et al., "Benchmarking saliency methods for chest X-ray
  interpretation", Nature Machine Intelligence 4:867, 2022);
* IoBB accuracy: Wang et al., "ChestX-ray8", CVPR 2017;
* pixel AUROC / AUPRC: Arun et al., "Assessing the trustworthiness of saliency maps for localizing abnormalities in
  medical imaging", Radiology: AI 3:e200267 (2021);
* relevance mass and relevance rank accuracy: Arras et al., "CLEVR-XAI", Information Fusion 81:14 (2022); top-k
  intersection: Theiner et al., "Interpretable semantic photo geolocation", WACV 2022 (as in Quantus).

The metrics that Quantus 0.6 implements equal its values on the same maps and masks (tests/test_localization.py);
where medxai differs by design (tolerance, ties, negative values) the function says so.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medxai.errors import ConfigError
from medxai.evaluate.bootstrap import percentile_interval, resample_counts
from medxai.explain.base import normalize_per_sample

__all__ = [
    "POINTING_GAME_TOLERANCE_PX",
    "POINTING_GAME_REFERENCE_DIAGONAL",
    "TOP_FRACTIONS",
    "IOBB_THRESHOLDS",
    "IOBB_BINARIZATION_VALUE",
    "scaled_tolerance",
    "pointing_game",
    "energy_in_mask",
    "relevance_mass_accuracy",
    "energy_pointing_game",
    "otsu_thresholds",
    "binarize_at_otsu",
    "binarize_top_fraction",
    "binarize_at_value",
    "overlap_scores",
    "choose_thresholds",
    "connected_components",
    "component_boxes",
    "mask_boxes",
    "largest_component",
    "largest_component_box",
    "fill_boxes",
    "intersection_over_detected_box",
    "pixel_auroc",
    "pixel_auprc",
    "top_k_intersection",
    "relevance_rank_accuracy",
    "localization_metrics",
    "empty_mask_metrics",
    "border_band",
    "BORDER_FRACTION",
    "summarize_localization",
]

logger = logging.getLogger(__name__)

#: Zhang et al.'s tolerance: a hit when the maximum lies within 15 px of the object.
POINTING_GAME_TOLERANCE_PX = 15.0
#: The image diagonal at which those 15 px were measured. The authors' code (Caffe-ExcitationBP, eval_coco.py) feeds
#: the network an image whose shorter side is 224 px, upsamples the map back to the ORIGINAL image and draws a
#: radius-15 circle there; COCO and VOC07 images are about 640 x 480 px (diagonal 800 px). medxai keeps the same share
#: of the diagonal (1.9 %): 15 px on a 640 x 480 image, 13.3 px on a 500 x 500 one, 3.4 px on a 128 x 128 one.
POINTING_GAME_REFERENCE_DIAGONAL = 800.0
#: Fractions of the image kept when binarising at the top-ranked pixels.
TOP_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.20)
#: The T(IoBB) of Wang et al. 2017, Table 3.
IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Wang et al. 2017 scale the heatmap to [0, 255] and threshold it at 60 and 180; medxai uses the stricter 180.
IOBB_BINARIZATION_VALUE = 180.0 / 255.0
#: The border band: the outer 10 % of each side (where scanners burn in text and hospitals put markers).
BORDER_FRACTION = 0.10
#: Histogram bins of Otsu's method (scikit-image's default).
OTSU_BINS = 256
#: Candidate value thresholds of choose_thresholds: 0.05, 0.10, ..., 0.95 on the min-max normalised map.
DEFAULT_THRESHOLD_CANDIDATES: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))


# ------------------------------------------------------------------------------------------------ pointing game


def scaled_tolerance(spatial_shape: Sequence[int]) -> float:
    """Zhang et al.'s 15-pixel tolerance scaled to an image of ``spatial_shape`` by its diagonal.

    ``15 * diagonal / 800`` (see :data:`POINTING_GAME_REFERENCE_DIAGONAL`); for a volume, the diagonal of the volume.
    """
    diagonal = math.sqrt(sum(float(side) ** 2 for side in spatial_shape))
    return POINTING_GAME_TOLERANCE_PX * diagonal / POINTING_GAME_REFERENCE_DIAGONAL


def pointing_game(maps: Tensor, masks: Tensor, *, tolerance: float | None = None) -> Tensor:
    """Pointing game (Zhang et al. 2018): does the map's maximum lie within ``tolerance`` pixels of the lesion?

    A maximal pixel hits when its Euclidean distance to the nearest mask pixel is at most ``tolerance`` (the
    authors' code tests whether a radius-15 disc around the maximum intersects the mask, boundary included).

    Ties: the authors take the first maximum in raster order (``np.argmax``), which favours the top of the image;
    Quantus counts a hit when ANY maximal pixel is in the mask, which favours flat maps. medxai returns the share of
    the maximal pixels that hit: the expected hit of a maximum picked at random among the tied ones. With a unique
    maximum (the usual case) all three agree; a constant map scores the share of the image near the lesion (chance).
    An empty mask is undefined here; Quantus 0.6 writes its NaN into a bool array and so scores it a hit.

    Args:
        maps: ``(B, *spatial)`` heatmaps.
        masks: ``(B, *spatial)`` lesion masks at the same resolution.
        tolerance: in pixels; None scales Zhang et al.'s 15 px to the image (:func:`scaled_tolerance`); 0 asks for
            the maximum inside the mask itself (Quantus' PointingGame).

    Returns:
        ``(B,)`` float in [0, 1] (1 hit, 0 miss), NaN where the mask is empty.
    """
    maps, masks = _checked(maps, masks)
    b, *spatial = maps.shape
    radius = scaled_tolerance(spatial) if tolerance is None else float(tolerance)
    if radius < 0:
        raise ConfigError(f"the pointing-game tolerance must be >= 0 pixels, got {radius}")
    region = _dilate_by_ball(masks, radius).reshape(b, -1)
    flat = maps.reshape(b, -1)
    at_max = flat == flat.amax(dim=1, keepdim=True)
    hits = (at_max & region).sum(dim=1) / at_max.sum(dim=1)
    return _nan_where(hits.double(), _is_empty(masks))


def _dilate_by_ball(masks: Tensor, radius: float) -> Tensor:
    """The mask grown by a Euclidean ball of ``radius`` pixels (a pixel is kept when a mask pixel is that close)."""
    reach = int(math.floor(radius))
    if reach < 1:
        return masks
    spatial_dims = masks.ndim - 1
    offsets = torch.arange(-reach, reach + 1, device=masks.device, dtype=torch.float64)
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    ball = (sum(grid**2 for grid in grids) <= radius**2 + 1e-9).float()
    convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial_dims]
    touched = convolve(masks.float().unsqueeze(1), ball[None, None], padding=reach)[:, 0]
    return touched > 0.5


# ------------------------------------------------------------------------------------------------ energy shares


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the map's energy inside the mask: relevance mass accuracy (Arras et al. 2022).

    ``sum(map * mask) / sum(map)`` with negative values clipped to 0 (Quantus' RelevanceMassAccuracy does not clip;
    the two agree on non-negative maps, and on signed maps Quantus applied to the clipped map equals this).

    Returns:
        ``(B,)`` in [0, 1]; NaN where the mask is empty or the map has no positive mass.
    """
    maps, masks = _checked(maps, masks)
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double().clamp_min(0.0)
    inside = (flat * masks.reshape(b, -1)).sum(dim=1)
    total = flat.sum(dim=1)
    share = inside / torch.where(total > 0, total, torch.ones_like(total))
    return _nan_where(share, _is_empty(masks) | (total <= 0))


#: Arras et al.'s name for the same quantity.
relevance_mass_accuracy = energy_in_mask


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM, Sec. 5.2): the map's energy inside the lesion's box.

    Score-CAM measures the energy inside the object's BOUNDING BOX; medxai boxes each connected lesion of the mask
    and takes the union of the boxes. The same share inside the mask itself is :func:`energy_in_mask`; medxai's
    report uses this box version under the name "energy pointing game" and the mask version as "relevance mass".

    Returns:
        ``(B,)`` in [0, 1]; NaN where the mask is empty or the map has no positive mass.
    """
    maps, masks = _checked(maps, masks)
    return energy_in_mask(maps, mask_boxes(masks))


# ----------------------------------------------------------------------------------------------- binarisation


def otsu_thresholds(maps: Tensor, bins: int = OTSU_BINS) -> Tensor:
    """Otsu's threshold of each map, computed as scikit-image's ``threshold_otsu`` does, batched in torch.

    A ``bins``-bin histogram over [min, max] (NumPy's bin assignment), the threshold the bin centre that maximises
    the between-class variance (the first one on ties); a constant map returns its value. Computed in float64: it
    equals ``skimage.filters.threshold_otsu`` on the float64 map (tests).

    Returns:
        ``(B,)`` float64 thresholds; binarise with ``map > threshold`` (:func:`binarize_at_otsu`).
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double()
    low = flat.amin(dim=1, keepdim=True)
    high = flat.amax(dim=1, keepdim=True)
    constant = (high == low).squeeze(1)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    edges = torch.arange(bins + 1, device=flat.device, dtype=torch.float64) * (span / bins) + low
    edges[:, -1:] = torch.where(high > low, high, low + 1.0)
    # NumPy's histogram: index from the scaled value, then moved by one where rounding put it in the wrong bin.
    index = ((flat - low) / span * bins).long().clamp_(0, bins - 1)
    index = index - (flat < edges.gather(1, index)).long()
    index = index + ((flat >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    counts = torch.zeros(b, bins, device=flat.device, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(flat))
    centres = (edges[:, :-1] + edges[:, 1:]) / 2.0
    weight_below = counts.cumsum(dim=1)
    weight_above = counts.flip(1).cumsum(dim=1).flip(1)
    mean_below = (counts * centres).cumsum(dim=1) / weight_below.clamp_min(1.0)
    mean_above = (counts * centres).flip(1).cumsum(dim=1).flip(1) / weight_above.clamp_min(1.0)
    between = weight_below[:, :-1] * weight_above[:, 1:] * (mean_below[:, :-1] - mean_above[:, 1:]) ** 2
    thresholds = centres.gather(1, between.argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(constant, low.squeeze(1), thresholds)


def binarize_at_otsu(maps: Tensor) -> Tensor:
    """``map > otsu_threshold(map)`` per image (a constant map selects nothing)."""
    thresholds = otsu_thresholds(maps)
    return maps.double() > thresholds.reshape(-1, *([1] * (maps.ndim - 1)))


def binarize_top_fraction(maps: Tensor, fraction: float) -> Tensor:
    """The top ``fraction`` of each map's pixels: ``map >= v``, v the value of the ``ceil(fraction * N)``-th largest.

    Ties at the cut are all kept, so a map that is flat over more than ``1 - fraction`` of the image (a CAM that is
    0 on most of it) selects more than the fraction: the map does not rank those pixels, and the metric says so.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"the top fraction must lie in (0, 1], got {fraction}")
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    keep = max(1, math.ceil(fraction * flat.shape[1]))
    cut = flat.topk(keep, dim=1).values[:, -1:]
    return (flat >= cut).reshape(maps.shape)


def binarize_at_value(maps: Tensor, thresholds: float | Tensor) -> Tensor:
    """``normalised map >= threshold`` on the per-image min-max normalised map (one threshold, or one per image)."""
    value = torch.as_tensor(thresholds, device=maps.device, dtype=maps.dtype)
    if value.ndim == 1:
        value = value.reshape(-1, *([1] * (maps.ndim - 1)))
    return normalize_per_sample(maps) >= value


def overlap_scores(binary: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """IoU and Dice of binarised maps against the masks.

    Returns:
        ``{"iou": (B,), "dice": (B,)}``, NaN where the mask is empty (an empty binarisation scores 0).
    """
    binary, masks = _checked(binary.bool(), masks)
    b = binary.shape[0]
    predicted, truth = binary.reshape(b, -1), masks.reshape(b, -1)
    intersection = (predicted & truth).sum(dim=1).double()
    predicted_area, true_area = predicted.sum(dim=1).double(), truth.sum(dim=1).double()
    union = predicted_area + true_area - intersection
    empty = true_area == 0
    iou = intersection / torch.where(empty, torch.ones_like(union), union)
    dice = 2 * intersection / torch.where(empty, torch.ones_like(union), predicted_area + true_area)
    return {"iou": _nan_where(iou, empty), "dice": _nan_where(dice, empty)}


def choose_thresholds(
    maps: Iterable[Tensor],
    masks: Iterable[Tensor],
    classes: Iterable[int],
    candidates: Sequence[float] = DEFAULT_THRESHOLD_CANDIDATES,
) -> dict[int, float]:
    """Per-class value thresholds that maximise the mean IoU on validation maps (Saporta et al. 2022, Methods).

    Saporta et al. binarise each min-max normalised map at a threshold chosen per pathology on the validation set
    and apply it to the test set; this does the same per class over ``candidates``. Images of any size (one at a
    time); images with an empty mask are ignored. Ties in mean IoU go to the lowest threshold.

    Args:
        maps: one ``(*spatial)`` map per validation image (or a ``(B, *spatial)`` tensor).
        masks: the matching masks.
        classes: the class each image is explained for (e.g. its true class).
        candidates: value thresholds in [0, 1] on the normalised map.

    Returns:
        class -> threshold, for the classes with at least one lesion mask; use with :func:`binarize_at_value`.
    """
    grid = torch.tensor(sorted(candidates), dtype=torch.float64)
    iou_sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    for saliency, mask, label in zip(maps, masks, classes, strict=True):
        saliency, mask = _checked(saliency.unsqueeze(0), torch.as_tensor(mask).unsqueeze(0))
        if not mask.any():
            continue
        values = normalize_per_sample(saliency).reshape(-1).double().cpu()
        truth = mask.reshape(-1).cpu()
        sorted_all = values.sort().values
        sorted_inside = values[truth].sort().values
        selected = values.numel() - torch.searchsorted(sorted_all, grid, side="left")
        intersection = sorted_inside.numel() - torch.searchsorted(sorted_inside, grid, side="left")
        union = selected + sorted_inside.numel() - intersection
        key = int(label)
        iou_sums[key] = iou_sums.get(key, torch.zeros_like(grid)) + intersection / union
        counts[key] = counts.get(key, 0) + 1
    return {key: float(grid[int((iou_sums[key] / counts[key]).argmax())]) for key in sorted(iou_sums)}


# ------------------------------------------------------------------------------- connected components and boxes


def connected_components(binary: Tensor) -> Tensor:
    """Label the connected components of each binary image (full connectivity: 8 in 2D, 26 in 3D).

    ``scipy.ndimage.label`` on the CPU, one image at a time, the result moved back to the input's device: the one
    step here that is not torch. Label propagation by max-pooling in torch was tried and needs as many rounds as a
    component is long (50 s for eight 500 x 500 heatmaps on 2 CPU cores, against milliseconds here).

    Returns:
        ``(B, *spatial)`` int64, 0 on background, 1..K_b in each image.
    """
    from scipy import ndimage  # scikit-image's dependency, imported where used

    host = binary.bool().cpu().numpy()
    structure = np.ones((3,) * (host.ndim - 1), dtype=bool)
    labels = np.stack([ndimage.label(image, structure=structure)[0] for image in host]) if host.shape[0] else host
    return torch.from_numpy(labels.astype(np.int64)).to(binary.device)


def component_boxes(labels: Tensor) -> dict[str, Tensor]:
    """The bounding box and size of every component of :func:`connected_components`' labels.

    Returns:
        ``{"image": (K,), "label": (K,), "low": (K, n), "high": (K, n), "size": (K,)}`` over the K components of
        the batch: the image index, the component's label, the inclusive lowest and highest coordinate along each spatial axis, and the pixel count.
    """
    b, *spatial = labels.shape
    foreground = labels > 0
    positions = foreground.nonzero()  # (P, 1 + n): image index, then coordinates
    keys = positions[:, 0] * (math.prod(spatial) + 1) + labels[foreground]
    unique_keys, component = torch.unique(keys, return_inverse=True)
    k = unique_keys.shape[0]
    coordinates = positions[:, 1:]
    n = len(spatial)
    expanded = component.unsqueeze(1).expand(-1, n)
    low = torch.full((k, n), max(spatial), device=labels.device, dtype=torch.long).scatter_reduce(
        0, expanded, coordinates, reduce="amin")
    high = torch.full((k, n), -1, device=labels.device, dtype=torch.long).scatter_reduce(
        0, expanded, coordinates, reduce="amax")
    size = torch.zeros(k, device=labels.device, dtype=torch.long).scatter_add_(0, component, torch.ones_like(component))
    image = torch.div(unique_keys, math.prod(spatial) + 1, rounding_mode="floor")
    label = unique_keys - image * (math.prod(spatial) + 1)
    return {"image": image, "label": label, "low": low, "high": high, "size": size}


def fill_boxes(image: Tensor, low: Tensor, high: Tensor, shape: Sequence[int]) -> Tensor:
    """Union of the boxes ``[low, high]`` (inclusive, one per row, in image ``image``) drawn into ``shape = (B, *spatial)``, by an n-D difference
    array: +-1 at the 2^n corners of every box, then a cumulative sum along each axis."""
    b, *spatial = shape
    n = len(spatial)
    difference = torch.zeros(b, *[side + 1 for side in spatial], device=image.device, dtype=torch.long)
    for corner in itertools.product((0, 1), repeat=n):
        chosen = torch.stack([high[:, axis] + 1 if upper else low[:, axis] for axis, upper in enumerate(corner)], 1)
        sign = -1 if sum(corner) % 2 else 1
        index = (image, *chosen.unbind(1))
        difference.index_put_(index, torch.full_like(image, sign), accumulate=True)
    for axis in range(1, n + 1):
        difference = difference.cumsum(dim=axis)
    return difference[(slice(None), *[slice(0, side) for side in spatial])] > 0


def mask_boxes(masks: Tensor) -> Tensor:
    """Each mask replaced by the union of the bounding boxes of its connected components."""
    boxes = component_boxes(connected_components(masks))
    return fill_boxes(boxes["image"], boxes["low"], boxes["high"], masks.shape)


def _largest_components(binary: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Labels, component boxes, and a (K,) bool choosing each image's largest component (ties: the component whose
    last pixel comes later in raster order)."""
    labels = connected_components(binary)
    boxes = component_boxes(labels)
    k = boxes["size"].shape[0]
    rank = boxes["size"] * max(k, 1) + torch.arange(k, device=binary.device)  # unique, size first
    best = torch.full((binary.shape[0],), -1, device=binary.device, dtype=torch.long).scatter_reduce(
        0, boxes["image"], rank, reduce="amax")
    return labels, boxes, rank == best[boxes["image"]]


def largest_component(binary: Tensor) -> Tensor:
    """The pixels of each binary image's largest connected component (all False where there is none)."""
    labels, boxes, chosen = _largest_components(binary)
    b = binary.shape[0]
    winner = torch.zeros(b, device=binary.device, dtype=torch.long)
    winner[boxes["image"][chosen]] = boxes["label"][chosen]
    return (labels == winner.reshape(b, *([1] * (binary.ndim - 1)))) & (labels > 0)


def largest_component_box(binary: Tensor) -> Tensor:
    """The bounding box of each binary image's largest connected component (all False where there is none)."""
    _, boxes, chosen = _largest_components(binary)
    return fill_boxes(boxes["image"][chosen], boxes["low"][chosen], boxes["high"][chosen], binary.shape)


def intersection_over_detected_box(maps: Tensor, masks: Tensor, *, value: float = IOBB_BINARIZATION_VALUE) -> Tensor:
    """IoBB (Wang et al. 2017, ChestX-ray8, Sec. 5.3): area(detected box & lesion) / area(detected box).

    Wang et al. scale the heatmap to [0, 255], threshold it (at 60 and 180), put a box around each isolated region
    and count a localisation correct when IoBB > T(IoBB). They do not say which box is compared when several
    regions appear; medxai binarises the min-max normalised map at ``value`` (180/255 by default), keeps the box of
    the LARGEST connected region, and measures it against the lesion region (the expert box when the ground truth is
    a box, the mask otherwise). Accuracy at T is the share of images with IoBB > T (:data:`IOBB_THRESHOLDS`).

    Returns:
        ``(B,)`` in [0, 1]; 0 where nothing survives the threshold, NaN where the mask is empty.
    """
    maps, masks = _checked(maps, masks)
    detected = largest_component_box(binarize_at_value(maps, value))
    b = maps.shape[0]
    detected_flat = detected.reshape(b, -1)
    area = detected_flat.sum(dim=1).double()
    overlap = (detected_flat & masks.reshape(b, -1)).sum(dim=1).double()
    return _nan_where(overlap / area.clamp_min(1.0), _is_empty(masks))


# -------------------------------------------------------------------------------------------- pixel rankings


def pixel_auroc(maps: Tensor, masks: Tensor) -> Tensor:
    """Area under the ROC curve of the map as a pixel classifier of the mask (Arun et al. 2021).

    The Mann-Whitney form with tied scores counted one half, which equals scikit-learn's ``roc_auc_score`` on the
    flattened pixels and Quantus' localisation ``AUC`` (tests).

    Returns:
        ``(B,)``; NaN where the mask is empty or covers the whole image.
    """
    maps, masks = _checked(maps, masks)
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double()
    truth = masks.reshape(b, -1)
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, side="left").double()
    at_or_below = torch.searchsorted(ordered, flat, side="right").double()
    midrank = (below + at_or_below + 1.0) / 2.0  # 1-based average rank of each pixel's value
    positives = truth.sum(dim=1).double()
    negatives = truth.shape[1] - positives
    rank_sum = (midrank * truth).sum(dim=1)
    defined = (positives > 0) & (negatives > 0)
    auc = (rank_sum - positives * (positives + 1) / 2) / torch.where(defined, positives * negatives, 1.0)
    return _nan_where(auc, ~defined)


def pixel_auprc(maps: Tensor, masks: Tensor) -> Tensor:
    """Average precision of the map as a pixel classifier of the mask (Arun et al. 2021's AUPRC).

    scikit-learn's step-wise ``average_precision_score``: the mean over lesion pixels of the precision at that
    pixel's value (pixels tied with it all counted as selected), which equals it on the flattened pixels (tests).

    Returns:
        ``(B,)``; NaN where the mask is empty. The chance level is the lesion's share of the image.
    """
    maps, masks = _checked(maps, masks)
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double()
    truth = masks.reshape(b, -1)
    total = flat.shape[1]
    selected = total - torch.searchsorted(flat.sort(dim=1).values, flat, side="left")
    positive_scores = torch.where(truth, flat, torch.full_like(flat, -math.inf)).sort(dim=1).values
    lesion_selected = total - torch.searchsorted(positive_scores, flat, side="left")
    precision = lesion_selected.double() / selected.double()
    positives = truth.sum(dim=1).double()
    average = (precision * truth).sum(dim=1) / positives.clamp_min(1.0)
    return _nan_where(average, positives == 0)


def top_k_intersection(maps: Tensor, masks: Tensor, k: int | Tensor) -> Tensor:
    """Share of the ``k`` highest-ranked pixels that lie in the mask (Theiner et al. 2022; Quantus' TopKIntersection).

    Ties at the k-th value: Quantus keeps whichever tied pixels its sort happens to put first; medxai returns the
    expected share under a random choice among them (equal whenever the k-th value is not tied).

    Args:
        k: pixels per image, an int or a ``(B,)`` tensor.

    Returns:
        ``(B,)`` in [0, 1]; NaN where the mask is empty.
    """
    maps, masks = _checked(maps, masks)
    b = maps.shape[0]
    flat = maps.reshape(b, -1).double()
    truth = masks.reshape(b, -1)
    keep = torch.as_tensor(k, device=flat.device).long().expand(b).clamp(1, flat.shape[1])
    cut = flat.sort(dim=1, descending=True).values.gather(1, (keep - 1).unsqueeze(1))
    above, tied = flat > cut, flat == cut
    lesion_above = (above & truth).sum(dim=1).double()
    free_slots = keep.double() - above.sum(dim=1).double()
    lesion_share_of_tied = (tied & truth).sum(dim=1).double() / tied.sum(dim=1).double()
    share = (lesion_above + free_slots * lesion_share_of_tied) / keep.double()
    return _nan_where(share, _is_empty(masks))


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022): of the K most relevant pixels, K the lesion's size, the share
    inside the lesion (:func:`top_k_intersection` with k = K; ties as there)."""
    maps, masks = _checked(maps, masks)
    return top_k_intersection(maps, masks, masks.reshape(masks.shape[0], -1).sum(dim=1))


# -------------------------------------------------------------------------------------------------- all at once


def localization_metrics(
    maps: Tensor,
    masks: Tensor,
    *,
    tolerance: float | None = None,
    value_thresholds: float | Tensor | None = None,
) -> dict[str, Tensor]:
    """Every localisation metric of a batch of same-size maps, one ``(B,)`` tensor per name.

    Keys: ``pointing_game`` (scaled tolerance unless given), ``pointing_game_strict`` (tolerance 0),
    ``energy_pointing_game`` (box), ``relevance_mass``, ``relevance_rank``, ``iou_otsu``/``dice_otsu``,
    ``iou_top5``/``dice_top5`` (and 10, 20), ``iou_value``/``dice_value`` when ``value_thresholds`` is given (e.g.
    the per-class thresholds of :func:`choose_thresholds`, one per image), ``iobb`` and ``iobb_hit_0.1`` ...
    ``iobb_hit_0.9`` (1/0 by T(IoBB)), ``pixel_auroc``, ``pixel_auprc``. Every value is NaN where the mask is empty:
    report those images with :func:`empty_mask_metrics`.
    """
    maps, masks = _checked(maps, masks)
    results: dict[str, Tensor] = {
        "pointing_game": pointing_game(maps, masks, tolerance=tolerance),
        "pointing_game_strict": pointing_game(maps, masks, tolerance=0.0),
        "energy_pointing_game": energy_pointing_game(maps, masks),
        "relevance_mass": energy_in_mask(maps, masks),
        "relevance_rank": relevance_rank_accuracy(maps, masks),
    }
    binarised = {"otsu": binarize_at_otsu(maps)}
    for fraction in TOP_FRACTIONS:
        binarised[f"top{round(fraction * 100)}"] = binarize_top_fraction(maps, fraction)
    if value_thresholds is not None:
        binarised["value"] = binarize_at_value(maps, value_thresholds)
    for name, binary in binarised.items():
        scores = overlap_scores(binary, masks)
        results[f"iou_{name}"], results[f"dice_{name}"] = scores["iou"], scores["dice"]
    iobb = intersection_over_detected_box(maps, masks)
    results["iobb"] = iobb
    for threshold in IOBB_THRESHOLDS:
        results[f"iobb_hit_{threshold:g}"] = _nan_where((iobb > threshold).double(), iobb.isnan())
    results["pixel_auroc"] = pixel_auroc(maps, masks)
    results["pixel_auprc"] = pixel_auprc(maps, masks)
    return results


def empty_mask_metrics(maps: Tensor, *, border_fraction: float = BORDER_FRACTION) -> dict[str, Tensor]:
    """Where a map puts its mass on an image without lesion (a normal image), where the metrics above are undefined.

    Keys (each ``(B,)``): ``peak`` (the map's maximum as given: pass the unnormalised ``CAMResult.raw_maps`` to see
    how strongly the model responds), ``area_above_otsu`` (the share of the image above Otsu's threshold: small for a
    focused map), ``top10_energy`` (the share of the positive mass on the top 10 % of pixels), ``border_energy``
    (the share of the positive mass in the outer ``border_fraction`` of each side,
    :func:`border_band`).
    """
    b, *spatial = maps.shape
    flat = maps.reshape(b, -1)
    band = border_band(spatial, border_fraction, device=maps.device).expand(b, *spatial)
    return {
        "peak": flat.amax(dim=1).double(),
        "area_above_otsu": binarize_at_otsu(maps).reshape(b, -1).double().mean(dim=1),
        "top10_energy": energy_in_mask(maps, binarize_top_fraction(maps, 0.10)),
        "border_energy": energy_in_mask(maps, band),
    }


def border_band(spatial: Sequence[int], fraction: float = BORDER_FRACTION, *, device=None) -> Tensor:
    """A bool ``(1, *spatial)`` mask of the outer ``fraction`` of each side (at least one pixel per side)."""
    if not 0.0 < fraction < 0.5:
        raise ConfigError(f"the border fraction must lie in (0, 0.5), got {fraction}")
    band = torch.zeros(1, *spatial, dtype=torch.bool, device=device)
    for axis, side in enumerate(spatial):
        width = max(1, math.ceil(fraction * side))
        index = [slice(None)] * (len(spatial) + 1)
        index[axis + 1] = slice(0, width)
        band[tuple(index)] = True
        index[axis + 1] = slice(side - width, side)
        band[tuple(index)] = True
    return band


# --------------------------------------------------------------------------------------------- aggregation


def summarize_localization(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    *,
    group_by: Sequence[str] = ("method", "class"),
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-image metric rows -> one JSON-ready summary per group, with percentile bootstrap intervals.

    Each group's images are resampled with replacement (:func:`medxai.evaluate.bootstrap.resample_counts`, not
    stratified: every image is one draw) and each metric's mean recomputed; NaN values (undefined for that image)
    are left out of that metric, so ``n`` is per metric.

    Args:
        rows: e.g. ``{"method": "gradcam", "class": "malignant", "pointing_game": 1.0, ...}`` per image.
        metrics: the metric keys to summarise.
        group_by: the keys whose values form a group.

    Returns:
        ``[{**group, "metrics": {metric: {"mean", "n", "interval": [low, high] | None}}}]``, groups in first-seen
        order; a metric without any defined value has mean None.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_by), []).append(row)
    summaries = []
    for values_of_group, members in groups.items():
        summary: dict[str, Any] = dict(zip(group_by, values_of_group))
        summary["metrics"] = {
            metric: _bootstrap_mean([row.get(metric, math.nan) for row in members], resamples, confidence, seed)
            for metric in metrics
        }
        summaries.append(summary)
    return summaries


def _bootstrap_mean(values: Sequence[Any], resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    array = np.asarray([math.nan if value is None else float(value) for value in values], dtype=np.float64)
    defined = array[np.isfinite(array)]
    if defined.size == 0:
        return {"mean": None, "n": 0, "interval": None}
    means = np.concatenate([
        counts @ defined / defined.size
        for counts in resample_counts(np.zeros(defined.size), resamples, seed=seed, stratified=False)
    ])
    interval = percentile_interval(means, confidence)
    return {"mean": float(defined.mean()), "n": int(defined.size),
            "interval": None if interval is None else [interval[0], interval[1]]}


# ------------------------------------------------------------------------------------------------ machinery


def _checked(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The maps and their masks as a bool tensor on the maps' device; shapes must agree exactly."""
    masks = torch.as_tensor(masks, device=maps.device)
    if masks.shape != maps.shape:
        raise ConfigError(f"masks {tuple(masks.shape)} and saliency maps {tuple(maps.shape)} differ in shape; "
                          "compute the maps at the mask's (the original image's) resolution")
    if maps.ndim < 2 or maps.ndim > 4:
        raise ConfigError(f"maps must be (B, *spatial) with 1 to 3 spatial axes, got shape {tuple(maps.shape)}")
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise ConfigError("saliency maps contain NaN or infinite values")
    return maps, masks.bool()


def _is_empty(masks: Tensor) -> Tensor:
    return ~masks.reshape(masks.shape[0], -1).any(dim=1)


def _nan_where(values: Tensor, undefined: Tensor) -> Tensor:
    return torch.where(undefined, torch.full_like(values, math.nan), values)
