"""Evaluation: metrics as pure functions over labels and probabilities."""

from medxai.evaluate.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    to_jsonable,
)

__all__ = [
    "average_precision",
    "classification_metrics",
    "confusion_matrix",
    "precision_recall_curve",
    "roc_auc",
    "roc_curve",
    "to_jsonable",
]
