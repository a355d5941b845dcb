"""Figures for a run folder: training curves, confusion matrix, ROC and precision-recall curves, reliability diagram
(PNG).

Figures are built with :class:`matplotlib.figure.Figure` directly rather than through ``pyplot``. That renders with
the Agg canvas without selecting a backend (so it works headless, and a user's notebook backend is left alone),
changes no global style, and registers nothing in pyplot's figure list, so nothing is left open after saving.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from medxai.evaluate.calibration import DEFAULT_BINS, reliability_curve
from medxai.evaluate.metrics import average_precision, precision_recall_curve, roc_auc, roc_curve

__all__ = [
    "plot_training_curves",
    "plot_confusion_matrix",
    "plot_roc_curves",
    "plot_precision_recall",
    "plot_reliability_diagram",
    "plot_domain_scores",
]

logger = logging.getLogger(__name__)

FIGURE_DPI = 120
_HISTORY_SERIES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def plot_training_curves(
    history: Sequence[Mapping[str, Any]] | str | Path,
    out_path: str | Path,
    *,
    best_epoch: int | None = None,
) -> Path:
    """Plot accuracy and loss per epoch, training against validation, and mark the best epoch.

    Args:
        history: the rows of ``history.csv`` (keys ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy``; other keys are ignored), or the path of that CSV file. A missing or empty value is
            drawn as a gap.
        out_path: where to write the PNG; parent folders are created.
        best_epoch: the epoch to mark; defaults to the first epoch with the highest validation accuracy, and to no
            mark when there is no validation accuracy.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: if the history is empty or a row has no ``epoch``.
    """
    rows = _read_history_csv(Path(history)) if isinstance(history, (str, Path)) else list(history)
    if not rows:
        raise ValueError("training history is empty; nothing to plot")
    if any("epoch" not in row for row in rows):
        raise ValueError("every history row needs an 'epoch' value")
    epochs = np.array([float(row["epoch"]) for row in rows])
    series = {name: np.array([_as_float(row.get(name)) for row in rows]) for name in _HISTORY_SERIES}

    if best_epoch is None and np.isfinite(series["val_accuracy"]).any():
        best_epoch = int(epochs[int(np.nanargmax(series["val_accuracy"]))])

    figure = Figure(figsize=(10, 4), dpi=FIGURE_DPI, layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for axes, quantity, title in ((accuracy_axes, "accuracy", "Accuracy"), (loss_axes, "loss", "Loss")):
        for split, split_label, style in (("train", "training", "-o"), ("val", "validation", "-s")):
            values = series[f"{split}_{quantity}"]
            if np.isfinite(values).any():
                axes.plot(epochs, values, style, markersize=3, label=split_label)
        if best_epoch is not None:
            axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(quantity)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    return _save(figure, out_path)


def plot_confusion_matrix(
    matrix: ArrayLike,
    label_names: Sequence[str],
    out_path: str | Path,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix as a heat map with the counts written in its cells.

    Args:
        matrix: counts of shape (K, K), rows = true class, columns = predicted class.
        label_names: a name per class, in index order.
        out_path: where to write the PNG; parent folders are created.
        normalize: colour by the fraction of each true class (rows sum to 1) and write that fraction above the count;
            a class with no samples gets a row of zeros.
        title: the figure title.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: if the matrix is not square or does not match ``label_names``.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    if counts.shape[0] != len(label_names):
        raise ValueError(f"got {len(label_names)} label names for a {counts.shape[0]}-class confusion matrix")
    row_totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals != 0)
    shown = fractions if normalize else counts.astype(np.float64)
    num_classes = counts.shape[0]

    side = max(4.0, 1.0 + 0.8 * num_classes)
    figure = Figure(figsize=(side + 1.0, side), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(float(shown.max()), 1.0))
    figure.colorbar(image, ax=axes, label="fraction of true class" if normalize else "count")
    # Dark cells get white text so the numbers stay readable.
    darkness_cutoff = (1.0 if normalize else max(float(shown.max()), 1.0)) / 2.0
    for row in range(num_classes):
        for column in range(num_classes):
            count = int(counts[row, column]) if np.issubdtype(counts.dtype, np.integer) else counts[row, column]
            text = f"{fractions[row, column]:.2f}\n({count})" if normalize else f"{count}"
            axes.text(
                column,
                row,
                text,
                ha="center",
                va="center",
                fontsize=9,
                color="white" if shown[row, column] > darkness_cutoff else "black",
            )
    ticks = np.arange(num_classes)
    rotate_labels = num_classes > 3
    axes.set_xticks(
        ticks, labels=list(label_names), rotation=45 if rotate_labels else 0, ha="right" if rotate_labels else "center"
    )
    axes.set_yticks(ticks, labels=list(label_names))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    return _save(figure, out_path)


def plot_roc_curves(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    label_names: Sequence[str],
    out_path: str | Path,
    positive_index: int = 1,
) -> Path:
    """Plot ROC curves with their AUC in the legend and the chance diagonal.

    A binary problem (two columns) gets one curve, for ``positive_index``; a multi-class problem gets one
    one-vs-rest curve per class. A class absent from ``y_true`` (or the only one present) has no ROC curve and is
    listed in the legend as undefined.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        label_names: a name per class.
        out_path: where to write the PNG; parent folders are created.
        positive_index: the positive class of a binary problem.

    Returns:
        The path of the written PNG.
    """
    true_indices, probability_matrix = _validate_scores(y_true, probabilities, label_names)
    figure = Figure(figsize=(5.5, 5), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots()
    for class_index in _classes_to_plot(probability_matrix.shape[1], positive_index):
        is_class = true_indices == class_index
        name = label_names[class_index]
        if not _has_both_sides(is_class):
            axes.plot([], [], " ", label=f"{name} (AUC undefined: one class only)")
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(is_class, probability_matrix[:, class_index])
        area = roc_auc(is_class, probability_matrix[:, class_index])
        axes.plot(false_positive_rate, true_positive_rate, linewidth=1.5, label=f"{name} (AUC = {area:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    _finish_unit_axes(
        axes,
        x_label="false positive rate (1 - specificity)",
        y_label="true positive rate (sensitivity)",
        title="ROC curve" if probability_matrix.shape[1] == 2 else "ROC curves (one-vs-rest)",
        legend_location="lower right",
    )
    return _save(figure, out_path)


def plot_precision_recall(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    label_names: Sequence[str],
    out_path: str | Path,
    positive_index: int = 1,
) -> Path:
    """Plot precision-recall curves with the average precision in the legend.

    A binary problem gets one curve, for ``positive_index``, and the prevalence line a random classifier would
    give; a multi-class problem gets one one-vs-rest curve per class. The curve is drawn as the step function whose
    area is the average precision. A class absent from ``y_true`` has no curve and is listed as undefined.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K).
        label_names: a name per class.
        out_path: where to write the PNG; parent folders are created.
        positive_index: the positive class of a binary problem.

    Returns:
        The path of the written PNG.
    """
    true_indices, probability_matrix = _validate_scores(y_true, probabilities, label_names)
    is_binary = probability_matrix.shape[1] == 2
    figure = Figure(figsize=(5.5, 5), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots()
    for class_index in _classes_to_plot(probability_matrix.shape[1], positive_index):
        is_class = true_indices == class_index
        name = label_names[class_index]
        if not is_class.any():
            axes.plot([], [], " ", label=f"{name} (AP undefined: no samples)")
            continue
        precision, recall, _ = precision_recall_curve(is_class, probability_matrix[:, class_index])
        area = average_precision(is_class, probability_matrix[:, class_index])
        axes.plot(recall, precision, drawstyle="steps-post", linewidth=1.5, label=f"{name} (AP = {area:.3f})")
        if is_binary:
            prevalence = float(is_class.mean())
            axes.axhline(
                prevalence, color="grey", linestyle="--", linewidth=1, label=f"chance (prevalence {prevalence:.2f})"
            )
    _finish_unit_axes(
        axes,
        x_label="recall (sensitivity)",
        y_label="precision (positive predictive value)",
        title="Precision-recall curve" if is_binary else "Precision-recall curves (one-vs-rest)",
        legend_location="lower left",
    )
    return _save(figure, out_path)


def plot_domain_scores(
    groups: Mapping[str, ArrayLike], threshold: float, out_path: str | Path, *, title: str = "Domain scores"
) -> Path:
    """Histograms of out-of-domain guard scores per group (in-domain test data, probes) with the threshold line.

    Scores are clipped to a readable range (far-out probes would squash the in-domain histogram); the legend gives
    each group's share above the threshold.
    """
    figure = Figure(figsize=(6.5, 4), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots()
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in groups.items() if len(values)}
    high = max(threshold * 3.0, 10.0)
    bins = np.linspace(-5.0, high, 60)
    for name, values in arrays.items():
        share = float((values > threshold).mean())
        axes.hist(np.clip(values, bins[0], bins[-1]), bins=bins, alpha=0.55, density=True,
                  label=f"{name} (n={len(values)}, {share:.0%} flagged)")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.2f}")
    axes.set_xlabel("domain score (validation standard deviations; clipped)")
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper right")
    return _save(figure, out_path)


def plot_reliability_diagram(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    out_path: str | Path,
    *,
    uncalibrated_probabilities: ArrayLike | None = None,
    class_index: int | None = None,
    class_name: str | None = None,
    n_bins: int = DEFAULT_BINS,
    title: str = "Reliability diagram",
) -> Path:
    """Plot a reliability diagram (DeGroot & Fienberg 1983; Guo et al. 2017) with a histogram of the confidences.

    Each non-empty bin is a point at (mean predicted probability, observed frequency); a calibrated model lies on the
    diagonal. The expected calibration error of the bins is given in the legend. The lower panel shows how many
    samples fall in each bin, which says how much each point can be trusted.

    Args:
        y_true: true class indices, shape (N,).
        probabilities: class probabilities, shape (N, K), after calibration.
        out_path: where to write the PNG; parent folders are created.
        uncalibrated_probabilities: the probabilities before temperature scaling, drawn as a second, dashed curve.
        class_index: None for the top-label reading (confidence of the predicted class against accuracy); a class
            index to read that class's probability against how often it is the truth (binary tasks: the positive
            class). See :mod:`medxai.evaluate.calibration`.
        class_name: the name of ``class_index`` for the axis labels.
        n_bins: number of equal-width bins.
        title: the figure title.

    Returns:
        The path of the written PNG.
    """
    curves = [("calibrated" if uncalibrated_probabilities is not None else "model", probabilities, "-o")]
    if uncalibrated_probabilities is not None:
        curves.append(("before temperature scaling", uncalibrated_probabilities, "--s"))
    figure = Figure(figsize=(5.5, 6.2), dpi=FIGURE_DPI, layout="constrained")
    curve_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    width = 1.0 / n_bins
    for offset, (label, values, style) in enumerate(curves):
        curve = reliability_curve(y_true, values, n_bins=n_bins, class_index=class_index)
        filled = curve.counts > 0
        curve_axes.plot(
            curve.mean_confidence[filled], curve.observed_frequency[filled], style, markersize=4, linewidth=1.5,
            label=f"{label} (ECE = {curve.ece:.3f})",
        )
        count_axes.bar(
            curve.bin_edges[:-1] + width * (0.25 + 0.5 * offset), curve.counts, width=width / len(curves) * 0.9,
            align="center", alpha=0.7, label=label,
        )
    if class_index is None:
        x_label, y_label = "confidence (probability of the predicted class)", "accuracy (fraction correct)"
    else:
        name = class_name if class_name is not None else f"class {class_index}"
        x_label, y_label = f"predicted probability of {name}", f"observed fraction that are {name}"
    _finish_unit_axes(curve_axes, x_label="", y_label=y_label, title=title, legend_location="upper left")
    curve_axes.set_aspect("auto")
    count_axes.set_xlabel(x_label)
    count_axes.set_ylabel("samples")
    count_axes.set_yscale("symlog")
    count_axes.grid(alpha=0.3)
    return _save(figure, out_path)


def _save(figure: Figure, out_path: str | Path) -> Path:
    """Write the figure as PNG, creating parent folders, and release its memory."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=FIGURE_DPI)
    figure.clear()
    logger.debug("Wrote figure %s", path)
    return path


