"""``medxai train`` and ``medxai demo``: data -> splits -> model -> fit -> calibration -> evaluation -> gallery ->
report, written into one run folder (:mod:`medxai.run_folder`).

This is a job: it composes the stages and the stages never import it. Everything a later command needs goes into the
run folder: the resolved configuration (written first, so the folder is provably a run from its first second), the
split lists, the data check, the model card (with the positive label, temperature, threshold and how the splits were
made), checkpoints, metrics, figures, heatmaps and the report.

``--resume`` continues a run from its own ``config.yaml``: only the keys in :data:`RESUMABLE_KEYS` may change, and
the data must still have the fingerprint the card recorded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.classifier import Classifier
from medxai.config import RunConfig, apply_overrides
from medxai.data import Record, Source, is_hidden_or_system, open_source
from medxai.data.augment import BatchAugmenter
from medxai.data.check import check_prepared, leaked_ids
from medxai.data.ground_truth import prepare_masks
from medxai.data.labels import choose_positive_label
from medxai.data.prepared import PreparedSplit, prepare_split, preparation_options
from medxai.data.preprocess import Preprocessor, channel_statistics
from medxai.data.splits import SplitPlan, plan_splits
from medxai.errors import ConfigError, DataError
from medxai.evaluate import classification_metrics, roc_auc
from medxai.evaluate.calibration import CALIBRATION_METHODS, LogitCalibrator, card_calibrator
from medxai.evaluate.thresholds import THRESHOLD_METHODS, choose_threshold
from medxai.data.input_profile import InputProfile, image_facts
from medxai.evaluate.domain import DomainGuard, fit_domain_guard, summarize_verdicts, synthetic_probes
from medxai.jobs.evaluate import SplitEvaluation, evaluate_prepared, write_figures
from medxai.report.plots import plot_domain_scores
from medxai.jobs.gallery import write_gallery
from medxai.models import create_model
from medxai.models.card import ModelCard
from medxai.models.checkpoint import save_weights
from medxai.report.html import build_report
from medxai.run_folder import RunFolder, check_folder_name
from medxai.train import BatchContext, distributed, fit, resolve_device
from medxai.train.distributed import Distributed
from medxai.train.explanation_loss import check_explanation_settings, counted_images
from medxai.train.loop import predict_split_with_features

__all__ = [
    "train_run", "finish_run", "resume_config", "score_function", "fit_operating_point", "RESUMABLE_KEYS",
]

logger = logging.getLogger(__name__)

#: What ``--resume`` may change in a run's saved configuration: how long and where it runs, and what is written after
#: training. Everything else (data, preprocessing, model, optimiser, the explanation loss and its weight...) defines
#: the run and is refused; so is ``explain.layer``, which becomes the run's CAM layer (model card, bound to the
#: weights) and the layer the "cam" and "actdiff" explanation losses train.
RESUMABLE_KEYS = (
    "train.epochs",
    "train.patience",
    "train.device",
    "train.threads",
    "train.bootstrap_resamples",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "explain.method",
    "explain.colormap",
    "explain.alpha",
    "explain.per_outcome",
    "explain.save_npy",
)


def train_run(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and explain as ``config`` says; return the run folder.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is one rank of a DDP job (:mod:`medxai.train.distributed`); after
    ``torchrun`` restarts failed workers (``--max-restarts``) the run continues from its last checkpoint.

    Args:
        config: the resolved configuration (for ``resume``, from :func:`resume_config`).
        resume: continue the run in ``out_dir/name`` from its last checkpoint.
        overwrite: replace an existing run of that name (only a folder that is provably a medxai run).

    Raises:
        ConfigError: a bad option, a run folder that may not be written, or a resume that would change the run.
        DataError: unusable data.
    """
    with distributed.session(config.train.device) as (job, device_name):
        return _train(config, job, device_name, resume=resume, overwrite=overwrite)


