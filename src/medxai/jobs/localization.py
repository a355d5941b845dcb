"""Does the heatmap point at the lesion? ``medxai explain-eval``'s comparison of each method's maps with expert masks.

Each map is placed on its ORIGINAL image exactly as the overlays place it
(:func:`medxai.explain.overlay.place_on_original`: padding cut off, bilinear upsampling) and compared there with the
ground truth read at the image's own resolution (:func:`medxai.data.ground_truth.read_ground_truth`: the union of
the expert masks, or the filled boxes). The metrics are :func:`medxai.explain.localization.localization_metrics`
(pointing game, energy pointing game, IoU/Dice at Otsu, at the top 5/10/20 % of pixels and at per-class values
chosen on validation, IoBB accuracy, pixel AUROC/AUPRC, relevance mass and rank); images whose mask is empty (normal
images) are reported apart (:func:`~medxai.explain.localization.empty_mask_metrics`). Every summary has bootstrap
intervals and is given for correctly and wrongly classified images and per class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medxai.data.ground_truth import read_ground_truth
from medxai.data.prepared import PreparedSplit
from medxai.data.sources.base import Record, Source
from medxai.errors import InvalidImageError
from medxai.explain.localization import (
    choose_thresholds,
    empty_mask_metrics,
    localization_metrics,
    summarize_localization,
)
from medxai.explain.overlay import place_on_original, save_overlay
from medxai.explain.shortcut import shortcut_alarm, shortcut_shares

__all__ = [
    "LesionTruth",
    "read_truths",
    "place_maps",
    "localization_rows",
    "localization_summary",
    "thresholds_on",
    "save_extreme_cases",
    "shortcut_verdicts",
    "LESION_METRICS",
    "EMPTY_MASK_METRICS",
]

logger = logging.getLogger(__name__)

#: The summarised metrics of images with a lesion, in the order the report shows them.
LESION_METRICS: tuple[str, ...] = (
    "pointing_game", "energy_pointing_game", "iou_otsu", "dice_otsu", "iou_top5", "iou_top10", "iou_top20",
    "iou_value", "dice_value", "iobb_hit_0.1", "iobb_hit_0.25", "iobb_hit_0.5", "iobb_hit_0.75", "iobb_hit_0.9",
    "pixel_auroc", "pixel_auprc", "relevance_mass", "relevance_rank", "pointing_game_strict",
)
#: What the maps do on images without a lesion.
EMPTY_MASK_METRICS: tuple[str, ...] = ("peak", "area_above_otsu", "top10_energy", "border_energy")
#: The metric that ranks the best and worst cases shown with their mask outline.
_RANKING_METRIC = "energy_pointing_game"


@dataclass(frozen=True)
class LesionTruth:
    """One evaluated image's ground truth, on the device.

    Attributes:
        index: the image's row in the prepared split (and in the maps).
        mask: bool ``(H, W)`` at the original resolution; all False for an image without a lesion.
        label: the image's true class.
    """

    index: int
    mask: Tensor
    label: int  # -1 (UNKNOWN_LABEL) for an unlabelled image: its rows say "unlabelled"

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


def read_truths(source: Source, records: Sequence[Record], prepared: PreparedSplit, device: torch.device,
                skipped: list[tuple[str, str]]) -> list[LesionTruth]:
    """The ground truth of each prepared image that has some, read at the image's original size.

    A mask that cannot be read or does not fit its image is a skip reason (appended to ``skipped``): the image
    still counts for faithfulness, only not for localisation.
    """
    by_id = {record.id: record for record in records}
    truths = []
    for index, image_id in enumerate(prepared.ids):
        record = by_id.get(image_id)
        if record is None or (not record.masks and not record.boxes):
            continue
        facts = prepared.facts[index] if index < len(prepared.facts) else None
        try:
            shape = (facts.height, facts.width) if facts is not None else np.shape(source.load(record).image)
            truth = read_ground_truth(record, shape)
        except InvalidImageError as error:
            skipped.append((error.path, f"ground truth: {error.reason}"))
            continue
        truths.append(LesionTruth(index, torch.from_numpy(truth.mask).to(device), int(prepared.labels[index])))
    return truths


def place_maps(maps: Tensor, truths: Sequence[LesionTruth], prepared: PreparedSplit) -> list[Tensor]:
    """Each truth's map on its original image (as its overlay places it), on the maps' device."""
    placed = []
    for truth in truths:
        box = prepared.boxes[truth.index]
        placed.append(place_on_original(maps[truth.index], tuple(truth.mask.shape),
                                        box.as_tuple() if box is not None else None))
    return placed


def localization_rows(
    method: str,
    placed: Sequence[Tensor],
    truths: Sequence[LesionTruth],
    predicted: Tensor,
    label_names: Sequence[str],
    ids: Sequence[str],
    thresholds: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per image: its method, class, outcome (correct / wrong), whether its mask is empty, and its metrics.

    ``thresholds`` (class -> value, chosen on validation by :func:`thresholds_on`) adds ``iou_value``/``dice_value``
    at the threshold of the image's true class.
    """
    rows = []
    for saliency, truth in zip(placed, truths, strict=True):
        labelled = truth.label >= 0
        row: dict[str, Any] = {
            "method": method,
            "id": ids[truth.index],
            "class": label_names[truth.label] if labelled else "unlabelled",
            "outcome": ("correct" if int(predicted[truth.index]) == truth.label else "wrong") if labelled
            else "unlabelled",
            "empty_mask": truth.empty,
        }
        if truth.empty:
            values = empty_mask_metrics(saliency[None])
        else:
            value = None if thresholds is None or truth.label not in thresholds else thresholds[truth.label]
            values = localization_metrics(saliency[None], truth.mask[None], value_thresholds=value)
        row.update({key: _finite_or_none(float(tensor[0])) for key, tensor in values.items()})
        rows.append(row)
    return rows


