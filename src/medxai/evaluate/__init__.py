"""Evaluation: metrics as pure functions over labels and probabilities; bootstrap intervals, calibration and the
operating threshold (learned pieces in the estimator style)."""

from medxai.evaluate.bootstrap import bootstrap_confidence_intervals, bootstrap_metric_samples, percentile_interval
from medxai.evaluate.calibration import (
    TemperatureScaler,
    brier_score,
    expected_calibration_error,
    reliability_curve,
)
from medxai.evaluate.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    to_jsonable,
)
from medxai.evaluate.summary import summarize_split
from medxai.evaluate.thresholds import choose_threshold

__all__ = [
    "TemperatureScaler",
    "bootstrap_confidence_intervals",
    "bootstrap_metric_samples",
    "brier_score",
    "choose_threshold",
    "expected_calibration_error",
    "percentile_interval",
    "reliability_curve",
    "summarize_split",
    "average_precision",
    "classification_metrics",
    "confusion_matrix",
    "precision_recall_curve",
    "roc_auc",
    "roc_curve",
    "to_jsonable",
]
