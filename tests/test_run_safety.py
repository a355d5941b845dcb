"""Run folders are safe: --resume continues the run it names from its own config and data, --overwrite only ever
removes a medxai run, and a run name is one plain folder name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medxai.cli import main
from medxai.errors import ConfigError
from medxai.run_folder import RunFolder, check_folder_name

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
    output = capsys.readouterr().err
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
    (copy / "figures" / "roc_old.png").write_bytes(b"a figure of the earlier run")  # medxai's kind of file
    old_id = json.loads((copy / "medxai_run.json").read_text())["run_id"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", "--overwrite", "--epochs",
                 "1", "--size", "28", *FAST]) == 0
    assert not (copy / "figures" / "roc_old.png").exists()
    assert len((copy / "history.csv").read_text().splitlines()) == 2
    new_id = json.loads((copy / "medxai_run.json").read_text())["run_id"]
    assert new_id != old_id and len(new_id) == 32  # a new random id, carried by the card and the weights
    assert json.loads((copy / "model_card.json").read_text())["run_id"] == new_id
    for name in ("best", "last"):
        embedded = json.loads(_metadata(copy / "checkpoints" / f"{name}.safetensors")["medxai_model_card"])
        assert embedded["run_id"] == new_id


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _legacy(run: Path) -> Path:
    """``run`` as the previous release wrote it: no marker, no run id, weights without the card's digest."""
    (run / "medxai_run.json").unlink()
    card = json.loads((run / "model_card.json").read_text())
    card.pop("run_id")
    (run / "model_card.json").write_text(json.dumps(card, indent=2))
    for path in (run / "checkpoints").glob("*.safetensors"):
        metadata = _metadata(path)
        if "medxai_model_card" in metadata:
            embedded = json.loads(metadata["medxai_model_card"])
            embedded.pop("run_id")
            save_file(load_file(path), path, {"medxai_model_card": json.dumps(embedded)})
    return run


@pytest.mark.parametrize("case", ["config naming the folder", "copied card", "notes in a run", "notes in figures",
                                  "another run's card", "legacy run without weights", "legacy run with notes",
                                  "a link in a run"])
def test_overwrite_refuses_what_medxai_did_not_provably_write(case, trained, tmp_path, capsys):
    """Only a folder medxai provably wrote (its marker's run id, carried by card and weights; or, before markers,
    weights that embed its card) and that holds nothing else is removed; anything else is refused, listed, kept."""
    run, data = trained
    folder = tmp_path / "precious2"
    if case == "config naming the folder":
        folder.mkdir()
        (folder / "config.yaml").write_text("name: precious2\n")  # RunConfig.from_dict fills in every default
    elif case == "copied card":
        folder.mkdir()
        shutil.copy(run / "model_card.json", folder)
    else:
        _copy(run, tmp_path, "precious2")
        if case == "another run's card":
            card = json.loads((folder / "model_card.json").read_text())
            (folder / "model_card.json").write_text(json.dumps({**card, "run_id": "0" * 32}))
        elif case == "legacy run without weights":
            shutil.rmtree(_legacy(folder) / "checkpoints")
        elif case == "legacy run with notes":
            _legacy(folder)
        elif case == "a link in a run":
            (folder / "figures" / "data").symlink_to(tmp_path)
    mine = {"notes in figures": folder / "figures" / "notes.txt"}.get(case, folder / "notes.txt")
    if case != "a link in a run":
        mine.write_text("years of work")
    before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "precious2", "--overwrite",
                 "--epochs", "1", *FAST]) == 2
    line = _error(capsys)
    assert "refusing to delete" in line
    if case in ("notes in a run", "notes in figures", "legacy run with notes", "a link in a run"):
        listed = {"notes in figures": "figures/notes.txt", "a link in a run": "figures/data"}.get(case, "notes.txt")
        assert f"did not write ({listed})" in line
    else:
        assert "not a medxai run folder" in line
    assert sorted(path.relative_to(folder) for path in folder.rglob("*")) == before


def test_a_run_of_the_previous_release_is_replaced_when_its_weights_vouch_for_it(trained, tmp_path):
    run, data = trained
    copy = _legacy(_copy(run, tmp_path))
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", "--overwrite", "--epochs",
                 "1", "--size", "28", *FAST]) == 0
    assert (copy / "medxai_run.json").is_file()  # a run of this release now


