"""End to end through the CLI: synthetic data everywhere, real data where MEDXAI_DATA_DIR has it."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medxai
from medxai.cli import main
from medxai.config import load_config

FAST = [
    "--set", "train.batch_size=32", "--set", "train.threads=2", "--set", "explain.per_outcome=1",
]


def _train(tmp_path: Path, data: str, *extra: str, name: str = "run") -> Path:
    code = main(["train", "--data", data, "--out", str(tmp_path), "--name", name, *FAST, *extra])
    assert code == 0
    return tmp_path / name


def _folder_dataset(root: Path, per_class: int = 12, size: tuple[int, int] = (40, 32)) -> Path:
    """Two classes of tiny PNGs: a bright square at the left (a) or the right (b)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            image = rng.integers(0, 60, size=size[::-1]).astype(np.uint8)
            column = 8 if label == "a" else size[0] - 14
            image[12:20, column : column + 6] = 230
            Image.fromarray(image).save(root / label / f"img {index}.png")
    return root


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """One short training run on a synthetic MedMNIST-style file, shared by the tests below."""
    from conftest import make_synthetic_npz

    folder = tmp_path_factory.mktemp("synthetic")
    data = make_synthetic_npz(folder / "synthetic.npz", per_class=48)
    return _train(folder, str(data), "--epochs", "4", "--size", "28", "--model", "simple_cnn")


