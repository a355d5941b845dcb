"""The end-to-end jobs behind the CLI: train a run, evaluate it, write its figures and heatmap gallery.

This module composes the stages (data -> models/train -> evaluate -> explain -> report); the stages themselves
never import it.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.classifier import Classifier
from medxai.config import RunConfig, save_config
from medxai.data import open_source, resolve_splits, write_split_lists
from medxai.data.augment import BatchAugmenter
from medxai.data.prepared import PreparedSplit, prepare_split
from medxai.data.preprocess import Preprocessor, channel_statistics
from medxai.data.sources import Record, Source
from medxai.errors import ConfigError, DataError
from medxai.evaluate import classification_metrics
from medxai.evaluate.calibration import TemperatureScaler
from medxai.evaluate.summary import summarize_split
from medxai.evaluate.thresholds import THRESHOLD_METHODS, choose_threshold
from medxai.models import create_model
from medxai.models.card import MODEL_CARD_FILE, ModelCard
from medxai.models.checkpoint import save_weights
from medxai.report import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from medxai.report.html import build_report
from medxai.report.plots import plot_precision_recall, plot_reliability_diagram
from medxai.train import BatchContext, fit, predict_split, read_history, resolve_device

__all__ = ["train_run", "evaluate_run", "write_skipped", "SplitEvaluation", "POSITIVE_LABEL_HINTS"]

logger = logging.getLogger(__name__)

# Names that mark the positive (disease) class of a binary task, checked in order.
POSITIVE_LABEL_HINTS = ("pneumonia", "malignant", "tumor", "tumour", "yes", "abnormal", "disease", "positive")


@dataclass
class SplitEvaluation:
    split: str
    metrics: dict[str, Any]
    logits: torch.Tensor
    labels: torch.Tensor
    ids: list[str]


def train_run(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and explain as ``config`` says; return the run folder."""
    run_dir = Path(config.out_dir) / config.name
    _check_operating_point_options(config)
    _prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    source = open_source(config.data.source, patient_pattern=config.data.patient_pattern)
    _check_label_set(source)
    splits = resolve_splits(
        source,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
    )
    write_split_lists(splits, run_dir / "splits")
    prepared = _prepare_splits(source, splits, config)
    write_skipped(run_dir / "skipped.csv", [item for split in prepared.values() for item in split.skipped])
    data_check = _write_data_check(run_dir / "data_check.json", source, prepared)
    if config.data.drop_test_duplicates:
        _drop_test_duplicates(prepared, data_check, run_dir / "data_check.json")
    if config.preprocess.normalize == "dataset":
        config.preprocess.mean, config.preprocess.std = channel_statistics(prepared["train"].images)
    save_config(config, run_dir / "config.yaml")

    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)  # the initial weights are part of the seeded run
    model = create_model(
        config.model.name,
        num_classes=len(source.label_names),
        in_chans=config.preprocess.channels,
        pretrained=config.model.pretrained,
        weights=config.model.weights,
        input_size=config.preprocess.size,
        dropout=config.model.dropout,
    )
    card = _new_card(model, config, source)
    card.save(run_dir / MODEL_CARD_FILE)
    context = BatchContext(
        Preprocessor(config.preprocess), device, config.train.batch_size, config.train.amp, config.train.channels_last
    )
    result = fit(
        model,
        prepared["train"],
        prepared["val"],
        context=context,
        augmenter=BatchAugmenter(config.augment),
        config=config.train,
        card=card,
        run_dir=run_dir,
        score_fn=score_function(config.train.monitor, card),
        resume=resume,
    )
    monitor = "auc" if config.train.monitor == "auto" else config.train.monitor
    logger.info("best epoch %d, validation %s %.4f", result.best_epoch, monitor, result.best_score)
    val_logits = fit_operating_point(result.model, prepared["val"], card, context, config)
    card.save(run_dir / MODEL_CARD_FILE)
    # The weights' own copy of the card gets the temperature and threshold too (it travels without the run folder).
    save_weights(result.model, card, run_dir / "checkpoints" / "best.safetensors")
    evaluations = [
        evaluate_prepared(
            result.model, prepared[name], name, card, context, logits=val_logits if name == "val" else None,
            resamples=config.train.bootstrap_resamples, seed=config.train.seed,
        )
        for name in prepared
        if name != "train"
    ]
    write_metrics(run_dir / "metrics.json", evaluations)
    final = next((item for item in evaluations if item.split == "test"), evaluations[-1])
    card.metrics = {"split": final.split, **_summary(final.metrics)}
    card.save(run_dir / MODEL_CARD_FILE)
    write_figures(run_dir, evaluations, card)
    classifier = Classifier(result.model, card, device=config.train.device)
    write_gallery(
        classifier, source, splits[final.split], final, run_dir / "heatmaps", config.explain.per_outcome, config
    )
    build_report(run_dir)
    return run_dir