def _train(config: RunConfig, job: Distributed, device_name: str, *, resume: bool, overwrite: bool) -> Path:
    """:func:`train_run` in this process: the whole job on one process, or one rank's part under ``torchrun``
    (every rank prepares the data and trains; rank 0 alone writes the run folder and finishes the run)."""
    run = RunFolder(Path(config.out_dir) / check_folder_name(config.name))
    _check_operating_point_options(config)
    check_explanation_settings(config.train.explanation_loss, config.train.explanation_weight)
    resume, overwrite = _after_restart(run, resume, overwrite)
    if resume:
        run.check_resumable()
    else:
        run.check_can_create(overwrite=overwrite)  # before anything slow: refuse early, delete nothing
    source = open_source(config.data.source, patient_pattern=config.data.patient_pattern,
                         split_folders=config.data.split_folders)
    _check_label_set(source)
    _check_explain_layer(config, len(source.label_names))
    positive = choose_positive_label(source.label_names, config.data.positive_label)
    if resume:
        _check_same_data(run, source)
    job.barrier()  # every rank has checked the folder before rank 0 creates it
    if job.is_main and not resume:
        run.prepare_new(overwrite=overwrite, protected=_data_locations(source))
        run.write_config(config)  # first: from here on the folder is provably a medxai run
    if config.train.threads:
        torch.set_num_threads(config.train.threads)

    plan = plan_splits(source, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
                       seed=config.data.split_seed, min_val_size=config.data.min_val_size)
    if config.train.explanation_loss != "none":
        _check_train_ground_truth(source, plan.splits["train"], config)
    prepared = _prepare_splits(source, plan.splits, config, job)
    if config.train.explanation_loss != "none":
        _attach_train_masks(source, plan.splits["train"], prepared, config)
    if config.preprocess.normalize == "dataset":
        config.preprocess.mean, config.preprocess.std = channel_statistics(prepared["train"].images)
    if job.is_main:
        run.write_skipped(_skipped(source, plan, prepared))
        data_check = _data_check(run, source, prepared, config.data.near_duplicate_bits)
        if config.data.drop_test_duplicates:
            _drop_test_duplicates(prepared, data_check)
        run.write_data_check(data_check)
        run.write_splits({name: split.ids for name, split in prepared.items()})
        run.write_config(config)

    device = resolve_device(device_name)
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
    card = _new_card(model, config, source, positive, plan)
    if job.is_main:
        card.run_id = run.read_run_id()  # the marker's: card and weights name the run they belong to
        run.write_card(card)
    job.barrier()  # rank 0's data check and writes (minutes on a large set) are done before DDP's first collective
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
        run=run,
        score_fn=score_function(config.train.monitor, card),
        resume=resume,
        job=job,
    )
    monitor = "auc" if config.train.monitor == "auto" else config.train.monitor
    logger.info("best epoch %d, validation %s %.4f", result.best_epoch, monitor, result.best_score)
    if job.is_main:
        finish_run(run, result.model, card, prepared, source, plan.splits, context, config)
    job.barrier()  # the run is finished before any rank returns
    return run.path


