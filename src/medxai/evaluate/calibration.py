"""Calibration: does a predicted probability of 0.9 come true 90% of the time?

- :class:`TemperatureScaler` learns one temperature ``T`` that divides the logits before the softmax (Guo, Pleiss,
  Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017). It changes no decision made by the argmax
  (the ranking of classes is kept, and so is every ROC AUC), only how confident the probabilities are. Fit it on the
  validation split, never on the test split.
- :class:`LogitCalibrator` generalises it to one of :data:`CALIBRATION_METHODS`: the identity, the temperature,
  a temperature with per-class biases (Platt scaling, Platt 1999, for a binary task) or vector scaling (per-class
  scales and biases, Guo et al. 2017), and stores itself in a model card's JSON.
- :func:`expected_calibration_error` (ECE; Naeini, Cooper & Hauskrecht, AAAI 2015, in the form of Guo et al. 2017):
  the sample-weighted mean gap between confidence and observed frequency over equal-width confidence bins, or with
  ``binning="adaptive"`` over equal-mass bins (:func:`adaptive_calibration_error`; Nixon et al. 2019).
- :func:`brier_score` (Brier, Monthly Weather Review 78:1, 1950): the mean squared error of the probabilities.
- :func:`reliability_curve`: the points of a reliability diagram (DeGroot & Fienberg 1983), the ECE's picture.

Two ways of reading a probability are supported by ``class_index``. ``None`` is Guo et al.'s *top-label* reading:
the confidence is the largest probability and the outcome whether that class was right. An integer reads one class's
probability against how often that class is the truth; for a binary task, with the positive class, this answers the
clinician's question ("of the films given 0.9 for pneumonia, how many had pneumonia?") and covers the whole [0, 1]
range, where the top-label confidence of a binary model never falls below 0.5.

The ECE depends on the number of bins and is biased upwards on small samples (Kumar, Liang & Ma, NeurIPS 2019);
report it with its bin count and, ideally, a bootstrap interval (:mod:`medxai.evaluate.bootstrap`). Equal-width
bins leave most bins nearly empty when a model is confident, so its ECE then rests on a few samples; equal-mass bins
spend every bin on data, and their ECE is the less biased estimate (Nixon et al., "Measuring Calibration in Deep
Learning", CVPR Workshops 2019; Roelofs et al., "Mitigating Bias in Calibration Error Estimation", AISTATS 2022).
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
    "LogitCalibrator",
    "CALIBRATION_METHODS",
    "card_calibrator",
    "adaptive_calibration_error",
    "BINNING_SCHEMES",
    "adaptive_bin_edges",
]

logger = logging.getLogger(__name__)

DEFAULT_BINS = 15  # Guo et al. 2017 use 15 equal-width bins
#: How :func:`reliability_curve` may cut the confidences into bins: equal width on [0, 1], or equal mass.
BINNING_SCHEMES = ("uniform", "adaptive")


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
        _minimise_nll([log_temperature], lambda: logit_tensor / log_temperature.exp(), label_tensor, self.max_iter)
        clamped = _clamped_temperature(float(log_temperature.detach().exp()), self.bounds)
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
        bin_edges: (n_bins + 1,) edges of the bins on [0, 1]; bin ``m`` is ``(edges[m], edges[m+1]]`` (the first
            bin also holds its lower edge). Equal-width bins for ``binning="uniform"``; for ``"adaptive"`` the
            equal-mass edges of :func:`adaptive_bin_edges`, where ties may leave fewer than ``n_bins`` bins (none
            of them empty).
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
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    n_bins: int = DEFAULT_BINS,
    class_index: int | None = None,
    binning: str = "uniform",
) -> ReliabilityCurve:
    """Bin the predictions by confidence and compare each bin's mean confidence with its observed frequency.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        n_bins: number of bins.
        class_index: None for the top-label reading (confidence = max probability, outcome = argmax correct), or a
            class whose probability is read against how often it is the true class (see the module docstring).
        binning: ``"uniform"``, equal-width bins on [0, 1]; or ``"adaptive"``, bins of (nearly) equal sample counts
            (:func:`adaptive_bin_edges`; ties are never split, so fewer bins may result).

    Returns:
        A :class:`ReliabilityCurve`.
    """
    labels, probability_matrix = _validate(y_true, probabilities)
    confidence, outcome = top_label_or_class(labels, probability_matrix, class_index)
    if binning not in BINNING_SCHEMES:
        raise ValueError(f"unknown binning {binning!r}; known: {list(BINNING_SCHEMES)}")
    edges = uniform_bin_edges(n_bins) if binning == "uniform" else adaptive_bin_edges(confidence, n_bins)
    bins = bin_indices(confidence, edges)
    bin_count = len(edges) - 1
    counts = np.bincount(bins, minlength=bin_count)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=bin_count)
    outcome_sums = np.bincount(bins, weights=outcome, minlength=bin_count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / np.maximum(counts, 1), np.nan)
        observed = np.where(counts > 0, outcome_sums / np.maximum(counts, 1), np.nan)
    return ReliabilityCurve(edges, mean_confidence, observed, counts.astype(np.int64))


def expected_calibration_error(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    n_bins: int = DEFAULT_BINS,
    class_index: int | None = None,
    binning: str = "uniform",
) -> float:
    """Expected calibration error: ``sum_m |B_m| / N * |frequency(B_m) - confidence(B_m)|``.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        n_bins: number of bins (15 in Guo et al. 2017).
        class_index: None for the top-label ECE of Guo et al.; a class index for that class's ECE (binary tasks:
            the positive class).
        binning: ``"uniform"``, equal-width bins on [0, 1] (Guo et al. 2017); ``"adaptive"``, equal-mass bins (the
            adaptive calibration error of Nixon et al. 2019, the equal-mass ECE of Roelofs et al. 2022).

    Returns:
        The ECE in [0, 1]; 0 is perfect calibration.
    """
    return reliability_curve(y_true, probabilities, n_bins=n_bins, class_index=class_index, binning=binning).ece


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
    return bin_indices(confidence, uniform_bin_edges(n_bins))


def uniform_bin_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins + 1`` edges of equal-width bins on [0, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def bin_indices(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the bin ``(edges[m], edges[m + 1]]`` holding each confidence (the lowest edge goes to the first)."""
    return np.searchsorted(edges[1:-1], np.clip(confidence, 0.0, 1.0), side="left").astype(np.int64)


