"""Train / validation / test splits: use the data's own, replace a too-small val split, carve the missing ones.

The run folder keeps them as id lists (:mod:`medxai.run_folder`).

Carving is stratified by label and grouped by patient: all images of one patient land in the same split, because a
model that has seen a patient's other images scores higher than it deserves on that patient.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from medxai.data.sources.base import SPLIT_NAMES, Record, Source
from medxai.errors import ConfigError, DataError

__all__ = ["carve_splits", "plan_splits", "resolve_splits", "SplitPlan"]

logger = logging.getLogger(__name__)

_Label = int | None


def carve_splits(
    records: Sequence[Record],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split records into train, val and (optionally) test, stratified by label and grouped by patient.

    Records sharing a ``patient_id`` form one group; a record without one is a group of its own. Groups are
    assigned greedily, largest first (ties in a seeded random order): each goes to the split where it brings the
    per-class counts closest, in squared error, to their targets (``fraction x class count``). Without patient ids
    this yields exact per-class rounding; with groups, stratification is approximate, as whole patients move.

    Every class with at least two records gets at least one val record when ``val_fraction > 0`` (and one test
    record when ``test_fraction > 0`` and it has at least three), with at least one record left in train. With
    groups this can be impossible (all of a class from one patient); that is logged as a warning.

    The result depends only on the records' ids, labels and patient ids, and on ``seed``, not on their order; each
    split keeps the input order.

    Args:
        records: the records to split.
        val_fraction: fraction of each class to put in val, in [0, 1).
        test_fraction: fraction of each class to put in test, in [0, 1).
        seed: seed of the tie-breaking order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``; ``val`` and ``test`` are present only when their fraction
        is above zero.

    Raises:
        ConfigError: a fraction outside [0, 1) or fractions summing to 1 or more.
        DataError: no records, or two records with the same id.
    """
    _check_fractions(val_fraction, test_fraction)
    if not records:
        raise DataError("no records to split")
    duplicate_ids = [record_id for record_id, count in Counter(r.id for r in records).items() if count > 1]
    if duplicate_ids:
        raise DataError(f"records to split repeat ids, e.g. {duplicate_ids[:3]}")

    fractions = {"val": val_fraction, "test": test_fraction}
    carved = ["train"] + [split for split in ("val", "test") if fractions[split] > 0]
    groups = _group_by_patient(records)
    class_counts = Counter(record.label for record in records)
    targets = _per_class_targets(class_counts, fractions, carved)

    current: dict[str, Counter[_Label]] = {split: Counter() for split in carved}
    split_of_group: dict[str, str] = {}
    for group_key in _assignment_order(groups, seed):
        group_counts = Counter(record.label for record in groups[group_key])
        best_split = min(carved, key=lambda split: _added_squared_error(current[split], targets[split], group_counts))
        split_of_group[group_key] = best_split
        current[best_split].update(group_counts)

    for split in carved[1:]:
        _ensure_every_class_present(split, groups, split_of_group, current, class_counts, fractions)

    split_of_record = {record.id: split_of_group[key] for key, members in groups.items() for record in members}
    result = {split: [record for record in records if split_of_record[record.id] == split] for split in carved}
    logger.info(
        "carved %s from %d records (%d groups, seed %d)",
        ", ".join(f"{split} {len(members)}" for split, members in result.items()),
        len(records),
        len(groups),
        seed,
    )
    return result


@dataclass
class SplitPlan:
    """The splits to train and evaluate on, and how each came about.

    Attributes:
        splits: ``{"train": [...], "val": [...], "test": [...]}`` (the splits that exist, in that order), labelled
            records only.
        origins: split -> how it was made, in words (``"official"``, ``"carved from the official train split"``...).
        notes: what a reader of the model card and report must know (a tiny official val split replaced...).
        unlabelled: records without a label, left out of every split (a manifest row with an empty label).
    """

    splits: dict[str, list[Record]]
    origins: dict[str, str]
    notes: list[str] = field(default_factory=list)
    unlabelled: list[Record] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """What the model card's ``train_data["splits"]`` records."""
        return {
            "counts": {split: len(records) for split, records in self.splits.items()},
            "origins": dict(self.origins),
            "notes": list(self.notes),
            "unlabelled_left_out": len(self.unlabelled),
        }