def thresholds_on(placed: Sequence[Tensor], truths: Sequence[LesionTruth]) -> dict[int, float]:
    """Per-class map values maximising the mean IoU with the masks (Saporta et al. 2022): chosen on validation."""
    return choose_thresholds(list(placed), [truth.mask for truth in truths], [truth.label for truth in truths])


def localization_summary(rows: Sequence[Mapping[str, Any]], *, resamples: int = 1000, seed: int = 0
                         ) -> dict[str, Any]:
    """The rows of one method summarised with bootstrap intervals.

    Returns:
        ``{"lesion": {"correct": {...}, "wrong": {...}, "all": {...}}, "by_class": {class: {...}}, "empty_mask":
        {...}}``; each ``{...}`` maps a metric to ``{"mean", "n", "interval"}``.
    """
    lesion = [row for row in rows if not row["empty_mask"]]
    empty = [row for row in rows if row["empty_mask"]]

    def summary(selected: Sequence[Mapping[str, Any]], metrics: Sequence[str], group_by: Sequence[str]
                ) -> dict[str, Any]:
        if not selected:
            return {}
        groups = summarize_localization([{**row, "all": "all"} for row in selected], metrics, group_by=group_by,
                                        resamples=resamples, seed=seed)
        return {str(group[group_by[0]]): group["metrics"] for group in groups}

    return {
        "n_lesion_images": len(lesion),
        "n_empty_mask_images": len(empty),
        "lesion": {**summary(lesion, LESION_METRICS, ("all",)), **summary(lesion, LESION_METRICS, ("outcome",))},
        "by_class": summary(lesion, LESION_METRICS, ("class",)),
        "empty_mask": summary(empty, EMPTY_MASK_METRICS, ("all",)).get("all", {}),
    }


