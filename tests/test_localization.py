"""Localisation metrics: hand-computed tiny cases, and equality with Quantus, scikit-learn and scikit-image."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from medxai.errors import ConfigError
from medxai.explain import localization as loc


def _maps_and_masks(seed: int = 0, count: int = 6, size: tuple[int, int] = (12, 16)):
    """Continuous random maps (no ties) and masks of different sizes, one empty."""
    rng = np.random.default_rng(seed)
    maps = rng.random((count, *size))
    masks = np.zeros((count, *size), dtype=bool)
    for index in range(count - 1):
        top, left = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 5)
        masks[index, top:top + 2 + index % 3, left:left + 3 + index % 2] = True
    masks[0, 0, 0] = True  # a second lesion
    return maps, masks  # the last mask stays empty


# --------------------------------------------------------------------------------------- hand-computed cases

def _case(peak: tuple[int, int], mask_rows: slice, mask_cols: slice, size: int = 9):
    saliency = torch.zeros(1, size, size, dtype=torch.float64)
    saliency[0, peak[0], peak[1]] = 1.0
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, mask_rows, mask_cols] = True
    return saliency, mask


@pytest.mark.parametrize(
    ("name", "peak", "rows", "cols", "tolerance", "expected"),
    [
        ("hit", (4, 4), slice(3, 6), slice(3, 6), 0.0, 1.0),
        ("miss", (0, 8), slice(3, 6), slice(3, 6), 0.0, 0.0),
        ("edge, just inside: distance 2 = tolerance", (4, 7), slice(3, 6), slice(3, 6), 2.0, 1.0),
        ("edge, just outside: distance 2 > 1.99", (4, 7), slice(3, 6), slice(3, 6), 1.99, 0.0),
        ("diagonal: distance sqrt 2 > 1 (Euclidean, not a square)", (6, 6), slice(3, 6), slice(3, 6), 1.0, 0.0),
        ("diagonal: distance sqrt 2 <= 1.5", (6, 6), slice(3, 6), slice(3, 6), 1.5, 1.0),
        ("empty mask: undefined", (4, 4), slice(0, 0), slice(0, 0), 0.0, math.nan),
    ],
)
def test_pointing_game_hand_cases(name, peak, rows, cols, tolerance, expected) -> None:
    saliency, mask = _case(peak, rows, cols)
    result = float(loc.pointing_game(saliency, mask, tolerance=tolerance)[0])
    assert result == expected or (math.isnan(expected) and math.isnan(result)), name


def test_pointing_game_ties_score_the_share_of_maxima_that_hit() -> None:
    saliency, mask = _case((4, 4), slice(3, 6), slice(3, 6))
    saliency[0, 0, 0] = saliency[0, 8, 8] = saliency[0, 0, 8] = 1.0  # four maxima, one in the lesion
    assert loc.pointing_game(saliency, mask, tolerance=0).tolist() == [0.25]
    flat = torch.ones(1, 9, 9)  # a constant map: chance, the lesion's share of the image
    assert loc.pointing_game(flat, mask, tolerance=0).tolist() == [pytest.approx(9 / 81)]


def test_scaled_tolerance_follows_the_diagonal() -> None:
    assert loc.scaled_tolerance((480, 640)) == pytest.approx(15.0)
    assert loc.scaled_tolerance((500, 500)) == pytest.approx(15 * math.sqrt(2) * 500 / 800)
    saliency, mask = _case((4, 8), slice(3, 6), slice(3, 6), size=9)  # distance 3 from the lesion
    big = torch.nn.functional.interpolate(saliency[None], scale_factor=40, mode="nearest")[0]  # 360 px: r = 9.5
    big_mask = torch.nn.functional.interpolate(mask[None].float(), scale_factor=40, mode="nearest")[0].bool()
    assert loc.pointing_game(big, big_mask).item() == 0.0  # 3 px scaled to 81 px: beyond 9.5 px
    assert loc.pointing_game(saliency, mask, tolerance=3).item() == 1.0


def test_energy_iou_dice_iobb_rank_on_a_hand_case() -> None:
    saliency = torch.zeros(1, 4, 4, dtype=torch.float64)
    saliency[0, 0, 0:2] = 1.0  # in the lesion
    saliency[0, 3, 3] = 2.0  # outside
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0:3] = True
    assert loc.energy_in_mask(saliency, mask).item() == pytest.approx(2 / 4)
    assert loc.energy_pointing_game(saliency, mask).item() == pytest.approx(2 / 4)  # the box is the mask here
    binary = saliency > 0
    scores = loc.overlap_scores(binary, mask)
    assert scores["iou"].item() == pytest.approx(2 / 4) and scores["dice"].item() == pytest.approx(4 / 6)
    # Rank: K = 3, top 3 = (3,3) then the tied pair (0,0), (0,1), both in the lesion -> 2/3.
    assert loc.relevance_rank_accuracy(saliency, mask).item() == pytest.approx(2 / 3)
    # Tie at the cut: top 2 = (3,3) and one of the two 1.0 pixels (both in the lesion) -> 1/2.
    assert loc.top_k_intersection(saliency, mask, 2).item() == pytest.approx(1 / 2)
    # IoBB at value 0.4 of the normalised map: components {(0,0),(0,1)} (2 px) and {(3,3)} (1 px); the largest's box
    # is inside the lesion -> 1; at 0.9 only (3,3) survives -> 0.
    assert loc.intersection_over_detected_box(saliency, mask, value=0.4).item() == 1.0
    assert loc.intersection_over_detected_box(saliency, mask, value=0.9).item() == 0.0
    empty = torch.zeros_like(mask)
    for metric in (loc.energy_in_mask, loc.relevance_rank_accuracy, loc.pixel_auroc, loc.pixel_auprc,
                   loc.intersection_over_detected_box, loc.energy_pointing_game):
        assert math.isnan(metric(saliency, empty).item()), metric.__name__


def test_energy_pointing_game_uses_the_box_of_each_lesion() -> None:
    saliency = torch.ones(1, 6, 6)
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # one diagonal lesion: box 2x2
    mask[0, 4, 5] = True  # a second lesion: box 1x1
    assert loc.energy_pointing_game(saliency, mask).item() == pytest.approx(5 / 36)
    assert loc.energy_in_mask(saliency, mask).item() == pytest.approx(3 / 36)


def test_shape_mismatch_and_non_finite_maps_are_refused() -> None:
    with pytest.raises(ConfigError, match="differ in shape"):
        loc.pointing_game(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="NaN"):
        loc.pixel_auroc(torch.full((1, 4, 4), math.nan), torch.ones(1, 4, 4, dtype=torch.bool))


def test_metrics_work_on_volumes() -> None:
    saliency = torch.zeros(1, 5, 5, 5)
    saliency[0, 2, 2, 2] = 1.0
    mask = torch.zeros(1, 5, 5, 5, dtype=torch.bool)
    mask[0, 2, 2, 3] = True
    assert loc.pointing_game(saliency, mask, tolerance=0).item() == 0.0
    assert loc.pointing_game(saliency, mask, tolerance=1).item() == 1.0
    results = loc.localization_metrics(saliency, mask)
    # AUROC: the lesion voxel scores 0 like 123 of the 124 others -> (123 * 0.5) / 124.
    assert results["pixel_auroc"].item() == pytest.approx(123 * 0.5 / 124)


# ------------------------------------------------------------------------------------------- references

def _quantus_scores(metric, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A Quantus metric on precomputed maps and masks: no model, explicit a_batch / s_batch, (B, 1, H, W)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=None, x_batch=maps[:, None].astype(np.float64), y_batch=np.zeros(len(maps), dtype=int),
                        a_batch=maps[:, None].copy(), s_batch=masks[:, None].astype(np.float64))
    return np.asarray(scores, dtype=np.float64)


def _assert_equal_with_nan(ours: torch.Tensor, reference: np.ndarray) -> None:
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-6, rtol=0, equal_nan=True)


def test_equal_to_quantus_on_the_same_maps_and_masks() -> None:
    quantus = pytest.importorskip("quantus")
    maps, masks = _maps_and_masks()
    saliency, truth = torch.from_numpy(maps), torch.from_numpy(masks)
    common = {"disable_warnings": True}
    pairs = [
        # Quantus' default max-normalisation does not change any of these (all scale-invariant).
        (quantus.PointingGame(**common), loc.pointing_game(saliency, truth, tolerance=0)),
        (quantus.AttributionLocalisation(**common), loc.energy_in_mask(saliency, truth)),
        (quantus.RelevanceMassAccuracy(**common), loc.relevance_mass_accuracy(saliency, truth)),
        (quantus.RelevanceRankAccuracy(**common), loc.relevance_rank_accuracy(saliency, truth)),
        (quantus.TopKIntersection(k=20, **common), loc.top_k_intersection(saliency, truth, 20)),
        (quantus.AUC(**common), loc.pixel_auroc(saliency, truth)),
    ]
    for metric, ours in pairs:
        reference = _quantus_scores(metric, maps, masks)
        _assert_equal_with_nan(ours[:-1], reference[:-1])
        assert math.isnan(ours[-1]), type(metric).__name__  # the empty mask: undefined
        if not isinstance(metric, quantus.PointingGame):
            assert math.isnan(reference[-1])
    # Quantus' PointingGame writes NaN into a bool array, which reads True: an image without lesion scores a hit.
    assert _quantus_scores(quantus.PointingGame(**common), maps, masks)[-1] == 1.0


def test_documented_differences_from_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    maps, masks = _maps_and_masks(seed=1)
    # Signed maps: medxai's mass ignores negative evidence; Quantus on the clipped map agrees.
    signed = maps - 0.5
    reference = _quantus_scores(quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True),
                                np.clip(signed, 0, None), masks)
    _assert_equal_with_nan(loc.relevance_mass_accuracy(torch.from_numpy(signed), torch.from_numpy(masks)), reference)
    # Ties in the maximum: Quantus hits when ANY maximum is in the lesion; medxai gives the share of maxima that do.
    tied = maps.copy()
    tied[:, 0, 0] = tied[:, -1, -1] = 2.0  # (0, 0) is in the first mask only
    ours = loc.pointing_game(torch.from_numpy(tied), torch.from_numpy(masks), tolerance=0)
    theirs = _quantus_scores(quantus.PointingGame(disable_warnings=True), tied, masks)
    assert ours[0].item() == 0.5 and theirs[0] == 1.0
    np.testing.assert_array_equal(ours[1:-1].numpy() > 0, theirs[1:-1] > 0)
    # Tolerance: medxai's default counts a maximum 15 px (scaled) from the lesion as a hit; tolerance=0 is Quantus'.
    assert loc.pointing_game(torch.from_numpy(maps), torch.from_numpy(masks)).shape == (len(maps),)


def test_pixel_auroc_and_auprc_equal_scikit_learn_with_ties() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    maps, masks = _maps_and_masks(seed=2)
    maps = np.round(maps * 4) / 4  # five levels: many ties
    auroc = loc.pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks))
    auprc = loc.pixel_auprc(torch.from_numpy(maps), torch.from_numpy(masks))
    for index in range(len(maps) - 1):
        truth, scores = masks[index].ravel(), maps[index].ravel()
        assert auroc[index].item() == pytest.approx(metrics.roc_auc_score(truth, scores), abs=1e-12)
        assert auprc[index].item() == pytest.approx(metrics.average_precision_score(truth, scores), abs=1e-12)
    assert math.isnan(auroc[-1]) and math.isnan(auprc[-1])


def test_otsu_equals_scikit_image() -> None:
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(3)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((5, 1, 4, 4))), size=(37, 29),
                                             mode="bilinear", align_corners=False)[:, 0]
    skewed = torch.from_numpy(rng.random((3, 37, 29)) ** 3)
    cases = torch.cat([smooth, skewed, torch.full((1, 37, 29), 0.3, dtype=torch.float64)])
    ours = loc.otsu_thresholds(cases)
    for index, image in enumerate(cases.numpy()):
        assert ours[index].item() == filters.threshold_otsu(image), index
    assert not loc.binarize_at_otsu(cases[-1:]).any()  # a constant map selects nothing


def test_top_fraction_and_value_binarisation() -> None:
    saliency = torch.arange(100, dtype=torch.float64).reshape(1, 10, 10)
    assert loc.binarize_top_fraction(saliency, 0.05).sum().item() == 5
    assert loc.binarize_top_fraction(saliency, 0.2).sum().item() == 20
    mostly_zero = torch.zeros(1, 10, 10)
    mostly_zero[0, 0, :3] = 1.0
    assert loc.binarize_top_fraction(mostly_zero, 0.05).sum().item() == 100  # ties at the cut are all kept
    assert loc.binarize_at_value(saliency * 7 + 3, 0.5).sum().item() == 50  # on the min-max normalised map


def test_choose_thresholds_picks_the_best_mean_iou_per_class() -> None:
    ramp = torch.linspace(0, 1, 100, dtype=torch.float64).reshape(10, 10)
    mask_top30 = ramp >= 0.7 - 1e-9  # the 30 highest pixels
    mask_top60 = ramp >= 0.4 - 1e-9
    chosen = loc.choose_thresholds([ramp, ramp, ramp], [mask_top30, mask_top60, torch.zeros(10, 10, dtype=torch.bool)],
                                   [0, 1, 2], candidates=[0.2, 0.4, 0.7, 0.9])
    assert chosen == {0: 0.7, 1: 0.4}  # class 2 has no lesion: no threshold


def test_summary_gives_means_counts_and_intervals_per_group() -> None:
    rows = [{"method": "gradcam", "class": "benign", "pointing_game": value} for value in (1.0, 0.0, 1.0, math.nan)]
    rows += [{"method": "gradcam", "class": "malignant", "pointing_game": 1.0}]
    summary = loc.summarize_localization(rows, ["pointing_game", "absent"], resamples=200)
    benign = summary[0]["metrics"]["pointing_game"]
    assert summary[0]["class"] == "benign" and benign["n"] == 3 and benign["mean"] == pytest.approx(2 / 3)
    low, high = benign["interval"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0
    assert summary[1]["metrics"]["pointing_game"] == {"mean": 1.0, "n": 1, "interval": [1.0, 1.0]}
    assert summary[0]["metrics"]["absent"] == {"mean": None, "n": 0, "interval": None}


def test_empty_mask_metrics_describe_where_the_map_goes() -> None:
    saliency = torch.zeros(2, 20, 20)
    saliency[0, 0, 0] = 1.0  # all mass in the corner
    saliency[1, 8:12, 8:12] = 1.0  # all in the centre
    result = loc.empty_mask_metrics(saliency)
    assert result["border_energy"].tolist() == [1.0, 0.0]
    assert result["area_above_otsu"].tolist() == [pytest.approx(1 / 400), pytest.approx(16 / 400)]
    assert result["peak"].tolist() == [1.0, 1.0]