def plan_splits(
    source: Source,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_val_size: int = 100,
) -> SplitPlan:
    """The splits to train and evaluate on: the source's official ones, completed by carving.

    - Official splits are used as given (``val_fraction`` is ignored when the source has a usable val split).
    - An official val split smaller than ``min_val_size`` or than 5% of train is too small to choose the best epoch,
      the temperature and the threshold on (the Kaggle chest X-ray set ships 16 images in ``val/``): its images join
      train and val is carved from the result instead, with a WARNING and a note.
    - Without an official val split, val is carved out of train (``val_fraction`` of train, per class).
    - Without an official test split and with ``test_fraction > 0``, test is carved out of train as well.
    - Without any official split, everything is carved with :func:`carve_splits`.
    - Records without a label are left out of every split (``unlabelled``), with a WARNING.

    Args:
        source: the data source.
        val_fraction, test_fraction, seed: see :func:`carve_splits`.
        min_val_size: the smallest official val split used as it is.

    Raises:
        DataError: the source has official splits but no train split.
        ConfigError: invalid fractions or a negative ``min_val_size``.
    """
    _check_fractions(val_fraction, test_fraction)
    if min_val_size < 0:
        raise ConfigError(f"data.min_val_size must be >= 0, not {min_val_size}")
    official = source.official_splits()
    unlabelled = [record for record in source.records() if record.label is None]
    if unlabelled:
        logger.warning("%s: %d record(s) without a label are left out of training and evaluation",
                       source.description, len(unlabelled))

    def labelled(records: Sequence[Record]) -> list[Record]:
        return [record for record in records if record.label is not None]

    if not official:
        logger.info("%s has no official splits: carving all records", source.description)
        carved = carve_splits(labelled(source.records()), val_fraction=val_fraction, test_fraction=test_fraction,
                              seed=seed)
        origins = {split: "carved (stratified, grouped by patient)" for split in carved}
        return SplitPlan(carved, origins, unlabelled=unlabelled)
    if "train" not in official:
        raise DataError(f"{source.description} has official splits {official} but no train split")

    splits = {split: labelled(source.records(split)) for split in official}
    origins = {split: "official" for split in splits}
    notes: list[str] = []
    if "val" in splits and val_fraction > 0 and _too_small(splits["val"], splits["train"], min_val_size):
        note = (
            f"the official val split has only {len(splits['val'])} images (fewer than data.min_val_size = "
            f"{min_val_size} or 5% of train's {len(splits['train'])}); they joined train and val was carved from it "
            f"(val_fraction {val_fraction}, stratified, grouped by patient)"
        )
        logger.warning("%s: %s", source.description, note)
        notes.append(note)
        splits["train"] = splits["train"] + splits.pop("val")
        origins.pop("val")
    carve_val = "val" not in splits and val_fraction > 0
    carve_test = "test" not in splits and test_fraction > 0
    if carve_val or carve_test:
        carved = carve_splits(
            splits["train"],
            val_fraction=val_fraction if carve_val else 0.0,
            test_fraction=test_fraction if carve_test else 0.0,
            seed=seed,
        )
        made = [split for split in ("val", "test") if split in carved]
        logger.info("%s: official splits %s; carved %s out of the train split", source.description, official,
                    " and ".join(made))
        splits.update(carved)
        origins.update({split: "carved from the train split (stratified, grouped by patient)" for split in made})
    else:
        logger.info("%s: using its official splits %s", source.description, official)
    _log_patients_shared_between_splits(source.description, splits)
    ordered = {split: splits[split] for split in SPLIT_NAMES if split in splits}
    return SplitPlan(ordered, {split: origins[split] for split in ordered}, notes, unlabelled)


