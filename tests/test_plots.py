"""Each plot writes a readable PNG from small synthetic inputs, headless, and leaves no figure open."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from medxai.report.plots import (
    plot_confusion_matrix,
    plot_precision_recall,
    plot_roc_curves,
    plot_training_curves,
)

MINIMUM_SIDE_PIXELS = 300


def _assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width >= MINIMUM_SIDE_PIXELS and height >= MINIMUM_SIDE_PIXELS
        # Something was drawn: a blank canvas would be a single colour.
        assert np.asarray(image.convert("L")).std() > 0


def _history_rows(epoch_count: int = 5) -> list[dict[str, float]]:
    return [
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "train_accuracy": 0.5 + 0.08 * epoch,
            "val_loss": 1.1 / epoch + 0.02 * epoch,
            "val_accuracy": 0.5 + 0.07 * epoch - 0.01 * epoch**2,
            "lr": 0.001,
            "seconds": 1.5,
        }
        for epoch in range(1, epoch_count + 1)
    ]


def _synthetic_scores(num_classes: int, sample_count: int = 40) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(num_classes)
    y_true = np.arange(sample_count) % num_classes
    logits = generator.normal(size=(sample_count, num_classes))
    logits[np.arange(sample_count), y_true] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


def test_training_curves_from_rows_in_a_new_folder(tmp_path: Path) -> None:
    out_path = plot_training_curves(_history_rows(), tmp_path / "figures" / "nested" / "curves.png", best_epoch=3)
    assert out_path == tmp_path / "figures" / "nested" / "curves.png"
    _assert_valid_png(out_path)


def test_training_curves_from_history_csv(tmp_path: Path) -> None:
    rows = _history_rows()
    history_path = tmp_path / "history.csv"
    with history_path.open("w", newline="") as history_file:
        writer = csv.DictWriter(history_file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _assert_valid_png(plot_training_curves(history_path, tmp_path / "curves.png"))
    _assert_valid_png(plot_training_curves(str(history_path), tmp_path / "curves_from_string.png"))


def test_training_curves_without_validation_columns(tmp_path: Path) -> None:
    rows = [{"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.1 * epoch} for epoch in range(1, 4)]
    _assert_valid_png(plot_training_curves(rows, tmp_path / "curves.png"))


def test_training_curves_reject_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "curves.png")


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix(tmp_path: Path, normalize: bool) -> None:
    matrix = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # the last class has no samples
    out_path = plot_confusion_matrix(
        matrix, ["normal", "benign", "malignant"], tmp_path / "confusion.png", normalize=normalize
    )
    _assert_valid_png(out_path)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_roc_and_precision_recall_curves(tmp_path: Path, num_classes: int) -> None:
    y_true, probabilities = _synthetic_scores(num_classes)
    label_names = [f"class {index}" for index in range(num_classes)]
    _assert_valid_png(plot_roc_curves(y_true, probabilities, label_names, tmp_path / "roc.png"))
    _assert_valid_png(plot_precision_recall(y_true, probabilities, label_names, tmp_path / "pr.png"))


def test_curves_with_a_class_absent_from_the_labels(tmp_path: Path) -> None:
    y_true, probabilities = _synthetic_scores(3)
    y_true[y_true == 2] = 0
    label_names = ["a", "b", "absent"]
    _assert_valid_png(plot_roc_curves(y_true, probabilities, label_names, tmp_path / "roc.png"))
    _assert_valid_png(plot_precision_recall(y_true, probabilities, label_names, tmp_path / "pr.png"))


def test_plots_leave_no_pyplot_figures_and_keep_the_backend(tmp_path: Path) -> None:
    backend_before = matplotlib.get_backend()
    y_true, probabilities = _synthetic_scores(2)
    plot_roc_curves(y_true, probabilities, ["negative", "positive"], tmp_path / "roc.png", positive_index=0)
    plot_confusion_matrix(np.eye(2, dtype=int), ["negative", "positive"], tmp_path / "confusion.png")
    assert matplotlib.get_backend() == backend_before
    import matplotlib.pyplot as pyplot

    assert pyplot.get_fignums() == []
