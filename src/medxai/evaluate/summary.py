"""One split's full evaluation entry for ``metrics.json``: metrics, intervals, the operating point, calibration.

:func:`summarize_split` composes the pure pieces of this package; the schema it writes is::

    {
      ...every key of classification_metrics, at the argmax (= 0.5 for binary tasks: the MedMNIST protocol)...,
      "ci95": {"<metric>": [low, high] | null},           # percentile bootstrap, stratified by class
      "per_class_ci95": {"<label>": {"<metric>": [low, high] | null}},
      "bootstrap": {"resamples", "confidence", "seed", "stratified", "method"},
      "at_threshold": {...the same keys again, predicted with p[positive] >= threshold, with their own "ci95"...},
                                                           # binary tasks with a chosen threshold only
      "calibration": {"ece", "ece_adaptive", "brier", "temperature", "method", "n_bins", "ece_reading",
                      "ci95": {"ece", "brier"}},
      "calibration_uncalibrated": {"ece", "ece_adaptive", "brier"}   # the same before calibration
    }

Probabilities are the softmax of the calibrated logits (:class:`~medxai.evaluate.calibration.LogitCalibrator`).
Temperature scaling never changes the argmax or an AUC, so with it the top-level metrics are those of the
uncalibrated model too; bias and vector scaling may move the argmax (never a binary AUC: the log-odds map is
monotone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from medxai.evaluate.bootstrap import bootstrap_calibration_intervals, bootstrap_confidence_intervals
from medxai.evaluate.calibration import (
    DEFAULT_BINS,
    LogitCalibrator,
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
)
from medxai.evaluate.metrics import classification_metrics, to_jsonable

__all__ = ["summarize_split"]


def summarize_split(
    y_true: ArrayLike,
    logits: ArrayLike | torch.Tensor,
    *,
    label_names: Sequence[str],
    positive_index: int = 1,
    temperature: float = 1.0,
    calibrator: LogitCalibrator | None = None,
    threshold: float | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds for one split, JSON-ready.

    Args:
        y_true: true class indices, shape (N,).
        logits: the model's raw outputs, shape (N, K).
        label_names: a name per class.
        positive_index: the positive class of a binary task.
        temperature: the calibration temperature fitted on validation (1.0 when uncalibrated); ignored when a
            ``calibrator`` is given.
        calibrator: the calibration fitted on validation (overrides ``temperature``).
        threshold: the binary operating threshold chosen on validation, or None (then no ``at_threshold``).
        resamples: bootstrap resamples per interval; 0 leaves the intervals out.
        confidence: nominal coverage of the intervals.
        seed: seed of the bootstrap.
        n_bins: bins of the expected calibration error.

    Returns:
        The dictionary described in the module docstring, passed through :func:`to_jsonable`.
    """
    logit_tensor = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    labels = np.asarray(y_true).astype(np.int64)
    if calibrator is None:
        calibrator = LogitCalibrator.from_dict({"method": "temperature", "temperature": float(temperature)})
    probabilities = torch.softmax(calibrator.transform(logit_tensor), dim=1).numpy()
    uncalibrated = torch.softmax(logit_tensor, dim=1).numpy()
    is_binary = probabilities.shape[1] == 2
    common = {"label_names": label_names, "positive_index": positive_index}
    interval_options = {"resamples": resamples, "confidence": confidence, "seed": seed}

    summary = classification_metrics(labels, probabilities, **common)
    if resamples:
        _add_intervals(summary, labels, probabilities, None, common, interval_options)
        summary["bootstrap"] = {
            **interval_options, "stratified": True, "method": "percentile, stratified by true class",
        }
    if is_binary and threshold is not None:
        at_threshold = classification_metrics(labels, probabilities, threshold=threshold, **common)
        if resamples:
            _add_intervals(at_threshold, labels, probabilities, threshold, common, interval_options)
        summary["at_threshold"] = at_threshold

    # Binary tasks read the positive class's probability (is "0.9 pneumonia" right 90% of the time?); multi-class
    # tasks the top-label confidence of Guo et al. 2017.
    class_index = positive_index if is_binary else None
    summary["calibration"] = {
        "ece": expected_calibration_error(labels, probabilities, n_bins=n_bins, class_index=class_index),
        "ece_adaptive": adaptive_calibration_error(labels, probabilities, n_bins=n_bins, class_index=class_index),
        "brier": brier_score(labels, probabilities, positive_index=positive_index),
        "temperature": float(calibrator.temperature_),
        "method": calibrator.method,
        "n_bins": n_bins,
        "ece_reading": "positive class" if is_binary else "top label",
    }
    if resamples:
        summary["calibration"]["ci95"] = bootstrap_calibration_intervals(
            labels, probabilities, class_index=class_index, positive_index=positive_index, n_bins=n_bins,
            **interval_options,
        )
    summary["calibration_uncalibrated"] = {
        "ece": expected_calibration_error(labels, uncalibrated, n_bins=n_bins, class_index=class_index),
        "ece_adaptive": adaptive_calibration_error(labels, uncalibrated, n_bins=n_bins, class_index=class_index),
        "brier": brier_score(labels, uncalibrated, positive_index=positive_index),
    }
    return to_jsonable(summary)


def _add_intervals(
    metrics: dict[str, Any],
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float | None,
    common: dict[str, Any],
    interval_options: dict[str, Any],
) -> None:
    intervals = bootstrap_confidence_intervals(labels, probabilities, threshold=threshold, **common, **interval_options)
    metrics["ci95"] = intervals["overall"]
    metrics["per_class_ci95"] = intervals["per_class"]
