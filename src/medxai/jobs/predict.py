"""``medxai predict`` and ``medxai explain``: a run applied to files and folders, every input accounted for.

Inputs are expanded and named by :class:`~medxai.jobs.names.InputNames` (pseudonyms with ``hash_names``), read in
batches; a batch with a bad file is retried file by file, so one broken file costs nothing else. Files in = results
+ rows of ``skipped.csv``, which also lists what was never opened (named pipes, sockets, broken or looping links,
hidden clutter). Every output (CSV, JSON, overlay and DICOM file names, the skipped list and the log) names inputs as
:class:`InputNames` does.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medxai.classifier import Classifier, Explanation, Prediction
from medxai.config import ExplainConfig, InferenceConfig
from medxai.data.dicom_sc import is_dicom_file, write_secondary_capture
from medxai.errors import ConfigError, InvalidImageError
from medxai.explain import save_overlay
from medxai.explain.overlay import OUT_OF_DOMAIN_BANNER
from medxai.explain.tta import parse_tta
from medxai.jobs.names import InputFile, InputNames
from medxai.run_folder import PREDICTIONS_FILE, SKIPPED_FILE, write_skipped

__all__ = ["predict_files", "explain_files", "BatchResult", "ExplainedFile", "DicomOutput", "OOD_ACTIONS"]

#: What ``--ood-action`` does with an input the domain guard marks out of domain: keep it, marked (``in_domain``
#: false in every output, a banner on its overlay), or leave it out of the results and list it in skipped.csv.
OOD_ACTIONS = ("mark", "skip")

logger = logging.getLogger(__name__)


@dataclass
class ExplainedFile:
    """One explained input and the files written for it."""

    explanation: Explanation
    overlay: Path
    extra: list[Path] = field(default_factory=list)


@dataclass
class BatchResult:
    """What a batch job did: results in input order, skipped inputs with reasons, how many entries were found."""

    classifier: Classifier
    inputs: int
    predictions: list[Prediction] = field(default_factory=list)
    explained: list[ExplainedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class DicomOutput:
    """``--dicom-sc``: also write each DICOM input's overlay as a Secondary Capture (see :mod:`medxai.data.dicom_sc`).

    Attributes:
        enabled: write them at all.
        copy_patient: copy the patient and study identification (PHI, by choice).
        deidentify: a new study without references to the source.
    """

    enabled: bool = False
    copy_patient: bool = False
    deidentify: bool = False


def predict_files(
    run_dir: str | Path,
    items: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    hash_names: bool = False,
    inference: InferenceConfig | None = None,
    ood_action: str = "mark",
    tta: Sequence[str] = (),
    backend: str = "torch",
) -> BatchResult:
    """Classify files and folders; with ``out``, write ``predictions.csv`` and ``skipped.csv`` there.

    Args:
        ood_action: see :data:`OOD_ACTIONS`.
        tta: test-time augmentation views (:mod:`medxai.explain.tta`).
        backend: ``torch``, or ``onnxruntime`` to run the run's ONNX export (``medxai export``); the outputs are
            the same (see :data:`medxai.classifier.BACKENDS`).
    """
    inference = inference or InferenceConfig()
    _check_ood_action(ood_action)
    names = InputNames(items, hash_names=hash_names)
    with names.redacted_logs():
        classifier = Classifier.from_run(run_dir, device=inference.device, batch_size=inference.batch_size, tta=tta,
                                         backend=backend)
        result = BatchResult(classifier, len(names), skipped=list(names.skipped))

        def predict(files: list[InputFile]) -> list[Prediction]:
            return classifier.predict([file.path for file in files], ids=[file.name for file in files])

        predictions, skipped = _batched(names, predict, _chunk(classifier))
        predictions, out_of_domain = _apply_ood_action(predictions, ood_action, lambda item: item)
        result.predictions, result.skipped = predictions, result.skipped + skipped + out_of_domain
        if out is not None:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            _write_predictions_csv(folder / PREDICTIONS_FILE, predictions, classifier.label_names)
            write_skipped(folder / SKIPPED_FILE, result.skipped)
    return result


def explain_files(
    run_dir: str | Path,
    items: Sequence[str | Path],
    out: str | Path,
    *,
    explain: ExplainConfig | None = None,
    target: int | str | None = None,
    hash_names: bool = False,
    dicom: DicomOutput = DicomOutput(),
    inference: InferenceConfig | None = None,
    ood_action: str = "mark",
) -> BatchResult:
    """Write a heatmap overlay (PNG, at each image's original resolution) per input into ``out``, plus
    ``skipped.csv``; raw maps as ``.npy`` with ``explain.save_npy``; DICOM Secondary Captures with ``dicom``.

    Each overlay explains the label the run's decision rule reports, unless ``target`` names a class. An input the
    domain guard marks out of domain gets a red banner across its overlay (``ood_action="mark"``) or is listed in
    ``skipped.csv`` instead (``"skip"``). ``explain.tta`` averages probabilities and maps over test-time views.
    """
    explain = explain or ExplainConfig()
    inference = inference or InferenceConfig()
    _check_ood_action(ood_action)
    if dicom.copy_patient and dicom.deidentify:
        raise ConfigError("--dicom-sc-copy-patient and --dicom-sc-deidentify contradict each other; choose one")
    names = InputNames(items, hash_names=hash_names)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with names.redacted_logs():
        classifier = Classifier.from_run(run_dir, device=inference.device, batch_size=inference.batch_size,
                                         tta=parse_tta(explain.tta))
        result = BatchResult(classifier, len(names), skipped=list(names.skipped))
        stems = {file.name: file for file in names.files}

        def explain_batch(files: list[InputFile]) -> list[Explanation]:
            return classifier.explain([file.path for file in files], ids=[file.name for file in files],
                                      method=explain.method, target=target, layer=explain.layer)

        explanations, skipped = _batched(names, explain_batch, _chunk(classifier))
        explanations, out_of_domain = _apply_ood_action(explanations, ood_action, lambda item: item.prediction)
        result.skipped += skipped + out_of_domain
        for explanation in explanations:
            result.explained.append(_write_outputs(explanation, stems[explanation.prediction.id], folder, explain,
                                                   dicom))
        write_skipped(folder / SKIPPED_FILE, result.skipped)
    return result


def _write_outputs(
    explanation: Explanation, file: InputFile, folder: Path, explain: ExplainConfig, dicom: DicomOutput
) -> ExplainedFile:
    banner = OUT_OF_DOMAIN_BANNER if explanation.prediction.in_domain is False else None
    overlay = save_overlay(folder / f"{file.stem}.png", explanation.image, explanation.heatmap,
                           colormap=explain.colormap, alpha=explain.alpha, banner=banner)
    written = ExplainedFile(explanation, overlay)
    if explain.save_npy:
        np.save(folder / f"{file.stem}.npy", explanation.heatmap)
        written.extra.append(folder / f"{file.stem}.npy")
    if dicom.enabled and is_dicom_file(file.path):
        description = f"{explanation.method} heatmap overlay ({explanation.target_label})"
        try:
            written.extra.append(write_secondary_capture(
                explanation.overlay(colormap=explain.colormap, alpha=explain.alpha), file.path,
                folder / f"{file.stem}.dcm", copy_patient=dicom.copy_patient, deidentify=dicom.deidentify,
                description=description,
            ))
        except InvalidImageError as error:  # the PNG overlay stands; only the DICOM copy is missing
            logger.warning("no DICOM secondary capture for %s: %s", file.name, error.reason)
    return written


def _check_ood_action(action: str) -> None:
    if action not in OOD_ACTIONS:
        raise ConfigError(f"--ood-action must be one of {list(OOD_ACTIONS)}, got {action!r}")


def _apply_ood_action(results: list, action: str, prediction_of: Callable) -> tuple[list, list[tuple[str, str]]]:
    """Keep every result (``mark``), or move the out-of-domain ones to the skipped list with the guard's reasons."""
    if action == "mark":
        return results, []
    kept, skipped = [], []
    for item in results:
        prediction = prediction_of(item)
        if prediction.in_domain is False:
            skipped.append((prediction.id, "out of domain: " + "; ".join(prediction.domain_reasons)))
        else:
            kept.append(item)
    if skipped:
        logger.warning("%d input(s) out of the training domain left out (--ood-action skip); see skipped.csv",
                       len(skipped))
    return kept, skipped


def _chunk(classifier: Classifier, most: int = 32) -> int:
    """Files decoded at a time: a batch, but at most ``most`` originals (full-resolution images are large)."""
    return max(1, min(classifier.batch_size, most))


def _batched(names: InputNames, function: Callable[[list[InputFile]], list], chunk: int):
    """Run ``function`` on chunks of files; a chunk with a bad file is retried file by file so nothing is lost."""
    results, skipped = [], []
    files = names.files
    for start in range(0, len(files), chunk):
        part = list(files[start : start + chunk])
        try:
            results.extend(function(part))
        except InvalidImageError:
            for file in part:
                try:
                    results.extend(function([file]))
                except InvalidImageError as error:
                    reason = names.redact(error.reason)
                    skipped.append((file.name, reason))
                    logger.warning("skipped %s: %s", file.name, reason)
    return results, skipped


def _write_predictions_csv(path: Path, predictions: Sequence[Prediction], label_names: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "prediction", *(f"p_{name}" for name in label_names), "decision_rule",
                         "in_domain", "domain_score", "domain_reasons"])
        for prediction in predictions:
            writer.writerow([prediction.id, prediction.label,
                             *(prediction.probabilities[name] for name in label_names), prediction.decision_rule,
                             "" if prediction.in_domain is None else str(prediction.in_domain).lower(),
                             "" if prediction.domain_score is None else prediction.domain_score,
                             "; ".join(prediction.domain_reasons)])
