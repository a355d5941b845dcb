"""The operating threshold of a binary classifier, chosen on the validation split only.

A probability of 0.5 is an arbitrary operating point: a screening test may need a sensitivity of 0.95 whatever that
costs in specificity. Two rules are offered:

- ``"youden"``: the threshold that maximises Youden's J = sensitivity + specificity - 1 (Youden, "Index for rating
  diagnostic tests", Cancer 3:32, 1950), the point of the ROC curve farthest above the chance diagonal. Several
  thresholds can share the maximum; the one with the highest sensitivity is taken, since a missed case usually costs
  more than a false alarm in the screening settings this tool is aimed at.
- ``"sensitivity"``: the highest threshold whose sensitivity reaches ``target`` (so, of the thresholds meeting the
  target, the one with the best specificity).

The threshold is placed halfway between the chosen score and the next lower distinct score, not on the score itself:
on the data it was fitted on it classifies identically, but it does not sit on a sample (where float rounding between
a float32 softmax and a stored float64 could flip that sample) and it is the natural estimate of the cut between two
observed scores. Fitted on validation data, the target sensitivity holds there exactly and, on new data, only in
expectation: report the test-split sensitivity at the threshold with its confidence interval.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medxai.evaluate.metrics import roc_curve

__all__ = ["choose_threshold", "THRESHOLD_METHODS"]

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("youden", "sensitivity")


def choose_threshold(
    y_true: ArrayLike, scores: ArrayLike, method: str = "youden", target: float = 0.95
) -> dict[str, Any]:
    """Choose a binary operating threshold; a sample is positive when ``score >= value``.

    Args:
        y_true: 0/1 (or boolean) labels, shape (N,), 1 = positive; both classes must be present.
        scores: scores of the positive class, shape (N,) (calibrated probabilities in medxai).
        method: ``"youden"`` or ``"sensitivity"`` (see the module docstring).
        target: the sensitivity to reach with ``method="sensitivity"``, in (0, 1]; ignored by ``"youden"``.

    Returns:
        ``{"value", "method", "target", "sensitivity", "specificity", "youden_j"}``: the threshold and the
        sensitivity, specificity and J it gives on ``(y_true, scores)``; ``target`` is None for ``"youden"``.

    Raises:
        ValueError: for an unknown method, a target outside (0, 1], or labels with one class only.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if method == "sensitivity" and not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    labels = np.asarray(y_true).astype(np.int64)
    score_array = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.size == 0 or labels.min() == labels.max():
        raise ValueError("choosing a threshold needs 1-D labels with both classes present")
    # Every distinct score is a candidate (no dropped points): thresholds decrease, rates increase.
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, score_array, drop_intermediate=False)
    if method == "youden":
        youden = true_positive_rate - false_positive_rate
        # argmax over the reversed array takes the last maximum: the lowest threshold, the highest sensitivity.
        chosen = len(youden) - 1 - int(np.argmax(youden[::-1]))
    else:
        # A small tolerance so that a sensitivity of exactly the target (e.g. 19/20 = 0.95) counts as met.
        meets = np.flatnonzero(true_positive_rate >= target - 1e-12)
        chosen = int(meets[0])  # the highest threshold that meets it; the last point (all positive) always does
    value = _between(thresholds, chosen)
    result = {
        "value": value,
        "method": method,
        "target": float(target) if method == "sensitivity" else None,
        "sensitivity": float(true_positive_rate[chosen]),
        "specificity": float(1.0 - false_positive_rate[chosen]),
        "youden_j": float(true_positive_rate[chosen] - false_positive_rate[chosen]),
    }
    logger.info(
        "threshold %.4g (%s): sensitivity %.3f, specificity %.3f on the data it was chosen on",
        value, method, result["sensitivity"], result["specificity"],
    )
    return result


def _between(thresholds: np.ndarray, chosen: int) -> float:
    """Halfway between the chosen score and the next lower distinct score (the score itself at the ends)."""
    score = thresholds[chosen]
    if not np.isfinite(score):  # the "nothing positive" point: just above the highest score
        return float(np.nextafter(thresholds[1], np.inf)) if len(thresholds) > 1 else 1.0
    if chosen + 1 < len(thresholds):
        return float((score + thresholds[chosen + 1]) / 2.0)
    return float(score)
