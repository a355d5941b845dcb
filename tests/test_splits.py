"""Splits: stratified, patient-grouped carving; completing official splits; split lists on disk."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from medxai.data import Record, Source, carve_splits, resolve_splits
from medxai.run_folder import read_split_lists, write_split_lists
from medxai.data.sources.base import Sample
from medxai.errors import ConfigError, DataError


def ungrouped_records(counts_per_label: dict[int, int]) -> list[Record]:
    return [
        Record(id=f"class{label}/{index:04d}.png", label=label)
        for label, count in counts_per_label.items()
        for index in range(count)
    ]


def grouped_records(patient_count: int = 80, seed: int = 1) -> list[Record]:
    """Patients with 1 to 5 images each, all of one label, about a third of them label 1."""
    rng = random.Random(seed)
    records = []
    for patient in range(patient_count):
        label = 1 if rng.random() < 0.35 else 0
        for image in range(rng.randint(1, 5)):
            records.append(Record(id=f"p{patient:03d}_{image}.png", label=label, patient_id=f"p{patient:03d}"))
    return records


def ids(records: list[Record]) -> list[str]:
    return [record.id for record in records]


def label_counts(records: list[Record]) -> Counter:
    return Counter(record.label for record in records)


# -- carve_splits --------------------------------------------------------------------------------------------------


def test_carving_without_patients_rounds_each_class_exactly():
    records = ungrouped_records({0: 100, 1: 50, 2: 10})
    splits = carve_splits(records, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert list(splits) == ["train", "val", "test"]
    assert label_counts(splits["val"]) == {0: 20, 1: 10, 2: 2}
    assert label_counts(splits["test"]) == {0: 10, 1: 5, 2: 1}
    assert label_counts(splits["train"]) == {0: 70, 1: 35, 2: 7}
    assert sorted(ids(splits["train"]) + ids(splits["val"]) + ids(splits["test"])) == sorted(ids(records))


def test_carving_keeps_input_order_within_each_split():
    records = ungrouped_records({0: 30, 1: 30})
    splits = carve_splits(records, val_fraction=0.3)
    position = {record.id: index for index, record in enumerate(records)}
    for members in splits.values():
        assert [position[r.id] for r in members] == sorted(position[r.id] for r in members)


def test_carving_is_deterministic_and_independent_of_input_order():
    records = ungrouped_records({0: 40, 1: 20})
    first = carve_splits(records, val_fraction=0.25, seed=7)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    again = carve_splits(shuffled, val_fraction=0.25, seed=7)
    assert set(ids(first["val"])) == set(ids(again["val"]))
    assert ids(first["val"]) == ids(carve_splits(records, val_fraction=0.25, seed=7)["val"])
    other_seed = carve_splits(records, val_fraction=0.25, seed=8)
    assert set(ids(other_seed["val"])) != set(ids(first["val"]))
    assert label_counts(other_seed["val"]) == label_counts(first["val"]) == {0: 10, 1: 5}


def test_no_test_key_without_test_fraction_and_no_val_key_without_val_fraction():
    records = ungrouped_records({0: 10, 1: 10})
    assert list(carve_splits(records, val_fraction=0.1)) == ["train", "val"]
    assert list(carve_splits(records, val_fraction=0.0, test_fraction=0.2)) == ["train", "test"]


def test_patients_never_straddle_splits_and_classes_stay_balanced():
    records = grouped_records()
    total = label_counts(records)
    for seed in range(5):
        splits = carve_splits(records, val_fraction=0.2, test_fraction=0.2, seed=seed)
        patients = {name: {r.patient_id for r in members} for name, members in splits.items()}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        for name in ("val", "test"):
            for label in (0, 1):
                fraction = label_counts(splits[name])[label] / total[label]
                assert abs(fraction - 0.2) < 0.06, (seed, name, label, fraction)


def test_records_without_patient_are_their_own_group():
    records = [
        Record(id=f"a{index}", label=index % 2, patient_id="shared" if index < 6 else None) for index in range(20)
    ]
    splits = carve_splits(records, val_fraction=0.3, seed=0)
    holders = [name for name, members in splits.items() if any(r.patient_id == "shared" for r in members)]
    assert len(holders) == 1
    assert sum(len(members) for members in splits.values()) == 20


def test_every_class_with_two_records_reaches_val():
    records = ungrouped_records({0: 50, 1: 2, 2: 1, 3: 3})
    splits = carve_splits(records, val_fraction=0.05, seed=0)
    assert label_counts(splits["val"]) == {0: 2, 1: 1, 3: 1}  # 2.5 rounds down; the singleton class stays in train
    assert label_counts(splits["train"]) == {0: 48, 1: 1, 2: 1, 3: 2}


def test_min_one_val_record_with_patient_groups():
    # Class 1 has four images from two patients; the greedy pass alone would leave val without it at 5 %.
    records = [Record(id=f"n{index}", label=0) for index in range(40)]
    records += [Record(id=f"s{index}", label=1, patient_id=f"patient{index // 2}") for index in range(4)]
    splits = carve_splits(records, val_fraction=0.05, seed=0)
    assert label_counts(splits["val"])[1] == 2
    assert label_counts(splits["train"])[1] == 2


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction"), [(-0.1, 0.0), (1.0, 0.0), (0.0, 1.2), (0.6, 0.5)]
)
def test_carving_rejects_bad_fractions(val_fraction, test_fraction):
    with pytest.raises(ConfigError):
        carve_splits(ungrouped_records({0: 5, 1: 5}), val_fraction=val_fraction, test_fraction=test_fraction)


def test_carving_rejects_empty_and_duplicate_ids():
    with pytest.raises(DataError, match="no records"):
        carve_splits([])
    with pytest.raises(DataError, match="repeat ids"):
        carve_splits([Record(id="x", label=0), Record(id="x", label=1)])


# -- resolve_splits ------------------------------------------------------------------------------------------------


class ListSource:
    """The smallest Source: records given up front, nothing to decode."""

    def __init__(self, records: list[Record]) -> None:
        self.description = "test list"
        self.label_names = ["a", "b"]
        self.skipped: list[tuple[str, str]] = []
        self.layout: dict = {"kind": "list"}
        self._records = records

    def official_splits(self) -> list[str]:
        present = {record.split for record in self._records}
        return [split for split in ("train", "val", "test") if split in present]

    def records(self, split: str | None = None) -> list[Record]:
        return [record for record in self._records if split is None or record.split == split]

    def load(self, record: Record) -> Sample:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return "none"


def with_split(records: list[Record], split: str) -> list[Record]:
    return [Record(id=f"{split}/{r.id}", label=r.label, patient_id=r.patient_id, split=split) for r in records]


def test_resolve_without_official_splits_carves_everything():
    source = ListSource(ungrouped_records({0: 40, 1: 20}))
    assert isinstance(source, Source)
    splits = resolve_splits(source, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert {name: len(members) for name, members in splits.items()} == {"train": 30, "val": 15, "test": 15}


def test_resolve_carves_val_from_official_train_and_keeps_official_test():
    train = with_split(ungrouped_records({0: 60, 1: 40}), "train")
    test = with_split(ungrouped_records({0: 5, 1: 5}), "test")
    splits = resolve_splits(ListSource(train + test), val_fraction=0.1, seed=0)
    assert list(splits) == ["train", "val", "test"]
    assert ids(splits["test"]) == ids(test)
    assert label_counts(splits["val"]) == {0: 6, 1: 4}
    assert set(ids(splits["train"])) | set(ids(splits["val"])) == set(ids(train))


def test_resolve_keeps_all_three_official_splits_and_can_carve_test():
    train = with_split(ungrouped_records({0: 20, 1: 20}), "train")
    val = with_split(ungrouped_records({0: 3, 1: 3}), "val")
    as_given = resolve_splits(ListSource(train + val), val_fraction=0.5, min_val_size=0)
    assert ids(as_given["val"]) == ids(val) and ids(as_given["train"]) == ids(train) and "test" not in as_given

    with_test = resolve_splits(ListSource(train + val), test_fraction=0.25, min_val_size=0)
    assert ids(with_test["val"]) == ids(val)
    assert label_counts(with_test["test"]) == {0: 5, 1: 5} and len(with_test["train"]) == 30


def test_resolve_needs_a_train_split():
    only_test = with_split(ungrouped_records({0: 3, 1: 3}), "test")
    with pytest.raises(DataError, match="no train split"):
        resolve_splits(ListSource(only_test))


# -- split lists ---------------------------------------------------------------------------------------------------


def test_split_lists_round_trip(tmp_path):
    splits = {
        "train": [Record(id="yes/Y1 copy.jpg", label=1), Record(id="no/N 2.jpg", label=0)],
        "val": ["pneumoniamnist/val/3"],
    }
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.txt").write_text("stale/from/an/old/run.png\n")
    write_split_lists(splits, tmp_path / "splits")
    assert (tmp_path / "splits" / "train.txt").read_text() == "yes/Y1 copy.jpg\nno/N 2.jpg\n"
    assert read_split_lists(tmp_path / "splits") == {
        "train": ["yes/Y1 copy.jpg", "no/N 2.jpg"],
        "val": ["pneumoniamnist/val/3"],
    }


def test_split_list_errors(tmp_path):
    with pytest.raises(DataError, match="no split lists"):
        read_split_lists(tmp_path)
    with pytest.raises(DataError, match="unknown split name"):
        write_split_lists({"holdout": []}, tmp_path)
    with pytest.raises(DataError, match="line breaks"):
        write_split_lists({"train": ["bad\nid"]}, tmp_path)
