"""Classification metrics as pure NumPy functions.

Every function here takes arrays and returns numbers or arrays; nothing reads files, touches a model or keeps state.
The curve and score functions reproduce scikit-learn's definitions exactly (same tie handling, same threshold
arrays), so numbers in a medxai report can be checked against the reference implementation; the tests do so on many
random inputs. scikit-learn is not needed at runtime.

``metrics.json`` (written by ``evaluate`` and ``train`` into the run folder) maps a split name to the dictionary
returned by :func:`classification_metrics`, passed through :func:`to_jsonable`::

    {
      "<split>": {                      # "val", "test", ...
        "n": int,                       # number of samples
        "accuracy": float,
        "precision": float,             # binary: of the positive class; multi-class: macro average
        "recall": float,                # binary: of the positive class; multi-class: macro average
        "f1": float,                    # binary: of the positive class; multi-class: macro average
        "auc": float | null,            # binary: ROC AUC of p[:, positive_index]; multi-class: one-vs-rest macro AUC
        "sensitivity": float,           # binary: recall of the positive class; multi-class: macro recall
        "specificity": float,           # binary: recall of the negative class; multi-class: macro one-vs-rest
        "confusion_matrix": [[int]],    # rows = true class, columns = predicted class
        "precision_macro": float,
        "recall_macro": float,
        "f1_macro": float,
        "auc_macro": float | null,      # one-vs-rest, over the classes whose AUC is defined
        "balanced_accuracy": float,     # mean recall over the classes present in y_true
        "per_class": {"<label name>": {"precision", "recall", "f1", "specificity", "auc" (one-vs-rest, or null),
                                       "support"}},
        "threshold": float | null,      # binary operating point used for the predictions, null for argmax
        "positive_label": str | null,   # binary: the label the binary metrics refer to; multi-class: null
        "label_names": [str],
        "ci95": {"<metric>": [low, high]}   # added by the bootstrap module, not by this one
      }
    }

Undefined values (an AUC for a class absent from ``y_true``) are ``NaN`` in Python and ``null`` in JSON, which has
no NaN. Divisions by zero in precision, recall, F1 and specificity give 0.0, like scikit-learn's
``zero_division=0``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "confusion_matrix",
    "roc_curve",
    "roc_auc",
    "precision_recall_curve",
    "average_precision",
    "classification_metrics",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

# Rows of a probability matrix may drift from 1 by float32 rounding of a softmax; logits miss by far more.
_ROW_SUM_TOLERANCE = 1e-3


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Count predictions per (true class, predicted class) pair.

    Args:
        y_true: true class indices, shape (N,), values in ``[0, num_classes)``.
        y_pred: predicted class indices, shape (N,), values in ``[0, num_classes)``.
        num_classes: number of classes K; the matrix is K x K even when some classes never occur.

    Returns:
        An int64 array of shape (K, K) whose entry ``[i, j]`` counts samples of true class ``i`` predicted as ``j``.

    Raises:
        ValueError: if the arrays differ in length or hold an index outside ``[0, num_classes)``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    true_indices = _as_class_indices(y_true, num_classes, "y_true")
    predicted_indices = _as_class_indices(y_pred, num_classes, "y_pred")
    if true_indices.shape != predicted_indices.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {true_indices.shape[0]} and {predicted_indices.shape[0]}"
        )
    flat_counts = np.bincount(true_indices * num_classes + predicted_indices, minlength=num_classes * num_classes)
    return flat_counts.reshape(num_classes, num_classes).astype(np.int64)


def roc_curve(
    y_true_binary: ArrayLike, scores: ArrayLike, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic curve, identical to ``sklearn.metrics.roc_curve``.

    Samples are sorted by decreasing score; tied scores form one threshold (one point), so ties give the diagonal
    segment that makes the area equal to the Mann-Whitney statistic with ties counted as one half. The first
    threshold is ``inf`` so that the curve starts at (0, 0).

    Args:
        y_true_binary: 0/1 (or boolean) labels, shape (N,); 1 is the positive class.
        scores: scores for the positive class, shape (N,); higher means more likely positive.
        drop_intermediate: drop points collinear with their neighbours, which do not change the plotted curve or
            its area. ``True`` is scikit-learn's default and gives the same arrays as it.

    Returns:
        ``(false_positive_rate, true_positive_rate, thresholds)``: float64 arrays of equal length; ``thresholds`` is
        decreasing and point ``i`` counts samples with ``score >= thresholds[i]`` as positive. When ``y_true_binary``
        has no negatives (positives), the false (true) positive rates are all NaN and a warning is logged.

    Raises:
        ValueError: if the inputs are not 1-D of equal length, labels are not 0/1, or scores are not finite.
    """
    labels, scores_array = _validate_binary_inputs(y_true_binary, scores)
    false_positives, true_positives, thresholds = _cumulative_counts_at_thresholds(labels, scores_array)

    if drop_intermediate and false_positives.shape[0] > 2:
        # A point is kept when the curve turns there (non-zero second difference) or at either end.
        is_corner = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        kept = np.flatnonzero(np.concatenate([[True], is_corner, [True]]))
        false_positives, true_positives, thresholds = false_positives[kept], true_positives[kept], thresholds[kept]

    false_positives = np.concatenate([[0.0], false_positives])
    true_positives = np.concatenate([[0.0], true_positives])
    thresholds = np.concatenate([[np.inf], thresholds])

    if false_positives[-1] <= 0:
        logger.warning("No negative samples in y_true; the false positive rate is undefined (NaN).")
        false_positive_rate = np.full(false_positives.shape, np.nan)
    else:
        false_positive_rate = false_positives / false_positives[-1]
    if true_positives[-1] <= 0:
        logger.warning("No positive samples in y_true; the true positive rate is undefined (NaN).")
        true_positive_rate = np.full(true_positives.shape, np.nan)
    else:
        true_positive_rate = true_positives / true_positives[-1]
    return false_positive_rate, true_positive_rate, thresholds


