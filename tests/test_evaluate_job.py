"""``medxai evaluate`` cannot lie: the run's own splits on its own data, a separate folder for other data, and the
run's own results untouched either way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxai.cli import main
from medxai.report.compare import compare_runs

FAST = ["--set", "train.batch_size=16", "--set", "explain.per_outcome=1", "--set", "train.threads=2"]


def _blob_folder(root: Path, per_class: int, seed: int, names=("normal", "pneumonia"), shape=(36, 28)) -> Path:
    """A flat class-folder tree (no splits): a bright blob on the left (first class) or the right (second)."""
    rng = np.random.default_rng(seed)
    for index, label in enumerate(names):
        (root / label).mkdir(parents=True)
        for item in range(per_class):
            image = rng.integers(0, 70, size=shape).astype(np.uint8)
            column = 4 if index == 0 else shape[1] - 12
            row = int(rng.integers(4, shape[0] - 12))
            image[row : row + 8, column : column + 8] = 220
            Image.fromarray(image).save(root / label / f"{label}_{item:03d}.png")
    return root


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("flat")
    data = _blob_folder(folder / "data", per_class=40, seed=0)
    assert main(["train", "--data", str(data), "--out", str(folder), "--name", "run", "--epochs", "3", "--size", "24",
                 "--set", "data.test_fraction=0.25", *FAST]) == 0
    return folder / "run", data


def test_own_flat_data_is_evaluated_on_the_runs_own_test_list_exactly(flat_run, capsys):
    run, data = flat_run
    before = (run / "metrics.json").read_bytes()
    assert main(["evaluate", str(run), "--data", str(data), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    recorded = json.loads(before)["test"]
    assert printed["test"] == recorded  # same images, same metrics, same bootstrap intervals
    assert printed["test"]["n"] == len((run / "splits" / "test.txt").read_text().split()) == 20
    assert printed["evaluation"]["kind"] == "internal"
    assert printed["evaluation"]["selection"].startswith("the run's own test split list")
    assert (run / "metrics.json").read_bytes() == before
    folder = run / "evaluations" / "data-test"
    assert {"evaluation.json", "metrics.json", "skipped.csv", "figures"} <= {path.name for path in folder.iterdir()}
    assert (folder / "figures" / "roc_test.png").is_file()


def test_other_data_goes_to_its_own_folder_and_never_touches_the_run(flat_run, tmp_path, capsys):
    run, _ = flat_run
    other = _blob_folder(tmp_path / "hospital_b", per_class=15, seed=7, names=("NORMAL", "Pneumonia"), shape=(50, 30))
    protected = {name: (run / name).read_bytes() for name in ("metrics.json", "model_card.json", "skipped.csv")}
    figures = {path.name: path.read_bytes() for path in (run / "figures").iterdir()}

    assert main(["evaluate", str(run), "--data", str(other), "--split", "test"]) == 2
    assert "no splits of its own" in capsys.readouterr().err  # a flat folder has no test split to take

    assert main(["evaluate", str(run), "--data", str(other), "--split", "all", "--name", "hospital_b"]) == 0
    capsys.readouterr()
    for name, content in protected.items():
        assert (run / name).read_bytes() == content, name
    assert {path.name: path.read_bytes() for path in (run / "figures").iterdir()} == figures
    info = json.loads((run / "evaluations" / "hospital_b" / "evaluation.json").read_text())
    assert info["kind"] == "external" and info["n"] == 30
    assert info["label_map"] == {"NORMAL": "normal", "Pneumonia": "pneumonia"}
    metrics = json.loads((run / "evaluations" / "hospital_b" / "metrics.json").read_text())
    assert metrics["all"]["n"] == 30 and metrics["all"]["positive_label"] == "pneumonia"

    report = (run / "report.html").read_text()
    assert 'id="evaluations"' in report and "hospital_b" in report and "external" in report
    rows = compare_runs([run], evaluations=True)
    assert [row["kind"] for row in rows][:1] == ["run"]
    external = next(row for row in rows if row["run"] == "run/hospital_b")
    assert external["kind"] == "external" and external["split"] == "all" and external["n"] == 30
    assert main(["compare", str(run / "evaluations" / "hospital_b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["kind"] == "external"


def test_a_folder_that_is_not_an_evaluation_is_never_reused(flat_run, tmp_path, capsys):
    run, data = flat_run
    mine = run / "evaluations" / "notes"
    mine.mkdir(parents=True)
    (mine / "todo.txt").write_text("keep me")
    assert main(["evaluate", str(run), "--data", str(data), "--name", "notes"]) == 2
    assert "not a medxai evaluation" in capsys.readouterr().err
    assert (mine / "todo.txt").read_text() == "keep me"
    assert main(["evaluate", str(run), "--data", str(data), "--name", "../escape"]) == 2
    assert "single folder name" in capsys.readouterr().err


@pytest.mark.realdata
def test_a_pneumoniamnist_model_evaluates_on_the_kermany_folder_without_a_label_map(data_dir, pneumoniamnist_run,
                                                                                    capsys):
    capsys.readouterr()
    before = (pneumoniamnist_run / "metrics.json").read_bytes()
    assert main(["evaluate", str(pneumoniamnist_run), "--data", str(data_dir / "chest_xray_kermany_224"),
                 "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["evaluation"]["kind"] == "external"
    assert printed["evaluation"]["label_map"] == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    assert printed["test"]["n"] == 624 and printed["test"]["per_class"]["pneumonia"]["support"] == 390
    assert printed["test"]["auc"] > 0.6  # two epochs at 28 px on another hospital's films: far from chance
    assert (pneumoniamnist_run / "metrics.json").read_bytes() == before
