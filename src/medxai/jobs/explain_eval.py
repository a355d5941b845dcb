"""``medxai explain-eval``: can a run's heatmaps be believed? Writes ``explain_metrics.json``.

For each CAM method, on up to ``max_images`` images of a labelled split: deletion and insertion AUC, ROAD (MoRF and
LeRF), the same four for random heatmaps, whether the method beats them, and the model-randomisation sanity check
(:mod:`medxai.explain.faithfulness`, :mod:`medxai.explain.sanity`). Every map explains the label the run's classifier
reports (its calibrated probabilities and operating threshold; log-odds for binary models), from the same forward pass
as the decision, exactly as ``medxai explain`` does; the curves follow that label's calibrated probability.

Where the images carry lesion masks or boxes (or ``ground_truth`` gives them), each method's maps are also compared
with them on the original images (:mod:`medxai.jobs.localization`: pointing game, IoU, IoBB... with bootstrap
intervals; per-class thresholds chosen on the run's validation split). Every method gets the shortcut alarm
(:mod:`medxai.explain.shortcut`): does the evidence of correctly classified images sit on the border, on burnt-in text
or outside the body? On the run's own test split its verdict is recorded in the model card.

The images are chosen as ``medxai evaluate`` chooses them (:func:`medxai.jobs.evaluate.select_records`): the run's
own split lists on its own data, the data's official split (or all of it) elsewhere. Results on the run's own data go
to the run folder; on other data, to ``RUN/evaluations/<name>/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from medxai.classifier import Classifier
from medxai.config import ExplainEvalConfig, InferenceConfig
from medxai.data import open_source
from medxai.data.ground_truth import attach_ground_truth, open_ground_truth
from medxai.data.cache import to_unit_range
from medxai.data.labels import match_labels
from medxai.data.prepared import PreparedSplit, preparation_options, prepare_split
from medxai.errors import ConfigError, DataError
from medxai.explain import CAM_METHODS, get_cam_method
from medxai.explain.faithfulness import (
    FaithfulnessSummary,
    faithfulness_metrics,
    random_saliency,
)
from medxai.explain.sanity import model_randomisation_check
from medxai.explain.targets import ClassTarget
from medxai.jobs.evaluate import (
    default_evaluation_name,
    is_training_data,
    prepare_evaluation_folder,
    select_records,
)
from medxai.jobs.localization import (
    LesionTruth,
    localization_rows,
    localization_summary,
    place_maps,
    read_truths,
    save_extreme_cases,
    shortcut_verdicts,
    thresholds_on,
)
from medxai.run_folder import RunFolder, write_skipped

__all__ = ["evaluate_explanations"]

logger = logging.getLogger(__name__)

_METRIC_KEYS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")


def _canonical_name(name: str) -> str:
    """The registry key of a method name (``"Grad-CAM++"`` -> ``"gradcamplusplus"``), as the JSON keys use."""
    method = get_cam_method(name)
    return next(key for key, value in CAM_METHODS.items() if value is method)


def _subset(records: Sequence[Any], max_images: int, seed: int) -> list[Any]:
    if max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    if len(records) <= max_images:
        return list(records)
    chosen = np.sort(np.random.default_rng(seed).choice(len(records), size=max_images, replace=False))
    return [records[int(index)] for index in chosen]


def evaluate_explanations(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    settings: ExplainEvalConfig | None = None,
    name: str | None = None,
    label_map: Mapping[str, str] | Sequence[str] | None = None,
    split_folders: Mapping[str, str] | None = None,
    inference: InferenceConfig | None = None,
    ground_truth: str | Path | None = None,
) -> dict[str, Any]:
    """Faithfulness and sanity of CAM methods on a run; writes ``explain_metrics.json`` (see the module docstring).

    Args:
        run_dir: a run folder (``medxai train``).
        data: the data source (folder, manifest, .npz, MedMNIST name) whose labels the model knows.
        split: ``train``, ``val``, ``test`` or ``all``.
        settings: methods, image count, steps, baseline, seed, batch size, sanity images.
        name: the evaluation folder's name for data other than the run's own (default: data name and split).
        label_map: ``{data label: model label}`` for names that do not match by themselves.
        split_folders: passed to :func:`~medxai.data.open_source`.
        inference: the device.
        ground_truth: masks or boxes given apart from the data (``--masks``): a folder of mask files named after the
            images, or a CSV (:func:`medxai.data.ground_truth.open_ground_truth`); they replace the data's own for
            the images they name, the others keep theirs.

    Returns:
        The document written (see the README for its keys).

    Raises:
        ConfigError: unknown method or baseline, bad counts.
        DataError: the split is missing or unreadable, or its labels are unknown to the model.
    """
    settings = settings or ExplainEvalConfig()
    inference = inference or InferenceConfig()
    if settings.baseline not in ("blur", "mean"):
        raise ConfigError(f"unknown baseline {settings.baseline!r}: use 'blur' or 'mean'")
    method_classes = {_canonical_name(method): get_cam_method(method) for method in settings.methods}
    if not method_classes:
        raise ConfigError("name at least one CAM method")
    run = RunFolder(run_dir)
    run.check_is_run()
    classifier = Classifier.from_run(run.path, device=inference.device, allow_unfinished=inference.allow_unfinished)
    source = open_source(data, split_folders=split_folders)
    label_mapping = match_labels(source.label_names, classifier.card.label_names, label_map, where=str(data))
    fingerprint = source.fingerprint()
    own = is_training_data(source, classifier.card, fingerprint)
    records, selection = select_records(source, split, run, own, data)
    if ground_truth is not None:
        records = attach_ground_truth(records, open_ground_truth(ground_truth), replace_own=True)
    records = _subset(records, settings.max_images, settings.seed)
    out = run if own else run.evaluation(name or default_evaluation_name(data, split))
    if not own:
        prepare_evaluation_folder(out)
    layer = settings.layer or classifier.card.cam_layer
    _check_methods_explain(method_classes, classifier, layer)
    with out.staged_explain_eval_outputs() as staging:
        document = _evaluate(run, out, staging, own, source, records, selection, split, data, fingerprint,
                             label_mapping, classifier, method_classes, layer, settings, ground_truth)
    return document


def _check_methods_explain(method_classes: Mapping[str, type], classifier: Classifier, layer) -> None:
    """Build each method once before any image is read: an unknown layer is refused at once (naming close ones)."""
    for method in method_classes.values():
        method(classifier.model, layer)


def _evaluate(run: RunFolder, out, staging, own: bool, source, records, selection: str, split: str, data,
              fingerprint: str, label_mapping, classifier: Classifier, method_classes: Mapping[str, type], layer,
              settings: ExplainEvalConfig, ground_truth) -> dict[str, Any]:
    """The body of :func:`evaluate_explanations` once the run, data and records are known; overlays and per-image
    rows go to ``staging`` (published when this returns), the JSON and skipped list to ``out``."""
    prepared = prepare_split(source, records, classifier.preprocessor, label_map=label_mapping,
                             description=f"{split} (explain-eval)", **preparation_options(run.data_config()))
    model = classifier.model.eval()
    images = _model_inputs(classifier, prepared)
    skipped = list(prepared.skipped)
    truths = read_truths(source, records, prepared, classifier.device, skipped)
    records_by_id = {record.id: record for record in records}
    validation = _validation_truths(source, run, own, split, settings, classifier, ground_truth, skipped) \
        if truths else None
    logger.info("explain-eval on %d images of %s (%s), methods: %s", len(prepared), data, selection,
                ", ".join(method_classes))
    steps, baseline, batch_size, seed = settings.steps, settings.baseline, settings.batch_size, settings.seed

    def calibrated_probability(logits: Tensor, classes: Tensor) -> Tensor:
        return classifier.probabilities(logits.float()).gather(1, classes.long()[:, None]).squeeze(1)

    document: dict[str, Any] = {
        "run": str(run.path),
        "data": str(data),
        "split": split,
        "selection": selection,
        "folder": str(out.path),
        "n_images": len(prepared),
        "baseline": baseline,
        "steps": steps,
        "seed": seed,
        "methods": {},
    }
    if truths:
        document["localization"] = {
            "images_with_ground_truth": len(truths),
            "lesion_images": sum(not truth.empty for truth in truths),
            "empty_mask_images": sum(truth.empty for truth in truths),
            "layer": layer,
            "thresholds_from": validation[0] if validation else None,
        }
    localization_table: list[dict[str, Any]] = []
    maps_by_method: dict[str, Tensor] = {}
    classes_by_method: dict[str, Tensor] = {}
    random_cache: dict[str, Any] = {"seconds": 0.0}
    # Four stages per method (maps, deletion/insertion/ROAD, sanity check, localisation): a bar with rate and ETA.
    progress = tqdm(total=4 * len(method_classes), desc="explain-eval", unit="stage", disable=None)
    for method_name, method in method_classes.items():
        progress.set_postfix_str(method_name)
        started = time.perf_counter()
        maps, classes = _maps(method, model, layer, images, classifier, batch_size)
        maps_by_method[method_name], classes_by_method[method_name] = maps, classes
        progress.update()
        entry: dict[str, Any] = {}
        if settings.faithfulness:
            entry, random_seconds = _faithfulness(method, model, images, maps, classes, layer, settings,
                                                  calibrated_probability, random_cache)
            started += random_seconds  # the random maps' time is reported apart from the methods'
            logger.info("%s: deletion %.4f (random %.4f), insertion %.4f (random %.4f), sanity %s", method_name,
                        entry["deletion_auc"], entry["random_baseline"]["deletion_auc"], entry["insertion_auc"],
                        entry["random_baseline"]["insertion_auc"],
                        "passed" if entry["sanity_check"]["passed"] else "FAILED")
        progress.update(2)
        if truths:
            entry["localization"], rows = _localization(
                method_name, method, maps, classes, truths, prepared, validation, classifier, layer, batch_size,
                staging, source, records_by_id,
            )
            localization_table.extend(rows)
        progress.update()
        entry["seconds"] = round(time.perf_counter() - started, 2)
        document["methods"][method_name] = entry
    progress.close()
    if "metrics" in random_cache:
        document["random_baseline_seconds"] = round(random_cache["seconds"], 2)
    verdicts = shortcut_verdicts(staging.shortcut_dir, source, records_by_id, prepared, maps_by_method,
                                 classes_by_method, classifier.card.label_names)
    for method_name, verdict in verdicts.items():
        document["methods"][method_name]["shortcut_alarm"] = verdict
    document["shortcut_alarm"] = {"fires": any(verdict["fires"] for verdict in verdicts.values()),
                                  "methods": [name for name, verdict in verdicts.items() if verdict["fires"]]}
    if own and split == "test":
        _record_shortcut_verdict(run, document)

    if not own and not out.info_path.is_file():
        out.write_info({"name": out.name, "kind": "external", "data": source.description,
                        "fingerprint": fingerprint, "split": split, "selection": selection})
    out.write_explain_metrics(document)
    if localization_table:
        staging.write_localization_rows(localization_table)
    if skipped:
        write_skipped(out.explain_skipped_path, skipped)
    return document


def _faithfulness(method: type, model: torch.nn.Module, images: Tensor, maps: Tensor, classes: Tensor, layer,
                  settings: ExplainEvalConfig, score_fn, random_cache: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Deletion/insertion/ROAD of one method's maps beside random maps, and the sanity check: its JSON entry, and
    the seconds spent on random maps (computed once for every method explaining the same classes, kept in
    ``random_cache``)."""
    options = dict(steps=settings.steps, baseline=settings.baseline, batch_size=settings.batch_size,
                   score_fn=score_fn, seed=settings.seed)
    random_seconds = 0.0
    if "metrics" not in random_cache or not torch.equal(classes, random_cache["classes"]):
        started = time.perf_counter()
        random_maps = random_saliency(maps.shape, seed=settings.seed, device=maps.device)
        random_cache["metrics"] = faithfulness_metrics(model, images, random_maps, classes, **options)
        random_cache["classes"] = classes
        random_seconds = time.perf_counter() - started
        random_cache["seconds"] += random_seconds
    summary = FaithfulnessSummary(faithfulness_metrics(model, images, maps, classes, **options),
                                  random_cache["metrics"])
    method_means, random_means = summary.means()
    count = min(settings.sanity_images, images.shape[0])
    sanity = model_randomisation_check(method, model, images[:count], ClassTarget(classes[:count]),
                                       target_layers=layer, seed=settings.seed)
    entry: dict[str, Any] = {key: round(method_means[key], 6) for key in _METRIC_KEYS}
    entry["random_baseline"] = {key: round(random_means[key], 6) for key in _METRIC_KEYS}
    entry["beats_random"] = summary.beats_random()
    entry["sanity_check"] = sanity.to_dict()
    return entry, random_seconds