def resolve_splits(
    source: Source,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_val_size: int = 100,
) -> dict[str, list[Record]]:
    """The splits of :func:`plan_splits`, without the account of how they were made."""
    return plan_splits(source, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                       min_val_size=min_val_size).splits


def _too_small(val: Sequence[Record], train: Sequence[Record], min_val_size: int) -> bool:
    return len(val) < min_val_size or len(val) < 0.05 * len(train)


# -- carving machinery ---------------------------------------------------------------------------------------------


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), not {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1 to leave training data, not {val_fraction + test_fraction}"
        )


def _group_by_patient(records: Sequence[Record]) -> dict[str, list[Record]]:
    # The prefixes keep a patient called "x" apart from a record whose id is "x".
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        key = f"patient:{record.patient_id}" if record.patient_id is not None else f"record:{record.id}"
        groups[key].append(record)
    return groups


def _per_class_targets(
    class_counts: Counter[_Label], fractions: dict[str, float], carved: list[str]
) -> dict[str, dict[_Label, float]]:
    targets: dict[str, dict[_Label, float]] = {split: {} for split in carved}
    for label, count in class_counts.items():
        val = fractions["val"] * count if "val" in carved else 0.0
        test = fractions["test"] * count if "test" in carved else 0.0
        if "val" in carved and count >= 2:
            val = max(val, 1.0)
        if "test" in carved and count >= 3:
            test = max(test, 1.0)
        # Leave at least one record of each class for training, shrinking the carved targets if needed.
        excess = val + test - (count - 1)
        if excess > 0 and val + test > 0:
            shrink = (count - 1) / (val + test) if count > 1 else 0.0
            val, test = val * shrink, test * shrink
        if "val" in carved:
            targets["val"][label] = val
        if "test" in carved:
            targets["test"][label] = test
        targets["train"][label] = count - val - test
    return targets


def _assignment_order(groups: dict[str, list[Record]], seed: int) -> list[str]:
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda key: len(groups[key]), reverse=True)  # stable: equal sizes keep the seeded order
    return keys


def _added_squared_error(current: Counter[_Label], target: dict[_Label, float], group: Counter[_Label]) -> float:
    """How much sum((count - target)^2) over classes grows when ``group`` joins a split."""
    return sum(n * (2.0 * (current[label] - target[label]) + n) for label, n in group.items())


def _ensure_every_class_present(
    split: str,
    groups: dict[str, list[Record]],
    split_of_group: dict[str, str],
    current: dict[str, Counter[_Label]],
    class_counts: Counter[_Label],
    fractions: dict[str, float],
) -> None:
    """Move the smallest suitable train group into ``split`` for each class the greedy pass left out of it."""
    minimum_count = 2 if split == "val" else 3
    for label, count in sorted(class_counts.items(), key=lambda item: str(item[0])):
        if count < minimum_count or current[split][label] > 0 or fractions[split] == 0:
            continue
        candidates = []
        for key, members in groups.items():
            if split_of_group[key] != "train":
                continue
            group_counts = Counter(record.label for record in members)
            # Moving the group must leave train with at least one record of every class it has.
            if group_counts[label] and all(current["train"][c] - n >= 1 for c, n in group_counts.items()):
                candidates.append((len(members), key, group_counts))
        if not candidates:
            logger.warning(
                "could not put class %r in %s without splitting a patient or emptying train of a class",
                label,
                split,
            )
            continue
        _, key, group_counts = min(candidates)
        split_of_group[key] = split
        current["train"].subtract(group_counts)
        current[split].update(group_counts)


def _log_patients_shared_between_splits(description: str, splits: dict[str, list[Record]]) -> None:
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for split, members in splits.items():
        for record in members:
            if record.patient_id is not None:
                splits_of_patient[record.patient_id].add(split)
    shared = sum(1 for names in splits_of_patient.values() if len(names) > 1)
    if shared:
        # Carving never separates a patient, so these come from the source's own splits, which are kept as published.
        # Only the count is logged: patient ids are identifiers.
        logger.info(
            "%s: %d patient(s) have images in more than one split; the source's official splits are kept as given",
            description,
            shared,
        )