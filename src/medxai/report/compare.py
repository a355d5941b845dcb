"""``medxai compare RUN..``: runs side by side, every metric with its 95% confidence interval.

Overlapping intervals are the first thing to look at before calling one run better than another: two test-set
accuracies 0.01 apart on 624 images are usually within each other's intervals. (Overlap is a conservative check,
not a paired test: the runs are evaluated on the same images, which a paired bootstrap would exploit.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from medxai.errors import CheckpointError
from medxai.run_folder import EvaluationFolder, RunFolder

__all__ = ["compare_runs", "comparison_table", "COMPARED_METRICS"]

COMPARED_METRICS = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "balanced_accuracy")


def compare_runs(
    run_dirs: Sequence[str | Path], *, split: str | None = None, evaluations: bool = False
) -> list[dict[str, Any]]:
    """One row per run or evaluation: model, data, split and metrics with intervals, read from their folders.

    An evaluation folder (``RUN/evaluations/<name>``, written by ``medxai evaluate``) is a row of its own, with the
    model of its run and the data it was evaluated on, marked ``external`` or ``internal``.

    Args:
        run_dirs: run folders written by ``medxai train`` / ``demo``, or evaluation folders.
        split: the split to compare for runs; None takes ``test`` where a run has it, else ``val``. An evaluation
            always shows the split it evaluated.
        evaluations: also a row for every evaluation of each run given.

    Returns:
        Rows ``{"run", "path", "kind", "model", "data", "split", "n", "metrics": {name: {"value", "ci95"}},
        "at_threshold": {...same for sensitivity/specificity/accuracy, or None}, "threshold", "ece", "brier",
        "temperature"}``, in the order given (a run's evaluations right after it).

    Raises:
        CheckpointError: for a folder without ``metrics.json``, or without the requested split.
    """
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if EvaluationFolder(path).info_path.is_file():
            rows.append(_evaluation_row(EvaluationFolder(path)))
            continue
        run = RunFolder(path)
        rows.append(_row(run, split))
        if evaluations:  # those with metrics: an explain-eval alone measures heatmaps, not the model
            rows.extend(_evaluation_row(folder) for folder in run.evaluations() if folder.metrics_path.is_file())
    return rows


def comparison_table(rows: Sequence[dict[str, Any]], *, title: str = "runs compared") -> Table:
    """A rich table of :func:`compare_runs` rows, one column per run (so that a few runs fit a terminal), one row per
    property or metric; metric cells read "value [low, high]"."""
    table = Table(title=title)
    table.add_column("")
    names = [row["run"] for row in rows]
    for row in rows:  # run folders of the same name (runs/a/demo, runs/b/demo) are told apart by their path
        table.add_column(row["run"] if names.count(row["run"]) == 1 else row["path"], justify="right", overflow="fold")
    for label, key in (("kind", "kind"), ("model", "model"), ("data", "data"), ("split", "split"), ("n", "n")):
        table.add_row(label, *(str(row[key]) for row in rows))
    for metric in COMPARED_METRICS:
        table.add_row(metric.replace("_", " "), *(_format(row["metrics"][metric]) for row in rows))
    if any(row.get("at_threshold") for row in rows):
        table.add_row("threshold", *(
            f"{row['threshold']['value']:.3g} ({row['threshold'].get('method', '')})" if row.get("at_threshold")
            else "-" for row in rows
        ))
        for metric in ("sensitivity", "specificity"):
            table.add_row(f"{metric} at threshold", *(
                _format(row["at_threshold"][metric]) if row.get("at_threshold") else "-" for row in rows
            ))
    table.add_row("ECE", *(_format(row["ece"]) for row in rows))
    table.add_row("temperature", *(
        f"{row['temperature']:.3f}" if isinstance(row.get("temperature"), (int, float)) else "-" for row in rows
    ))
    return table


def _row(run: RunFolder, split: str | None) -> dict[str, Any]:
    if not run.metrics_path.is_file():
        raise CheckpointError(f"{run.path}: no metrics.json; is this a trained medxai run folder?")
    metrics = run.read_metrics()
    card = run.read_card().to_dict() if run.card_path.is_file() else {}
    chosen = split or ("test" if "test" in metrics else "val")
    if chosen not in metrics:
        raise CheckpointError(f"{run.path}: metrics.json has no '{chosen}' split (it has {sorted(metrics)})")
    data = (card.get("train_data") or {}).get("source", "?")
    return _metrics_row(run.path.name, run.path, "run", card, data, chosen, metrics[chosen])


def _evaluation_row(folder: EvaluationFolder) -> dict[str, Any]:
    """The row of an evaluation folder; its run (two levels up) gives the model card."""
    info = folder.read_info()
    run = RunFolder(folder.path.parent.parent)
    card = run.read_card().to_dict() if run.card_path.is_file() else {}
    metrics = folder.read_metrics()
    chosen = info.get("split")
    if chosen not in metrics:
        raise CheckpointError(f"{folder.path}: no metrics for its split {chosen!r} (an explain-eval only folder?)")
    name = f"{run.path.name}/{folder.name}"
    return _metrics_row(name, folder.path, info.get("kind", "external"), card, info.get("data", "?"), chosen,
                        metrics[chosen])


def _metrics_row(name: str, path: Path, kind: str, card: dict[str, Any], data: str, split: str,
                 entry: dict[str, Any]) -> dict[str, Any]:
    at = entry.get("at_threshold")
    calibration = entry.get("calibration") or {}
    return {
        "run": name,
        "path": str(path),
        "kind": kind,
        "model": card.get("architecture", "?"),
        "data": data,
        "split": split,
        "n": entry.get("n"),
        "metrics": {metric: _value(entry, metric) for metric in COMPARED_METRICS},
        "at_threshold": {metric: _value(at, metric) for metric in ("accuracy", "sensitivity", "specificity")}
        if isinstance(at, dict) else None,
        "threshold": card.get("threshold") if isinstance(at, dict) else None,
        "ece": {"value": calibration.get("ece"), "ci95": (calibration.get("ci95") or {}).get("ece")},
        "brier": {"value": calibration.get("brier"), "ci95": (calibration.get("ci95") or {}).get("brier")},
        "temperature": card.get("temperature"),
    }


def _value(entry: dict[str, Any], metric: str) -> dict[str, Any]:
    return {"value": entry.get(metric), "ci95": (entry.get("ci95") or {}).get(metric)}


def _format(cell: dict[str, Any]) -> str:
    value, interval = cell.get("value"), cell.get("ci95")
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if interval:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text
