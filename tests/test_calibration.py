"""Calibration: hand-checked ECE, Brier against scikit-learn, and temperature scaling that undoes a known
over-confidence and lowers the ECE on held-out data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import calibrated_problem, softmax
from medxai.evaluate.calibration import (
    TemperatureScaler,
    brier_score,
    expected_calibration_error,
    reliability_curve,
)




def test_ece_and_reliability_curve_by_hand():
    # Top-label confidences 0.9, 0.8, 0.6, 0.55; correct, wrong, correct, correct. With 2 bins, (0, 0.5] is empty
    # and (0.5, 1] holds all four: mean confidence 0.7125, accuracy 0.75, ECE |0.75 - 0.7125| = 0.0375.
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(labels, probabilities, n_bins=2) == pytest.approx(0.0375)
    # With 10 bins: {0.9}: |1 - 0.9|, {0.8}: |0 - 0.8|, {0.6}: |1 - 0.6|, {0.55}: |1 - 0.55|, each weighted 1/4.
    assert expected_calibration_error(labels, probabilities, n_bins=10) == pytest.approx((0.1 + 0.8 + 0.4 + 0.45) / 4)
    curve = reliability_curve(labels, probabilities, n_bins=10)
    assert curve.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 1, 1, 0]  # 0.6 is the upper edge of (0.5, 0.6]
    np.testing.assert_allclose(curve.mean_confidence[[5, 7, 8]], [0.575, 0.8, 0.9])
    np.testing.assert_allclose(curve.observed_frequency[[5, 7, 8]], [1.0, 0.0, 1.0])
    # Class reading, class 1: probabilities 0.1, 0.8, 0.4, 0.55 against "is class 1": 0, 0, 0, 1.
    by_class = reliability_curve(labels, probabilities, n_bins=2, class_index=1)
    assert by_class.counts.tolist() == [2, 2]
    np.testing.assert_allclose(by_class.mean_confidence, [0.25, 0.675])
    np.testing.assert_allclose(by_class.observed_frequency, [0.0, 0.5])
    assert by_class.ece == pytest.approx((2 * 0.25 + 2 * 0.175) / 4)
    # A bin edge belongs to the bin below: 0.5 falls in (0, 0.5].
    edge = reliability_curve(np.array([1]), np.array([[0.5, 0.5]]), n_bins=2, class_index=1)
    assert edge.counts.tolist() == [1, 0]


def test_brier_score_matches_scikit_learn_and_the_multiclass_definition():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = np.random.default_rng(0)
    probabilities = softmax(generator.normal(size=(50, 2)))
    labels = generator.integers(0, 2, 50)
    assert brier_score(labels, probabilities) == pytest.approx(
        sklearn_metrics.brier_score_loss(labels, probabilities[:, 1])
    )
    assert brier_score(labels, probabilities, positive_index=0) == pytest.approx(
        sklearn_metrics.brier_score_loss(labels == 0, probabilities[:, 0])
    )
    three = softmax(generator.normal(size=(40, 3)))
    three_labels = generator.integers(0, 3, 40)
    expected = np.mean(((three - np.eye(3)[three_labels]) ** 2).sum(axis=1))
    assert brier_score(three_labels, three) == pytest.approx(expected)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_temperature_scaling_undoes_a_known_overconfidence_and_lowers_ece(num_classes):
    logits, labels = calibrated_problem(20000, num_classes, seed=num_classes)
    overconfident = 3.0 * logits  # the same ranking, three times too sharp
    fit_half, held_out = slice(0, 10000), slice(10000, None)
    scaler = TemperatureScaler().fit(torch.tensor(overconfident[fit_half]), torch.tensor(labels[fit_half]))
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.08)
    assert scaler.nll_after_ < scaler.nll_before_
    before = softmax(overconfident[held_out])
    after = scaler.predict_proba(overconfident[held_out])
    class_index = 1 if num_classes == 2 else None
    ece_before = expected_calibration_error(labels[held_out], before, class_index=class_index)
    ece_after = expected_calibration_error(labels[held_out], after, class_index=class_index)
    assert ece_before > 0.08  # clearly over-confident
    assert ece_after < 0.03 and ece_after < ece_before / 3
    assert brier_score(labels[held_out], after) < brier_score(labels[held_out], before)
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))  # decisions unchanged


def test_temperature_scaling_sharpens_an_underconfident_model():
    logits, labels = calibrated_problem(8000, 2, seed=11)
    scaler = TemperatureScaler().fit(logits / 2.0, labels)
    assert scaler.temperature_ == pytest.approx(0.5, rel=0.1)


class _Records(logging.Handler):
    """Collects log records (works with ``-p no:logging``, where pytest's caplog is absent)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_perfectly_separated_validation_keeps_temperature_one():
    logits = np.array([[3.0, -1.0], [2.0, 0.0], [-1.0, 2.0], [0.0, 4.0]])
    records = _Records()
    logger = logging.getLogger("medxai.evaluate.calibration")
    logger.addHandler(records)
    try:
        scaler = TemperatureScaler().fit(logits, np.array([0, 0, 1, 1]))
    finally:
        logger.removeHandler(records)
    assert scaler.temperature_ == 1.0
    assert any("no finite optimum" in message for message in records.messages)


def test_scaler_follows_the_estimator_conventions():
    scaler = TemperatureScaler(max_iter=20)
    assert scaler.max_iter == 20 and not hasattr(scaler, "temperature_")
    with pytest.raises(RuntimeError, match="not fitted"):
        scaler.predict_proba(np.zeros((1, 2)))
    with pytest.raises(ValueError):
        scaler.fit(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError):
        scaler.fit(np.array([[np.nan, 0.0]]), np.array([0]))