def evaluate_run(run_dir: str | Path, data: str, split: str = "test", *, out: str | Path | None = None,
                 device: str = "auto", patient_pattern: str | None = None) -> SplitEvaluation:
    """Evaluate a trained run on one split of any data source whose labels the model knows."""
    classifier = Classifier.from_run(run_dir, device=device)
    source = open_source(data, patient_pattern=patient_pattern)
    label_map = label_mapping(source.label_names, classifier.card.label_names, data)
    available = source.official_splits()
    if split == "all" or not available:
        records = source.records(None)
    elif split in available:
        records = source.records(split)
    else:
        raise DataError(f"{data}: has no '{split}' split (it has {available or 'none'}; use --split all)")
    prepared = prepare_split(source, records, classifier.preprocessor, label_map=label_map, description=split)
    context = BatchContext(classifier.preprocessor, classifier.device, 64)
    evaluation = evaluate_prepared(classifier.model, prepared, split, classifier.card, context)
    out_dir = Path(out) if out else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(out_dir / "metrics.json", [evaluation], merge=True)
    write_skipped(out_dir / "skipped.csv", prepared.skipped)
    write_figures(out_dir, [evaluation], classifier.card, history=False)
    return evaluation


def label_mapping(data_labels: Sequence[str], model_labels: Sequence[str], where: str) -> dict[int, int]:
    """Source label index -> model label index; a data label the model does not know is an error."""
    unknown = [name for name in data_labels if name not in model_labels]
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} are not among the model's labels {list(model_labels)}")
    return {index: list(model_labels).index(name) for index, name in enumerate(data_labels)}


def score_function(monitor: str, card: ModelCard):
    """The validation score to maximise: AUC for binary tasks ("auto"), macro AUC for multi-class, or as named."""
    from medxai.evaluate import roc_auc

    monitor = monitor if monitor != "auto" else "auc"

    def score(logits: torch.Tensor, labels: torch.Tensor) -> float:
        probabilities = torch.softmax(logits, dim=1).numpy()
        truth = labels.numpy()
        if monitor == "accuracy":
            return float((probabilities.argmax(1) == truth).mean())
        if monitor == "loss":
            return -float(torch.nn.functional.cross_entropy(logits, labels))
        if card.is_binary:
            value = roc_auc(truth == card.positive_index, probabilities[:, card.positive_index])
        else:
            value = classification_metrics(truth, probabilities)["auc_macro"]
        return float(value) if value is not None and np.isfinite(value) else -float("inf")

    if monitor not in ("auc", "accuracy", "loss"):
        raise ConfigError(f"train.monitor must be auto, auc, accuracy or loss, got {monitor!r}")
    return score


