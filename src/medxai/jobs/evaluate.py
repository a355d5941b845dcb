"""``medxai evaluate``: a trained run measured on data, without ever rewriting the run's own results.

Two cases, told apart by the data's content fingerprint (and location) against the model card's ``train_data``:

- **the run's own data**: the split asked for is the run's saved split list (``splits/<split>.txt``), so a flat
  folder without official splits still gives exactly the images the run was tested on, never its training images;
- **other data** (another hospital, another public set): its own official split, or ``--split all``; a folder without
  splits has no "test" split to take, and saying so beats evaluating every image under that name.

Either way the result goes to ``RUN/evaluations/<name>/`` (metrics, figures, skipped list, ``evaluation.json``);
``metrics.json`` of the run is read-only here. Data labels are matched to the model's by
:func:`~medxai.data.labels.match_labels`.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.classifier import Classifier
from medxai.config import InferenceConfig, TrainConfig
from medxai.data import Record, Source, open_source
from medxai.data.labels import match_labels, parse_label_map
from medxai.data.prepared import PreparedSplit, prepare_split, preparation_options
from medxai.errors import ConfigError, DataError
from medxai.evaluate.calibration import LogitCalibrator, card_calibrator
from medxai.evaluate.domain import DomainGuard, summarize_verdicts
from medxai.evaluate.summary import summarize_split
from medxai.models.card import ModelCard
from medxai.report.html import build_report
from medxai.report.plots import (
    plot_confusion_matrix,
    plot_precision_recall,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_training_curves,
)
from medxai.run_folder import TRAINING_CURVES, EvaluationFolder, RunFolder
from medxai.train import BatchContext, predict_split
from medxai.train.loop import place_model, predict_split_with_features

__all__ = [
    "evaluate_run",
    "evaluate_prepared",
    "write_figures",
    "select_records",
    "prepare_evaluation_folder",
    "default_evaluation_name",
    "is_training_data",
    "SplitEvaluation",
    "EvaluationResult",
]

logger = logging.getLogger(__name__)


@dataclass
class SplitEvaluation:
    """One evaluated split: its ``metrics.json`` entry and what the figures and gallery are drawn from."""

    split: str
    metrics: dict[str, Any]
    logits: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    domain_scores: torch.Tensor | None = None  # (N,) of the labelled rows, when the run has a domain guard


@dataclass
class EvaluationResult:
    """What :func:`evaluate_run` wrote and where."""

    folder: EvaluationFolder
    evaluation: SplitEvaluation
    info: dict[str, Any]


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    name: str | None = None,
    label_map: Mapping[str, str] | Sequence[str] | None = None,
    split_folders: Mapping[str, str] | None = None,
    patient_pattern: str | None = None,
    inference: InferenceConfig | None = None,
) -> EvaluationResult:
    """Evaluate a trained run on one split of any labelled data; write ``RUN/evaluations/<name>/``.

    Args:
        run_dir: the run folder.
        data: anything :func:`~medxai.data.open_source` opens.
        split: ``train``, ``val``, ``test`` or ``all``.
        name: the evaluation's folder name (default: the data's name and the split, e.g. ``chest_xray-test``).
        label_map: ``{data label: model label}`` for names that do not match by themselves.
        split_folders, patient_pattern: passed to :func:`~medxai.data.open_source`.
        inference: device and batch size.

    Returns:
        The evaluation folder, the metrics and ``evaluation.json``'s content.

    Raises:
        DataError: unknown or ambiguous labels, a split the data does not have, nothing readable.
        CheckpointError: ``run_dir`` is not a run folder.
    """
    inference = inference or InferenceConfig()
    label_map = parse_label_map(label_map)  # a malformed pair is refused before any work
    run = RunFolder(run_dir)
    run.check_is_run()
    classifier = Classifier.from_run(run.path, device=inference.device, batch_size=inference.batch_size,
                                     allow_unfinished=inference.allow_unfinished)
    card = classifier.card
    source = open_source(data, patient_pattern=patient_pattern, split_folders=split_folders)
    label_mapping = match_labels(source.label_names, card.label_names, label_map, where=str(data))
    fingerprint = source.fingerprint()  # reads every file's size: once
    own = is_training_data(source, card, fingerprint)
    records, selection = select_records(source, split, run, own, data)
    folder = run.evaluation(name or default_evaluation_name(data, split))
    prepare_evaluation_folder(folder)
    prepared = prepare_split(source, records, classifier.preprocessor, label_map=label_mapping,
                             description=f"{split} ({data})", **preparation_options(run.data_config()))
    training = run.training_config()
    context = BatchContext(classifier.preprocessor, classifier.device, classifier.batch_size,
                           channels_last=training.channels_last)  # the layout training evaluated in
    place_model(classifier.model, context)
    evaluation = evaluate_prepared(classifier.model, prepared, split, card, context, guard=classifier.guard,
                                   resamples=training.bootstrap_resamples, seed=training.seed)
    folder.write_metrics({split: evaluation.metrics})
    folder.write_skipped(prepared.skipped)
    write_figures(folder, [evaluation], card, history=None)
    info = {
        "name": folder.name,
        "kind": "internal" if own else "external",
        "data": source.description,
        "fingerprint": fingerprint,
        "split": split,
        "selection": selection,
        "n": evaluation.metrics["n"],
        "skipped": len(prepared.skipped),
        "label_map": {source.label_names[i]: card.label_names[j] for i, j in label_mapping.items()},
        "model": {"architecture": card.architecture, "train_data": card.train_data.get("source")},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    folder.write_info(info)
    logger.info("%s evaluation %s: %d images (%s)", info["kind"], folder.path, info["n"], selection)
    build_report(run.path)
    return EvaluationResult(folder, evaluation, info)


def default_evaluation_name(data: str | Path, split: str) -> str:
    """``<data name>-<split>``, reduced to letters, digits, ``.``, ``_`` and ``-`` (a safe folder name)."""
    stem = Path(str(data).rstrip("/\\")).name or "data"
    for suffix in (".npz", ".csv"):
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "data"
    return f"{safe[:100]}-{split}"


def is_training_data(source: Source, card: ModelCard, fingerprint: str) -> bool:
    """Whether ``source`` (whose content fingerprint is ``fingerprint``) is the data the run was trained on: the same
    content or the same location."""
    train_data = card.train_data or {}
    return bool(train_data) and (
        fingerprint == train_data.get("fingerprint") or source.description == train_data.get("source")
    )


def select_records(
    source: Source, split: str, run: RunFolder, own: bool, data: str | Path
) -> tuple[list[Record], str]:
    """The records of ``split`` and how they were chosen (for ``evaluation.json``).

    On the run's own data a split is the run's saved list (ids missing from the data now are reported); on other
    data it is the data's official split, and ``all`` is every record.

    Raises:
        DataError: the split is not there (the message says what is and what to pass instead).
    """
    if split == "all":
        if own:
            logger.warning("%s is the run's own data: --split all includes the images it was trained on", data)
        return source.records(None), "every record"
    if own:
        return _records_from_split_list(source, split, run, data)
    official = source.official_splits()
    if split in official:
        return source.records(split), f"the data's official {split} split"
    if not official:
        raise DataError(
            f"{data} has no splits of its own and is not the data {run.path} was trained on, so it has no {split!r} "
            "split; evaluate all of it with --split all (an external evaluation)"
        )
    raise DataError(f"{data} has no {split!r} split (its splits: {', '.join(official)}; or --split all)")


def _records_from_split_list(source: Source, split: str, run: RunFolder, data: str | Path) -> tuple[list[Record], str]:
    try:
        lists = run.read_splits()
    except DataError:
        raise DataError(f"{run.path} has no split lists, so its {split!r} split is unknown; use --split all") from None
    if split not in lists:
        raise DataError(f"run {run.path} has no {split!r} split (it has {', '.join(lists)})")
    wanted = lists[split]
    by_id = {record.id: record for record in source.records(None)}
    records = [by_id[record_id] for record_id in wanted if record_id in by_id]
    missing = len(wanted) - len(records)
    if not records:
        raise DataError(f"none of the {len(wanted)} images of the run's {split} list are in {data}")
    if missing:
        logger.warning("%d image(s) of the run's %s list are no longer in %s", missing, split, data)
    return records, f"the run's own {split} split list ({len(records)} of {len(wanted)} images present)"


def prepare_evaluation_folder(folder: EvaluationFolder) -> None:
    """An evaluation folder is reused only when it holds an earlier evaluation (``evaluation.json``)."""
    if folder.path.exists() and any(folder.path.iterdir()) and not folder.info_path.is_file():
        raise ConfigError(f"{folder.path} exists and is not a medxai evaluation; choose another --name")
    folder.path.mkdir(parents=True, exist_ok=True)


def evaluate_prepared(
    model: torch.nn.Module,
    split: PreparedSplit,
    name: str,
    card: ModelCard,
    context: BatchContext,
    *,
    logits: torch.Tensor | None = None,
    features: dict[str, torch.Tensor] | None = None,
    guard: DomainGuard | None = None,
    resamples: int = TrainConfig.bootstrap_resamples,
    seed: int = TrainConfig.seed,
) -> SplitEvaluation:
    """Metrics of one split (``metrics.json`` schema: :mod:`medxai.evaluate.summary`): at the argmax, with bootstrap
    intervals, at the card's operating threshold, and calibration with the card's calibration. ``logits`` are the
    split's logits when already computed, ``features`` its stage statistics (from the same pass). With a
    ``guard``, ``metrics["domain"]`` says how many images it marks out of domain
    (:func:`~medxai.evaluate.domain.summarize_verdicts`); the metrics themselves cover every image."""
    verdicts = None
    if guard is not None:
        if logits is None or features is None:
            logits, features = predict_split_with_features(model, split, context, guard.layers)
        verdicts = guard.assess(features, split.facts or [None] * len(split))
    elif logits is None:
        logits = predict_split(model, split, context)
    known = split.labels >= 0
    if not bool(known.any()):
        raise DataError(f"split '{name}' has no labelled images to evaluate")
    metrics = summarize_split(
        split.labels[known].numpy(),
        logits[known],
        label_names=card.label_names,
        positive_index=card.positive_index,
        calibrator=card_calibrator(card),
        threshold=(card.threshold or {}).get("value") if card.is_binary else None,
        resamples=resamples,
        seed=seed,
    )
    ids = [sample_id for sample_id, labelled in zip(split.ids, known.tolist()) if labelled]
    domain_scores = None
    if verdicts is not None:
        metrics["domain"] = summarize_verdicts(verdicts)
        domain_scores = torch.tensor([verdict.score for verdict in verdicts])[known]
    return SplitEvaluation(name, metrics, logits[known], split.labels[known], ids, domain_scores)


def write_figures(
    folder: EvaluationFolder,
    evaluations: Sequence[SplitEvaluation],
    card: ModelCard,
    history: Sequence[Mapping[str, float]] | None,
) -> None:
    """Training curves (from ``history`` rows) and, per evaluated split, the confusion matrix, ROC, precision-recall
    and reliability diagrams."""
    folder.figures_dir.mkdir(parents=True, exist_ok=True)
    if history:
        # train.fit's rule: the highest validation score, ties to the lower validation loss.
        best = max(history, key=lambda row: (row["val_score"], -row["val_loss"]))["epoch"]
        plot_training_curves(list(history), folder.figure_path(TRAINING_CURVES), best_epoch=int(best))
    for evaluation in evaluations:
        _write_split_figures(folder, evaluation, card)


def _is_identity(calibrator: LogitCalibrator) -> bool:
    """Whether the calibration leaves logits as they are (none, or a temperature of 1 without bias)."""
    return calibrator.method == "none" or (
        calibrator.method == "temperature" and calibrator.temperature_ == 1.0 and calibrator.bias_ is None)


def _write_split_figures(folder: EvaluationFolder, evaluation: SplitEvaluation, card: ModelCard) -> None:
    split, labels = evaluation.split, evaluation.labels.numpy()
    calibrator = card_calibrator(card)
    probabilities = torch.softmax(calibrator.transform(evaluation.logits), dim=1).numpy()
    positive = card.positive_index
    plot_confusion_matrix(
        np.array(evaluation.metrics["confusion_matrix"]), card.label_names,
        folder.figure_path("confusion_matrix", split),
        title=f"Confusion matrix ({split}, n={evaluation.metrics['n']})",
    )
    if len(np.unique(labels)) > 1:
        plot_roc_curves(labels, probabilities, card.label_names, folder.figure_path("roc", split),
                        positive_index=positive)
    plot_precision_recall(labels, probabilities, card.label_names, folder.figure_path("precision_recall", split),
                          positive_index=positive)
    plot_reliability_diagram(
        labels, probabilities, folder.figure_path("reliability", split),
        uncalibrated_probabilities=(torch.softmax(evaluation.logits, dim=1).numpy()
                                    if not _is_identity(calibrator) else None),
        class_index=positive if card.is_binary else None,
        class_name=card.label_names[positive] if card.is_binary else None,
        title=f"Reliability diagram ({split}, n={evaluation.metrics['n']})",
    )