def roc_auc(y_true_binary: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve by the trapezoid rule, equal to ``sklearn.metrics.roc_auc_score``.

    Ties in ``scores`` count as one half, as in scikit-learn.

    Args:
        y_true_binary: 0/1 (or boolean) labels, shape (N,).
        scores: scores for the positive class, shape (N,).

    Returns:
        The area in ``[0, 1]``, or NaN (with a logged warning) when only one class is present, where the ROC curve
        is undefined.
    """
    labels, scores_array = _validate_binary_inputs(y_true_binary, scores)
    positive_count = int(labels.sum())
    if positive_count == 0 or positive_count == labels.shape[0]:
        logger.warning(
            "Only one class present in y_true (%d of %d samples positive); ROC AUC is undefined, returning NaN.",
            positive_count,
            labels.shape[0],
        )
        return math.nan
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores_array)
    # The trapezoid rule written out: np.trapezoid is NumPy 2 only, and numpy>=1.24 is supported.
    widths = np.diff(false_positive_rate)
    return float(np.sum(widths * (true_positive_rate[1:] + true_positive_rate[:-1]) / 2.0))


def precision_recall_curve(
    y_true_binary: ArrayLike, scores: ArrayLike, *, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve, identical to ``sklearn.metrics.precision_recall_curve``.

    Args:
        y_true_binary: 0/1 (or boolean) labels, shape (N,).
        scores: scores for the positive class, shape (N,).
        drop_intermediate: drop thresholds that do not change recall (keeping the first and last of each run), as
            scikit-learn does with the same flag. ``False`` is scikit-learn's default.

    Returns:
        ``(precision, recall, thresholds)``: ``thresholds`` increases; ``precision`` and ``recall`` have one more
        entry than ``thresholds``, the final point (precision 1, recall 0) that has no threshold. Precision at a
        threshold that predicts nothing positive is 0. With no positives in ``y_true_binary`` recall is 1
        everywhere (scikit-learn's convention) and a warning is logged.
    """
    labels, scores_array = _validate_binary_inputs(y_true_binary, scores)
    false_positives, true_positives, thresholds = _cumulative_counts_at_thresholds(labels, scores_array)

    if drop_intermediate and false_positives.shape[0] > 2:
        # Points sharing a true-positive count share the recall; keep only the ends of each such run.
        changes = np.logical_or(np.diff(true_positives[:-1]), np.diff(true_positives[1:]))
        kept = np.flatnonzero(np.concatenate([[True], changes, [True]]))
        false_positives, true_positives, thresholds = false_positives[kept], true_positives[kept], thresholds[kept]

    predicted_positive = true_positives + false_positives
    precision = np.divide(
        true_positives, predicted_positive, out=np.zeros_like(true_positives), where=predicted_positive != 0
    )
    if true_positives[-1] == 0:
        logger.warning("No positive samples in y_true; recall is set to 1 for all thresholds.")
        recall = np.ones_like(true_positives)
    else:
        recall = true_positives / true_positives[-1]
    return (
        np.concatenate([precision[::-1], [1.0]]),
        np.concatenate([recall[::-1], [0.0]]),
        thresholds[::-1].copy(),
    )


def average_precision(y_true_binary: ArrayLike, scores: ArrayLike) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score``.

    The step-function area under the precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n``, without interpolation.

    Args:
        y_true_binary: 0/1 (or boolean) labels, shape (N,).
        scores: scores for the positive class, shape (N,).

    Returns:
        The average precision in ``[0, 1]``; 0.0 with a logged warning when ``y_true_binary`` has no positives (as
        scikit-learn returns).
    """
    precision, recall, _ = precision_recall_curve(y_true_binary, scores)
    # Rounding can give -0.0 for an empty sum, hence the clip.
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def classification_metrics(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    label_names: Sequence[str] | None = None,
    threshold: float | None = None,
    positive_index: int = 1,
) -> dict[str, Any]:
    """Every summary metric a run reports for one split, as a JSON-ready dictionary.

    Predictions are the argmax of ``probabilities`` (the first class on ties), except for a binary problem with a
    ``threshold``, where a sample is predicted as ``positive_index`` when ``p[:, positive_index] >= threshold``.

    Binary problems (K == 2) report precision, recall, F1 and sensitivity of the positive class, specificity (the
    recall of the negative class) and the ROC AUC of ``p[:, positive_index]``. Multi-class problems report macro
    averages instead, the one-vs-rest macro AUC and the macro one-vs-rest specificity.

    Macro averages of precision, recall, F1 and specificity run over the classes present in ``y_true`` or in the
    predictions, as scikit-learn's ``average="macro"`` does without ``labels``: a class that never occurs and is
    never predicted has nothing to score. Macro AUC runs over the classes whose one-vs-rest AUC is defined (present
    in ``y_true`` alongside some other class); it equals scikit-learn's ``roc_auc_score(multi_class="ovr",
    average="macro")`` when every class is present. Balanced accuracy equals scikit-learn's
    ``balanced_accuracy_score``: mean recall over the classes present in ``y_true``.

    Args:
        y_true: true class indices, shape (N,), values in ``[0, K)``.
        probabilities: class probabilities, shape (N, K) with K >= 2, rows summing to 1.
        label_names: a name per class (keys of ``per_class``); defaults to ``"0"``, ``"1"``, ...
        threshold: binary operating point on ``p[:, positive_index]``; ``None`` uses the argmax.
        positive_index: the positive class of a binary problem; ignored for multi-class problems.

    Returns:
        A dictionary with plain Python values (see the module docstring for the keys). Undefined AUCs are NaN;
        pass the result through :func:`to_jsonable` before writing JSON.

    Raises:
        ValueError: if the inputs are empty, of inconsistent shapes, not finite, the rows of ``probabilities`` do
            not sum to 1, ``label_names`` has the wrong length or repeats a name, ``positive_index`` is not 0 or 1
            for a binary problem, or a ``threshold`` is given for a multi-class problem.
    """
    probability_matrix = np.asarray(probabilities, dtype=np.float64)
    if probability_matrix.ndim != 2 or probability_matrix.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {probability_matrix.shape}")
    sample_count, num_classes = probability_matrix.shape
    if sample_count == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.all(np.isfinite(probability_matrix)):
        raise ValueError("probabilities contain NaN or infinite values")
    largest_row_error = float(np.max(np.abs(probability_matrix.sum(axis=1) - 1.0)))
    if largest_row_error > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"rows of probabilities must sum to 1 (largest deviation {largest_row_error:.3g}); "
            "apply a softmax to logits first"
        )
    true_indices = _as_class_indices(y_true, num_classes, "y_true")
    if true_indices.shape[0] != sample_count:
        raise ValueError(f"y_true has {true_indices.shape[0]} samples but probabilities has {sample_count}")
    names = _resolve_label_names(label_names, num_classes)
    is_binary = num_classes == 2
    if is_binary and positive_index not in (0, 1):
        raise ValueError(f"positive_index must be 0 or 1 for a binary problem, got {positive_index}")
    if threshold is not None and not is_binary:
        raise ValueError(f"a threshold applies only to binary problems; this one has {num_classes} classes")

    if threshold is not None:
        negative_index = 1 - positive_index
        predicted_indices = np.where(
            probability_matrix[:, positive_index] >= threshold, positive_index, negative_index
        ).astype(np.int64)
    else:
        predicted_indices = np.argmax(probability_matrix, axis=1).astype(np.int64)

    counts = confusion_matrix(true_indices, predicted_indices, num_classes)
    per_class_scores = _per_class_scores(counts)
    per_class_auc = np.array(
        [
            _one_vs_rest_auc(true_indices, probability_matrix[:, class_index], class_index)
            for class_index in range(num_classes)
        ]
    )
    undefined_auc_names = [names[class_index] for class_index in np.flatnonzero(np.isnan(per_class_auc))]
    if undefined_auc_names:
        logger.warning(
            "ROC AUC undefined (class absent from y_true, or the only class present) for: %s; reported as null.",
            ", ".join(undefined_auc_names),
        )
    support = counts.sum(axis=1)
    predicted_counts = counts.sum(axis=0)
    # Classes that occur or are predicted: the label set scikit-learn averages over by default.
    averaged_classes = (support > 0) | (predicted_counts > 0)
    present_classes = support > 0

    precision_macro = float(per_class_scores["precision"][averaged_classes].mean())
    recall_macro = float(per_class_scores["recall"][averaged_classes].mean())
    f1_macro = float(per_class_scores["f1"][averaged_classes].mean())
    specificity_macro = float(per_class_scores["specificity"][averaged_classes].mean())
    auc_macro = _nan_mean(per_class_auc)
    balanced_accuracy = float(per_class_scores["recall"][present_classes].mean()) if present_classes.any() else 0.0

    if is_binary:
        negative_index = 1 - positive_index
        precision = float(per_class_scores["precision"][positive_index])
        recall = float(per_class_scores["recall"][positive_index])
        f1 = float(per_class_scores["f1"][positive_index])
        specificity = float(per_class_scores["recall"][negative_index])
        auc = float(per_class_auc[positive_index])
        positive_label: str | None = names[positive_index]
    else:
        precision, recall, f1 = precision_macro, recall_macro, f1_macro
        specificity = specificity_macro
        auc = auc_macro
        positive_label = None

    per_class = {
        name: {
            "precision": float(per_class_scores["precision"][class_index]),
            "recall": float(per_class_scores["recall"][class_index]),
            "f1": float(per_class_scores["f1"][class_index]),
            "specificity": float(per_class_scores["specificity"][class_index]),
            "auc": float(per_class_auc[class_index]),
            "support": int(support[class_index]),
        }
        for class_index, name in enumerate(names)
    }
    return {
        "n": int(sample_count),
        "accuracy": float(np.trace(counts) / sample_count),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": auc,
        "sensitivity": recall,
        "specificity": specificity,
        "confusion_matrix": counts.tolist(),
        "precision_macro": precision_macro,
        "recall_macro": recall_macro,
        "f1_macro": f1_macro,
        "auc_macro": auc_macro,
        "balanced_accuracy": balanced_accuracy,
        "per_class": per_class,
        "threshold": None if threshold is None else float(threshold),
        "positive_label": positive_label,
        "label_names": list(names),
    }


def to_jsonable(value: Any) -> Any:
    """Turn a nested structure of metrics into plain JSON values.

    NumPy scalars and arrays become Python numbers and lists, tuples become lists, and NaN or infinite floats become
    ``None`` (JSON has no NaN, and ``json.dumps`` would otherwise write the invalid token ``NaN``).

    Args:
        value: a number, string, ``None``, NumPy value, or a mapping/sequence of these (nested to any depth).

    Returns:
        The same structure made of ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``.

    Raises:
        TypeError: for a value of any other type.
    """
    if isinstance(value, np.ndarray):
        return [to_jsonable(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    raise TypeError(f"cannot convert a value of type {type(value).__name__} to JSON")


def _as_class_indices(values: ArrayLike, num_classes: int, name: str) -> np.ndarray:
    """Validate a 1-D array of class indices and return it as int64."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    indices = array.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(
            f"{name} holds class indices outside [0, {num_classes}): min {indices.min()}, max {indices.max()}"
        )
    return indices