def _record_shortcut_verdict(run: RunFolder, document: Mapping[str, Any]) -> None:
    """The model card keeps the shortcut alarm's verdict on the run's own test images (an unbound, descriptive
    field: measured after the weights were saved), with the methods and regions that fired."""
    card = run.read_card()
    card.metrics["shortcut_alarm"] = {
        "split": document["split"], "n_images": document["n_images"], **document["shortcut_alarm"],
        "regions": sorted({region for entry in document["methods"].values()
                           for region, result in entry["shortcut_alarm"]["regions"].items() if result["fires"]}),
    }
    run.write_card(card)


def _model_inputs(classifier: Classifier, prepared: PreparedSplit) -> Tensor:
    """The prepared images normalised for the model, on its device."""
    return torch.cat([
        classifier.preprocessor.normalize(to_unit_range(prepared.images.codes(slice(start, start + 256)).to(
            classifier.device))) for start in range(0, len(prepared), 256)
    ])


def _maps(method: type, model: torch.nn.Module, layer: str | list[str], images: Tensor, classifier: Classifier,
          batch_size: int) -> tuple[Tensor, Tensor]:
    """The method's maps of every image at the model's input size, explaining the label the classifier reports."""
    cam = method(model, layer)
    target = classifier.decision_target()
    results = [cam(batch, target) for batch in images.split(batch_size)]
    return torch.cat([result.maps for result in results]), torch.cat([result.target_class for result in results])


