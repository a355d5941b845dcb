"""Shortcut alarm: does the evidence of correctly classified images sit on the border, burnt-in text or background?

A model that learns a shortcut (a hospital marker, burnt-in text, calipers, the shape of the field of view) gives
confident, faithful, sane heatmaps on the wrong thing. This module measures, per image, the share of a heatmap's
energy (its positive mass, as :func:`medxai.explain.localization.energy_in_mask`) in three regions found cheaply
from the image itself, and an alarm that says when a large part of the evidence sits there.

Regions (all at the map's resolution, which is the original image's; torch, batched, on the maps' device):

* **border**: the outer ``border_fraction`` (10 %) of each side (:func:`border_band`);
* **text/markers**: high-contrast small connected components near the edges (:func:`text_regions`): pixels that
  differ from a Gaussian-smoothed copy of the min-max normalised image by more than ``contrast`` (0.2), grouped
  into components; a component no larger than ``max_area`` (2 %) of the image whose bounding box lies within the
  outer ``edge_fraction`` (25 %) of some side is kept, as its bounding box grown by 1 % of the diagonal (a smooth map
  spreads over glyphs). Where the caller knows an image carries burnt-in annotation (DICOM BurnedInAnnotation
  (0028,0301) = "YES"), its whole border band counts as text too: scanners write it there and the detector may miss
  low-contrast text;
* **outside the foreground**: the complement of a cheap body mask (:func:`foreground_masks`): the image smoothed
  (sigma 1 % of the diagonal), binarised at Otsu, its largest connected component kept and its holes filled (dark
  lungs inside a chest stay foreground). On ultrasound this is roughly the scan sector.

Alarm (:func:`shortcut_alarm`): a region can be large (an ultrasound sector leaves much background), so its energy
share alone proves nothing: a uniform map would put 36 % of its energy in a 10 % border. An image is flagged for a
region when the share of its energy there is at least ``min_share`` (0.5) AND at least ``min_enrichment`` (2) times
the share of the image's area the region takes (the evidence is twice as dense there as a uniform map's). The alarm
fires for a region (border, text, outside the foreground, each judged on its own) when at least
``min_flagged_fraction`` (25 %) of the correctly classified images are flagged, or at least half of one class's
(and at least three images). The thresholds are judgement calls, set so that the toy marker set fires and the toy
centre set stays quiet (tests/test_shortcut.py); the verdict lists them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medxai.errors import ConfigError
from medxai.explain.base import normalize_per_sample
from medxai.explain.faithfulness import gaussian_blur
from medxai.explain.localization import (
    BORDER_FRACTION,
    border_band,
    fill_boxes,
    component_boxes,
    connected_components,
    energy_in_mask,
    largest_component,
    otsu_thresholds,
)

__all__ = [
    "BORDER_FRACTION",
    "border_band",
    "text_regions",
    "foreground_masks",
    "shortcut_shares",
    "shortcut_alarm",
]

logger = logging.getLogger(__name__)

#: Text detection: minimum |image - smoothed image| on the [0, 1] image, largest component (share of the image),
#: the band where a component must lie, and how far its box is grown (share of the diagonal).
TEXT_CONTRAST = 0.2
TEXT_MAX_AREA = 0.02
TEXT_EDGE_FRACTION = 0.25
TEXT_MARGIN = 0.01
#: Alarm thresholds (see the module docstring).
MIN_SHARE = 0.5
MIN_ENRICHMENT = 2.0
MIN_FLAGGED_FRACTION = 0.25
MIN_FLAGGED_CLASS_FRACTION = 0.5
MIN_FLAGGED_CLASS_IMAGES = 3
#: Regions the alarm judges, each on its own: the text region is small, so a map on a marker is many times denser
#: there than a uniform map; judged together with the border (36 % of the image, 44 % at 32 px) the same map is not.
ALARM_REGIONS = ("border", "text", "outside_foreground")


def _diagonal(spatial: Sequence[int]) -> float:
    return math.sqrt(sum(float(side) ** 2 for side in spatial))


def _smoothed(images: Tensor, sigma: float) -> Tensor:
    return gaussian_blur(images.unsqueeze(1), max(sigma, 0.5)).squeeze(1)


def text_regions(images: Tensor, burned_in: Sequence[bool] | Tensor | None = None) -> Tensor:
    """Burnt-in text and markers: small high-contrast components near the edges (see the module docstring).

    Args:
        images: ``(B, *spatial)`` grey images at the maps' resolution (average colour channels first).
        burned_in: per image, whether the caller knows it carries burnt-in annotation; its border band is added.

    Returns:
        ``(B, *spatial)`` bool.
    """
    b, *spatial = images.shape
    normalised = normalize_per_sample(images.float())
    contrast = (normalised - _smoothed(normalised, 0.02 * _diagonal(spatial))).abs() > TEXT_CONTRAST
    boxes = component_boxes(connected_components(contrast))
    sides = torch.tensor(spatial, device=images.device)
    near = torch.ceil(TEXT_EDGE_FRACTION * sides).long()
    small = boxes["size"] <= TEXT_MAX_AREA * math.prod(spatial)
    near_edge = ((boxes["high"] < near) | (boxes["low"] >= sides - near)).any(dim=1)
    kept = small & near_edge
    margin = math.ceil(TEXT_MARGIN * _diagonal(spatial))
    low = (boxes["low"][kept] - margin).clamp_min(0)
    high = torch.minimum(boxes["high"][kept] + margin, sides - 1)
    regions = fill_boxes(boxes["image"][kept], low, high, images.shape)
    if burned_in is not None:
        flagged = torch.as_tensor(burned_in, dtype=torch.bool, device=images.device).reshape(b, *([1] * len(spatial)))
        regions = regions | (flagged & border_band(spatial, device=images.device))
    return regions


def foreground_masks(images: Tensor) -> Tensor:
    """A cheap body/foreground mask: smooth, Otsu, largest component, holes filled (see the module docstring).

    Returns:
        ``(B, *spatial)`` bool; the whole image where the image is constant.
    """
    b, *spatial = images.shape
    smoothed = _smoothed(normalize_per_sample(images.float()), 0.01 * _diagonal(spatial))
    bright = smoothed.double() > otsu_thresholds(smoothed).reshape(b, *([1] * len(spatial)))
    largest = largest_component(bright)
    # Holes: background components that do not touch the image's edge.
    background = connected_components(~largest)
    edge = border_band(spatial, 1e-9, device=images.device).expand(b, *spatial)
    outside_labels = torch.where(edge, background, torch.zeros_like(background))
    reaches_edge = torch.zeros_like(background, dtype=torch.bool).reshape(b, -1)
    for image in range(b):  # a handful of labels per image; isin has no batched form
        reaches_edge[image] = torch.isin(background[image].reshape(-1), outside_labels[image].unique()[1:])
    foreground = ~reaches_edge.reshape(b, *spatial)
    constant = ~bright.reshape(b, -1).any(dim=1)
    return foreground | constant.reshape(b, *([1] * len(spatial)))


def shortcut_shares(
    maps: Tensor, images: Tensor, *, burned_in: Sequence[bool] | Tensor | None = None,
    border_fraction: float = BORDER_FRACTION,
) -> dict[str, Tensor]:
    """Energy and area shares of each suspect region, per image.

    Args:
        maps: ``(B, *spatial)`` heatmaps at the images' (original) resolution.
        images: ``(B, *spatial)`` grey images.
        burned_in: per image, the DICOM burned-in annotation flag where known.
        border_fraction: width of the border band on each side.

    Returns:
        ``{"<region>_energy": (B,), "<region>_area": (B,)}`` for the regions ``border``, ``text``,
        ``border_or_text`` and ``outside_foreground``; energy shares NaN where the map has no positive mass.
    """
    if maps.shape != images.shape:
        raise ConfigError(f"maps {tuple(maps.shape)} and images {tuple(images.shape)} differ in shape")
    b, *spatial = maps.shape
    border = border_band(spatial, border_fraction, device=maps.device).expand(b, *spatial)
    text = text_regions(images, burned_in)
    regions = {
        "border": border,
        "text": text,
        "border_or_text": border | text,
        "outside_foreground": ~foreground_masks(images),
    }
    shares: dict[str, Tensor] = {}
    positive_mass = maps.reshape(b, -1).clamp_min(0).sum(dim=1) > 0
    for name, region in regions.items():
        energy = energy_in_mask(maps, region)
        # energy_in_mask leaves an empty region undefined; here it simply holds no energy.
        empty = ~region.reshape(b, -1).any(dim=1)
        shares[f"{name}_energy"] = torch.where(empty & positive_mass, torch.zeros_like(energy), energy)
        shares[f"{name}_area"] = region.reshape(b, -1).double().mean(dim=1)
    return shares


def shortcut_alarm(
    shares: dict[str, Tensor | np.ndarray | Sequence[float]],
    *,
    classes: Sequence[Any] | None = None,
    min_share: float = MIN_SHARE,
    min_enrichment: float = MIN_ENRICHMENT,
    min_flagged_fraction: float = MIN_FLAGGED_FRACTION,
    worst: int = 5,
) -> dict[str, Any]:
    """Decide whether the evidence of correctly classified images sits on shortcut regions (module docstring).

    Args:
        shares: :func:`shortcut_shares` of the CORRECTLY classified images only (the caller selects them).
        classes: the class of each of those images, for the per-class rule.
        min_share: energy share an image needs in a region to be flagged.
        min_enrichment: energy share / area share an image needs to be flagged.
        min_flagged_fraction: flagged share of all images that fires the alarm (half of one class's fires too).
        worst: how many example indices to return per region.

    Returns:
        JSON-ready ``{"fires": bool, "n_images": int, "thresholds": {...}, "regions": {region: {"fires",
        "flagged_fraction", "flagged_fraction_by_class", "median_energy_share", "median_area_share",
        "worst_examples": [index into the given images, ...]}}}``; worst examples are flagged images by decreasing
        energy share.
    """
    as_arrays = {key: np.asarray(torch.as_tensor(value).cpu(), dtype=np.float64) for key, value in shares.items()}
    n_images = len(next(iter(as_arrays.values()))) if as_arrays else 0
    labels = None if classes is None else [str(label) for label in classes]
    regions: dict[str, Any] = {}
    for region in ALARM_REGIONS:
        energy = np.nan_to_num(as_arrays[f"{region}_energy"], nan=0.0)
        area = as_arrays[f"{region}_area"]
        enrichment = np.divide(energy, area, out=np.zeros_like(energy), where=area > 0)
        flagged = (energy >= min_share) & (enrichment >= min_enrichment)
        by_class, class_fires = {}, False
        if labels is not None:
            for label in sorted(set(labels)):
                members = np.array([value == label for value in labels])
                by_class[label] = float(flagged[members].mean())
                # half of a class, and at least MIN_FLAGGED_CLASS_IMAGES of them: one flagged image of a class
                # with two correct ones is no pattern
                class_fires |= (by_class[label] >= MIN_FLAGGED_CLASS_FRACTION
                                and int(flagged[members].sum()) >= MIN_FLAGGED_CLASS_IMAGES)
        fraction = float(flagged.mean()) if n_images else 0.0
        order = np.argsort(-energy, kind="stable")
        regions[region] = {
            "fires": bool(n_images) and (fraction >= min_flagged_fraction or class_fires),
            "flagged_fraction": fraction,
            "flagged_fraction_by_class": by_class,
            "median_energy_share": float(np.median(energy)) if n_images else None,
            "median_area_share": float(np.median(area)) if n_images else None,
            "worst_examples": [int(index) for index in order if flagged[index]][:worst],
        }
    fires = any(result["fires"] for result in regions.values())
    if fires:
        logger.warning("shortcut alarm: the heatmaps of correctly classified images sit on %s",
                       ", ".join(name for name, result in regions.items() if result["fires"]))
    return {
        "fires": fires,
        "n_images": n_images,
        "thresholds": {"min_share": min_share, "min_enrichment": min_enrichment,
                       "min_flagged_fraction": min_flagged_fraction,
                       "min_flagged_class_fraction": MIN_FLAGGED_CLASS_FRACTION,
                       "min_flagged_class_images": MIN_FLAGGED_CLASS_IMAGES},
        "regions": regions,
    }