def test_train_writes_the_documented_run_folder(synthetic_run):
    for item in ("config.yaml", "model_card.json", "history.csv", "metrics.json", "data_check.json", "skipped.csv"):
        assert (synthetic_run / item).is_file(), item
    for item in ("checkpoints/best.safetensors", "checkpoints/last.safetensors", "checkpoints/state.json",
                 "splits/train.txt", "splits/val.txt", "splits/test.txt", "figures/training_curves.png",
                 "figures/confusion_matrix_test.png", "figures/roc_test.png"):
        assert (synthetic_run / item).is_file(), item
    assert list((synthetic_run / "heatmaps").glob("*.png"))
    metrics = json.loads((synthetic_run / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity", "confusion_matrix", "n"):
        assert key in metrics["test"], key
    assert metrics["test"]["n"] == 48
    assert metrics["test"]["accuracy"] >= 0.9  # the synthetic classes are easy
    assert not list(synthetic_run.rglob("*.pt")) and not list(synthetic_run.rglob("*.pkl"))


def test_python_api_predicts_and_explains_at_original_resolution(synthetic_run):
    classifier = medxai.load(synthetic_run)
    image = np.zeros((60, 90), dtype=np.uint8)
    image[20:40, 10:25] = 230  # class 0 pattern (left), at a different size than training
    predictions = classifier.predict([image])
    assert predictions[0].label_index == 0
    assert sum(predictions[0].probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    explanation = classifier.explain(image)[0]
    assert explanation.heatmap.shape == (60, 90)
    assert explanation.overlay().shape == (60, 90, 3)
    # The same forward gives prediction and heatmap: explain's prediction equals predict's.
    assert explanation.prediction.probabilities == pytest.approx(predictions[0].probabilities, abs=1e-5)
    # The original-size heatmap is the model-size map resized bilinearly (stretch mode: no padding to remove).
    import torch

    expected = torch.nn.functional.interpolate(
        torch.from_numpy(explanation.model_heatmap)[None, None], size=(60, 90), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(explanation.heatmap, expected, atol=1e-6)
    assert explanation.model_heatmap.shape == (28, 28) and explanation.model_heatmap.max() == pytest.approx(1.0)


def test_evaluate_recomputes_the_training_time_metrics(synthetic_run, tmp_path, capsys):
    data = next(synthetic_run.parent.glob("*.npz"))
    before = (synthetic_run / "metrics.json").read_bytes()
    assert main(["evaluate", str(synthetic_run), "--data", str(data), "--split", "test", "--name", "again",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    original = json.loads(before)["test"]
    assert printed["test"] == original  # every metric and interval, exactly
    assert printed["evaluation"]["kind"] == "internal"
    assert (synthetic_run / "metrics.json").read_bytes() == before
    assert json.loads((synthetic_run / "evaluations" / "again" / "metrics.json").read_text())["test"] == original


def test_predict_and_explain_skip_bad_files_and_account_for_every_input(synthetic_run, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((30, 30), 100, dtype=np.uint8)).save(inputs / "good one.png")
    Image.fromarray(np.full((30, 30), 100, dtype=np.uint8)).save(inputs / "png named.jpg", format="PNG")
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.png").write_text("this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(buffer, format="JPEG")
    (inputs / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (inputs / ".DS_Store").write_bytes(b"\x00\x01")  # a hidden file: listed as skipped, not dropped silently
    (inputs / ".git").mkdir()  # a tool's hidden folder: left out, and said so once
    (inputs / ".git" / "HEAD").write_text("ref: refs/heads/main")

    out = tmp_path / "pred"
    assert main(["predict", str(synthetic_run), str(inputs), "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr()
    lines = [json.loads(line) for line in printed.out.splitlines()]
    predicted = [line for line in lines if "label" in line]
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert len(predicted) == 2 and len(skipped) == 4  # files in = results + skipped
    assert {Path(row["file"]).name: row["reason"] for row in skipped}[".DS_Store"] == "hidden file"
    assert {Path(row["file"]).name for row in skipped} == {"empty.png", "notes.png", "truncated.jpg", ".DS_Store"}
    assert all(row["reason"] for row in skipped)
    assert printed.err.count("left out 1 hidden or system folder") == 1

    heatmaps = tmp_path / "heatmaps"
    assert main(["explain", str(synthetic_run), str(inputs), "--out", str(heatmaps), "--npy"]) == 0
    written = sorted(path.name for path in heatmaps.glob("*.png"))
    assert written == ["good_one_png.png", "png_named_jpg.png"]
    assert np.load(heatmaps / "good_one_png.npy").shape == (30, 30)
    assert len(list(csv.DictReader((heatmaps / "skipped.csv").open()))) == 4


def test_resume_continues_an_interrupted_cli_run(synthetic_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(synthetic_run, run)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 4
    data = next(synthetic_run.parent.glob("*.npz"))
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "copy", "--epochs", "5",
                 "--size", "28", "--resume", *FAST]) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 6


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["predict", "{run}", "{missing}"], None),
        (["train", "--data", "{one_class}", "--out", "{tmp}"], "at least two classes"),
        (["train", "--data", "{empty_class}", "--out", "{tmp}"], "no files"),
        (["evaluate", "{run}", "--data", "{other_labels}", "--split", "all"], "match no model label"),
        (["train", "--data", "{tmp}/nothing-here", "--out", "{tmp}"], "nothing-here"),
        (["predict", "{tmp}/no-run", "x.png"], "no-run"),
    ],
)
def test_bad_input_gives_one_clear_line_not_a_traceback(arguments, message, synthetic_run, tmp_path, capsys):
    (tmp_path / "one_class" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "one_class" / "only" / "x.png")
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    (tmp_path / "empty_class" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "empty_class" / "a" / "x.png")
    _folder_dataset(tmp_path / "other_labels", per_class=2)
    values = {"run": str(synthetic_run), "tmp": str(tmp_path), "missing": str(tmp_path / "missing.png"),
              "one_class": str(tmp_path / "one_class"), "empty_class": str(tmp_path / "empty_class"),
              "other_labels": str(tmp_path / "other_labels")}
    code = main([item.format(**values) for item in arguments])
    output = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in output
    if message:
        assert "error:" in output and message in output


def test_training_on_a_class_folder_with_messy_files(tmp_path):
    data = _folder_dataset(tmp_path / "data", per_class=16)
    (data / "a" / ".DS_Store").write_bytes(b"\x00")
    (data / "b" / "broken.png").write_text("not an image")
    run = _train(tmp_path, str(data), "--epochs", "2", "--size", "32", "--set", "data.test_fraction=0.2",
                 "--positive-label", "b")
    skipped = list(csv.DictReader((run / "skipped.csv").open()))
    assert [Path(row["file"]).name for row in skipped] == ["broken.png"]
    splits = {name: (run / "splits" / f"{name}.txt").read_text().splitlines() for name in ("train", "val", "test")}
    assert sum(len(ids) for ids in splits.values()) == 32  # the lists hold the images used; broken.png is skipped
    assert not set(splits["train"]) & set(splits["test"])


# -- real data ------------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_short_pneumoniamnist_run_on_the_official_splits(pneumoniamnist_run):
    run = pneumoniamnist_run  # `medxai train --preset demo --epochs 2` (conftest), shared with other real-data tests
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 624 and metrics["val"]["n"] == 524
    assert len((run / "splits" / "train.txt").read_text().split()) == 4708
    assert metrics["test"]["auc"] > 0.85  # two epochs are enough to be far above chance


@pytest.mark.realdata
def test_short_kermany_run_at_reduced_size_and_full_resolution_explanation(data_dir, tmp_path):
    run = _train(
        tmp_path, str(data_dir / "chest_xray_kermany_224"), "--preset", "kermany", "--model", "simple_cnn",
        "--size", "32", "--epochs", "1", "--set", "train.batch_size=128", "--set", "data.num_workers=2",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 624
    assert metrics["test"]["auc"] > 0.7
    train_ids = set((run / "splits" / "train.txt").read_text().splitlines())
    val_ids = set((run / "splits" / "val.txt").read_text().splitlines())
    pattern = re.compile(load_config("kermany").data.patient_pattern)

    def patients(ids):
        return {pattern.match(Path(sample_id).name).group(1) for sample_id in ids}

    assert len(patients(val_ids)) > 100 and not patients(train_ids) & patients(val_ids)

    fullres = sorted((data_dir / "chest_xray_fullres_sample" / "PNEUMONIA").iterdir())[0]
    out = tmp_path / "fullres"
    assert main(["explain", str(run), str(fullres), "--out", str(out)]) == 0
    overlay = Image.open(next(out.glob("*.png")))
    assert overlay.size == Image.open(fullres).size  # the heatmap lies over the ORIGINAL resolution


# -- every error from what the user wrote is one line and exit 2 -----------------------------------------------------
NESTED = "[" * 5000


@pytest.mark.parametrize("case", [
    "set: unclosed list", "set: python tag", "set: alias", "set: nested too deeply", "set: numbers as keys",
    "set: a list for text", "preset: python tag", "preset: not UTF-8", "preset: nested too deeply",
    "split folders", "label map", "resume: python tag in config.yaml", "resume: nested config.yaml",
    "ensemble: nested config.yaml", "predict: nested model card", "predict: card of the wrong types",
])
def test_bad_text_from_the_user_is_one_error_line_and_exit_2(case, synthetic_run, tmp_path, capsys):
    """The review's case: ``--set "data.val_fraction=[1"`` (or a ``!!python/object`` tag) ended in a YAML traceback
    and exit 1. Every place user text is parsed (--set, a preset file, --split-folders, --label-map, a run's
    config.yaml and model card read by any command) answers with one ``error:`` line on stderr and exit 2."""
    data = next(synthetic_run.parent.glob("*.npz"))
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    preset = tmp_path / "preset.yaml"
    train = ["train", "--data", str(data), "--out", str(tmp_path), "--name", "fresh"]
    kind, _, detail = case.partition(": ")
    if kind == "set":
        value = {"unclosed list": "data.val_fraction=[1", "python tag": "model.name=!!python/object/apply:os.getcwd []",
                 "alias": "explain.tta=[&a x, *a]", "nested too deeply": f"data.val_fraction={NESTED}",
                 "numbers as keys": "data={1: 2}", "a list for text": "model.name=[a, b]"}[detail]
        command = [*train, "--set", value]
    elif kind == "preset":
        preset.write_bytes({"python tag": b"model: {name: !!python/object/apply:os.getcwd []}\n",
                            "not UTF-8": b"model:\n  name: \xff\xfe\n", "nested too deeply": NESTED.encode()}[detail])
        command = [*train, "--preset", str(preset)]
    elif kind == "split folders":
        command = ["check-data", str(tmp_path), "--split-folders", "train"]
    elif kind == "label map":
        command = ["evaluate", str(run), "--data", str(data), "--label-map", "a"]
    elif kind in ("resume", "ensemble"):
        (run / "config.yaml").write_text("name: run\ndata: !!python/object/apply:os.getcwd []\n"
                                         if detail == "python tag" else NESTED)
        command = (["train", "--resume", "--out", str(tmp_path), "--name", "run"] if kind == "resume" else
                   ["ensemble", str(run), str(synthetic_run), "--name", "fresh", "--out", str(tmp_path)])
    else:
        card = json.loads((run / "model_card.json").read_text())
        (run / "model_card.json").write_text(NESTED if detail == "nested model card" else
                                             json.dumps({**card, "label_names": 2, "num_classes": "2"}))
        command = ["predict", str(run), str(data)]
    assert main(command) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), printed.err
    assert "Traceback" not in printed.out + printed.err
    assert not (tmp_path / "fresh").exists()