def save_extreme_cases(folder: Path, method: str, rows: Sequence[Mapping[str, Any]], placed: Sequence[Tensor],
                       truths: Sequence[LesionTruth], source: Source, records: Mapping[str, Record], *,
                       count: int = 3) -> list[dict[str, Any]]:
    """Overlays of the best and worst correctly classified lesion images (by energy pointing game), mask outlined.

    Files are named ``<method>_<best|worst>_<rank>.png`` (no image names: ids may identify patients).
    """
    ranked = [(row[_RANKING_METRIC], position) for position, row in enumerate(rows)
              if not row["empty_mask"] and row["outcome"] == "correct" and row.get(_RANKING_METRIC) is not None]
    ranked.sort()
    count = min(count, len(ranked) // 2)  # the best and the worst never show the same image
    chosen = [("worst", ranked[:count]), ("best", ranked[::-1][:count])]
    cases = []
    folder.mkdir(parents=True, exist_ok=True)
    for kind, entries in chosen:
        for rank, (score, position) in enumerate(entries, start=1):
            truth = truths[position]
            image = source.load(records[rows[position]["id"]]).image
            path = folder / f"{method}_{kind}_{rank}.png"
            save_overlay(path, image, placed[position].cpu().numpy(),
                         outline=mask_outline(truth.mask).cpu().numpy())
            cases.append({"kind": kind, "rank": rank, "file": path.name, "class": rows[position]["class"],
                          _RANKING_METRIC: round(float(score), 4)})
    return cases


def shortcut_verdicts(folder: Path, source: Source, records: Mapping[str, Record], prepared: PreparedSplit,
                      maps: Mapping[str, Tensor], classes: Mapping[str, Tensor], label_names: Sequence[str], *,
                      examples: int = 3) -> dict[str, dict[str, Any]]:
    """The shortcut alarm of each method (:func:`medxai.explain.shortcut.shortcut_alarm`) on the correctly classified
    images, with overlays of its worst examples (``shortcut/<method>_<region>_<rank>.png``) where it fires.

    Each image is decoded once at its original resolution (its grey version finds the border, burnt-in text and
    the foreground; a DICOM file's Burned In Annotation flag adds its border to the text) and every method's map is
    placed on it as its overlay would be.
    """
    correct = {name: set((classes[name].cpu() == prepared.labels.cpu()).nonzero().flatten().tolist()) for name in maps}
    wanted = sorted(set().union(*correct.values()))
    shares: dict[str, dict[int, dict[str, Tensor]]] = {name: {} for name in maps}
    for index in wanted:
        sample = source.load(records[prepared.ids[index]])
        grey = _grey(sample.image).to(next(iter(maps.values())).device)
        box = prepared.boxes[index]
        for name, method_maps in maps.items():
            if index in correct[name]:
                placed = place_on_original(method_maps[index], tuple(grey.shape), box.as_tuple() if box else None)
                shares[name][index] = shortcut_shares(
                    placed[None], grey[None], burned_in=[bool(sample.meta.get("burned_in_annotation"))])
    verdicts = {}
    for name, by_index in shares.items():
        indices = sorted(by_index)
        stacked = {key: torch.cat([by_index[i][key].cpu() for i in indices]) for key in next(iter(
            by_index.values()))} if indices else {key: torch.zeros(0) for key in _SHARE_KEYS}
        verdict = shortcut_alarm(stacked, classes=[label_names[int(prepared.labels[i])] for i in indices])
        for region, result in verdict["regions"].items():
            result["worst_examples"] = [
                _save_example(folder / f"{name}_{region}_{rank}.png", source, records, prepared, maps[name], indices[k])
                for rank, k in enumerate(result["worst_examples"][:examples], start=1)
            ] if result["fires"] else []
        verdicts[name] = verdict
    return verdicts


_SHARE_KEYS = ("border_energy", "border_area", "text_energy", "text_area", "outside_foreground_energy",
               "outside_foreground_area")


def _save_example(path: Path, source: Source, records: Mapping[str, Record], prepared: PreparedSplit, maps: Tensor,
                  index: int) -> str:
    box = prepared.boxes[index]
    save_overlay(path, source.load(records[prepared.ids[index]]).image, maps[index].cpu().numpy(),
                 crop_box=box.as_tuple() if box else None)
    return path.name


def _grey(image: np.ndarray) -> Tensor:
    """A decoded image as a float ``(H, W)`` grey tensor (colour channels averaged, alpha dropped)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).float()
    if tensor.ndim == 3:
        tensor = tensor[..., :3].mean(dim=2)
    return tensor


def mask_outline(mask: Tensor, width: int | None = None) -> Tensor:
    """The pixels of ``mask`` (bool ``(H, W)``) within ``width`` of its edge: the outline drawn over an overlay.

    ``width`` defaults to 0.4 % of the image's diagonal (2 px on a 500 x 500 image), so it stays visible.
    """
    if width is None:
        width = max(1, round(0.004 * math.hypot(*mask.shape)))
    inside = mask.float()[None, None]
    eroded = -F.max_pool2d(-inside, kernel_size=2 * width + 1, stride=1, padding=width)
    return (inside - eroded)[0, 0] > 0.5


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