def _validation_truths(source, run: RunFolder, own: bool, split: str, settings: ExplainEvalConfig,
                       classifier: Classifier, ground_truth: str | Path | None, skipped: list[tuple[str, str]]
                       ) -> tuple[str, Tensor, PreparedSplit, list[LesionTruth]] | None:
    """The run's validation images with ground truth, on which per-class map thresholds are chosen (Saporta et al.
    choose them on validation, never on the images they are then measured on); None off the run's own data, when
    the evaluated split is validation itself, or when validation has no masks."""
    if not own or split in ("val", "all"):
        return None
    try:
        records, _ = select_records(source, "val", run, own, run.path)
    except DataError:
        return None
    if ground_truth is not None:
        records = attach_ground_truth(records, open_ground_truth(ground_truth), replace_own=True)
    records = _subset([record for record in records if record.masks or record.boxes], settings.max_images,
                      settings.seed)
    if not records:
        return None
    prepared = prepare_split(source, records, classifier.preprocessor, description="val (explain-eval thresholds)",
                             **preparation_options(run.data_config()))
    truths = read_truths(source, records, prepared, classifier.device, skipped)
    if not any(not truth.empty for truth in truths):
        return None
    return "val", _model_inputs(classifier, prepared), prepared, truths


def _localization(method_name: str, method: type, maps: Tensor, classes: Tensor, truths: list[LesionTruth],
                  prepared: PreparedSplit, validation, classifier: Classifier, layer, batch_size: int, staging,
                  source, records_by_id: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One method's localisation summary (with its best and worst cases drawn) and its per-image rows."""
    thresholds = None
    if validation is not None:
        _, val_images, val_prepared, val_truths = validation
        val_maps, _ = _maps(method, classifier.model, layer, val_images, classifier, batch_size)
        thresholds = thresholds_on(place_maps(val_maps, val_truths, val_prepared), val_truths)
    placed = place_maps(maps, truths, prepared)
    rows = localization_rows(method_name, placed, truths, classes, classifier.card.label_names, prepared.ids,
                             thresholds)
    summary = localization_summary(rows)
    if thresholds is not None:
        summary["thresholds"] = {classifier.card.label_names[key]: value for key, value in thresholds.items()}
    summary["cases"] = save_extreme_cases(staging.localization_dir, method_name, rows, placed, truths, source,
                                          records_by_id)
    return summary, rows