def _after_restart(run: RunFolder, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """After ``torchrun`` restarted the workers (``--max-restarts``), continue from the last checkpoint the failed
    attempt wrote, or, when it failed before its first epoch ended, start its run folder again (only a folder medxai
    provably wrote and that holds nothing else: the one the failed attempt began)."""
    if not distributed.restart_count() or resume:
        return resume, overwrite
    try:
        run.check_resumable()
    except ConfigError:
        if run.is_deletable():
            logger.warning("restart %d: no checkpoint yet in %s; starting the run again",
                           distributed.restart_count(), run.path)
            return False, True
        return resume, overwrite
    logger.warning("restart %d: resuming %s from its last checkpoint", distributed.restart_count(), run.path)
    return True, overwrite


def finish_run(
    run: RunFolder,
    model: torch.nn.Module,
    card: ModelCard,
    prepared: dict[str, PreparedSplit],
    source: Source,
    records: dict[str, list[Record]],
    context: BatchContext,
    config: RunConfig,
) -> None:
    """Everything after the weights are final, for a trained run and an ensemble alike: calibration and threshold
    on validation, the domain guard, the weights with their card, metrics of every split but train, figures, the
    gallery and the report."""
    # One pass over validation gives the logits the calibration and threshold are fitted on and the stage features
    # the domain guard is thresholded on; the val evaluation below reuses both.
    layers = _guard_layers(model, config)
    val_logits, val_features = predict_split_with_features(model, prepared["val"], context, layers)
    fit_operating_point(val_logits, prepared["val"].labels, card, config)
    guard = _fit_domain_guard(model, prepared["train"], val_features, context, config) if layers else None
    if guard is not None:
        guard.save(run.domain_guard_path)
        card.domain = guard.describe()
    else:  # a guard an earlier attempt left must not pass for this model's
        run.domain_guard_path.unlink(missing_ok=True)
    run.write_card(card)
    # The weights' own copy of the card gets the calibration and threshold too (it travels without the run folder),
    # and the digest of the card's bound fields and of the guard file: a card or guard changed later is refused.
    save_weights(model, card, run.weights_path("best"), guard_path=run.domain_guard_path if guard else None)
    evaluations = [
        evaluate_prepared(
            model, prepared[name], name, card, context, logits=val_logits if name == "val" else None,
            features=val_features if name == "val" else None, guard=guard,
            resamples=config.train.bootstrap_resamples, seed=config.train.seed,
        )
        for name in prepared
        if name != "train"
    ]
    final = next((item for item in evaluations if item.split == "test"), evaluations[-1])
    if guard is not None:
        card.domain["probes"] = _probe_domain_guard(model, guard, prepared[final.split], final, context, run,
                                                    config.train.seed)
    run.write_metrics({evaluation.split: evaluation.metrics for evaluation in evaluations})
    card.metrics = {"split": final.split, **_summary(final.metrics)}
    run.write_card(card)
    history = run.read_history() if run.history_path.is_file() else None
    write_figures(run, evaluations, card, history=history)
    classifier = Classifier(model, card, device=config.train.device, guard=guard)
    write_gallery(classifier, source, records[final.split], final, run, config.explain)
    build_report(run.path)


def resume_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The configuration to resume ``run_dir`` with: its saved ``config.yaml`` plus ``overrides``.

    The run's location (``name``, ``out_dir``) is where it lies now. Overrides that change anything outside
    :data:`RESUMABLE_KEYS` are refused: a run resumed on other data or another model would not be that run.

    Raises:
        ConfigError: nothing to resume, or a refused change (the message lists it and what may change).
    """
    run = RunFolder(run_dir)
    run.check_resumable()
    saved = run.read_config()
    values = saved.to_dict()
    apply_overrides(values, list(overrides))
    config = RunConfig.from_dict(values)
    config.name, config.out_dir = run.path.name, str(run.path.parent)
    saved.name, saved.out_dir = config.name, config.out_dir
    changes = _differences(saved.to_dict(), config.to_dict())
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise ConfigError(
            f"--resume continues {run.path} with its saved {run.config_path.name}, and these options would change "
            f"the run: {listed}. On resume only {', '.join(RESUMABLE_KEYS)} may change; start a new run (another "
            "--name) for anything else"
        )
    if changes:
        logger.info("resuming %s with %s", run.path,
                    ", ".join(f"{key} = {new!r}" for key, (_, new) in changes.items()))
    return config


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested mappings, with (old, new)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        left, right = old.get(key), new.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            changes.update(_differences(left, right, f"{dotted}."))
        elif left != right:
            changes[dotted] = (left, right)
    return changes


def _check_same_data(run: RunFolder, source: Source) -> None:
    """Refuse to resume on data whose content changed since the run started, or with another architecture."""
    recorded = (run.read_card().train_data or {}).get("fingerprint")
    current = source.fingerprint()
    if recorded and recorded != current:
        raise ConfigError(
            f"--resume: the data {source.description} is not the data {run.path} started on (content fingerprint "
            f"{recorded[:19]} then, {current[:19]} now); resuming would train on other images. Start a "
            "new run instead"
        )


def _data_locations(source: Source) -> list[Path]:
    """What a run folder must never overlap: an image folder's root (a run inside it would be read as a class next
    time), a manifest or a MedMNIST file (its images may lie beside it, untouched)."""
    inner = getattr(source, "volumes", None)
    if inner is not None:
        return _data_locations(inner)
    for attribute in ("csv_path", "path", "root"):
        value = getattr(source, attribute, None)
        if value is not None:
            return [Path(value)]
    return []


def score_function(monitor: str, card: ModelCard):
    """The validation score to maximise: AUC for binary tasks ("auto"), macro AUC for multi-class, or as named."""
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



def fit_operating_point(
    logits: torch.Tensor, val_labels: torch.Tensor, card: ModelCard, config: RunConfig
) -> None:
    """Fit the calibration and (binary tasks) the operating threshold on the VALIDATION split's logits only, and
    store them in ``card``. A split where a fit is impossible (one class only) stays uncalibrated / uses the argmax,
    with a warning."""
    known = val_labels >= 0
    labels = val_labels[known]
    if config.train.temperature_scaling and config.train.calibration != "none":
        try:
            calibrator = LogitCalibrator(config.train.calibration).fit(logits[known], labels)
        except ValueError as error:
            logger.warning("calibration not fitted (%s); probabilities stay uncalibrated", error)
        else:
            card.calibration = calibrator.to_dict()
            card.temperature = calibrator.temperature_
    method = config.train.threshold_method
    if card.is_binary and method != "argmax":
        probabilities = torch.softmax(card_calibrator(card).transform(logits[known].double()), dim=1)
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


def _guard_layers(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """The stages the domain guard models; [] when it is turned off or the model declares none (with a warning)."""
    layers = list(getattr(model, "stage_layers", ()))
    if config.domain.enabled and not layers:
        logger.warning("no domain guard: %s declares no stages", config.model.name)
    return layers if config.domain.enabled else []


def _fit_domain_guard(
    model: torch.nn.Module, train: PreparedSplit, val_features: dict[str, torch.Tensor], context: BatchContext,
    config: RunConfig,
) -> DomainGuard | None:
    """Fit the out-of-domain guard (:mod:`medxai.evaluate.domain`) on un-augmented train images (a seeded subset of
    at most ``domain.max_train_images``) and threshold it on the validation features; None when impossible."""
    settings = config.domain
    train = _subset(train, settings.max_train_images, config.train.seed)
    _, train_features = predict_split_with_features(model, train, context, list(val_features))
    profile = InputProfile.fit(train.facts, input_size=config.preprocess.size,
                               modalities=settings.modalities, body_parts=settings.body_parts)
    try:
        return fit_domain_guard(train_features, train.labels, val_features, profile,
                                false_alarm_rate=settings.false_alarm_rate, shrinkage=settings.shrinkage)
    except (ValueError, RuntimeError) as error:  # e.g. a singular covariance on tiny data
        logger.warning("no domain guard: it could not be fitted (%s)", error)
        return None


def _subset(split: PreparedSplit, limit: int, seed: int) -> PreparedSplit:
    if len(split) <= limit:
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return split.subset(keep.tolist())


def _probe_domain_guard(
    model: torch.nn.Module, guard: DomainGuard, split: PreparedSplit, evaluation: SplitEvaluation,
    context: BatchContext, run: RunFolder, seed: int, count: int = 256,
) -> dict[str, Any]:
    """Score synthetic probes (:func:`~medxai.evaluate.domain.synthetic_probes`) made from ``split``; return their
    flag rates (for the model card) and draw their scores beside the split's in the ``domain_scores`` figure."""
    probes = synthetic_probes(split.images[:count], seed=seed)
    groups = {f"{evaluation.split} split": evaluation.domain_scores.numpy()}
    rates = {}
    for name, images in probes.items():
        probe = PreparedSplit(images=images, labels=torch.full((len(images),), -1), ids=[name] * len(images),
                              boxes=[], facts=[image_facts(image.permute(1, 2, 0).numpy(), image) for image in images])
        _, features = predict_split_with_features(model, probe, context, guard.layers)
        verdicts = guard.assess(features, probe.facts)
        groups[f"probe: {name}"] = [verdict.score for verdict in verdicts]
        rates[name] = summarize_verdicts(verdicts)
    plot_domain_scores(groups, guard.z_threshold, run.figure_path("domain_scores", evaluation.split),
                       title=f"Out-of-domain guard: {evaluation.split} split and synthetic probes")
    return rates


