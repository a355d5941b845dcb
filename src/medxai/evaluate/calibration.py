"""Calibration: does a predicted probability of 0.9 come true 90% of the time?

- :class:`TemperatureScaler` learns one temperature ``T`` that divides the logits before the softmax (Guo, Pleiss,
  Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017). It changes no decision made by the argmax
  (the ranking of classes is kept, and so is every ROC AUC), only how confident the probabilities are. Fit it on the
  validation split, never on the test split.
- :func:`expected_calibration_error` (ECE; Naeini, Cooper & Hauskrecht, AAAI 2015, in the form of Guo et al. 2017):
  the sample-weighted mean gap between confidence and observed frequency over equal-width confidence bins.
- :func:`brier_score` (Brier, Monthly Weather Review 78:1, 1950): the mean squared error of the probabilities.
- :func:`reliability_curve`: the points of a reliability diagram (DeGroot & Fienberg 1983), the ECE's picture.

Two ways of reading a probability are supported by ``class_index``. ``None`` is Guo et al.'s *top-label* reading:
the confidence is the largest probability and the outcome whether that class was right. An integer reads one class's
probability against how often that class is the truth; for a binary task, with the positive class, this answers the
clinician's question ("of the films given 0.9 for pneumonia, how many had pneumonia?") and covers the whole [0, 1]
range, where the top-label confidence of a binary model never falls below 0.5.

The ECE depends on the number of bins and is biased upwards on small samples (Kumar, Liang & Ma, NeurIPS 2019);
report it with its bin count and, ideally, a bootstrap interval (:mod:`medxai.evaluate.bootstrap`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

__all__ = [
    "TemperatureScaler",
    "ReliabilityCurve",
    "expected_calibration_error",
    "brier_score",
    "reliability_curve",
    "DEFAULT_BINS",
]

logger = logging.getLogger(__name__)

DEFAULT_BINS = 15  # Guo et al. 2017 use 15 equal-width bins


class TemperatureScaler:
    """Temperature scaling (Guo et al. 2017) in the estimator style: parameters in ``__init__``, ``fit`` learns.

    ``fit`` minimises the mean negative log-likelihood (cross-entropy) of ``softmax(logits / T)`` over ``T`` with
    L-BFGS. The optimisation runs on ``log T``, which keeps ``T`` positive without constraints; the NLL is convex in
    ``1 / T`` so the one-dimensional problem has a single minimum.

    Deviations from the paper: when the model classifies every validation sample correctly, the NLL keeps falling as
    ``T -> 0`` and has no finite minimum; sharpening the model into certainty on such evidence would be wrong, so
    ``temperature_`` stays 1.0 and a warning says so. Otherwise ``T`` is kept within ``bounds`` (a warning says when
    a bound is reached, e.g. ``T -> inf`` for a model no better than chance).

    Args:
        initial_temperature: the starting point of the optimisation.
        max_iter: maximum L-BFGS iterations.
        bounds: the smallest and largest temperature allowed.

    Attributes:
        temperature_: the fitted temperature (logits are divided by it).
        nll_before_: validation NLL at ``T = 1``.
        nll_after_: validation NLL at ``temperature_``.
    """

    def __init__(
        self, initial_temperature: float = 1.0, max_iter: int = 100, bounds: tuple[float, float] = (0.01, 100.0)
    ) -> None:
        self.initial_temperature = initial_temperature
        self.max_iter = max_iter
        self.bounds = bounds

    def fit(self, logits: ArrayLike | torch.Tensor, labels: ArrayLike | torch.Tensor) -> TemperatureScaler:
        """Learn ``temperature_`` from validation logits and their true labels.

        Args:
            logits: shape (N, K), the model's raw outputs.
            labels: true class indices, shape (N,).

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: on empty or inconsistent inputs, non-finite logits or bad parameters.
        """
        low, high = self.bounds
        if not 0.0 < low < high or not 0.0 < self.initial_temperature:
            raise ValueError(f"need 0 < bounds[0] < bounds[1] and a positive initial temperature, got {self.bounds}, "
                             f"{self.initial_temperature}")
        logit_tensor, label_tensor = _as_logits_and_labels(logits, labels)
        with torch.no_grad():
            self.nll_before_ = float(F.cross_entropy(logit_tensor, label_tensor))
        if bool((logit_tensor.argmax(dim=1) == label_tensor).all()):
            logger.warning(
                "every validation sample is classified correctly: the likelihood has no finite optimum (T -> 0); "
                "the temperature stays 1.0"
            )
            self.temperature_, self.nll_after_ = 1.0, self.nll_before_
            return self
        log_temperature = torch.tensor(math.log(self.initial_temperature), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_temperature], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
            tolerance_grad=1e-10, tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logit_tensor / log_temperature.exp(), label_tensor)
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = float(log_temperature.detach().exp())
        if not math.isfinite(fitted):
            fitted = high if log_temperature.detach() > 0 else low
        clamped = min(max(fitted, low), high)
        if clamped != fitted:
            logger.warning(
                "temperature %.3g is outside %s and was clamped to %.3g", fitted, self.bounds, clamped,
            )
        with torch.no_grad():
            self.nll_after_ = float(F.cross_entropy(logit_tensor / clamped, label_tensor))
        self.temperature_ = clamped
        logger.info("temperature %.4f: validation NLL %.4f -> %.4f", clamped, self.nll_before_, self.nll_after_)
        return self

    def transform(self, logits: ArrayLike | torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits ``logits / temperature_`` (float64 tensor)."""
        return _as_tensor(logits) / self._fitted_temperature()

    def predict_proba(self, logits: ArrayLike | torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)`` as a float64 array (N, K)."""
        return torch.softmax(self.transform(logits), dim=1).numpy()

    def _fitted_temperature(self) -> float:
        if not hasattr(self, "temperature_"):
            raise RuntimeError("TemperatureScaler is not fitted yet; call fit(logits, labels) first")
        return self.temperature_

    def __repr__(self) -> str:
        fitted = f", temperature_={self.temperature_:.4g}" if hasattr(self, "temperature_") else ""
        return f"TemperatureScaler(initial_temperature={self.initial_temperature}, max_iter={self.max_iter}{fitted})"


@dataclass(frozen=True)
class ReliabilityCurve:
    """The points of a reliability diagram.

    Attributes:
        bin_edges: (n_bins + 1,) edges of the equal-width bins on [0, 1]; bin ``m`` is ``(edges[m], edges[m+1]]``
            (the first bin also holds 0).
        mean_confidence: (n_bins,) mean predicted probability in each bin; NaN for an empty bin.
        observed_frequency: (n_bins,) fraction of the bin's samples whose outcome came true; NaN for an empty bin.
        counts: (n_bins,) samples per bin.
    """

    bin_edges: np.ndarray
    mean_confidence: np.ndarray
    observed_frequency: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """The expected calibration error these bins give."""
        filled = self.counts > 0
        gaps = np.abs(self.observed_frequency[filled] - self.mean_confidence[filled])
        return float((self.counts[filled] * gaps).sum() / self.counts.sum())


def reliability_curve(
    y_true: ArrayLike, probabilities: ArrayLike, *, n_bins: int = DEFAULT_BINS, class_index: int | None = None
) -> ReliabilityCurve:
    """Bin the predictions by confidence and compare each bin's mean confidence with its observed frequency.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        n_bins: number of equal-width bins on [0, 1].
        class_index: None for the top-label reading (confidence = max probability, outcome = argmax correct), or a
            class whose probability is read against how often it is the true class (see the module docstring).

    Returns:
        A :class:`ReliabilityCurve`.
    """
    labels, probability_matrix = _validate(y_true, probabilities)
    confidence, outcome = top_label_or_class(labels, probability_matrix, class_index)
    bins = calibration_bin_indices(confidence, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    outcome_sums = np.bincount(bins, weights=outcome, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / np.maximum(counts, 1), np.nan)
        observed = np.where(counts > 0, outcome_sums / np.maximum(counts, 1), np.nan)
    return ReliabilityCurve(np.linspace(0.0, 1.0, n_bins + 1), mean_confidence, observed, counts.astype(np.int64))


def expected_calibration_error(
    y_true: ArrayLike, probabilities: ArrayLike, *, n_bins: int = DEFAULT_BINS, class_index: int | None = None
) -> float:
    """Expected calibration error: ``sum_m |B_m| / N * |frequency(B_m) - confidence(B_m)|``.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        n_bins: number of equal-width bins on [0, 1] (15 in Guo et al. 2017).
        class_index: None for the top-label ECE of Guo et al.; a class index for that class's ECE (binary tasks:
            the positive class).

    Returns:
        The ECE in [0, 1]; 0 is perfect calibration.
    """
    return reliability_curve(y_true, probabilities, n_bins=n_bins, class_index=class_index).ece


def brier_score(y_true: ArrayLike, probabilities: ArrayLike, *, positive_index: int = 1) -> float:
    """Brier score: the mean squared difference between predicted probabilities and outcomes.

    Binary tasks (K == 2) use the usual binary form ``mean((p_positive - y_positive)^2)`` in [0, 1], as
    ``sklearn.metrics.brier_score_loss``; multi-class tasks use Brier's original form
    ``mean(sum_k (p_k - [y == k])^2)`` in [0, 2] (for K == 2 it would be twice the binary form).

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        positive_index: the positive class of a binary task; ignored for multi-class tasks.

    Returns:
        The Brier score; 0 is perfect.
    """
    labels, probability_matrix = _validate(y_true, probabilities)
    return float(brier_score_terms(labels, probability_matrix, positive_index).mean())


# -- shared with the bootstrap -----------------------------------------------------------------------------------
def top_label_or_class(
    labels: np.ndarray, probability_matrix: np.ndarray, class_index: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (confidence, outcome 0/1) for the top-label reading (None) or one class's reading."""
    if class_index is None:
        predicted = probability_matrix.argmax(axis=1)
        return probability_matrix.max(axis=1), (predicted == labels).astype(np.float64)
    if not 0 <= class_index < probability_matrix.shape[1]:
        raise ValueError(f"class_index {class_index} is outside [0, {probability_matrix.shape[1]})")
    return probability_matrix[:, class_index], (labels == class_index).astype(np.float64)


