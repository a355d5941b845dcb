"""``medxai ensemble RUN1 RUN2 .. --name E``: trained runs combined into one run that works like any other.

The members must be models of the same task on the same data: equal label names and positive label, equal
preprocessing (one input batch feeds them all), the same training data fingerprint and the same split lists (so the
ensemble's validation split is every member's and its test split was never seen by any of them). The ensemble
(:class:`~medxai.models.ensemble.EnsembleModel`: the mean of the members' probabilities) is then calibrated, given
its operating threshold and its domain guard on validation, evaluated, explained (each member's CAM at its own
layer, averaged) and reported by the same code as a trained run (:func:`medxai.jobs.train.finish_run`). Its weights
file holds every member's weights, and its card every member's card: it needs no member folder afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from medxai.config import RunConfig
from medxai.data import open_source
from medxai.data.prepared import prepare_split, preparation_options
from medxai.data.preprocess import Preprocessor
from medxai.errors import ConfigError
from medxai.jobs.evaluate import select_records
from medxai.jobs.train import finish_run
from medxai.models.card import ModelCard
from medxai.models.checkpoint import check_binding, load_weights
from medxai.models.ensemble import ENSEMBLE_ARCHITECTURE, EnsembleModel
from medxai.run_folder import RunFolder, check_folder_name
from medxai.train import BatchContext, resolve_device
from medxai.train.loop import place_model

__all__ = ["build_ensemble"]

logger = logging.getLogger(__name__)


def build_ensemble(
    run_dirs: Sequence[str | Path], *, name: str, out_dir: str | Path = "runs", overwrite: bool = False,
    device: str | None = None,
) -> Path:
    """Combine trained runs into the ensemble run ``out_dir/name``; return its folder.

    Raises:
        ConfigError: fewer than two runs, members that do not fit together (the message says how), or a run
            folder that may not be written.
    """
    if len(run_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    members = [RunFolder(path) for path in run_dirs]
    cards = []
    for member in members:
        member.check_is_run()
        member.check_finished()
        cards.append(member.read_card())
        check_binding(cards[-1], member.weights_path("best"), card_name=f"{member.path.name}/{member.card_path.name}")
    _check_compatible(members, cards)
    run = RunFolder(Path(out_dir) / check_folder_name(name))
    if any(run.path.resolve() == member.path.resolve() for member in members):
        raise ConfigError(f"the ensemble {run.path} may not replace one of its members")
    run.check_can_create(overwrite=overwrite)
    config = _ensemble_config(members[0].read_config(), run, device)
    run_id = run.prepare_new(overwrite=overwrite)
    run.write_config(config)
    model = EnsembleModel([load_weights(member.weights_path("best"), card)[0] for member, card in zip(members, cards)])
    card = _ensemble_card(model, cards, members)
    card.run_id = run_id
    run.write_card(card)
    run.write_splits(members[0].read_splits())
    data_check = members[0].read_data_check()
    if data_check is not None:
        run.write_data_check(data_check)

    source = open_source(config.data.source, patient_pattern=config.data.patient_pattern,
                         split_folders=config.data.split_folders)
    preprocessor = Preprocessor(card.preprocess)
    records = {split: select_records(source, split, members[0], True, config.data.source)[0]
               for split in members[0].read_splits()}
    prepared = {split: prepare_split(source, items, preprocessor, description=split,
                                     **preparation_options(config.data)) for split, items in records.items()}
    context = BatchContext(preprocessor, resolve_device(config.train.device), config.train.batch_size,
                           config.train.amp, config.train.channels_last)
    place_model(model, context).eval()
    logger.info("ensemble of %d runs: %s", len(members), ", ".join(str(member.path) for member in members))
    finish_run(run, model, card, prepared, source, records, context, config)
    return run.path


def _check_compatible(members: Sequence[RunFolder], cards: Sequence[ModelCard]) -> None:
    first, reference = cards[0], members[0]
    splits = reference.read_splits()
    for member, card in zip(members[1:], cards[1:]):
        problems = []
        if card.label_names != first.label_names or card.positive_label != first.positive_label:
            problems.append(f"labels {card.label_names} (positive {card.positive_label}) vs {first.label_names} "
                            f"(positive {first.positive_label})")
        if card.preprocess != first.preprocess:
            problems.append("a different preprocessing (size, channels, intensity or normalisation statistics)")
        if (card.train_data or {}).get("fingerprint") != (first.train_data or {}).get("fingerprint"):
            problems.append("other training data (content fingerprints differ)")
        if member.read_splits() != splits:
            problems.append("other split lists (its validation or test images differ)")
        if problems:
            raise ConfigError(f"{member.path} cannot join an ensemble with {reference.path}: " + "; ".join(problems))


def _ensemble_config(config: RunConfig, run: RunFolder, device: str | None) -> RunConfig:
    config = dataclasses.replace(config, name=run.path.name, out_dir=str(run.path.parent))
    config.model = dataclasses.replace(config.model, name=ENSEMBLE_ARCHITECTURE, pretrained=False, weights=None)
    if device is not None:
        config.train = dataclasses.replace(config.train, device=device)
    return config


def _ensemble_card(model: EnsembleModel, cards: Sequence[ModelCard], members: Sequence[RunFolder]) -> ModelCard:
    first = cards[0]
    member_entries = []
    for member, card in zip(members, cards):
        plain = card.to_dict()
        plain.update(calibration=None, temperature=1.0, domain={}, metrics={})  # the ensemble is calibrated anew
        member_entries.append({"run": str(member.path), "architecture": card.architecture,
                               "cam_layer": card.cam_layer, "card": plain})
    return ModelCard(
        architecture=ENSEMBLE_ARCHITECTURE,
        num_classes=first.num_classes,
        label_names=list(first.label_names),
        preprocess=first.preprocess,
        cam_layer=model.cam_layer,
        positive_label=first.positive_label,
        train_data=dict(first.train_data),
        members=member_entries,
        limitations=first.limitations,
        intended_use=first.intended_use,
    )
