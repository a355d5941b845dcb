"""Bootstrap confidence intervals for every metric of a split, vectorised over resamples.

A resample is represented by its vector of counts (how often each sample was drawn) rather than by a copy of the
data, so that all metrics of all resamples are weighted sums computed at once: the confusion matrices of every
resample are one matrix product, the ROC AUCs one sort (shared by all resamples) and a cumulative sum. 1,000
resamples of a 624-image test set take a few milliseconds per metric family.

Method: the non-parametric bootstrap with percentile intervals (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13). Resampling is stratified by true class by default: each class is resampled with
replacement to its own size, as is usual for ROC analysis (Carpenter & Bithell, "Bootstrap confidence intervals:
when, which, what?", Statistics in Medicine 19:1141, 2000). Stratification keeps every resample's class counts equal
to the observed ones, so an AUC or a sensitivity is defined in every resample; it treats the class counts as fixed
by design (case-control style), which is how a test set with a set number of cases is usually read.

Deviations and limits: the percentile interval is not bias-corrected (BCa); for AUCs near 1 on small test sets it can
be slightly too narrow. The operating threshold and the calibration temperature are treated as fixed (they were fitted
on the validation split, not on the data being resampled). Correlated samples (several images of one patient) make
every bootstrap interval too narrow; resampling by patient is not done here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medxai.evaluate.calibration import brier_score_terms, calibration_bin_indices, top_label_or_class

__all__ = [
    "BootstrapSamples",
    "SCALAR_METRICS",
    "PER_CLASS_METRICS",
    "resample_counts",
    "bootstrap_metric_samples",
    "percentile_interval",
    "bootstrap_confidence_intervals",
    "bootstrap_calibration_intervals",
]

logger = logging.getLogger(__name__)

# The scalar keys of ``classification_metrics`` that get an interval (``n`` and ``threshold`` are not estimates).
SCALAR_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "auc",
    "sensitivity",
    "specificity",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "auc_macro",
    "balanced_accuracy",
)
PER_CLASS_METRICS = ("precision", "recall", "f1", "specificity", "auc")

# Resamples are processed in chunks so that the (chunk, N) count matrix stays near this many entries (~32 MB).
_CHUNK_ENTRIES = 4_000_000
# An interval is reported only when at least this fraction of resamples gave a finite value.
_MIN_FINITE_FRACTION = 0.5


@dataclass(frozen=True)
class BootstrapSamples:
    """The value of every metric in every resample.

    Attributes:
        overall: metric name -> array (B,), one value per resample (keys of :data:`SCALAR_METRICS`).
        per_class: metric name -> array (B, K), one-vs-rest values per class (keys of :data:`PER_CLASS_METRICS`).
    """

    overall: dict[str, np.ndarray]
    per_class: dict[str, np.ndarray]


def resample_counts(
    y_true: ArrayLike, resamples: int = 1000, *, seed: int = 0, stratified: bool = True
) -> Iterator[np.ndarray]:
    """Draw bootstrap resamples as count vectors, in chunks.

    Args:
        y_true: class indices, shape (N,); used for stratification and for N.
        resamples: number of resamples B.
        seed: seed of the NumPy generator; the same seed gives the same resamples.
        stratified: resample each class to its own size (True) or all N samples together (False).

    Yields:
        float64 arrays of shape (b, N) whose rows sum to N; entry ``[r, i]`` is how many times sample ``i`` was drawn
        in resample ``r``. The chunks together hold ``resamples`` rows; the chunk size depends only on N, so the
        sequence is reproducible.
    """
    labels = np.asarray(y_true).astype(np.int64).ravel()
    sample_count = labels.shape[0]
    if sample_count == 0:
        raise ValueError("cannot bootstrap zero samples")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    generator = np.random.default_rng(seed)
    if stratified:
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    else:
        groups = [np.arange(sample_count)]
    chunk = max(1, min(resamples, _CHUNK_ENTRIES // sample_count))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        offsets = (np.arange(size, dtype=np.int64) * sample_count)[:, None]
        drawn = np.concatenate(
            [members[generator.integers(0, members.shape[0], size=(size, members.shape[0]))] for members in groups],
            axis=1,
        )
        counts = np.bincount((drawn + offsets).ravel(), minlength=size * sample_count)
        yield counts.reshape(size, sample_count).astype(np.float64)


def bootstrap_metric_samples(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    threshold: float | None = None,
    positive_index: int = 1,
    resamples: int = 1000,
    seed: int = 0,
    stratified: bool = True,
) -> BootstrapSamples:
    """Every metric of :func:`medxai.evaluate.classification_metrics` on each of ``resamples`` bootstrap resamples.

    The values of one resample equal what ``classification_metrics`` returns on the resampled data (same prediction
    rule, same zero-division and macro-averaging conventions); the tests check this.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K), K >= 2.
        threshold: binary operating point on ``p[:, positive_index]``; None predicts the argmax.
        positive_index: the positive class of a binary problem.
        resamples: number of bootstrap resamples B.
        seed: seed of the resampling.
        stratified: resample within each true class (see the module docstring).

    Returns:
        A :class:`BootstrapSamples` with arrays of B values per metric.
    """
    labels, probability_matrix = _validate(y_true, probabilities)
    num_classes = probability_matrix.shape[1]
    is_binary = num_classes == 2
    if threshold is not None and not is_binary:
        raise ValueError(f"a threshold applies only to binary problems; this one has {num_classes} classes")
    if threshold is not None:
        predicted = np.where(probability_matrix[:, positive_index] >= threshold, positive_index, 1 - positive_index)
    else:
        predicted = np.argmax(probability_matrix, axis=1)
    pair_indicator = np.zeros((labels.shape[0], num_classes * num_classes))
    pair_indicator[np.arange(labels.shape[0]), labels * num_classes + predicted] = 1.0
    # Every class gets its own sort, even in a binary task where p_0 = 1 - p_1 in exact arithmetic: float rounding
    # can tie two scores in one column and not in the other, and the intervals should match classification_metrics.
    auc_plans = [
        _AucPlan(labels == class_index, probability_matrix[:, class_index]) for class_index in range(num_classes)
    ]

    overall_chunks: list[dict[str, np.ndarray]] = []
    per_class_chunks: list[dict[str, np.ndarray]] = []
    for counts in resample_counts(labels, resamples, seed=seed, stratified=stratified):
        confusion = (counts @ pair_indicator).reshape(-1, num_classes, num_classes)
        per_class_auc = np.stack([plan.auc(counts) for plan in auc_plans], axis=1)
        overall, per_class = _metrics_from_confusion(confusion, per_class_auc, is_binary, positive_index)
        overall_chunks.append(overall)
        per_class_chunks.append(per_class)
    return BootstrapSamples(
        overall={key: np.concatenate([chunk[key] for chunk in overall_chunks]) for key in overall_chunks[0]},
        per_class={key: np.concatenate([chunk[key] for chunk in per_class_chunks]) for key in per_class_chunks[0]},
    )


def percentile_interval(samples: ArrayLike, confidence: float = 0.95) -> tuple[float, float] | None:
    """The percentile bootstrap interval of one metric.

    Args:
        samples: the metric's value in each resample; NaN marks a resample where it was undefined.
        confidence: the nominal coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``(low, high)``, or None when fewer than half of the resamples gave a finite value.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    values = np.asarray(samples, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < _MIN_FINITE_FRACTION * values.size:
        return None
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_confidence_intervals(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    label_names: Sequence[str] | None = None,
    threshold: float | None = None,
    positive_index: int = 1,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for every scalar and per-class metric of a split.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        label_names: a name per class (keys of ``per_class``); defaults to ``"0"``, ``"1"``, ...
        threshold: binary operating point, as in :func:`~medxai.evaluate.classification_metrics`.
        positive_index: the positive class of a binary problem.
        resamples: number of resamples (1,000 or more for 95% intervals).
        confidence: nominal coverage of the intervals.
        seed: seed of the resampling.
        stratified: resample within each true class.

    Returns:
        ``{"overall": {metric: [low, high] | None}, "per_class": {label: {metric: [low, high] | None}}}``; None marks
        a metric that is undefined in most resamples (an AUC with one class present).
    """
    samples = bootstrap_metric_samples(
        y_true,
        probabilities,
        threshold=threshold,
        positive_index=positive_index,
        resamples=resamples,
        seed=seed,
        stratified=stratified,
    )
    num_classes = next(iter(samples.per_class.values())).shape[1]
    names = [str(name) for name in label_names] if label_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} label names for {num_classes} classes")
    overall = {key: _as_list(percentile_interval(values, confidence)) for key, values in samples.overall.items()}
    per_class = {
        name: {
            key: _as_list(percentile_interval(values[:, index], confidence))
            for key, values in samples.per_class.items()
        }
        for index, name in enumerate(names)
    }
    return {"overall": overall, "per_class": per_class}


def bootstrap_calibration_intervals(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    class_index: int | None = None,
    positive_index: int = 1,
    n_bins: int = 15,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of the expected calibration error and the Brier score.

    Both are weighted means over samples (the ECE over bins), so every resample is a matrix product. The definitions
    are those of :func:`~medxai.evaluate.calibration.expected_calibration_error` (with ``class_index`` and
    ``n_bins``) and :func:`~medxai.evaluate.calibration.brier_score` (with ``positive_index``).

    Returns:
        ``{"ece": [low, high], "brier": [low, high]}``.
    """
    labels, probability_matrix = _validate(y_true, probabilities)
    confidence_values, outcome = top_label_or_class(labels, probability_matrix, class_index)
    bins = calibration_bin_indices(confidence_values, n_bins)
    bin_indicator = np.zeros((labels.shape[0], n_bins))
    bin_indicator[np.arange(labels.shape[0]), bins] = 1.0
    gap_terms = bin_indicator * (outcome - confidence_values)[:, None]
    squared_errors = brier_score_terms(labels, probability_matrix, positive_index)
    ece_chunks, brier_chunks = [], []
    for counts in resample_counts(labels, resamples, seed=seed, stratified=stratified):
        totals = counts.sum(axis=1)
        # ECE = sum over bins of |sum_{i in bin} w_i (outcome_i - confidence_i)| / sum w.
        ece_chunks.append(np.abs(counts @ gap_terms).sum(axis=1) / totals)
        brier_chunks.append(counts @ squared_errors / totals)
    return {
        "ece": _as_list(percentile_interval(np.concatenate(ece_chunks), confidence)),
        "brier": _as_list(percentile_interval(np.concatenate(brier_chunks), confidence)),
    }


# -- machinery ---------------------------------------------------------------------------------------------------
class _AucPlan:
    """One sort of the scores, reused to compute the weighted ROC AUC of any number of resamples.

    With weights ``w`` (draw counts), the AUC is the weighted Mann-Whitney statistic
    ``sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos W_neg)``, which equals the trapezoid area
    under the ROC curve of the resampled data (ties counted as one half, as scikit-learn does).
    """

    def __init__(self, is_positive: np.ndarray, scores: np.ndarray) -> None:
        order = np.argsort(scores, kind="stable")
        sorted_scores = scores[order]
        self._order = order
        self._positive = is_positive[order].astype(np.float64)
        self._group_starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1])
        self._defined = bool(is_positive.any() and not is_positive.all())

    def auc(self, counts: np.ndarray) -> np.ndarray:
        if not self._defined:
            return np.full(counts.shape[0], math.nan)
        weights = counts[:, self._order]
        positive_weights = weights * self._positive
        negative_weights = weights - positive_weights
        if self._group_starts.shape[0] < weights.shape[1]:  # tied scores: sum each group of equal scores
            positive_weights = np.add.reduceat(positive_weights, self._group_starts, axis=1)
            negative_weights = np.add.reduceat(negative_weights, self._group_starts, axis=1)
        negatives_below = np.cumsum(negative_weights, axis=1) - negative_weights
        numerator = (positive_weights * (negatives_below + 0.5 * negative_weights)).sum(axis=1)
        denominator = positive_weights.sum(axis=1) * negative_weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), math.nan)