def _read_history_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``history.csv`` file as dictionaries of strings."""
    with path.open(newline="", encoding="utf-8") as history_file:
        return list(csv.DictReader(history_file))


def _as_float(value: Any) -> float:
    """A history value as a float; missing or empty values become NaN (a gap in the plot)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    return float(value)


def _validate_scores(
    y_true: ArrayLike, probabilities: ArrayLike, label_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Check labels and probabilities for the curve plots."""
    true_indices = np.asarray(y_true).astype(np.int64)
    probability_matrix = np.asarray(probabilities, dtype=np.float64)
    if probability_matrix.ndim != 2 or probability_matrix.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {probability_matrix.shape}")
    if true_indices.shape != (probability_matrix.shape[0],):
        raise ValueError(f"y_true has shape {true_indices.shape}; expected ({probability_matrix.shape[0]},)")
    if len(label_names) != probability_matrix.shape[1]:
        raise ValueError(f"got {len(label_names)} label names for {probability_matrix.shape[1]} classes")
    return true_indices, probability_matrix


def _classes_to_plot(num_classes: int, positive_index: int) -> list[int]:
    """The positive class alone for a binary problem, every class otherwise."""
    if num_classes == 2:
        if positive_index not in (0, 1):
            raise ValueError(f"positive_index must be 0 or 1 for a binary problem, got {positive_index}")
        return [positive_index]
    return list(range(num_classes))


def _has_both_sides(is_class: np.ndarray) -> bool:
    """Whether a one-vs-rest split has at least one sample on each side."""
    return bool(is_class.any() and not is_class.all())


def _finish_unit_axes(axes: Axes, *, x_label: str, y_label: str, title: str, legend_location: str) -> None:
    """Common axes for curves on the unit square."""
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc=legend_location, fontsize=8)
