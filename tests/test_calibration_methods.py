"""LogitCalibrator and the equal-mass ECE, checked on numbers: each calibration map undoes a known distortion of
logits whose softmax is the true class distribution, and the adaptive ECE matches hand-computed bins."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import calibrated_problem, softmax
from medxai.evaluate.calibration import (
    CALIBRATION_METHODS,
    LogitCalibrator,
    adaptive_bin_edges,
    adaptive_calibration_error,
    expected_calibration_error,
    reliability_curve,
)

FIT_SIZE = 10_000




def _ece(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The binary positive-class ECE, else the top-label ECE (the reading summarize_split reports)."""
    return expected_calibration_error(labels, probabilities, class_index=1 if probabilities.shape[1] == 2 else None)


class _Records(logging.Handler):
    """Collects log records (works with ``-p no:logging``, where pytest's caplog is absent)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fit_logged(calibrator: LogitCalibrator, logits: np.ndarray, labels: np.ndarray) -> list[str]:
    records = _Records()
    logger = logging.getLogger("medxai.evaluate.calibration")
    previous = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        calibrator.fit(logits, labels)
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous)
    return records.messages


# -- the calibration maps undo known distortions ------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
def test_temperature_recovers_a_known_overconfidence(num_classes):
    logits, labels = calibrated_problem(FIT_SIZE, num_classes, seed=num_classes)
    held_logits, held_labels = calibrated_problem(FIT_SIZE, num_classes, seed=100 + num_classes)
    calibrator = LogitCalibrator("temperature").fit(3.0 * logits, labels)
    assert calibrator.temperature_ == pytest.approx(3.0, rel=0.05)
    assert calibrator.scale_ is None and calibrator.bias_ is None
    assert calibrator.nll_after_ < calibrator.nll_before_
    np.testing.assert_allclose(calibrator.transform(3.0 * logits).numpy(), 3.0 * logits / calibrator.temperature_)
    before, after = _ece(labels, softmax(3.0 * logits)), _ece(labels, calibrator.predict_proba(3.0 * logits))
    assert before > 0.1 and after < 0.02
    held_before = _ece(held_labels, softmax(3.0 * held_logits))
    held_after = _ece(held_labels, calibrator.predict_proba(3.0 * held_logits))
    assert held_after < 0.02 and held_after < held_before / 4
    np.testing.assert_array_equal(calibrator.predict_proba(3.0 * logits).argmax(1), logits.argmax(1))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_bias_recovers_a_known_shift_of_the_class_priors(num_classes):
    shift = np.array([0.0, 1.0, -0.5])[:num_classes]
    logits, labels = calibrated_problem(FIT_SIZE, num_classes, seed=10 + num_classes)
    held_logits, held_labels = calibrated_problem(FIT_SIZE, num_classes, seed=110 + num_classes)
    calibrator = LogitCalibrator("bias")
    messages = _fit_logged(calibrator, logits + shift, labels)
    assert calibrator.temperature_ == pytest.approx(1.0, abs=0.05)
    assert calibrator.scale_ is None and calibrator.bias_.shape == (num_classes,)
    assert calibrator.bias_.sum() == pytest.approx(0.0, abs=1e-12)  # centred: the softmax ignores a common shift
    np.testing.assert_allclose(calibrator.bias_ - calibrator.bias_[0], -(shift - shift[0]), atol=0.1)
    temperature_only = LogitCalibrator("temperature").fit(logits + shift, labels)
    assert calibrator.nll_after_ < temperature_only.nll_after_ <= temperature_only.nll_before_
    assert any("bias calibration" in message and "alone" in message for message in messages)
    before, after = _ece(labels, softmax(logits + shift)), _ece(labels, calibrator.predict_proba(logits + shift))
    assert before > 0.05 and after < 0.02
    held_after = _ece(held_labels, calibrator.predict_proba(held_logits + shift))
    assert held_after < 0.02 and held_after < _ece(held_labels, softmax(held_logits + shift)) / 3


def test_binary_bias_is_platt_scaling_of_the_log_odds():
    # Logits twice too sharp and shifted toward class 1 by 1: z' = 2 z + (0, 1), so z = z' / 2 + (0, -0.5), i.e.
    # T = 2 and a log-odds shift b[1] - b[0] = -0.5.
    logits, labels = calibrated_problem(FIT_SIZE, 2, seed=21)
    distorted = 2.0 * logits + np.array([0.0, 1.0])
    calibrator = LogitCalibrator("bias").fit(distorted, labels)
    assert calibrator.temperature_ == pytest.approx(2.0, rel=0.05)
    assert calibrator.bias_[1] - calibrator.bias_[0] == pytest.approx(-0.5, abs=0.1)
    # Platt scaling is the unregularised logistic regression of the label on the log-odds x = z'[1] - z'[0]; its
    # maximum-likelihood conditions are sum(p - y) = 0 and sum((p - y) x) = 0.
    residual = calibrator.predict_proba(distorted)[:, 1] - labels
    log_odds = distorted[:, 1] - distorted[:, 0]
    assert abs(residual.mean()) < 1e-6 and abs((residual * log_odds).mean()) < 1e-6


def test_vector_recovers_per_class_scales():
    scales = np.array([0.5, 2.0, 1.0])
    logits, labels = calibrated_problem(FIT_SIZE, 3, seed=31)
    held_logits, held_labels = calibrated_problem(FIT_SIZE, 3, seed=131)
    calibrator = LogitCalibrator("vector").fit(logits * scales, labels)
    assert calibrator.temperature_ == 1.0
    np.testing.assert_allclose(calibrator.scale_, 1.0 / scales, rtol=0.1)
    np.testing.assert_allclose(calibrator.bias_, 0.0, atol=0.1)
    temperature_only = LogitCalibrator("temperature").fit(logits * scales, labels)
    assert calibrator.nll_after_ < temperature_only.nll_after_ - 0.01  # one temperature cannot undo this
    after = _ece(labels, calibrator.predict_proba(logits * scales))
    assert after < 0.02 and after < _ece(labels, temperature_only.predict_proba(logits * scales))
    held_before = _ece(held_labels, softmax(held_logits * scales))
    assert _ece(held_labels, calibrator.predict_proba(held_logits * scales)) < min(0.02, held_before / 3)


def test_none_is_the_identity_and_needs_no_fit():
    logits, labels = calibrated_problem(200, 3, seed=41)
    unfitted = LogitCalibrator("none")
    np.testing.assert_array_equal(unfitted.transform(logits).numpy(), logits)
    fitted = LogitCalibrator("none").fit(logits, labels)
    assert fitted.transform(torch.tensor(logits, dtype=torch.float32)).dtype == torch.float64
    np.testing.assert_allclose(fitted.predict_proba(logits), softmax(logits), atol=1e-12)
    assert fitted.temperature_ == 1.0 and fitted.scale_ is None and fitted.bias_ is None
    assert fitted.nll_after_ == fitted.nll_before_
    assert unfitted.to_dict() == {"method": "none", "temperature": 1.0, "scale": None, "bias": None,
                                  "nll_before": None, "nll_after": None}


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_to_dict_from_dict_round_trip_gives_identical_outputs(method):
    logits, labels = calibrated_problem(2000, 3, seed=51)
    distorted = 2.0 * logits + np.array([0.3, -0.2, 0.1])
    calibrator = LogitCalibrator(method).fit(distorted, labels)
    stored = json.loads(json.dumps(calibrator.to_dict()))  # what a model card keeps
    assert stored == calibrator.to_dict()
    assert set(stored) == {"method", "temperature", "scale", "bias", "nll_before", "nll_after"}
    assert all(value is None or type(value) in (str, float, list) for value in stored.values())
    rebuilt = LogitCalibrator.from_dict(stored)
    fresh = np.random.default_rng(0).normal(size=(50, 3)) * 4
    np.testing.assert_array_equal(rebuilt.transform(fresh).numpy(), calibrator.transform(fresh).numpy())
    assert rebuilt.to_dict() == stored


def test_an_old_card_temperature_divides_the_logits():
    calibrator = LogitCalibrator.from_dict({"method": "temperature", "temperature": 2.0})
    logits = np.array([[2.0, -4.0, 1.0], [0.5, 0.0, 3.0]])
    np.testing.assert_array_equal(calibrator.transform(logits).numpy(), logits / 2.0)
    np.testing.assert_allclose(calibrator.predict_proba(logits), softmax(logits / 2.0))
    assert calibrator.to_dict() == {"method": "temperature", "temperature": 2.0, "scale": None, "bias": None,
                                    "nll_before": None, "nll_after": None}
    assert LogitCalibrator.from_dict({"method": "temperature", "temperature": 1.7}).temperature_ == 1.7


def test_a_perfectly_classified_validation_split_keeps_the_identity():
    logits = np.array([[3.0, -1.0, 0.0], [2.0, 0.0, 1.0], [-1.0, 2.0, 0.0], [0.0, 4.0, 1.0], [0.0, 0.0, 2.0]])
    labels = np.array([0, 0, 1, 1, 2])
    for method in ("temperature", "bias", "vector"):
        calibrator = LogitCalibrator(method)
        messages = _fit_logged(calibrator, logits, labels)
        assert any("classified correctly" in message for message in messages)
        np.testing.assert_array_equal(calibrator.transform(logits).numpy(), logits)


# -- equal-mass (adaptive) binning -------------------------------------------------------------------------------
def test_adaptive_ece_by_hand():
    # Positive-class probabilities 0.05, 0.1, 0.15, 0.2, 0.8, 0.95 with outcomes 0, 0, 1, 0, 1, 1. Three equal-mass
    # bins of two: {0.05, 0.1}: |0 - 0.075|, {0.15, 0.2}: |0.5 - 0.175|, {0.8, 0.95}: |1 - 0.875|; each weighs 2/6.
    positive = np.array([0.05, 0.1, 0.15, 0.2, 0.8, 0.95])
    probabilities = np.stack([1 - positive, positive], axis=1)
    labels = np.array([0, 0, 1, 0, 1, 1])
    expected = 2 * (0.075 + 0.325 + 0.125) / 6
    assert expected_calibration_error(labels, probabilities, n_bins=3, class_index=1,
                                      binning="adaptive") == pytest.approx(expected)
    assert adaptive_calibration_error(labels, probabilities, n_bins=3, class_index=1) == pytest.approx(expected)
    curve = reliability_curve(labels, probabilities, n_bins=3, class_index=1, binning="adaptive")
    np.testing.assert_allclose(curve.bin_edges, [0.0, 0.1, 0.2, 1.0])
    assert curve.counts.tolist() == [2, 2, 2]
    np.testing.assert_allclose(curve.mean_confidence, [0.075, 0.175, 0.875])
    np.testing.assert_allclose(curve.observed_frequency, [0.0, 0.5, 1.0])
    # Equal-width bins differ: (0, 1/3] holds four (0.125 vs 0.25), (2/3, 1] two (0.875 vs 1): (4 + 2) * 0.125 / 6.
    assert expected_calibration_error(labels, probabilities, n_bins=3, class_index=1) == pytest.approx(0.125)


def test_adaptive_bins_never_split_ties():
    # Cuts after sorted positions 2 and 4 both fall inside the run of 0.3s, which goes wholly to the lower bin.
    positive = np.array([0.1, 0.3, 0.3, 0.3, 0.5, 0.9])
    probabilities = np.stack([1 - positive, positive], axis=1)
    curve = reliability_curve(np.array([0, 0, 1, 0, 1, 1]), probabilities, n_bins=3, class_index=1,
                              binning="adaptive")
    np.testing.assert_allclose(curve.bin_edges, [0.0, 0.3, 1.0])
    assert curve.counts.tolist() == [4, 2]
    np.testing.assert_allclose(curve.observed_frequency, [0.25, 1.0])
    # All confidences equal: one bin.
    np.testing.assert_allclose(adaptive_bin_edges(np.full(10, 0.7), 5), [0.0, 1.0])
    # Fewer samples than bins: one bin per sample.
    assert len(adaptive_bin_edges(np.array([0.2, 0.4, 0.6]), 15)) == 4


def test_equal_mass_bins_hold_equal_counts():
    logits, labels = calibrated_problem(6000, 3, seed=61)
    curve = reliability_curve(labels, softmax(logits), n_bins=15, binning="adaptive")
    assert curve.counts.tolist() == [400] * 15
    assert np.all(np.diff(curve.bin_edges) > 0) and curve.bin_edges[0] == 0.0 and curve.bin_edges[-1] == 1.0
    uneven = reliability_curve(labels[:10], softmax(logits[:10]), n_bins=3, binning="adaptive")
    assert uneven.counts.tolist() == [3, 4, 3]  # cuts after round(10/3) = 3 and round(20/3) = 7


def test_uniform_binning_is_unchanged():
    logits, labels = calibrated_problem(3000, 2, seed=71)
    probabilities = softmax(2.0 * logits)
    curve = reliability_curve(labels, probabilities, n_bins=10, class_index=1, binning="uniform")
    default = reliability_curve(labels, probabilities, n_bins=10, class_index=1)
    for field in ("bin_edges", "mean_confidence", "observed_frequency", "counts"):
        np.testing.assert_array_equal(getattr(curve, field), getattr(default, field))
    np.testing.assert_array_equal(curve.bin_edges, np.linspace(0, 1, 11))
    # The Guo et al. definition written out: bins (m / 10, (m + 1) / 10].
    positive, outcome = probabilities[:, 1], labels == 1
    bins = np.clip(np.ceil(positive * 10).astype(int) - 1, 0, 9)
    expected = sum(abs(outcome[bins == m].mean() - positive[bins == m].mean()) * (bins == m).sum()
                   for m in range(10) if (bins == m).any()) / len(labels)
    assert expected_calibration_error(labels, probabilities, n_bins=10, class_index=1) == pytest.approx(expected)


@pytest.mark.parametrize(("num_classes", "class_index"), [(2, 1), (3, None)])
def test_adaptive_ece_of_a_calibrated_model_is_near_zero(num_classes, class_index):
    logits, labels = calibrated_problem(20_000, num_classes, seed=81 + num_classes)
    assert adaptive_calibration_error(labels, softmax(logits), class_index=class_index) < 0.02
    assert adaptive_calibration_error(labels, softmax(3.0 * logits), class_index=class_index) > 0.1


# -- errors -------------------------------------------------------------------------------------------------------
def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown calibration method 'platt'.*'temperature', 'bias', 'vector'"):
        LogitCalibrator("platt")
    with pytest.raises(ValueError, match="unknown calibration method"):
        LogitCalibrator.from_dict({"method": "isotonic", "temperature": 1.0})
    with pytest.raises(ValueError, match="unknown binning"):
        expected_calibration_error(np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]), binning="quantile")


def test_a_bias_of_the_wrong_length_fails_at_transform():
    calibrator = LogitCalibrator.from_dict({"method": "bias", "temperature": 1.5, "bias": [0.1, -0.1]})
    with pytest.raises(ValueError, match="bias has 2 entries but the logits have 3 classes"):
        calibrator.transform(np.zeros((4, 3)))
    vector = LogitCalibrator.from_dict({"method": "vector", "scale": [1.0, 2.0, 0.5], "bias": [0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="scale has 3 entries but the logits have 2 classes"):
        vector.predict_proba(np.zeros((4, 2)))


@pytest.mark.parametrize("method", ["bias", "vector"])
def test_one_class_validation_labels_cannot_fit_biases(method):
    logits = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="needs at least two classes in the validation labels"):
        LogitCalibrator(method).fit(logits, np.zeros(20, dtype=int))


def test_bad_inputs_and_damaged_cards_are_refused():
    with pytest.raises(RuntimeError, match="not fitted"):
        LogitCalibrator("temperature").transform(np.zeros((1, 2)))
    with pytest.raises(ValueError):
        LogitCalibrator("bias").fit(np.zeros((0, 2)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError):
        LogitCalibrator("vector").fit(np.zeros((3, 2)), np.array([0, 1]))
    for damaged in (
        {"method": "temperature", "temperature": 0.0},
        {"method": "temperature", "temperature": float("nan")},
        {"method": "bias", "temperature": 1.0},  # no bias
        {"method": "temperature", "temperature": 1.0, "bias": [0.0, 0.0]},
        {"method": "vector", "scale": [1.0, 1.0], "bias": [0.0, 0.0, 0.0]},
        {"method": "vector", "scale": [1.0, float("inf")], "bias": [0.0, 0.0]},
    ):
        with pytest.raises(ValueError):
            LogitCalibrator.from_dict(damaged)
