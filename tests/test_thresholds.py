"""Operating thresholds: the target sensitivity is met on the data the threshold was fitted on, with the best
specificity that allows; Youden's J is the maximum over every possible cut."""

from __future__ import annotations

import numpy as np
import pytest

from medxai.evaluate.thresholds import choose_threshold


def _random_case(generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    count = int(generator.integers(10, 300))
    labels = generator.integers(0, 2, count)
    labels[:2] = [0, 1]
    scores = 1 / (1 + np.exp(-(generator.normal(size=count) + labels * generator.random() * 3)))
    if generator.random() < 0.4:
        scores = np.round(scores, 2)  # ties
    return labels, scores


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    predicted = scores >= threshold
    sensitivity = predicted[labels == 1].mean()
    specificity = (~predicted[labels == 0]).mean()
    return float(sensitivity), float(specificity)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99, 1.0])
def test_sensitivity_target_is_met_on_the_fitted_data_with_the_best_specificity(target):
    generator = np.random.default_rng(int(target * 100))
    for _ in range(40):
        labels, scores = _random_case(generator)
        chosen = choose_threshold(labels, scores, method="sensitivity", target=target)
        sensitivity, specificity = _rates(labels, scores, chosen["value"])
        assert sensitivity >= target - 1e-12
        assert (sensitivity, specificity) == pytest.approx((chosen["sensitivity"], chosen["specificity"]))
        # Every cut with a better specificity misses the target.
        for cut in np.unique(scores):
            cut_sensitivity, cut_specificity = _rates(labels, scores, cut)
            if cut_specificity > specificity:
                assert cut_sensitivity < target - 1e-12


def test_youden_threshold_maximises_j_over_every_cut():
    generator = np.random.default_rng(1)
    for _ in range(60):
        labels, scores = _random_case(generator)
        chosen = choose_threshold(labels, scores, method="youden")
        sensitivity, specificity = _rates(labels, scores, chosen["value"])
        best = max(sum(_rates(labels, scores, cut)) - 1 for cut in np.r_[np.unique(scores), np.inf])
        assert sensitivity + specificity - 1 == pytest.approx(best)
        assert chosen["youden_j"] == pytest.approx(best)
        assert chosen["target"] is None and chosen["method"] == "youden"


def test_threshold_lies_between_observed_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.4, 0.6, 0.7, 0.9])
    chosen = choose_threshold(labels, scores)
    assert chosen["value"] == pytest.approx(0.5)  # halfway between 0.4 and 0.6: a perfect cut
    assert (chosen["sensitivity"], chosen["specificity"]) == (1.0, 1.0)
    # A sensitivity of 2/3 is reached first by the cut between 0.6 and 0.7.
    assert choose_threshold(labels, scores, method="sensitivity", target=0.6)["value"] == pytest.approx(0.65)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="method"):
        choose_threshold([0, 1], [0.2, 0.8], method="f1")
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="target"):
        choose_threshold([0, 1], [0.2, 0.8], method="sensitivity", target=0.0)
