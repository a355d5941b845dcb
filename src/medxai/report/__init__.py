"""Report: figures, the self-contained HTML report and run comparisons, built from run folders."""

from medxai.report.compare import compare_runs, comparison_table
from medxai.report.html import build_report
from medxai.report.plots import (
    plot_confusion_matrix,
    plot_precision_recall,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_training_curves,
)

__all__ = [
    "build_report",
    "compare_runs",
    "comparison_table",
    "plot_reliability_diagram",
    "plot_confusion_matrix",
    "plot_precision_recall",
    "plot_roc_curves",
    "plot_training_curves",
]