def adaptive_bin_edges(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges of equal-mass bins: the sorted confidences cut into ``n_bins`` runs of (nearly) equal length.

    The cuts fall after sorted positions ``round(m * N / n_bins)``, ``m = 1 .. n_bins - 1``, and each interior
    edge is the last confidence below its cut, so bin ``m`` is ``(edges[m], edges[m+1]]`` as for the equal-width
    bins; the outer edges are 0 and 1. Samples of equal confidence always share a bin: a run of ties that straddles
    a cut goes wholly to the lower bin, and edges that coincide are merged, so ties (or ``N < n_bins``) give fewer
    bins, never an empty one.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    ordered = np.sort(np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0))
    cuts = np.linspace(0, len(ordered), n_bins + 1).round().astype(np.int64)[1:-1]
    cuts = cuts[(cuts > 0) & (cuts < len(ordered))]
    interior = np.unique(ordered[cuts - 1])
    interior = interior[interior < ordered[-1]] if len(ordered) else interior  # no edge may leave the top bin empty
    return np.concatenate([[0.0], interior, [1.0]])


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


# -- calibration maps beyond one temperature ---------------------------------------------------------------------
#: What ``train.calibration`` may name (see :class:`LogitCalibrator`).
CALIBRATION_METHODS = ("none", "temperature", "bias", "vector")

_TEMPERATURE_BOUNDS = (0.01, 100.0)  # TemperatureScaler's default bounds, shared by the "bias" temperature
_VECTORS = {"none": (), "temperature": (), "bias": ("bias",), "vector": ("scale", "bias")}  # per-class parameters


