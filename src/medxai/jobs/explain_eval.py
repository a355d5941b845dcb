"""``medxai explain-eval``: can a run's heatmaps be believed? Writes ``explain_metrics.json``.

For each CAM method, on up to ``max_images`` images of a labelled split: deletion and insertion AUC, ROAD (MoRF and
LeRF), the same four for random heatmaps, whether the method beats them, and the model-randomisation sanity check
(:mod:`medxai.explain.faithfulness`, :mod:`medxai.explain.sanity`). Every map explains the label the run's classifier
reports (its calibrated probabilities and operating threshold; log-odds for binary models), from the same forward pass
as the decision, exactly as ``medxai explain`` does; the curves follow that label's calibrated probability.

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
from medxai.data.cache import to_unit_range
from medxai.data.labels import match_labels
from medxai.data.prepared import preparation_options, prepare_split
from medxai.errors import ConfigError
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
    records = _subset(records, settings.max_images, settings.seed)
    out = run if own else run.evaluation(name or default_evaluation_name(data, split))
    if not own:
        prepare_evaluation_folder(out)
    prepared = prepare_split(source, records, classifier.preprocessor, label_map=label_mapping,
                             description=f"{split} (explain-eval)", **preparation_options(run.data_config()))
    model = classifier.model.eval()
    images = torch.cat([
        classifier.preprocessor.normalize(to_unit_range(prepared.images.codes(slice(start, start + 256)).to(
            classifier.device))) for start in range(0, len(prepared), 256)
    ])
    logger.info("explain-eval on %d images of %s (%s), methods: %s", len(prepared), data, selection,
                ", ".join(method_classes))
    steps, baseline, batch_size, seed = settings.steps, settings.baseline, settings.batch_size, settings.seed
    sanity_images = settings.sanity_images

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
    random_metrics: dict[str, Tensor] | None = None
    random_classes: Tensor | None = None
    # Three stages per method (maps, deletion/insertion/ROAD, sanity check): a bar with rate and ETA over them all.
    progress = tqdm(total=3 * len(method_classes), desc="explain-eval", unit="stage", disable=None)
    for method_name, method in method_classes.items():
        progress.set_postfix_str(method_name)
        started = time.perf_counter()
        cam = method(model, classifier.card.cam_layer)
        target = classifier.decision_target()
        results = [cam(batch, target) for batch in images.split(batch_size)]
        progress.update()
        maps = torch.cat([result.maps for result in results])
        classes = torch.cat([result.target_class for result in results])
        options = dict(steps=steps, baseline=baseline, batch_size=batch_size, score_fn=calibrated_probability,
                       seed=seed)
        if random_metrics is None or not torch.equal(classes, random_classes):
            # Random heatmaps explain the same classes of the same images for every method: computed once, and
            # their time is reported apart from the methods'.
            random_started = time.perf_counter()
            random_maps = random_saliency(maps.shape, seed=seed, device=maps.device)
            random_metrics = faithfulness_metrics(model, images, random_maps, classes, **options)
            random_classes = classes
            random_seconds = time.perf_counter() - random_started
            document["random_baseline_seconds"] = round(document.get("random_baseline_seconds", 0.0)
                                                        + random_seconds, 2)
            started += random_seconds
        summary = FaithfulnessSummary(faithfulness_metrics(model, images, maps, classes, **options), random_metrics)
        progress.update()
        method_means, random_means = summary.means()
        sanity_count = min(sanity_images, len(prepared))
        sanity = model_randomisation_check(
            method, model, images[:sanity_count], ClassTarget(classes[:sanity_count]),
            target_layers=classifier.card.cam_layer, seed=seed,
        )
        progress.update()
        entry = {key: round(method_means[key], 6) for key in _METRIC_KEYS}
        entry["random_baseline"] = {key: round(random_means[key], 6) for key in _METRIC_KEYS}
        entry["beats_random"] = summary.beats_random()
        entry["sanity_check"] = sanity.to_dict()
        entry["seconds"] = round(time.perf_counter() - started, 2)
        document["methods"][method_name] = entry
        logger.info("%s: deletion %.4f (random %.4f), insertion %.4f (random %.4f), sanity %s, %.0f s", method_name,
                    entry["deletion_auc"], random_means["deletion_auc"], entry["insertion_auc"],
                    random_means["insertion_auc"], "passed" if sanity.passed else "FAILED", entry["seconds"])
    progress.close()

    if not own and not out.info_path.is_file():
        out.write_info({"name": out.name, "kind": "external", "data": source.description,
                        "fingerprint": fingerprint, "split": split, "selection": selection})
    out.write_explain_metrics(document)
    if prepared.skipped:
        write_skipped(out.explain_skipped_path, prepared.skipped)
    return document