def evaluate_prepared(
    model: torch.nn.Module,
    split: PreparedSplit,
    name: str,
    card: ModelCard,
    context: BatchContext,
    *,
    logits: torch.Tensor | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> SplitEvaluation:
    """Metrics of one split (``metrics.json`` schema: :mod:`medxai.evaluate.summary`): at the argmax, with bootstrap
    intervals, at the card's operating threshold, and calibration with the card's temperature. ``logits`` are the
    split's logits when already computed."""
    if logits is None:
        logits = predict_split(model, split, context)
    known = split.labels >= 0
    if not bool(known.any()):
        raise DataError(f"split '{name}' has no labelled images to evaluate")
    metrics = summarize_split(
        split.labels[known].numpy(),
        logits[known],
        label_names=card.label_names,
        positive_index=card.positive_index,
        temperature=float(card.temperature or 1.0),
        threshold=(card.threshold or {}).get("value") if card.is_binary else None,
        resamples=resamples,
        seed=seed,
    )
    return SplitEvaluation(name, metrics, logits[known], split.labels[known], [i for i, k in zip(split.ids, known) if k])


def fit_operating_point(
    model: torch.nn.Module, val: PreparedSplit, card: ModelCard, context: BatchContext, config: RunConfig
) -> torch.Tensor:
    """Fit the calibration temperature and (binary tasks) the operating threshold on the VALIDATION split only, and
    store them in ``card``; returns the validation logits. A split where a fit is impossible (one class only) keeps
    temperature 1 / the argmax, with a warning."""
    logits = predict_split(model, val, context)
    known = val.labels >= 0
    labels = val.labels[known]
    if config.train.temperature_scaling:
        try:
            card.temperature = TemperatureScaler().fit(logits[known], labels).temperature_
        except ValueError as error:
            logger.warning("temperature not fitted (%s); keeping 1.0", error)
    method = config.train.threshold_method
    if card.is_binary and method != "argmax":
        probabilities = torch.softmax(logits[known].double() / float(card.temperature), dim=1)
        try:
            chosen = choose_threshold(
                (labels == card.positive_index).numpy(), probabilities[:, card.positive_index].numpy(),
                method=method, target=config.train.target_sensitivity,
            )
        except ValueError as error:
            logger.warning("operating threshold not chosen (%s); predictions use the argmax", error)
        else:
            card.threshold = {
                "value": chosen["value"], "method": method, "target": chosen["target"],
                "val_sensitivity": chosen["sensitivity"], "val_specificity": chosen["specificity"],
            }
    return logits


def _check_operating_point_options(config: RunConfig) -> None:
    """Fail before training, not after it, on an operating-point option that cannot work."""
    methods = (*THRESHOLD_METHODS, "argmax")
    if config.train.threshold_method not in methods:
        raise ConfigError(
            f"train.threshold_method must be one of {list(methods)}, got {config.train.threshold_method!r}"
        )
    if not 0.0 < config.train.target_sensitivity <= 1.0:
        raise ConfigError(f"train.target_sensitivity must lie in (0, 1], got {config.train.target_sensitivity}")
    if config.train.bootstrap_resamples < 0:
        raise ConfigError(f"train.bootstrap_resamples must be >= 0, got {config.train.bootstrap_resamples}")


def write_metrics(path: Path, evaluations: Sequence[SplitEvaluation], merge: bool = False) -> None:
    document: dict[str, Any] = {}
    if merge and path.is_file():
        document = json.loads(path.read_text())
    for evaluation in evaluations:
        document[evaluation.split] = evaluation.metrics
    path.write_text(json.dumps(document, indent=2))


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """``skipped.csv`` (file, reason): written always, so that files in = results + rows here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)


def write_figures(run_dir: Path, evaluations: Sequence[SplitEvaluation], card: ModelCard, history: bool = True) -> None:
    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    if history and (run_dir / "history.csv").is_file():
        rows = read_history(run_dir / "history.csv")
        # train.fit's rule: the highest validation score, ties to the lower validation loss.
        best = max(rows, key=lambda row: (row["val_score"], -row["val_loss"]))["epoch"] if rows else None
        plot_training_curves(rows, figures / "training_curves.png", best_epoch=int(best) if best else None)
    for evaluation in evaluations:
        probabilities = torch.softmax(evaluation.logits / card.temperature, dim=1).numpy()
        plot_confusion_matrix(
            np.array(evaluation.metrics["confusion_matrix"]),
            card.label_names,
            figures / f"confusion_matrix_{evaluation.split}.png",
            title=f"Confusion matrix ({evaluation.split}, n={evaluation.metrics['n']})",
        )
        if len(np.unique(evaluation.labels.numpy())) > 1:
            plot_roc_curves(
                evaluation.labels.numpy(), probabilities, card.label_names,
                figures / f"roc_{evaluation.split}.png", positive_index=card.positive_index,
            )
        plot_precision_recall(
            evaluation.labels.numpy(), probabilities, card.label_names,
            figures / f"precision_recall_{evaluation.split}.png", positive_index=card.positive_index,
        )
        plot_reliability_diagram(
            evaluation.labels.numpy(), probabilities, figures / f"reliability_{evaluation.split}.png",
            uncalibrated_probabilities=(
                torch.softmax(evaluation.logits, dim=1).numpy() if card.temperature != 1.0 else None
            ),
            class_index=card.positive_index if card.is_binary else None,
            class_name=card.label_names[card.positive_index] if card.is_binary else None,
            title=f"Reliability diagram ({evaluation.split}, n={evaluation.metrics['n']})",
        )


def write_gallery(
    classifier: Classifier,
    source: Source,
    records: Sequence[Record],
    evaluation: SplitEvaluation,
    out_dir: Path,
    per_outcome: int,
    config: RunConfig,
) -> list[Path]:
    """Grad-CAM overlays of a few images per outcome (TP/FP/FN/TN for binary tasks; right/wrong per class otherwise),
    the most confident of each, at the original image resolution."""
    by_id = {record.id: record for record in records}
    probabilities = torch.softmax(evaluation.logits / classifier.card.temperature, dim=1)
    predicted = classifier.decide(probabilities)
    chosen: list[tuple[str, str]] = []  # (outcome, id)
    for outcome, mask in _outcomes(evaluation.labels, predicted, classifier.card).items():
        indices = mask.nonzero().flatten()
        # Confidence in the decision taken: under an operating threshold the predicted label need not be the most
        # probable one, so rank by the probability of the predicted label, not by the largest probability.
        confidence = probabilities[indices, predicted[indices]]
        for index in indices[confidence.argsort(descending=True)][:per_outcome].tolist():
            chosen.append((outcome, evaluation.ids[index]))
    if not chosen:
        return []
    images = [source.load(by_id[sample_id]).image for _, sample_id in chosen]
    explanations = classifier.explain(images, method=config.explain.method, layer=config.explain.layer)
    written = []
    truth = dict(zip(evaluation.ids, evaluation.labels.tolist()))
    entries = []
    for (outcome, sample_id), explanation in zip(chosen, explanations):
        stem = f"{outcome}_{_safe_name(sample_id)}_p{max(explanation.prediction.probabilities.values()):.2f}"
        overlay = explanation.overlay(colormap=config.explain.colormap, alpha=config.explain.alpha)
        written.append(_save_display_png(out_dir / f"{stem}.png", overlay))
        if config.explain.save_npy:
            np.save(out_dir / f"{stem}.npy", explanation.heatmap)
        entries.append(_gallery_entry(outcome, sample_id, explanation, truth[sample_id], written[-1], classifier.card))
    # What the report's gallery shows: one entry per overlay, in the order written.
    (out_dir / "gallery.json").write_text(json.dumps(
        {"split": evaluation.split, "method": config.explain.method,
         "decision_rule": explanations[0].prediction.decision_rule, "items": entries}, indent=2,
    ))
    return written


def _gallery_entry(outcome: str, sample_id: str, explanation, label_index: int, path: Path, card: ModelCard) -> dict:
    """One ``heatmaps/gallery.json`` item: outcome, id, true and predicted label, probabilities, file name."""
    prediction = explanation.prediction
    return {
        "outcome": outcome,
        "id": sample_id,
        "label": card.label_names[label_index],
        "predicted": prediction.label,
        # The probability of the predicted label (under a threshold it need not be the largest), and of every label.
        "probability": prediction.probabilities[prediction.label],
        "probability_positive": (
            prediction.probabilities[card.label_names[card.positive_index]] if card.is_binary else None
        ),
        "probabilities": prediction.probabilities,
        "explained_label": explanation.target_label,
        "file": path.name,
    }


def _save_display_png(path: Path, overlay: np.ndarray, min_side: int = 224) -> Path:
    """Save an overlay; tiny images (28 px MedMNIST) are enlarged by an integer factor, nearest neighbour, so the
    gallery is legible without inventing detail: every original pixel becomes a uniform square."""
    from PIL import Image

    factor = max(1, -(-min_side // max(1, min(overlay.shape[:2]))))
    image = Image.fromarray(overlay)
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _outcomes(labels: torch.Tensor, predicted: torch.Tensor, card: ModelCard) -> dict[str, torch.Tensor]:
    if card.is_binary:
        positive = card.positive_index
        truth, guess = labels == positive, predicted == positive
        return {
            "true_positive": truth & guess,
            "false_positive": ~truth & guess,
            "false_negative": truth & ~guess,
            "true_negative": ~truth & ~guess,
        }
    outcomes = {}
    for index, name in enumerate(card.label_names):
        outcomes[f"correct_{_safe_name(name)}"] = (labels == index) & (predicted == index)
        outcomes[f"missed_{_safe_name(name)}"] = (labels == index) & (predicted != index)
    return outcomes


def _safe_name(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text).strip("_")[:80]


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "checkpoints" / "state.json").is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/state.json)")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{run_dir} already exists; use --resume to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _check_label_set(source: Source) -> None:
    if len(source.label_names) < 2:
        raise DataError(f"{source.description}: needs at least two classes, found {source.label_names}")


def _prepare_splits(source: Source, splits: dict[str, list[Record]], config: RunConfig) -> dict[str, PreparedSplit]:
    preprocessor = Preprocessor(config.preprocess)
    prepared = {
        name: prepare_split(source, records, preprocessor, num_workers=config.data.num_workers, description=name)
        for name, records in splits.items()
        if records
    }
    for required in ("train", "val"):
        if required not in prepared:
            raise DataError(f"{source.description}: the {required} split is empty")
    present = set(prepared["train"].labels.tolist())
    if len(present) < 2:
        raise DataError(f"{source.description}: the train split holds only one class ({sorted(present)})")
    return prepared


def _write_data_check(path: Path, source: Source, prepared: dict[str, PreparedSplit]) -> dict[str, Any]:
    """Counts per split and class, unreadable files, exact and near duplicates within and across splits (hashed
    from the prepared images the model sees, see :mod:`medxai.data.check`), image sizes and modes; written to
    ``data_check.json`` and returned. Cross-split duplicates are logged as a loud warning."""
    from medxai.data.check import check_prepared

    result = check_prepared(source, prepared)
    path.write_text(json.dumps(result, indent=2))
    counts = result["duplicates"]["counts"]
    if counts["cross_split_pairs"]:
        examples = "; ".join(
            f"{entry['a']['split']}:{entry['a']['id']} = {entry['b']['split']}:{entry['b']['id']}"
            for entry in result["duplicates"]["cross_split"][:3]
        )
        logger.warning(
            "DATA LEAK: %d duplicate pair(s) ACROSS SPLITS (%d exact), e.g. %s. Test scores will be optimistic; "
            "see %s, or set data.drop_test_duplicates=true to drop test images duplicated in train",
            counts["cross_split_pairs"], counts["cross_split_exact_pairs"], examples, path,
        )
    if counts["exact_groups"] or counts["near_pairs"]:
        logger.info("data check: %d exact duplicate group(s), %d near-duplicate pair(s) (%.1f s)",
                    counts["exact_groups"], counts["near_pairs"], result["seconds"])
    return result


def _drop_test_duplicates(prepared: dict[str, PreparedSplit], data_check: dict[str, Any], path: Path) -> None:
    """Remove test images that duplicate a train image (exact or near) before evaluation; record them."""
    from medxai.data.check import leaked_ids

    if "test" not in prepared:
        return
    leaked = leaked_ids(data_check, against=("train",), split="test")
    test = prepared["test"]
    keep = [index for index, sample_id in enumerate(test.ids) if sample_id not in leaked]
    if len(keep) == len(test):
        logger.info("drop_test_duplicates: no test image duplicates a train image")
    else:
        if not keep:
            raise DataError("drop_test_duplicates would remove every test image: the test split is a copy of train")
        index = torch.tensor(keep, dtype=torch.long)
        prepared["test"] = PreparedSplit(
            images=test.images[index], labels=test.labels[index], ids=[test.ids[i] for i in keep],
            boxes=[test.boxes[i] for i in keep], skipped=test.skipped,
        )
        logger.warning("drop_test_duplicates: dropped %d of %d test images duplicated in train; %d remain",
                       len(test) - len(keep), len(test), len(keep))
    data_check["dropped_from_test"] = sorted(leaked & set(test.ids))
    path.write_text(json.dumps(data_check, indent=2))


def _new_card(model: torch.nn.Module, config: RunConfig, source: Source) -> ModelCard:
    names = list(source.label_names)
    positive = next((name for hint in POSITIVE_LABEL_HINTS for name in names if hint in name.lower()), None)
    if len(names) == 2 and positive is None:
        positive = names[1]
    return ModelCard(
        architecture=config.model.name,
        num_classes=len(names),
        in_chans=config.preprocess.channels,
        input_size=config.preprocess.size,
        label_names=names,
        preprocess=config.to_dict()["preprocess"],
        cam_layer=model.cam_layer,
        classifier=getattr(model, "classifier_name", ""),
        dropout=config.model.dropout,
        positive_label=positive if len(names) == 2 else None,
        train_data={"source": source.description, "fingerprint": source.fingerprint()},
    )


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")
    return {key: metrics.get(key) for key in keys}
