"""The ``medxai explain-eval`` job: can a run's heatmaps be believed? Writes ``explain_metrics.json``.

For each CAM method, on up to ``max_images`` images of a labelled split: deletion and insertion AUC, ROAD (MoRF and
LeRF), the same four for random heatmaps, whether the method beats them, and the model-randomisation sanity check
(:mod:`medxai.explain.faithfulness`, :mod:`medxai.explain.sanity`). Every map explains the class the run's
classifier decides (its calibrated probabilities and operating threshold), from the same forward pass as the
decision; the curves follow that class's calibrated probability.

This is a job that composes the pipeline (run folder -> data -> model -> explain), so it imports the classifier and
the workflow helpers lazily, inside the function: the explain stage itself does not depend on them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medxai.errors import ConfigError, DataError
from medxai.explain import get_cam_method
from medxai.explain.faithfulness import FaithfulnessSummary, faithfulness_metrics, random_saliency
from medxai.explain.sanity import model_randomisation_check
from medxai.explain.targets import ClassTarget, PredictedClassTarget

__all__ = ["evaluate_explanations", "EXPLAIN_METRICS_FILE"]

logger = logging.getLogger(__name__)

EXPLAIN_METRICS_FILE = "explain_metrics.json"
_METRIC_KEYS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")


class _DecisionTarget(PredictedClassTarget):
    """The logit of the class the classifier decides (temperature and operating threshold), in the same forward.

    A :class:`PredictedClassTarget` with the run's decision rule instead of argmax, so gradient-free methods
    (Score-CAM) freeze it to the decided class when they score masked inputs.
    """

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier

    def classes(self, logits: Tensor) -> Tensor:
        detached = logits.detach().float()
        return self.classifier.decide(self.classifier.probabilities(detached)).to(logits.device).long()

    def __repr__(self) -> str:
        return "DecisionTarget()"


def _canonical_name(name: str) -> str:
    """The registry key of a method name (``"Grad-CAM++"`` -> ``"gradcamplusplus"``), as the JSON keys use."""
    from medxai.explain import CAM_METHODS

    method = get_cam_method(name)
    return next(key for key, value in CAM_METHODS.items() if value is method)


def _select_records(source: Any, split: str, run_dir: Path, data: str) -> list[Any]:
    """The split's records: the source's official split, all records, or the run's own list for that split."""
    from medxai.data import read_split_lists

    available = source.official_splits()
    if split == "all":
        return source.records(None)
    if split in available:
        return source.records(split)
    lists_dir = run_dir / "splits"
    if (lists_dir / f"{split}.txt").is_file():
        wanted = set(read_split_lists(lists_dir).get(split, []))
        records = [record for record in source.records(None) if record.id in wanted]
        if records:
            logger.info("%s: using the run's own '%s' split (%d images)", data, split, len(records))
            return records
        raise DataError(f"{data}: none of the ids in {lists_dir / f'{split}.txt'} are in this data source")
    raise DataError(f"{data}: has no '{split}' split (it has {available or 'none'}; use --split all)")


def _subset(records: Sequence[Any], max_images: int, seed: int) -> list[Any]:
    if max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    if len(records) <= max_images:
        return list(records)
    chosen = np.sort(np.random.default_rng(seed).choice(len(records), size=max_images, replace=False))
    return [records[int(index)] for index in chosen]