def _check_operating_point_options(config: RunConfig) -> None:
    """Fail before training, not after it, on an operating-point option that cannot work."""
    if config.train.calibration not in CALIBRATION_METHODS:
        raise ConfigError(f"train.calibration must be one of {list(CALIBRATION_METHODS)}, "
                          f"got {config.train.calibration!r}")
    methods = (*THRESHOLD_METHODS, "argmax")
    if config.train.threshold_method not in methods:
        raise ConfigError(
            f"train.threshold_method must be one of {list(methods)}, got {config.train.threshold_method!r}"
        )
    if not 0.0 < config.train.target_sensitivity <= 1.0:
        raise ConfigError(f"train.target_sensitivity must lie in (0, 1], got {config.train.target_sensitivity}")
    if config.train.bootstrap_resamples < 0:
        raise ConfigError(f"train.bootstrap_resamples must be >= 0, got {config.train.bootstrap_resamples}")


def _skipped(source: Source, plan: SplitPlan, prepared: dict[str, PreparedSplit]) -> list[tuple[str, str]]:
    """Everything listed but not trained or evaluated on: entries that are not readable files (named pipes, broken
    links...), unlabelled records and files that failed to decode. Hidden clutter (``.DS_Store``) is left out."""
    listed = [(path, reason) for path, reason in source.skipped if not is_hidden_or_system(path)]
    unlabelled = [(record.path or record.id, "no label (unlabelled row): left out") for record in plan.unlabelled]
    return listed + unlabelled + [item for split in prepared.values() for item in split.skipped]