class LogitCalibrator:
    """Post-hoc calibration of logits: a map fitted on VALIDATION logits by minimising the mean NLL (cross-entropy)
    with L-BFGS in float64 (strong Wolfe line search, as :class:`TemperatureScaler`). Fit it on the validation
    split, never on the test split.

    - ``"none"``: the identity; needs no fit.
    - ``"temperature"``: ``z / T``, one temperature (Guo et al. 2017), fitted by :class:`TemperatureScaler` with
      its behaviour: a validation split classified entirely correctly keeps ``T = 1`` (with a warning) and ``T``
      is clamped to ``[0.01, 100]``. It keeps every argmax and every AUC.
    - ``"bias"``: ``z / T + b``, one temperature and a per-class bias, fitted jointly (``log T`` and ``b``). The
      softmax ignores a shift common to all classes, so ``b`` is centred to sum 0 (identifiable; for a binary task
      ``b[1] - b[0]`` is the log-odds shift). For a binary task it is Platt scaling (Platt 1999) of the log-odds
      ``z[1] - z[0]``: ``sigmoid((z[1] - z[0]) / T + b[1] - b[0])``. It also corrects a prior the training loss
      distorted (class re-weighting, a shifted prevalence); it can move the argmax, never a binary AUC.
    - ``"vector"``: ``w * z + b``, a per-class scale and bias (vector scaling, Guo et al. 2017; ``b`` centred as
      above). As in the paper the scales are not constrained: a negative ``w[k]`` is allowed, and the fit is plain
      NLL (convex in ``w, b``), without a penalty toward the temperature solution. It starts at the fitted
      temperature (``w = 1 / T``, ``b = 0``). A scale is identifiable only where that class's logit varies
      independently of the others: for binary logits ``(-s, s)`` only ``w[0] + w[1]`` is; the fit then stays
      symmetric. Guo et al. found vector scaling prone to over-fitting a small validation split, and temperature
      scaling the safer default.

    ``bias`` and ``vector`` need at least two classes in the validation labels (with one class the biases have no
    finite optimum). Where every validation sample is already classified correctly they keep the identity (as the
    temperature does), with a warning; where the calibrated map could still separate the classes perfectly the
    optimum lies at infinity too, and a warning says when the temperature is clamped or a scale exceeds 100. The
    NLL before, with the temperature alone and after are logged at INFO; no method falls back to another when it
    fits worse.

    ``to_dict``/``from_dict`` carry a fitted calibrator in a model card's JSON without refitting; ``from_dict``
    reads old cards' ``{"method": "temperature", "temperature": T}`` too.

    Args:
        method: one of :data:`CALIBRATION_METHODS`.
        max_iter: maximum L-BFGS iterations per optimisation.

    Attributes:
        temperature_: the fitted temperature (1.0 for ``"none"`` and ``"vector"``).
        scale_: the per-class scales ``w`` (``"vector"``), else None.
        bias_: the per-class biases ``b``, centred (``"bias"``, ``"vector"``), else None.
        nll_before_: validation NLL of the raw logits (None when rebuilt from a dict without it).
        nll_after_: validation NLL of the calibrated logits.
    """

    def __init__(self, method: str = "temperature", max_iter: int = 200) -> None:
        _check_method(method)
        self.method = method
        self.max_iter = max_iter

    def fit(self, logits: ArrayLike | torch.Tensor, labels: ArrayLike | torch.Tensor) -> LogitCalibrator:
        """Learn the parameters from validation logits and their true labels.

        Args:
            logits: shape (N, K), the model's raw outputs.
            labels: true class indices, shape (N,).

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: on empty or inconsistent inputs, non-finite logits, or (``"bias"``, ``"vector"``) validation
                labels of a single class.
        """
        logit_tensor, label_tensor = _as_logits_and_labels(logits, labels)
        if self.method in ("bias", "vector") and label_tensor.unique().numel() < 2:
            raise ValueError(f"{self.method!r} calibration needs at least two classes in the validation labels, got "
                             f"only class {int(label_tensor[0])}: its per-class biases have no finite optimum")
        with torch.no_grad():
            self.nll_before_ = float(F.cross_entropy(logit_tensor, label_tensor))
        self.temperature_, self.scale_, self.bias_ = 1.0, None, None
        if self.method == "none":
            self.nll_after_ = self.nll_before_
            return self
        scaler = TemperatureScaler(max_iter=self.max_iter, bounds=_TEMPERATURE_BOUNDS).fit(logit_tensor, label_tensor)
        self.temperature_ = scaler.temperature_
        if self.method in ("bias", "vector"):
            self._fit_affine(logit_tensor, label_tensor)
        with torch.no_grad():
            self.nll_after_ = float(F.cross_entropy(self.transform(logit_tensor), label_tensor))
        if self.method != "temperature":  # TemperatureScaler logs its own
            logger.info("%s calibration: validation NLL %.4f -> %.4f (temperature %.4f alone: %.4f)", self.method,
                        self.nll_before_, self.nll_after_, scaler.temperature_, scaler.nll_after_)
        return self

    def _fit_affine(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit ``bias`` (``log T`` and ``b``) or ``vector`` (``w`` and ``b``) from the temperature solution."""
        classes = logits.shape[1]
        if bool((logits.argmax(dim=1) == labels).all()):
            logger.warning("every validation sample is classified correctly: %s calibration has no finite optimum; "
                           "it keeps the identity", self.method)
            self.bias_ = np.zeros(classes)
            self.scale_ = np.ones(classes) if self.method == "vector" else None
            return
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        if self.method == "bias":
            scale = torch.tensor(-math.log(self.temperature_), dtype=torch.float64, requires_grad=True)  # log(1/T)
        else:
            scale = torch.full((classes,), 1.0 / self.temperature_, dtype=torch.float64, requires_grad=True)

        def calibrated() -> torch.Tensor:
            multiplier = scale.exp() if self.method == "bias" else scale
            return logits * multiplier + (bias - bias.mean())

        _minimise_nll([scale, bias], calibrated, labels, self.max_iter)
        self.bias_ = (bias - bias.mean()).detach().numpy()
        if self.method == "vector":
            self.scale_, self.temperature_ = scale.detach().numpy(), 1.0
            if float(np.abs(self.scale_).max()) > 1.0 / _TEMPERATURE_BOUNDS[0]:
                logger.warning("vector scales %s exceed %g: the validation logits may be separable, where the "
                               "likelihood has no finite optimum", self.scale_, 1.0 / _TEMPERATURE_BOUNDS[0])
            return
        self.temperature_ = _clamped_temperature(float((-scale.detach()).exp()), _TEMPERATURE_BOUNDS)

    def transform(self, logits: ArrayLike | torch.Tensor) -> torch.Tensor:
        """Calibrated logits, float64, classes on the last axis.

        A tensor keeps its device and its autograd graph (the calibration is differentiable); on Apple's MPS, which
        has no float64, it also keeps its dtype. Arrays give a CPU tensor.

        Raises:
            RuntimeError: before ``fit`` (``"none"`` needs none).
            ValueError: when the fitted scale or bias does not have one entry per class of ``logits``.
        """
        tensor = _as_calibration_input(logits)
        self._check_fitted()
        if self.method == "none":
            return tensor
        classes = tensor.shape[-1]
        for name, values in (("scale", self.scale_), ("bias", self.bias_)):
            if values is not None and len(values) != classes:
                raise ValueError(f"the calibration's {name} has {len(values)} entries but the logits have {classes} "
                                 f"classes")
        if self.scale_ is not None:
            tensor = tensor * torch.as_tensor(self.scale_, dtype=tensor.dtype, device=tensor.device)
        else:
            tensor = tensor / self.temperature_
        if self.bias_ is not None:
            tensor = tensor + torch.as_tensor(self.bias_, dtype=tensor.dtype, device=tensor.device)
        return tensor

    def predict_proba(self, logits: ArrayLike | torch.Tensor) -> np.ndarray:
        """Calibrated probabilities, the softmax of :meth:`transform`, as a float64 array (N, K)."""
        return torch.softmax(self.transform(_as_tensor(logits)), dim=-1).numpy()

    def to_dict(self) -> dict:
        """The fitted calibration as JSON-ready plain values: ``{"method", "temperature", "scale", "bias",
        "nll_before", "nll_after"}`` (``scale``/``bias``: lists or None; the NLLs: floats or None)."""
        self._check_fitted()
        fitted = hasattr(self, "temperature_")  # an unfitted "none" is the identity
        return {
            "method": self.method,
            "temperature": float(self.temperature_) if fitted else 1.0,
            "scale": None if not fitted or self.scale_ is None else [float(value) for value in self.scale_],
            "bias": None if not fitted or self.bias_ is None else [float(value) for value in self.bias_],
            "nll_before": _float_or_none(getattr(self, "nll_before_", None)),
            "nll_after": _float_or_none(getattr(self, "nll_after_", None)),
        }

    @classmethod
    def from_dict(cls, values: dict) -> LogitCalibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict`'s output, without refitting.

        Missing keys take the identity's values, so an old card's ``{"method": "temperature", "temperature": T}``
        works. Parameters that do not fit the method raise (a damaged card must fail, not calibrate wrongly).

        Raises:
            ValueError: on an unknown method, a non-positive or non-finite temperature, non-finite or mismatched
                scale/bias vectors, or parameters the method does not have.
        """
        calibrator = cls(values.get("method", "temperature"))
        temperature = values.get("temperature")
        calibrator.temperature_ = 1.0 if temperature is None else float(temperature)
        calibrator.scale_ = _parameter_vector(values, "scale")
        calibrator.bias_ = _parameter_vector(values, "bias")
        calibrator.nll_before_ = _float_or_none(values.get("nll_before"))
        calibrator.nll_after_ = _float_or_none(values.get("nll_after"))
        calibrator._check_parameters()
        return calibrator

    def _check_parameters(self) -> None:
        method, scale, bias = self.method, self.scale_, self.bias_
        if not (math.isfinite(self.temperature_) and self.temperature_ > 0):
            raise ValueError(f"calibration temperature must be positive and finite, got {self.temperature_}")
        if method in ("none", "vector") and self.temperature_ != 1.0:
            raise ValueError(f"{method!r} calibration has no temperature, got {self.temperature_}")
        present = [name for name, values in (("scale", scale), ("bias", bias)) if values is not None]
        if present != list(_VECTORS[method]):
            raise ValueError(f"{method!r} calibration takes the vectors {list(_VECTORS[method])}, got {present}")
        if scale is not None and len(scale) != len(bias):
            raise ValueError(f"calibration scale and bias differ in length: {len(scale)} and {len(bias)}")

    def _check_fitted(self) -> None:
        if self.method != "none" and not hasattr(self, "temperature_"):
            raise RuntimeError("LogitCalibrator is not fitted yet; call fit(logits, labels) or from_dict first")

    def __repr__(self) -> str:
        fitted = ""
        if hasattr(self, "temperature_"):
            fitted = f", temperature_={self.temperature_:.4g}"
            for name, values in (("scale_", self.scale_), ("bias_", self.bias_)):
                if values is not None:
                    fitted += f", {name}={np.array2string(np.asarray(values), precision=3)}"
        return f"LogitCalibrator(method={self.method!r}, max_iter={self.max_iter}{fitted})"


def card_calibrator(card) -> LogitCalibrator:
    """The calibration a model card records: ``card.calibration``, or its temperature alone (older cards)."""
    if getattr(card, "calibration", None):
        return LogitCalibrator.from_dict(card.calibration)
    return LogitCalibrator.from_dict({"method": "temperature", "temperature": float(card.temperature or 1.0)})


def _minimise_nll(parameters: list[torch.Tensor], calibrated, labels: torch.Tensor, max_iter: int) -> None:
    """L-BFGS on the mean cross-entropy of ``calibrated()`` (a closure over ``parameters``), in place."""
    optimizer = torch.optim.LBFGS(parameters, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(calibrated(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)


def _clamped_temperature(fitted: float, bounds: tuple[float, float]) -> float:
    """``fitted`` within ``bounds`` (an infinite temperature goes to the upper bound, NaN to the lower), with a
    warning when it had to be moved (``T -> inf``: a model no better than chance; ``T -> 0``: separable data)."""
    low, high = bounds
    clamped = min(max(fitted, low), high) if math.isfinite(fitted) else (high if fitted > 0 else low)
    if clamped != fitted:
        logger.warning("temperature %.3g is outside %s and was clamped to %.3g", fitted, bounds, clamped)
    return clamped


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known methods: {list(CALIBRATION_METHODS)}")


def _as_calibration_input(logits: ArrayLike | torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        tensor = _as_tensor(logits)
    elif logits.device.type == "mps":  # no float64 on MPS
        tensor = logits
    else:
        tensor = logits.to(torch.float64)
    if tensor.ndim == 0:
        raise ValueError("logits must have a class axis, got a scalar")
    return tensor


def _parameter_vector(values: dict, name: str) -> np.ndarray | None:
    if values.get(name) is None:
        return None
    vector = np.asarray(values[name], dtype=np.float64)
    if vector.ndim != 1 or len(vector) < 2 or not np.all(np.isfinite(vector)):
        raise ValueError(f"calibration {name} must be a finite vector of one entry per class (K >= 2), "
                         f"got {values[name]!r}")
    return vector


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def adaptive_calibration_error(
    y_true: ArrayLike, probabilities: ArrayLike, *, n_bins: int = DEFAULT_BINS, class_index: int | None = None
) -> float:
    """The equal-mass ECE: :func:`expected_calibration_error` with ``binning="adaptive"`` (the adaptive calibration
    error of Nixon et al., "Measuring Calibration in Deep Learning", CVPR Workshops 2019)."""
    return expected_calibration_error(y_true, probabilities, n_bins=n_bins, class_index=class_index,
                                      binning="adaptive")
