"""Report: figures (and, later, the HTML report) built from a run's results."""

from medxai.report.plots import (
    plot_confusion_matrix,
    plot_precision_recall,
    plot_roc_curves,
    plot_training_curves,
)

__all__ = [
    "plot_confusion_matrix",
    "plot_precision_recall",
    "plot_roc_curves",
    "plot_training_curves",
]