def _check_label_set(source: Source) -> None:
    if len(source.label_names) < 2:
        raise DataError(f"{source.description}: needs at least two classes, found {source.label_names}")


def _prepare_splits(source: Source, splits: dict[str, list[Record]], config: RunConfig,
                    job: Distributed = distributed.SINGLE) -> dict[str, PreparedSplit]:
    """Every split, decoded or read from the cache. Under DDP with the cache, rank 0 decodes and the other ranks
    then read what it wrote instead of decoding the same files again."""
    preprocessor = Preprocessor(config.preprocess)
    options = preparation_options(config.data)

    def prepare() -> dict[str, PreparedSplit]:
        return {name: prepare_split(source, records, preprocessor, description=name, **options)
                for name, records in splits.items() if records}

    shared_cache = job.active and options["cache_root"] is not None
    if shared_cache and not job.is_main:
        job.barrier()
    prepared = prepare()
    if shared_cache and job.is_main:
        job.barrier()
    for required in ("train", "val"):
        if required not in prepared:
            raise DataError(f"{source.description}: the {required} split is empty")
    present = set(prepared["train"].labels.tolist())
    if len(present) < 2:
        raise DataError(f"{source.description}: the train split holds only one class ({sorted(present)})")
    return prepared


def _check_train_ground_truth(source: Source, records: list[Record], config: RunConfig) -> None:
    """Before any decoding: refuse ``train.explanation_loss`` when no train record has a mask or boxes.

    Raises:
        ConfigError: the loss would do nothing.
    """
    if not any(record.masks or record.boxes for record in records):
        raise ConfigError(
            f"train.explanation_loss {config.train.explanation_loss!r} needs lesion masks or boxes for some train "
            f"images, and {source.description} has none (docs/training.md says how to give them); set "
            "train.explanation_loss=none to train without"
        )


def _attach_train_masks(source: Source, records: list[Record], prepared: dict[str, PreparedSplit],
                        config: RunConfig) -> None:
    """Give the train split its lesion masks (placed as its images are) for ``train.explanation_loss``; masks that
    cannot be read are listed with the split's skipped files and their images train without one."""
    train = prepared["train"]
    by_id = {record.id: record for record in records}
    kept = [by_id[sample_id] for sample_id in train.ids]
    # The split's facts hold each decoded image's size: the masks are read without decoding the images again.
    shapes = [(facts.height, facts.width) for facts in train.facts] if len(train.facts) == len(kept) else None
    masks, has_mask = prepare_masks(source, kept, Preprocessor(config.preprocess), skipped=train.skipped,
                                    image_shapes=shapes)
    prepared["train"] = dataclasses.replace(train, masks=masks, has_mask=has_mask)
    counted = int(counted_images(masks, has_mask).sum())
    logger.info("explanation loss %r (weight %g): %d of %d train images have ground truth, %d of them a lesion",
                config.train.explanation_loss, config.train.explanation_weight, int(has_mask.sum()), len(train),
                counted)