def _validate_binary_inputs(y_true_binary: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check binary labels and scores; return labels as float64 0/1 and scores as a 1-D array."""
    labels = np.asarray(y_true_binary)
    scores_array = np.asarray(scores)
    if labels.ndim != 1 or scores_array.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores_array.shape}")
    if labels.shape[0] != scores_array.shape[0]:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} and {scores_array.shape[0]}")
    if labels.shape[0] == 0:
        raise ValueError("labels and scores are empty")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"binary labels must be 0/1, got values {np.unique(labels)[:10].tolist()}")
    if not np.issubdtype(scores_array.dtype, np.number) or not np.all(np.isfinite(scores_array)):
        raise ValueError("scores must be finite numbers")
    return labels.astype(np.float64), scores_array


def _cumulative_counts_at_thresholds(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive counts at each distinct score, highest score first.

    Mirrors scikit-learn's ``confusion_matrix_at_thresholds``: entry ``i`` counts samples with
    ``score >= thresholds[i]``, one entry per distinct score value, so tied samples enter together.
    """
    descending_order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[descending_order]
    sorted_labels = labels[descending_order]
    # The last index of each run of equal scores, plus the final sample.
    threshold_indices = np.concatenate([np.flatnonzero(np.diff(sorted_scores)), [sorted_labels.shape[0] - 1]])
    true_positives = np.cumsum(sorted_labels, dtype=np.float64)[threshold_indices]
    false_positives = 1.0 + threshold_indices.astype(np.float64) - true_positives
    return false_positives, true_positives, sorted_scores[threshold_indices].astype(np.float64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division giving 0.0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def _per_class_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and one-vs-rest specificity of every class from a confusion matrix."""
    true_positives = np.diag(counts)
    false_positives = counts.sum(axis=0) - true_positives
    false_negatives = counts.sum(axis=1) - true_positives
    true_negatives = counts.sum() - true_positives - false_positives - false_negatives
    return {
        "precision": _safe_divide(true_positives, true_positives + false_positives),
        "recall": _safe_divide(true_positives, true_positives + false_negatives),
        # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall and is 0, not 0/0, when TP is 0.
        "f1": _safe_divide(2 * true_positives, 2 * true_positives + false_positives + false_negatives),
        "specificity": _safe_divide(true_negatives, true_negatives + false_positives),
    }


def _one_vs_rest_auc(true_indices: np.ndarray, class_scores: np.ndarray, class_index: int) -> float:
    """ROC AUC of one class against all others; NaN when the class or the rest is absent (the caller logs it)."""
    is_class = true_indices == class_index
    if is_class.all() or not is_class.any():
        return math.nan
    return roc_auc(is_class, class_scores)


def _nan_mean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _resolve_label_names(label_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """Default or validate the class names."""
    if label_names is None:
        return [str(class_index) for class_index in range(num_classes)]
    names = [str(name) for name in label_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} label names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique, got {names}")
    return names
