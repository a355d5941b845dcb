"""``medxai predict`` and ``medxai explain``: a run applied to files and folders, every input accounted for.

Inputs are expanded and named by :class:`~medxai.jobs.names.InputNames` (pseudonyms with ``hash_names``), read in
batches; a batch with a bad file is retried file by file, so one broken file costs nothing else. Files in = results
+ rows of ``skipped.csv``, which also lists what was never opened (named pipes, sockets, broken or looping links,
hidden clutter). Every output (CSV, JSON, overlay and DICOM file names, the skipped list and the log) names inputs as
:class:`InputNames` does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medxai.classifier import Classifier, Explanation, Prediction
from medxai.config import ExplainConfig, InferenceConfig
from medxai.data.dicom_sc import is_dicom_file, write_secondary_capture
from medxai.errors import ConfigError, InvalidImageError
from medxai.explain import save_overlay
from medxai.explain.overlay import OUT_OF_DOMAIN_BANNER
from medxai.explain.tta import parse_tta
from medxai.jobs.names import InputFile, InputNames
from medxai.jobs.results import ResultsJournal
from medxai.run_folder import check_output_location

__all__ = [
    "EXPLAIN_CHUNK",
    "OOD_ACTIONS",
    "PREDICT_CHUNK",
    "BatchResult",
    "DicomOutput",
    "ExplainedFile",
    "check_ood_action",
    "chunk_size",
    "explain_files",
    "one_by_one_on_failure",
    "out_of_domain_reason",
    "predict_files",
    "prediction_columns",
    "prediction_row",
    "write_explanation_files",
]

#: What ``--ood-action`` does with an input the domain guard marks out of domain: keep it, marked (``in_domain``
#: false in every output, a banner on its overlay), or leave it out of the results and list it in skipped.csv.
OOD_ACTIONS = ("mark", "skip")

logger = logging.getLogger(__name__)


@dataclass
class ExplainedFile:
    """One explained input and the files written for it (the image and its heatmap are not kept: batch jobs forget
    them once the overlay is written)."""

    prediction: Prediction
    target_label: str
    method: str
    overlay: Path
    extra: list[Path] = field(default_factory=list)


@dataclass
class BatchResult:
    """What a batch job did: results in input order, skipped inputs with reasons, how many entries were found.

    With ``keep=False`` (``--out`` on the command line) ``predictions`` and ``explained`` stay empty and the
    results are only in the files written; ``done`` counts them either way (with ``resume``, those of earlier runs
    included)."""

    classifier: Classifier
    inputs: int
    predictions: list[Prediction] = field(default_factory=list)
    explained: list[ExplainedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    done: int = 0
    files: list[Path] = field(default_factory=list)


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
    resume: bool = False,
    keep: bool = True,
    on_results: Callable[[list[Prediction], list[tuple[str, str]]], None] | None = None,
) -> BatchResult:
    """Classify files and folders, streaming: decode a chunk, predict it, write it, forget it.

    With ``out``, ``predictions.csv`` and ``skipped.csv`` grow chunk by chunk (a killed job loses at most one
    chunk) and ``predictions.parquet`` is written at the end.

    Args:
        ood_action: see :data:`OOD_ACTIONS`.
        tta: test-time augmentation views (:mod:`medxai.explain.tta`).
        backend: ``torch``, or ``onnxruntime`` to run the run's ONNX export (``medxai export``); the outputs are
            the same (see :data:`medxai.classifier.BACKENDS`).
        resume: keep what ``out`` holds already and predict only the inputs in neither of its files.
        keep: also return every prediction in :class:`BatchResult` (memory grows with the inputs; ``False`` for
            large folders written to ``out``).
        on_results: called with each chunk's predictions and skipped entries as they are made (``--json``).
    """
    inference = inference or InferenceConfig()
    check_ood_action(ood_action)
    if resume and out is None:
        raise ConfigError("--resume needs --out: the folder whose predictions.csv is continued")
    if out is not None:
        check_output_location(out, inputs=items, runs=[run_dir])
    names = InputNames(items, hash_names=hash_names)
    with names.redacted_logs(), contextlib.ExitStack() as stack:
        classifier = Classifier.from_run(run_dir, device=inference.device, batch_size=inference.batch_size, tta=tta,
                                         backend=backend, allow_unfinished=inference.allow_unfinished)
        label_names = classifier.label_names
        journal = None if out is None else stack.enter_context(
            ResultsJournal(out, prediction_columns(label_names), names, resume=resume))
        result = BatchResult(classifier, len(names))

        def predict(files: list[InputFile]) -> list[Prediction]:
            return classifier.predict([file.path for file in files], ids=[file.name for file in files])

        def deliver(predictions: list[Prediction], skipped: list[tuple[str, str]]) -> None:
            predictions, out_of_domain = _apply_ood_action(predictions, ood_action, lambda item: item)
            skipped = skipped + out_of_domain
            if journal is not None:
                journal.write((prediction_row(item, label_names) for item in predictions), skipped)
            if keep:
                result.predictions.extend(predictions)
            if journal is None:
                result.skipped.extend(skipped)
            result.done += len(predictions)
            if on_results is not None:
                on_results(predictions, skipped)

        listed, todo = journal.pending() if journal is not None else (names.skipped, names.files)
        deliver([], listed)
        for predictions, skipped in _stream(names, todo, predict, chunk_size(classifier.batch_size), "predict"):
            deliver(predictions, skipped)
        if journal is not None:
            result.files = journal.close()
            result.skipped, result.done = list(journal.skipped), journal.written
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
    resume: bool = False,
    keep: bool = True,
    writers: int | None = None,
) -> BatchResult:
    """Write a heatmap overlay (PNG, at each image's original resolution) per input into ``out``, plus
    ``predictions.csv``, ``predictions.parquet`` and ``skipped.csv``; raw maps as ``.npy`` with
    ``explain.save_npy``; DICOM Secondary Captures with ``dicom``.

    Streaming: a chunk of (at most :data:`EXPLAIN_CHUNK`) images is decoded and explained, its overlays are coloured,
    encoded and written by ``writers`` threads while the next chunk is explained, and each input's row is written
    once its files are; memory is bounded by the chunk and the writes in flight, not by the number of inputs.

    Each overlay explains the label the run's decision rule reports, unless ``target`` names a class. An input the
    domain guard marks out of domain gets a red banner across its overlay (``ood_action="mark"``) or is listed in
    ``skipped.csv`` instead (``"skip"``). ``explain.tta`` averages probabilities and maps over test-time views.
    ``resume`` and ``keep``: see :func:`predict_files`.
    """
    explain = explain or ExplainConfig()
    inference = inference or InferenceConfig()
    check_ood_action(ood_action)
    if dicom.copy_patient and dicom.deidentify:
        raise ConfigError("--dicom-sc-copy-patient and --dicom-sc-deidentify contradict each other; choose one")
    check_output_location(out, inputs=items, runs=[run_dir])
    names = InputNames(items, hash_names=hash_names)
    folder = Path(out)
    with names.redacted_logs(), contextlib.ExitStack() as stack:
        classifier = Classifier.from_run(run_dir, device=inference.device, batch_size=inference.batch_size,
                                         tta=parse_tta(explain.tta), allow_unfinished=inference.allow_unfinished)
        label_names = classifier.label_names
        journal = stack.enter_context(ResultsJournal(folder, prediction_columns(label_names), names, resume=resume))
        result = BatchResult(classifier, len(names))
        stems = {file.name: file for file in names.files}
        workers = writers or _writer_threads()
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medxai-overlay"))
        in_flight: deque[tuple[Future, Prediction]] = deque()

        def finish_oldest() -> None:
            future, prediction = in_flight.popleft()
            written = future.result()
            journal.write([prediction_row(prediction, label_names)])
            if keep:
                result.explained.append(written)

        def explain_batch(files: list[InputFile]) -> list[Explanation]:
            return classifier.explain([file.path for file in files], ids=[file.name for file in files],
                                      method=explain.method, target=target, layer=explain.layer)

        listed, todo = journal.pending()
        journal.write([], listed)
        for explanations, skipped in _stream(names, todo, explain_batch, chunk_size(classifier.batch_size, explaining=True),
                                             "explain"):
            explanations, out_of_domain = _apply_ood_action(explanations, ood_action, lambda item: item.prediction)
            journal.write([], skipped + out_of_domain)
            for explanation in explanations:
                future = pool.submit(write_explanation_files, explanation, stems[explanation.prediction.id], folder, explain,
                                     dicom)
                in_flight.append((future, explanation.prediction))
                while len(in_flight) > 2 * workers:  # bounded: each pending write holds a full-size image
                    finish_oldest()
            del explanations
        while in_flight:
            finish_oldest()
        result.files = journal.close()
        result.skipped, result.done = list(journal.skipped), journal.written
    return result


def write_explanation_files(
    explanation: Explanation, file: InputFile, folder: Path, explain: ExplainConfig, dicom: DicomOutput = DicomOutput()
) -> ExplainedFile:
    """``<stem>.png`` (the overlay, with the out-of-domain banner where the guard flagged the input), ``<stem>.npy``
    with ``explain.save_npy``, and a DICOM Secondary Capture with ``dicom`` (the Ray engine's actors call this too)."""
    banner = OUT_OF_DOMAIN_BANNER if explanation.prediction.in_domain is False else None
    overlay = save_overlay(folder / f"{file.stem}.png", explanation.image, explanation.heatmap,
                           colormap=explain.colormap, alpha=explain.alpha, banner=banner)
    written = ExplainedFile(explanation.prediction, explanation.target_label, explanation.method, overlay)
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


def check_ood_action(action: str) -> None:
    """Raises ConfigError unless ``action`` is one of :data:`OOD_ACTIONS`."""
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
            skipped.append((prediction.id, out_of_domain_reason(prediction)))
        else:
            kept.append(item)
    if skipped:
        logger.warning("%d input(s) out of the training domain left out (--ood-action skip); see skipped.csv",
                       len(skipped))
    return kept, skipped


def out_of_domain_reason(prediction: Prediction) -> str:
    """The ``skipped.csv`` reason of an input left out as out of domain (``--ood-action skip``)."""
    return "out of domain: " + "; ".join(prediction.domain_reasons)


#: Images explained at a time: each holds its original and a full-size float heatmap until its overlay is written.
EXPLAIN_CHUNK = 8


#: Images predicted at a time, at most: full-resolution originals are large.
PREDICT_CHUNK = 32


def chunk_size(batch_size: int, *, explaining: bool = False) -> int:
    """Files decoded at a time: a batch, but at most :data:`PREDICT_CHUNK` originals (:data:`EXPLAIN_CHUNK` when
    explaining)."""
    return max(1, min(batch_size, EXPLAIN_CHUNK if explaining else PREDICT_CHUNK))


def _stream(names: InputNames, files: Sequence[InputFile], function: Callable[[list[InputFile]], list], chunk: int,
            description: str) -> Iterator[tuple[list, list[tuple[str, str]]]]:
    """``function`` over chunks of ``files``, yielding each chunk's results and skipped entries, with a progress bar
    (rate and ETA); a chunk with a bad file is retried file by file, so nothing is lost."""
    with tqdm(total=len(files), desc=description, unit="img", disable=None) as progress:
        for start in range(0, len(files), chunk):
            part = list(files[start : start + chunk])
            results, failures = one_by_one_on_failure(function, part)
            skipped = []
            for file, error in failures:
                reason = names.redact(error.reason)
                skipped.append((file.name, reason))
                logger.warning("skipped %s: %s", file.name, reason)
            progress.update(len(part))
            yield results, skipped


def one_by_one_on_failure(function: Callable[[list], list], items: list) -> tuple[list, list[tuple[Any, Exception]]]:
    """``function(items)``; if an item cannot be used (:class:`InvalidImageError`), each item alone, so that one
    broken file costs nothing else. Returns the results and the ``(item, error)`` of the items that failed.

    Whatever fails because of one input is an :class:`InvalidImageError` by the time it gets here: the readers turn
    their unforeseen exceptions into one (``unreadable (Type: ...)``), and so does the classifier for an image's
    preprocessing. Any other exception is not about one input (the network, the device, a bad option) and stops the
    job rather than skipping every file in its name.
    """
    try:
        return function(items), []
    except InvalidImageError:
        results, failures = [], []
        for item in items:
            try:
                results.extend(function([item]))
            except InvalidImageError as error:
                failures.append((item, error))
        return results, failures


def _writer_threads() -> int:
    """Overlay writers: colouring and PNG encoding release the GIL, so one per core beyond the model's."""
    return max(1, min(4, (os.cpu_count() or 2)))


def prediction_columns(label_names: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv`` (and of its Parquet twin), in order."""
    return ["file", "prediction", *(f"p_{name}" for name in label_names), "decision_rule", "in_domain",
            "domain_score", "domain_reasons"]


def prediction_row(prediction: Prediction, label_names: Sequence[str]) -> dict[str, object]:
    """One prediction as a row of :func:`prediction_columns` (``in_domain`` and ``domain_score`` None without a
    guard; the reasons joined by ``"; "``)."""
    values = [prediction.id, prediction.label, *(prediction.probabilities[name] for name in label_names),
              prediction.decision_rule, prediction.in_domain, prediction.domain_score,
              "; ".join(prediction.domain_reasons)]
    return dict(zip(prediction_columns(label_names), values))