def _data_check(
    run: RunFolder, source: Source, prepared: dict[str, PreparedSplit], near_threshold: int
) -> dict[str, Any]:
    """Counts per split and class, unreadable files, exact and near duplicates within and across splits (hashed
    from the prepared images the model sees, see :mod:`medxai.data.check`), image sizes and modes, and the layout
    the source was read with. Cross-split duplicates are logged as a loud warning."""
    result = check_prepared(source, prepared, near_threshold=near_threshold)
    counts = result["duplicates"]["counts"]
    if counts["cross_split_pairs"]:
        examples = "; ".join(
            f"{entry['a']['split']}:{entry['a']['id']} = {entry['b']['split']}:{entry['b']['id']}"
            for entry in result["duplicates"]["cross_split"][:3]
        )
        logger.warning(
            "DATA LEAK: %d duplicate pair(s) ACROSS SPLITS (%d exact), e.g. %s. Test scores will be optimistic; "
            "see %s, or set data.drop_test_duplicates=true to drop test images duplicated in train",
            counts["cross_split_pairs"], counts["cross_split_exact_pairs"], examples, run.data_check_path,
        )
    if counts["exact_groups"] or counts["near_pairs"]:
        logger.info("data check: %d exact duplicate group(s), %d near-duplicate pair(s) (%.1f s)",
                    counts["exact_groups"], counts["near_pairs"], result["seconds"])
    return result


def _drop_test_duplicates(prepared: dict[str, PreparedSplit], data_check: dict[str, Any]) -> None:
    """Remove test images that duplicate a train image (exact or near) before evaluation; record them in
    ``data_check`` (the test split list written afterwards holds only the images kept)."""
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
        prepared["test"] = dataclasses.replace(test.subset(keep), skipped=test.skipped)
        logger.warning("drop_test_duplicates: dropped %d of %d test images duplicated in train; %d remain",
                       len(test) - len(keep), len(test), len(keep))
    data_check["dropped_from_test"] = sorted(leaked & set(test.ids))


def _new_card(model: torch.nn.Module, config: RunConfig, source: Source, positive: str | None,
              plan: SplitPlan) -> ModelCard:
    return ModelCard(
        architecture=config.model.name,
        num_classes=len(source.label_names),
        label_names=list(source.label_names),
        preprocess=config.preprocess,
        cam_layer=_run_cam_layer(model, config),
        classifier=getattr(model, "classifier_name", ""),
        dropout=config.model.dropout,
        positive_label=positive,
        train_data={
            "source": source.description,
            "fingerprint": source.fingerprint(),
            "layout": getattr(source, "layout", {}),
            "splits": plan.to_dict(),
        },
    )


def _check_explain_layer(config: RunConfig, num_classes: int) -> None:
    """Refuse an ``explain.layer`` the model lacks before the run folder is made or any image decoded: the model is
    built on the meta device (no memory, no weights) with the global random state left as it was."""
    if not config.explain.layer:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = create_model(config.model.name, num_classes=num_classes, in_chans=config.preprocess.channels,
                             input_size=config.preprocess.size, dropout=config.model.dropout)
    _run_cam_layer(model, config)


def _run_cam_layer(model: torch.nn.Module, config: RunConfig) -> str | list[str]:
    """The run's CAM layer: ``explain.layer`` (a module name, or several to fuse) when set, else the model's
    declared one; it goes into the card, so later maps and ``train.explanation_loss`` "cam" and "actdiff" read the
    same layer.

    Raises:
        ConfigError: a name that is not a module of the model (the message lists the model's stages).
    """
    chosen = config.explain.layer
    if not chosen:
        return model.cam_layer
    names = [chosen] if isinstance(chosen, str) else list(dict.fromkeys(chosen))
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"explain.layer: {unknown} not a module of {config.model.name}; its stages, shallow to "
                          f"deep: {list(getattr(model, 'stage_layers', ()))}")
    return names[0] if len(names) == 1 else names


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")
    return {key: metrics.get(key) for key in keys}