def _metrics_from_confusion(
    confusion: np.ndarray, per_class_auc: np.ndarray, is_binary: bool, positive_index: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The metrics of ``classification_metrics`` from a stack of confusion matrices (B, K, K)."""
    true_positives = np.diagonal(confusion, axis1=1, axis2=2)
    predicted_counts = confusion.sum(axis=1)
    support = confusion.sum(axis=2)
    total = confusion.sum(axis=(1, 2))
    false_positives = predicted_counts - true_positives
    false_negatives = support - true_positives
    true_negatives = total[:, None] - true_positives - false_positives - false_negatives
    precision = _safe_divide(true_positives, true_positives + false_positives)
    recall = _safe_divide(true_positives, true_positives + false_negatives)
    f1 = _safe_divide(2 * true_positives, 2 * true_positives + false_positives + false_negatives)
    specificity = _safe_divide(true_negatives, true_negatives + false_positives)

    averaged = (support > 0) | (predicted_counts > 0)
    present = support > 0
    macro = {name: _masked_mean(values, averaged) for name, values in
             (("precision", precision), ("recall", recall), ("f1", f1), ("specificity", specificity))}
    finite_auc = np.isfinite(per_class_auc)
    auc_macro = _masked_mean(np.where(finite_auc, per_class_auc, 0.0), finite_auc, empty=math.nan)
    overall = {
        "accuracy": np.trace(confusion, axis1=1, axis2=2) / total,
        "precision_macro": macro["precision"],
        "recall_macro": macro["recall"],
        "f1_macro": macro["f1"],
        "auc_macro": auc_macro,
        "balanced_accuracy": _masked_mean(recall, present),
    }
    if is_binary:
        overall.update(
            precision=precision[:, positive_index],
            recall=recall[:, positive_index],
            f1=f1[:, positive_index],
            auc=per_class_auc[:, positive_index],
            specificity=recall[:, 1 - positive_index],
        )
    else:
        overall.update(
            precision=macro["precision"], recall=macro["recall"], f1=macro["f1"], auc=auc_macro,
            specificity=macro["specificity"],
        )
    overall["sensitivity"] = overall["recall"]
    per_class = {"precision": precision, "recall": recall, "f1": f1, "specificity": specificity, "auc": per_class_auc}
    return {key: overall[key] for key in SCALAR_METRICS}, per_class


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator != 0)


def _masked_mean(values: np.ndarray, mask: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Mean of ``values`` over the True entries of ``mask``, row by row; ``empty`` where a row has none."""
    kept = mask.sum(axis=1)
    sums = np.where(mask, values, 0.0).sum(axis=1)
    return np.divide(sums, kept, out=np.full(sums.shape, empty, dtype=np.float64), where=kept > 0)


def _validate(y_true: ArrayLike, probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    probability_matrix = np.asarray(probabilities, dtype=np.float64)
    if probability_matrix.ndim != 2 or probability_matrix.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {probability_matrix.shape}")
    if not np.all(np.isfinite(probability_matrix)):
        raise ValueError("probabilities contain NaN or infinite values")
    labels = np.asarray(y_true)
    if labels.ndim != 1 or labels.shape[0] != probability_matrix.shape[0]:
        raise ValueError(f"y_true must have shape ({probability_matrix.shape[0]},), got {labels.shape}")
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    labels = labels.astype(np.int64)
    if labels.size == 0:
        raise ValueError("cannot bootstrap zero samples")
    if labels.min() < 0 or labels.max() >= probability_matrix.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {probability_matrix.shape[1]})")
    return labels, probability_matrix


def _as_list(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]