def evaluate_explanations(
    run_dir: str | Path,
    data: str,
    split: str = "test",
    *,
    methods: Sequence[str] = ("gradcam",),
    max_images: int = 200,
    steps: int = 20,
    baseline: str = "blur",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    sanity_images: int = 32,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Faithfulness and sanity of CAM methods on a run; writes ``explain_metrics.json`` into ``out`` (or the run).

    Args:
        run_dir: a run folder (``medxai train``).
        data: the data source (folder, manifest, .npz, MedMNIST name) whose labels the model knows.
        split: an official split of ``data``, ``all``, or a split the run listed in ``splits/``.
        methods: CAM method names (see :data:`medxai.explain.CAM_METHODS`).
        max_images: a seeded random subset of at most this many images is evaluated.
        steps: deletion/insertion steps.
        baseline: ``"blur"`` or ``"mean"`` for deletion/insertion.
        seed: image subset, tie order, random heatmaps, ROAD noise and re-initialisation.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass.
        sanity_images: the first this many evaluated images go into the sanity check (one CAM call per layer).
        out: folder for ``explain_metrics.json``.

    Returns:
        The document written (see the module docstring and the README for its keys).

    Raises:
        ConfigError: unknown method or baseline, bad counts.
        DataError: the split is missing or unreadable, or its labels are unknown to the model.
    """
    from medxai.classifier import Classifier
    from medxai.data import open_source
    from medxai.data.prepared import prepare_split
    from medxai.workflow import label_mapping

    if baseline not in ("blur", "mean"):
        raise ConfigError(f"unknown baseline {baseline!r}: use 'blur' or 'mean'")
    method_classes = {_canonical_name(name): get_cam_method(name) for name in methods}
    if not method_classes:
        raise ConfigError("name at least one CAM method")
    run_dir = Path(run_dir)
    classifier = Classifier.from_run(run_dir, device=device)
    source = open_source(data)
    label_map = label_mapping(source.label_names, classifier.card.label_names, data)
    records = _subset(_select_records(source, split, run_dir, data), max_images, seed)
    prepared = prepare_split(source, records, classifier.preprocessor, label_map=label_map,
                             description=f"{split} (explain-eval)")
    model = classifier.model.eval()
    images = torch.cat([
        classifier.preprocessor.normalize(part.float().to(classifier.device)) for part in prepared.images.split(256)
    ])
    logger.info("explain-eval on %d images of %s (%s), methods: %s", len(prepared), data, split,
                ", ".join(method_classes))

    def calibrated_probability(logits: Tensor, classes: Tensor) -> Tensor:
        return classifier.probabilities(logits.float()).gather(1, classes.long()[:, None]).squeeze(1)

    document: dict[str, Any] = {
        "run": str(run_dir),
        "data": str(data),
        "split": split,
        "n_images": len(prepared),
        "baseline": baseline,
        "steps": steps,
        "seed": seed,
        "methods": {},
    }
    random_metrics: dict[str, Tensor] | None = None
    random_classes: Tensor | None = None
    for name, method in method_classes.items():
        started = time.perf_counter()
        cam = method(model, classifier.card.cam_layer)
        target = _DecisionTarget(classifier)
        results = [cam(batch, target) for batch in images.split(batch_size)]
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
        method_means, random_means = summary.means()
        sanity_count = min(sanity_images, len(prepared))
        sanity = model_randomisation_check(
            method, model, images[:sanity_count], ClassTarget(classes[:sanity_count]),
            target_layers=classifier.card.cam_layer, seed=seed,
        )
        entry = {key: round(method_means[key], 6) for key in _METRIC_KEYS}
        entry["random_baseline"] = {key: round(random_means[key], 6) for key in _METRIC_KEYS}
        entry["beats_random"] = summary.beats_random()
        entry["sanity_check"] = sanity.to_dict()
        entry["seconds"] = round(time.perf_counter() - started, 2)
        document["methods"][name] = entry
        logger.info("%s: deletion %.4f (random %.4f), insertion %.4f (random %.4f), sanity %s, %.0f s", name,
                    entry["deletion_auc"], random_means["deletion_auc"], entry["insertion_auc"],
                    random_means["insertion_auc"], "passed" if sanity.passed else "FAILED", entry["seconds"])

    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXPLAIN_METRICS_FILE).write_text(json.dumps(document, indent=2))
    if prepared.skipped:
        from medxai.workflow import write_skipped

        write_skipped(out_dir / "explain_skipped.csv", prepared.skipped)
    return document