def test_a_restarted_ddp_job_starts_again_only_in_a_folder_medxai_wrote(trained, tmp_path, monkeypatch):
    """After a torchrun restart, a folder without a checkpoint is started again (deleted) only when provably the
    failed attempt's; a user's folder whose config.yaml names it is left to the usual refusal."""
    from medxai.jobs import train as train_job

    monkeypatch.setattr(train_job.distributed, "restart_count", lambda: 1)
    precious = tmp_path / "precious2"
    precious.mkdir()
    (precious / "config.yaml").write_text("name: precious2\n")
    (precious / "notes.txt").write_text("years of work")
    assert train_job._after_restart(RunFolder(precious), False, False) == (False, False)
    begun = RunFolder(tmp_path / "begun")
    begun.prepare_new(overwrite=False)  # what the failed attempt wrote first
    (begun.path / "config.yaml").write_text((trained[0] / "config.yaml").read_text())
    assert train_job._after_restart(begun, False, False) == (False, True)


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


# -- outputs never go into the inputs or into a run ------------------------------------------------------------------
def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command", [
    ["explain", "{run}", "{inputs}", "--out", "{inputs}/maps"],  # the review's case: it explained its own overlays
    ["predict", "{run}", "{inputs}", "--out", "{run}"],  # the review's case: it overwrote the run's skipped.csv
    ["predict", "{run}", "{inputs}", "--out", "{inputs}"],
    ["predict", "{run}", "{inputs}/sub/b.png", "--out", "{inputs}"],  # contains an input file
    ["predict", "{run}", "{inputs}", "--out", "{link}/preds"],  # a link to the inputs, resolved
    ["predict", "{run}", "{inputs}", "--out", "{run}/evaluations/preds"],
    ["predict", "{run}", "{inputs}", "--out", "{runs}/other/preds"],  # inside any run, not only the one used
    ["predict", "{run}", "{inputs}", "--out", "{runs}"],  # contains a run
    ["explain", "{run}", "{inputs}", "--out", "{inputs}/maps", "--engine", "ray"],
    ["check-data", "{inputs}", "--out", "{inputs}/check.json"],
    ["check-data", "{inputs}", "--out", "{run}/check.json"],
    ["audit", "{run}", "--out", "{run}/audit.csv"],
    ["report", "{run}", "--out", "{runs}/other/figures/report.html"],
    ["export", "{run}", "--out", "{inputs}/model.onnx", "--images", "{inputs}"],
    ["export", "{run}", "--out", "{runs}/other/model.onnx"],
    ["train", "--data", "{data}", "--out", "{run}", "--name", "nested"],  # a run inside a run
], ids=lambda command: " ".join(command).replace("{", "").replace("}", ""))
def test_no_command_writes_into_its_inputs_or_into_a_run(command, trained, tmp_path, capsys):
    run, data = trained
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.full((28, 28), 90, dtype=np.uint8)).save(inputs / name)
    (tmp_path / "link").symlink_to(inputs)
    copy, other = _copy(run, tmp_path), _copy(run, tmp_path / "runs", "other")
    values = {"run": copy, "inputs": inputs, "link": tmp_path / "link", "runs": tmp_path / "runs", "data": data}
    before = _state(tmp_path)
    assert main([str(item).format(**values) for item in command]) == 2
    line = _error(capsys)
    assert "overlaps" in line or "inside the run folder" in line or "contains the run folder" in line
    assert _state(tmp_path) == before  # nothing written, nothing replaced


def test_an_unfinished_run_is_used_only_when_asked(trained, tmp_path, capsys):
    """A run killed after an epoch (weights and card of training, no calibration, threshold, guard or
    metrics.json) refuses predict, explain, evaluate, export and serve unless --allow-unfinished, and says what is
    missing."""
    from medxai.config import ServeConfig
    from medxai.errors import CheckpointError
    from medxai.serve.engine import Engine

    run, data = trained
    copy = _copy(run, tmp_path)
    training_card = json.loads(_metadata(copy / "checkpoints" / "last.safetensors")["medxai_model_card"])
    (copy / "model_card.json").write_text(json.dumps(training_card, indent=2))
    shutil.copy(copy / "checkpoints" / "last.safetensors", copy / "checkpoints" / "best.safetensors")
    for name in ("metrics.json", "checkpoints/domain_guard.safetensors", "report.html"):
        (copy / name).unlink()
    image = tmp_path / "film.png"
    Image.fromarray(np.full((28, 28), 90, dtype=np.uint8)).save(image)
    for command in (["predict", str(copy), str(image)], ["explain", str(copy), str(image), "--out", str(tmp_path / "m")],
                    ["evaluate", str(copy), "--data", str(data)], ["export", str(copy)]):
        assert main(command) == 2
        line = _error(capsys)
        assert "unfinished run" in line and "no metrics.json, calibration, operating threshold, domain guard" in line
        assert "--resume" in line and "--allow-unfinished" in line
    with pytest.raises(CheckpointError, match="unfinished"):
        Engine.load(copy, ServeConfig(device="cpu"))
    assert Engine.load(copy, ServeConfig(device="cpu", allow_unfinished=True)).classifier.guard is None
    assert main(["predict", str(copy), str(image), "--allow-unfinished", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision_rule"] == "argmax"  # no threshold was chosen