def calibration_bin_indices(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the bin ``(m / n_bins, (m + 1) / n_bins]`` holding each confidence (0 goes to the first bin)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    interior_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(interior_edges, np.clip(confidence, 0.0, 1.0), side="left").astype(np.int64)


def brier_score_terms(labels: np.ndarray, probability_matrix: np.ndarray, positive_index: int = 1) -> np.ndarray:
    """Per-sample squared errors whose mean is :func:`brier_score`."""
    num_classes = probability_matrix.shape[1]
    if num_classes == 2:
        if positive_index not in (0, 1):
            raise ValueError(f"positive_index must be 0 or 1 for a binary problem, got {positive_index}")
        return (probability_matrix[:, positive_index] - (labels == positive_index)) ** 2
    one_hot = np.eye(num_classes)[labels]
    return ((probability_matrix - one_hot) ** 2).sum(axis=1)


def _validate(y_true: ArrayLike, probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    probability_matrix = np.asarray(probabilities, dtype=np.float64)
    if probability_matrix.ndim != 2 or probability_matrix.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {probability_matrix.shape}")
    if probability_matrix.shape[0] == 0:
        raise ValueError("cannot measure calibration on zero samples")
    if not np.all(np.isfinite(probability_matrix)):
        raise ValueError("probabilities contain NaN or infinite values")
    labels = np.asarray(y_true).astype(np.int64).ravel()
    if labels.shape[0] != probability_matrix.shape[0]:
        raise ValueError(f"y_true has {labels.shape[0]} samples but probabilities has {probability_matrix.shape[0]}")
    if labels.min() < 0 or labels.max() >= probability_matrix.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {probability_matrix.shape[1]})")
    return labels, probability_matrix


def _as_tensor(values: ArrayLike | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _as_logits_and_labels(
    logits: ArrayLike | torch.Tensor, labels: ArrayLike | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logit_tensor = _as_tensor(logits)
    label_tensor = labels.detach().cpu().long() if isinstance(labels, torch.Tensor) else torch.as_tensor(
        np.asarray(labels).astype(np.int64)
    )
    if logit_tensor.ndim != 2 or logit_tensor.shape[1] < 2 or logit_tensor.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, K) with N >= 1 and K >= 2, got {tuple(logit_tensor.shape)}")
    if label_tensor.shape != (logit_tensor.shape[0],):
        raise ValueError(f"labels must have shape ({logit_tensor.shape[0]},), got {tuple(label_tensor.shape)}")
    if not bool(torch.isfinite(logit_tensor).all()):
        raise ValueError("logits contain NaN or infinite values")
    if int(label_tensor.min()) < 0 or int(label_tensor.max()) >= logit_tensor.shape[1]:
        raise ValueError(f"labels hold class indices outside [0, {logit_tensor.shape[1]})")
    return logit_tensor, label_tensor
