"""Bootstrap intervals: every resample's metrics equal the reference implementation on the resampled data, and the
95% intervals cover the true value about 95% of the time on a simulated problem whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from medxai.evaluate.bootstrap import (
    PER_CLASS_METRICS,
    SCALAR_METRICS,
    bootstrap_calibration_intervals,
    bootstrap_confidence_intervals,
    bootstrap_metric_samples,
    percentile_interval,
    resample_counts,
)
from medxai.evaluate.calibration import brier_score, expected_calibration_error
from medxai.evaluate.metrics import classification_metrics


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _random_case(generator: np.random.Generator, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    count = int(generator.integers(8, 70))
    labels = generator.integers(0, num_classes, count)
    labels[:num_classes] = np.arange(num_classes)
    logits = generator.normal(size=(count, num_classes)) * 2 + np.eye(num_classes)[labels] * generator.random() * 2
    if generator.random() < 0.5:
        logits = np.round(logits)  # ties in the scores
    return labels, _softmax(logits)


def _close(value: float, reference: float) -> bool:
    return (math.isnan(value) and math.isnan(reference)) or abs(value - reference) < 1e-9


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_each_resample_equals_classification_metrics_on_the_resampled_data(num_classes):
    generator = np.random.default_rng(num_classes)
    for trial in range(12):
        labels, probabilities = _random_case(generator, num_classes)
        threshold = 0.3 + 0.4 * generator.random() if num_classes == 2 and trial % 2 else None
        positive_index = trial % 2 if num_classes == 2 else 1
        samples = bootstrap_metric_samples(
            labels, probabilities, threshold=threshold, positive_index=positive_index, resamples=6, seed=trial
        )
        counts = np.concatenate(list(resample_counts(labels, 6, seed=trial)))
        for row in range(6):
            drawn = np.repeat(np.arange(labels.shape[0]), counts[row].astype(int))
            reference = classification_metrics(
                labels[drawn], probabilities[drawn], threshold=threshold, positive_index=positive_index
            )
            for key in SCALAR_METRICS:
                assert _close(samples.overall[key][row], reference[key]), (trial, row, key)
            for class_index, name in enumerate(reference["per_class"]):
                for key in PER_CLASS_METRICS:
                    assert _close(samples.per_class[key][row, class_index], reference["per_class"][name][key])


def test_stratified_resamples_keep_class_counts_and_are_reproducible():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    counts = np.concatenate(list(resample_counts(labels, 200, seed=7)))
    assert counts.shape == (200, 45)
    for value, size in ((0, 30), (1, 10), (2, 5)):
        np.testing.assert_array_equal(counts[:, labels == value].sum(axis=1), size)
    np.testing.assert_array_equal(counts, np.concatenate(list(resample_counts(labels, 200, seed=7))))
    assert not np.array_equal(counts, np.concatenate(list(resample_counts(labels, 200, seed=8))))
    unstratified = np.concatenate(list(resample_counts(labels, 200, seed=7, stratified=False)))
    assert unstratified.sum(axis=1).tolist() == [45] * 200
    assert len(set(unstratified[:, labels == 2].sum(axis=1).tolist())) > 1  # class sizes vary without strata


def test_calibration_intervals_hold_the_point_estimates():
    generator = np.random.default_rng(3)
    labels, probabilities = _random_case(generator, 2)
    intervals = bootstrap_calibration_intervals(labels, probabilities, class_index=1, resamples=1000)
    ece = expected_calibration_error(labels, probabilities, class_index=1)
    brier = brier_score(labels, probabilities)
    assert intervals["ece"][0] <= ece + 1e-12 and intervals["brier"][0] <= brier <= intervals["brier"][1]
    assert intervals["ece"][1] > intervals["ece"][0]


def test_percentile_interval_needs_mostly_finite_values():
    assert percentile_interval(np.r_[np.arange(100.0), [np.nan] * 20]) == pytest.approx((2.475, 96.525))
    assert percentile_interval([np.nan, np.nan, 1.0]) is None
    with pytest.raises(ValueError):
        percentile_interval([1.0, 2.0], confidence=1.5)


def test_intervals_cover_the_true_value_at_about_the_nominal_rate():
    """Scores ~ N(0, 1) for negatives and N(d, 1) for positives: the true AUC is Phi(d / sqrt 2), and at the cut
    score c the true sensitivity is 1 - Phi(c - d), the specificity Phi(c). Class counts are fixed by design, as the
    stratified bootstrap assumes. The percentile bootstrap is known to under-cover slightly at these sample sizes, so
    the check is "about 95%": between 90% and 99% over 200 simulated test sets (binomial s.e. about 1.5%)."""
    generator = np.random.default_rng(2024)
    separation, cut, positives, negatives = 1.5, 0.75, 80, 160
    truth = {
        "auc": norm.cdf(separation / math.sqrt(2)),
        "sensitivity": 1 - norm.cdf(cut - separation),
        "specificity": norm.cdf(cut),
    }
    truth["accuracy"] = (positives * truth["sensitivity"] + negatives * truth["specificity"]) / (positives + negatives)
    labels = np.r_[np.zeros(negatives, dtype=int), np.ones(positives, dtype=int)]
    simulations = 200
    covered = {key: 0 for key in truth}
    for simulation in range(simulations):
        scores = generator.normal(size=labels.shape[0]) + separation * labels
        positive_probability = 1.0 / (1.0 + np.exp(-(scores - cut)))  # >= 0.5 exactly when score >= cut
        probabilities = np.stack([1 - positive_probability, positive_probability], axis=1)
        samples = bootstrap_metric_samples(labels, probabilities, resamples=1000, seed=simulation)
        for key, value in truth.items():
            low, high = percentile_interval(samples.overall[key])
            covered[key] += low <= value <= high
    coverage = {key: count / simulations for key, count in covered.items()}
    assert all(0.90 <= rate <= 0.99 for rate in coverage.values()), coverage


def test_confidence_intervals_have_a_value_for_every_metric():
    generator = np.random.default_rng(5)
    labels, probabilities = _random_case(generator, 3)
    result = bootstrap_confidence_intervals(labels, probabilities, label_names=["a", "b", "c"], resamples=500)
    point = classification_metrics(labels, probabilities)
    assert set(result["overall"]) == set(SCALAR_METRICS)
    assert set(result["per_class"]) == {"a", "b", "c"}
    for key, (low, high) in result["overall"].items():
        assert low <= high
        assert low - 0.05 <= point[key] <= high + 0.05, key  # near the middle, not somewhere else
