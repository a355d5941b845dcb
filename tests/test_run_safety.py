"""Run folders are safe: --resume continues the run it names from its own config and data, --overwrite only ever
removes a medxai run, and a run name is one plain folder name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxai.cli import main
from medxai.run_folder import RunFolder, check_folder_name
from medxai.errors import ConfigError

FAST = ["--set", "train.batch_size=32", "--set", "explain.per_outcome=1", "--set", "train.bootstrap_resamples=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import make_synthetic_npz

    folder = tmp_path_factory.mktemp("safety")
    data = make_synthetic_npz(folder / "blobs.npz", per_class=24)
    assert main(["train", "--data", str(data), "--out", str(folder), "--name", "run", "--epochs", "2", "--size", "28",
                 *FAST]) == 0
    return folder / "run", data


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


def _error(capsys) -> str:
    output = capsys.readouterr().out
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_resume_without_data_continues_on_the_runs_own_data(trained, tmp_path):
    run, data = trained
    copy = _copy(run, tmp_path)
    # No --data: the run's config.yaml says where its data is (not the default PneumoniaMNIST).
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "run", "--epochs", "3"]) == 0
    assert len((copy / "history.csv").read_text().splitlines()) == 4
    config = RunFolder(copy).read_config()
    assert config.data.source == str(data) and config.train.epochs == 3


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["--data", "pneumoniamnist"], "data.source"),
        (["--model", "resnet18"], "model.name"),
        (["--size", "32"], "preprocess.size"),
        (["--set", "train.lr=0.1"], "train.lr"),
    ],
)
def test_resume_refuses_to_change_what_defines_the_run(trained, tmp_path, capsys, extra, refused):
    run, _ = trained
    copy = _copy(run, tmp_path)
    history = (copy / "history.csv").read_text()
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "run", *extra]) == 2
    line = _error(capsys)
    assert refused in line and "train.epochs" in line  # what changed, and what may change
    assert (copy / "history.csv").read_text() == history


def test_resume_refuses_data_whose_content_changed(trained, tmp_path, capsys):
    from conftest import make_synthetic_npz

    run, data = trained
    copy = _copy(run, tmp_path)
    changed = make_synthetic_npz(tmp_path / "blobs.npz", per_class=24, seed=9)  # same name, other images
    config_text = (copy / "config.yaml").read_text().replace(str(data), str(changed))
    (copy / "config.yaml").write_text(config_text)
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "run"]) == 2
    assert "fingerprint" in _error(capsys)


def test_resume_needs_a_run_and_no_preset(trained, tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "nothing"]) == 2
    assert "no such run" in _error(capsys)
    run, _ = trained
    _copy(run, tmp_path)
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "run", "--preset", "demo"]) == 2
    assert "--preset" in _error(capsys)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(trained, tmp_path, capsys):
    _, data = trained
    precious = tmp_path / "chest_xray"
    (precious / "NORMAL").mkdir(parents=True)
    (precious / "NORMAL" / "x.jpeg").write_bytes(b"patient film")
    (precious / "config.yaml").write_text("name: something else\n")  # a config.yaml alone proves nothing
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "chest_xray", "--overwrite",
                 *FAST]) == 2
    assert "not a medxai run folder" in _error(capsys)
    assert (precious / "NORMAL" / "x.jpeg").read_bytes() == b"patient film"

    user = tmp_path / "users" / "demo"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    assert main(["demo", "--out", str(tmp_path / "users")]) == 2
    assert "not a medxai run folder" in _error(capsys)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_run(trained, tmp_path):
    run, data = trained
    copy = _copy(run, tmp_path)
    (copy / "stale.txt").write_text("old")
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", "--overwrite", "--epochs",
                 "1", "--size", "28", *FAST]) == 0
    assert not (copy / "stale.txt").exists()
    assert len((copy / "history.csv").read_text().splitlines()) == 2


def test_without_overwrite_an_existing_run_is_refused(trained, capsys):
    run, data = trained
    assert main(["train", "--data", str(data), "--out", str(run.parent), "--name", "run", *FAST]) == 2
    assert "--overwrite" in _error(capsys)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "/abs", "", ".hidden", "-rf", "x" * 129, "a\\b"])
def test_a_run_name_is_one_plain_folder_name(name, trained, tmp_path, capsys):
    _, data = trained
    with pytest.raises(ConfigError):
        check_folder_name(name)
    before = sorted(path.name for path in tmp_path.parent.iterdir())
    assert main(["train", "--data", str(data), "--out", str(tmp_path), f"--name={name}", "--overwrite", *FAST]) == 2
    assert "single folder name" in _error(capsys)
    assert sorted(path.name for path in tmp_path.parent.iterdir()) == before


def test_a_run_folder_may_not_overlap_its_data(tmp_path, capsys):
    data = tmp_path / "data"
    for label in ("normal", "pneumonia"):
        (data / label).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(np.full((8, 8), 40 * index, dtype=np.uint8)).save(data / label / f"{index}.png")
    assert main(["train", "--data", str(data), "--out", str(data), "--name", "run", *FAST]) == 2
    assert "overlaps the data" in _error(capsys)
    assert sorted(path.name for path in data.iterdir()) == ["normal", "pneumonia"]  # no run folder in the data
    assert json.dumps(sorted(path.name for path in tmp_path.iterdir())) == '["data"]'
