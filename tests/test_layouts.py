"""Datasets in the layouts people download: split folders under any common name, ambiguous trees, special files, a
too-small official validation split and unlabelled rows."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxai.cli import main
from medxai.data import ImageFolderSource, open_source
from medxai.data.check import check_data
from medxai.data.sources.base import canonical_split_name
from medxai.data.splits import plan_splits
from medxai.errors import DataError

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _image(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


def _brain_tumor_tree(root: Path, per_class: int = 6, copied: int = 3) -> tuple[Path, list[str]]:
    """The Kaggle brain tumour MRI layout: Training/<class>/ and Testing/<class>/, with the first ``copied`` test
    files of each class byte-identical to training files (the leaks check-data must find)."""
    copies = []
    for index, name in enumerate(CLASSES):
        for split in ("Training", "Testing"):
            (root / split / name).mkdir(parents=True)
        for item in range(per_class):
            Image.fromarray(_image(100 * index + item)).save(root / "Training" / name / f"Tr-{item:03d}.jpg", "PNG")
            Image.fromarray(_image(100 * index + 50 + item)).save(root / "Testing" / name / f"Te-{item:03d}.jpg",
                                                                  "PNG")
        for item in range(copied):
            target = root / "Testing" / name / f"Te-copy-{item}.jpg"
            shutil.copyfile(root / "Training" / name / f"Tr-{item:03d}.jpg", target)
            copies.append(f"Testing/{name}/{target.name}")
    return root, copies


@pytest.mark.parametrize(
    "name, split",
    [("train", "train"), ("Training", "train"), ("TRAIN_SET", "train"), ("train-set", "train"),
     ("Train Set", "train"), ("val", "val"), ("Valid", "val"), ("VALIDATION", "val"), ("dev", "val"),
     ("test", "test"), ("Testing", "test"), ("test_set", "test"), ("Holdout", "test"), ("hold-out", "test"),
     ("tumor", None), ("validated", None), ("trainee", None)],
)
def test_split_folder_spellings(name, split):
    assert canonical_split_name(name) == split


def test_training_testing_tree_is_two_splits_of_four_classes_and_its_leaks_are_found(tmp_path, capsys):
    root, copies = _brain_tumor_tree(tmp_path / "brain_tumor")
    source = ImageFolderSource(root)
    assert source.official_splits() == ["train", "test"] and source.label_names == list(CLASSES)
    assert source.layout["splits"] == {"train": "Training", "test": "Testing"}
    assert len(source.records("train")) == 24 and len(source.records("test")) == 36

    result = check_data(root)
    leaked = {entry["b"]["id"] for entry in result["duplicates"]["cross_split"]}
    assert leaked == set(copies)
    pairs = result["duplicates"]["cross_split"]
    assert all(entry["a"]["split"] == "train" and entry["kind"] == "exact" for entry in pairs)
    assert result["duplicates"]["counts"]["conflicting_label_groups"] == 0

    assert main(["check-data", str(root)]) == 0
    first_lines = capsys.readouterr().out.splitlines()[:3]
    assert "read as split folders" in first_lines[0]
    assert first_lines[1] == "splits: train <- Training, test <- Testing"
    assert first_lines[2] == "classes (4): glioma, meningioma, notumor, pituitary"


def test_a_mixed_top_level_is_an_error_that_says_what_was_taken_and_how_to_override(tmp_path, capsys):
    root, _ = _brain_tumor_tree(tmp_path / "mixed", per_class=2, copied=0)
    (root / "extra" / "x").mkdir(parents=True)
    Image.fromarray(_image(1)).save(root / "extra" / "x" / "1.png")
    with pytest.raises(DataError) as caught:
        ImageFolderSource(root)
    message = str(caught.value)
    assert "Testing -> test" in message and "Training -> train" in message and "extra" in message
    assert "data.split_folders" in message

    assert main(["check-data", str(root)]) == 2
    output = capsys.readouterr().err
    assert output.startswith("error:") and "Traceback" not in output

    chosen = open_source(root, split_folders={"train": "Training", "test": "Testing"})
    assert chosen.official_splits() == ["train", "test"] and chosen.label_names == list(CLASSES)
    assert [Path(path).name for path, _ in chosen.skipped] == ["extra"]
    as_classes = open_source(root, split_folders={})
    assert as_classes.label_names == ["Testing", "Training", "extra"] and as_classes.official_splits() == []
    with pytest.raises(DataError, match="not top-level folders"):
        open_source(root, split_folders={"train": "Train"})


def test_two_folders_for_one_split_are_an_error(tmp_path):
    for split in ("train", "Training", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="two folders for the 'train' split"):
        ImageFolderSource(tmp_path)


def _special_files(folder: Path) -> dict[str, str]:
    """A named pipe, a socket, a broken link, a link loop and a link to a folder inside ``folder``; name -> the
    reason expected."""
    os.mkfifo(folder / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    server.close()
    (folder / "broken.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "elsewhere").symlink_to(folder.parent)
    return {"pipe.png": "named pipe", "sock.png": "socket", "broken.png": "broken symbolic link",
            "loop.png": "symbolic link loop", "elsewhere": "symbolic link to a folder"}


@pytest.mark.timeout(60)  # opening a FIFO would block for ever: the test fails by timeout if anything opens it
def test_special_files_are_listed_with_a_reason_and_never_opened(tmp_path, capsys):
    data = tmp_path / "data"
    for label in ("normal", "pneumonia"):
        (data / label).mkdir(parents=True)
        for index in range(12):
            Image.fromarray(_image(index + (0 if label == "normal" else 50))).save(data / label / f"{index}.png")
    expected = _special_files(data / "pneumonia")

    source = ImageFolderSource(data)
    reasons = {Path(path).name: reason for path, reason in source.skipped}
    for name, reason in expected.items():
        assert reason in reasons[name], name
    assert len(source.records()) == 24

    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", "--epochs", "1",
                 "--size", "16", "--set", "train.batch_size=8", "--set", "explain.per_outcome=1",
                 "--set", "train.bootstrap_resamples=0"]) == 0
    rows = csv.DictReader((tmp_path / "run" / "skipped.csv").open())
    skipped = {Path(row["file"]).name: row["reason"] for row in rows}
    assert set(skipped) == set(expected)

    out = tmp_path / "predictions"
    assert main(["predict", str(tmp_path / "run"), str(data / "pneumonia"), "--out", str(out), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    skipped = {Path(row["file"]).name: row["reason"] for row in csv.DictReader((out / "skipped.csv").open())}
    assert set(skipped) == set(expected)
    assert sum("label" in line for line in lines) == 12  # files in = 12 predicted + 5 skipped
    for name, reason in expected.items():
        assert reason in skipped[name]


def test_a_tiny_official_val_split_is_replaced_by_a_carve_with_a_note(tmp_path, capsys):
    data = tmp_path / "chest_xray"
    for split, count in (("train", 60), ("val", 4), ("test", 10)):
        for label in ("NORMAL", "PNEUMONIA"):
            (data / split / label).mkdir(parents=True)
            for index in range(count):
                seed = hash((split, label, index)) % 10_000
                Image.fromarray(_image(seed)).save(data / split / label / f"{index}.jpeg", "PNG")
    plan = plan_splits(open_source(data), val_fraction=0.1, min_val_size=100)
    assert plan.origins["val"].startswith("carved") and len(plan.splits["val"]) == 12
    assert len(plan.splits["train"]) == 116 and len(plan.splits["test"]) == 20  # 120 + 8 official val - 12 carved
    assert "only 8 images" in plan.notes[0]

    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", "--epochs", "1",
                 "--size", "16", "--set", "train.batch_size=16", "--set", "explain.per_outcome=1",
                 "--set", "train.bootstrap_resamples=0"]) == 0
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert "only 8 images" in card["train_data"]["splits"]["notes"][0]
    assert "only 8 images" in (tmp_path / "run" / "report.html").read_text()
    assert len((tmp_path / "run" / "splits" / "val.txt").read_text().split()) == 12

    kept = plan_splits(open_source(data), min_val_size=0)
    assert kept.origins["val"] == "official" and len(kept.splits["val"]) == 8


def test_unlabelled_manifest_rows_are_left_out_and_listed(tmp_path):
    rows = ["path,label"]
    for index in range(30):
        Image.fromarray(_image(index)).save(tmp_path / f"{index}.png")
        label = "" if index % 10 == 9 else ("normal" if index % 2 else "pneumonia")
        rows.append(f"{index}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["train", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path), "--name", "run",
                 "--epochs", "1", "--size", "16", "--set", "data.test_fraction=0.2", "--set", "train.batch_size=8",
                 "--set", "explain.per_outcome=1", "--set", "train.bootstrap_resamples=0"]) == 0
    skipped = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    assert sorted(Path(row["file"]).name for row in skipped) == ["19.png", "29.png", "9.png"]
    assert all("no label" in row["reason"] for row in skipped)
    listed = sum(len((tmp_path / "run" / "splits" / f"{split}.txt").read_text().split())
                 for split in ("train", "val", "test"))
    assert listed == 27
