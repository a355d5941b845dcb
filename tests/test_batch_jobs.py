"""Streaming batch jobs: results written chunk by chunk as CSV and Parquet, a killed job resumed with every input
exactly once, explain's overlays written by worker threads with each row after its file."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxai.errors import ConfigError
from medxai.jobs.predict import explain_files, predict_files
from medxai.jobs.results import PARQUET_FILE


def blob_files(folder: Path, count: int, *, bad: int = 0) -> Path:
    """``count`` small PNGs like the training data of ``demo_like_run`` (tests/conftest.py), plus ``bad`` text files
    named like images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 60, size=(40, 40)).astype(np.uint8)
        column = 10 if index % 2 else 30
        image[17:23, column - 3 : column + 3] = 220
        Image.fromarray(image).save(folder / f"img_{index:05d}.png")
    for index in range(bad):
        (folder / f"bad_{index}.png").write_text("not an image")
    return folder


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def skipped_names(path: Path) -> list[str]:
    return [row["file"] for row in csv_rows(path)]


def test_predictions_stream_to_csv_and_an_equal_parquet(demo_like_run, tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    inputs = blob_files(tmp_path / "in", 70, bad=2)
    result = predict_files(demo_like_run, [inputs], out=tmp_path / "out", keep=False)
    assert result.predictions == [] and result.done == 70 and len(result.skipped) == 2
    rows = csv_rows(tmp_path / "out" / "predictions.csv")
    table = pyarrow_parquet.read_table(tmp_path / "out" / PARQUET_FILE).to_pylist()
    assert [row["file"] for row in rows] == [row["file"] for row in table] and len(rows) == 70
    for text, typed in zip(rows, table):
        for column, value in text.items():
            if column.startswith("p_") or column == "domain_score":
                assert typed[column] == pytest.approx(float(value))
            elif column == "in_domain":
                assert typed[column] is (value == "true")
            else:
                assert typed[column] == value
    kept = predict_files(demo_like_run, [inputs])  # the Python default keeps them; same values
    assert [item.label for item in kept.predictions] == [row["prediction"] for row in rows]


def test_resume_needs_an_output_folder_and_the_same_model(demo_like_run, tmp_path):
    inputs = blob_files(tmp_path / "in", 3)
    with pytest.raises(ConfigError, match="--out"):
        predict_files(demo_like_run, [inputs], resume=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("file,prediction,p_cat,p_dog\nx,cat,1,0\n")
    with pytest.raises(ConfigError, match="columns"):
        predict_files(demo_like_run, [inputs], out=out, resume=True)


def test_a_resumed_job_after_a_cut_keeps_every_input_exactly_once(demo_like_run, tmp_path):
    inputs = blob_files(tmp_path / "in", 90, bad=3)
    whole = tmp_path / "whole"
    predict_files(demo_like_run, [inputs], out=whole, keep=False)
    expected = {row["file"]: row for row in csv_rows(whole / "predictions.csv")}
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (whole / "predictions.csv").read_text().splitlines(keepends=True)
    (cut / "predictions.csv").write_text("".join(lines[:41]) + lines[41][:17])  # 40 rows and a torn one
    (cut / "skipped.csv").write_text("file,reason\n")
    result = predict_files(demo_like_run, [inputs], out=cut, resume=True, keep=False)
    rows = csv_rows(cut / "predictions.csv")
    names = [row["file"] for row in rows] + skipped_names(cut / "skipped.csv")
    assert len(names) == len(set(names)) == 93 and result.done == 90 and len(result.skipped) == 3
    assert sorted(row["file"] for row in rows) == sorted(expected)
    for row in rows:  # the same predictions (batches are composed differently: float sums differ at 1e-6)
        reference = expected[row["file"]]
        assert row["prediction"] == reference["prediction"] and row["in_domain"] == reference["in_domain"]
        for column in row:
            if column.startswith("p_"):
                assert float(row[column]) == pytest.approx(float(reference[column]), abs=1e-5)
    again = predict_files(demo_like_run, [inputs], out=cut, resume=True, keep=False)
    assert again.done == 90 and len(csv_rows(cut / "predictions.csv")) == 90  # nothing left to do


def test_a_killed_predict_resumed_ends_with_every_input_once(demo_like_run, tmp_path):
    inputs = blob_files(tmp_path / "in", 2500, bad=5)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medxai", "predict", str(demo_like_run), str(inputs), "--out", str(out),
               "--device", "cpu", "--batch-size", "16"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = out / "predictions.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.is_file() and predictions.stat().st_size > 20_000:  # a few hundred rows written
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    written_before = len(csv_rows(predictions))
    assert 0 < written_before < 2500, "the job was not killed midway; make the folder larger"
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    names = [row["file"] for row in csv_rows(predictions)] + skipped_names(out / "skipped.csv")
    assert len(names) == len(set(names)) == 2505
    assert sorted(Path(name).name for name in names) == sorted(path.name for path in inputs.iterdir())


def test_explain_streams_overlays_and_rows_and_resumes(demo_like_run, tmp_path):
    inputs = blob_files(tmp_path / "in", 21, bad=1)
    out = tmp_path / "out"
    result = explain_files(demo_like_run, [inputs], out, writers=2)
    rows = csv_rows(out / "predictions.csv")
    assert len(rows) == 21 == result.done and len(result.explained) == 21
    assert [item.prediction.id for item in result.explained] == [row["file"] for row in rows]
    for item in result.explained:
        assert item.overlay.is_file() and Image.open(item.overlay).size == (40, 40)
    assert skipped_names(out / "skipped.csv") == [str(inputs / "bad_0.png")]
    first = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    (out / "predictions.csv").write_text("".join((out / "predictions.csv").read_text().splitlines(True)[:11]))
    resumed = explain_files(demo_like_run, [inputs], out, resume=True)
    assert len(resumed.explained) == 11 and resumed.done == 21  # only the 11 rows that were cut
    names = [row["file"] for row in csv_rows(out / "predictions.csv")]
    assert len(names) == len(set(names)) == 21
    rewritten = [name for name, stamp in first.items() if (out / name).stat().st_mtime_ns != stamp]
    assert len(rewritten) == 11
