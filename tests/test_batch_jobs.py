"""Streaming batch jobs: results written chunk by chunk as CSV and Parquet, a killed job resumed with every input
exactly once, explain's overlays written by worker threads with each row after its file."""

from __future__ import annotations

import csv
import json
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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    predictions = out / "predictions.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.is_file() and predictions.stat().st_size > 20_000:  # a few hundred rows written
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, errors = process.communicate(timeout=30)
    assert predictions.is_file(), f"the job ended (code {process.returncode}) before writing: {errors[-2000:]}"
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


# -- how inputs are named, and file names that are hostile to CSV --------------------------------------------------
def test_a_resume_that_would_name_inputs_otherwise_is_refused(demo_like_run, tmp_path, monkeypatch):
    """The review's case: a killed ``predict --out D`` resumed with --hash-names (or another MEDXAI_HASH_KEY) wrote
    real names and pseudonyms mixed, more rows than inputs. The output records its naming; a resume naming inputs
    otherwise is refused and changes nothing; the same naming resumes to every input exactly once."""
    inputs = blob_files(tmp_path / "in", 8, bad=1)
    monkeypatch.setenv("MEDXAI_HASH_KEY", "first key")
    for job, hashed, refused in (
        (predict_files, False, [{"hash_names": True}]),
        (explain_files, True, [{"hash_names": False}, {"hash_names": True, "key": "another key"}]),
    ):
        out = tmp_path / job.__name__
        job(demo_like_run, [inputs], out=out, keep=False, hash_names=hashed)
        lines = (out / "predictions.csv").read_text().splitlines(keepends=True)
        (out / "predictions.csv").write_text("".join(lines[:4]))  # killed after 3 rows
        before = {path.name: path.read_bytes() for path in out.iterdir()}
        for options in refused:
            monkeypatch.setenv("MEDXAI_HASH_KEY", options.get("key", "first key"))
            with pytest.raises(ConfigError, match="named by (their paths|pseudonyms).*--hash-names"):
                job(demo_like_run, [inputs], out=out, keep=False, hash_names=options["hash_names"], resume=True)
            assert {path.name: path.read_bytes() for path in out.iterdir()} == before
        monkeypatch.setenv("MEDXAI_HASH_KEY", "first key")
        result = job(demo_like_run, [inputs], out=out, keep=False, hash_names=hashed, resume=True)
        names = [row["file"] for row in csv_rows(out / "predictions.csv")] + skipped_names(out / "skipped.csv")
        assert len(names) == len(set(names)) == 9 == result.done + len(result.skipped)


def test_an_output_of_the_previous_release_is_not_resumed_under_other_names(demo_like_run, tmp_path):
    """Without a naming record (written before it existed), a folder none of whose results is among this job's
    inputs is refused rather than appended to."""
    inputs = blob_files(tmp_path / "in", 6)
    out = tmp_path / "out"
    predict_files(demo_like_run, [inputs], out=out, keep=False)
    (out / "naming.json").unlink()
    with pytest.raises(ConfigError, match="none of the 6 result"):
        predict_files(demo_like_run, [inputs], out=out, keep=False, hash_names=True, resume=True)
    assert len(csv_rows(out / "predictions.csv")) == 6 and not (out / "naming.json").exists()  # nothing changed
    assert predict_files(demo_like_run, [inputs], out=out, keep=False, resume=True).done == 6
    assert json.loads((out / "naming.json").read_text()) == {"names": "paths"}


#: File names a batch job must carry through CSV, Parquet and --resume unchanged: quotes, commas, line breaks, and
#: beginnings a spreadsheet would run as a formula.
HOSTILE_NAMES = ['=HYPERLINK("x";"y").png', "+1.png", "-2.png", "@SUM(A1).png", "'quoted.png",
                 'say "hi", bye.png', "tab\there.png", "line\nbreak.png", "z last\nrow, \"quoted\".png"]


def _hostile_inputs(folder: Path) -> Path:
    blob_files(folder, len(HOSTILE_NAMES))
    for source, name in zip(sorted(folder.iterdir()), HOSTILE_NAMES):
        source.rename(folder / name)
    (folder / "=bad.png").write_text("not an image")
    return folder


def _parquet_files(folder: Path) -> list[str]:
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    return pyarrow_parquet.read_table(folder / PARQUET_FILE).column("file").to_pylist()


def test_file_names_that_are_formulas_are_written_as_text_and_read_back_true(demo_like_run, tmp_path, capsys,
                                                                             monkeypatch):
    """OWASP CSV injection: a text cell beginning with = + - @ tab or CR is written after a single quote (and one
    beginning with a quote gets one too); Parquet and --json keep the true names; --resume reads the quoted cells
    back as the names they are, so every input ends up exactly once."""
    from medxai.cli import main

    inputs = _hostile_inputs(tmp_path / "in")
    monkeypatch.chdir(inputs)  # relative names: the cells begin with the names themselves
    names = [*HOSTILE_NAMES, "=bad.png"]
    options, positional = ["--device", "cpu", "--out", str(tmp_path / "out")], ["--", str(demo_like_run), *names]
    assert main(["predict", *options, "--json", *positional]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["id"] for line in printed) == sorted(names)  # --json: the true names
    cells = [row["file"] for row in csv_rows(tmp_path / "out" / "predictions.csv")]
    assert sorted(cells) == sorted(f"'{name}" if name[0] in "=+-@'\t" else name for name in HOSTILE_NAMES)
    assert [row["file"] for row in csv_rows(tmp_path / "out" / "skipped.csv")] == ["'=bad.png"]
    assert sorted(_parquet_files(tmp_path / "out")) == sorted(HOSTILE_NAMES)  # the true names

    data = (tmp_path / "out" / "predictions.csv").read_bytes()
    (tmp_path / "out" / "predictions.csv").write_bytes(data[: len(data) // 2])  # killed halfway
    assert main(["predict", *options, "--resume", *positional]) == 0
    rows = csv_rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == len(HOSTILE_NAMES) and sorted(_parquet_files(tmp_path / "out")) == sorted(HOSTILE_NAMES)


def test_a_torn_last_record_is_cut_at_a_record_boundary_whatever_its_quoting(tmp_path):
    """The review's case: a torn last row whose file name holds a line break was cut at that line break, which left
    half a quoted field and broke the CSV. Truncated at every byte of its last record, a journal resumes with the
    complete records only, and writes a valid Parquet file with every input exactly once."""
    from medxai.jobs.names import InputNames
    from medxai.jobs.predict import prediction_columns
    from medxai.jobs.results import ResultsJournal

    columns = prediction_columns(["normal", "pneumonia"])
    names = InputNames([])

    def row(name: str) -> dict:
        return {"file": name, "prediction": "normal", "p_normal": 0.75, "p_pneumonia": 0.25,
                "decision_rule": "threshold 0.5 on pneumonia (youden)", "in_domain": True, "domain_score": -1.5,
                "domain_reasons": 'unexpected "body part", modality'}

    whole = tmp_path / "whole"
    with ResultsJournal(whole, columns, names) as journal:
        journal.write([row(name) for name in HOSTILE_NAMES])
        journal.close()
    data = (whole / "predictions.csv").read_bytes()
    last = data[: -2].rfind(b'\r\n') + 2  # where the last record begins (no record here ends in a quoted \r\n)
    assert b"\n" in data[last:-2]  # the last record holds a line break inside quotes
    for cut in range(last, len(data) + 1):
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        (folder / "predictions.csv").write_bytes(data[:cut])
        with ResultsJournal(folder, columns, names, resume=True) as journal:
            complete = cut == len(data)
            assert journal.done == set(HOSTILE_NAMES if complete else HOSTILE_NAMES[:-1]), cut
            journal.write([row(name) for name in HOSTILE_NAMES if name not in journal.done])
            journal.close()
        assert _parquet_files(folder) == HOSTILE_NAMES, cut
        assert (folder / "predictions.csv").read_bytes() == data, cut


@pytest.mark.parametrize("where", ["after the line break in the name", "before the closing quote", "before the CR"])
def test_a_job_killed_inside_a_quoted_line_break_resumes_to_every_input_once(where, demo_like_run, tmp_path):
    inputs = _hostile_inputs(tmp_path / "in")
    out = tmp_path / "out"
    predict_files(demo_like_run, [inputs / name for name in HOSTILE_NAMES], out=out, keep=False)
    data = (out / "predictions.csv").read_bytes()
    start = data.index(b"z last\nrow")
    cut = {"after the line break in the name": start + len(b"z last\n") + 2,
           "before the closing quote": data.index(b'.png"', start) + len(b".png"),
           "before the CR": len(data) - 2}[where]
    (out / "predictions.csv").write_bytes(data[:cut])
    result = predict_files(demo_like_run, [inputs / name for name in HOSTILE_NAMES], out=out, keep=False,
                           resume=True)
    assert result.done == len(HOSTILE_NAMES)
    assert sorted(_parquet_files(out)) == sorted(str(inputs / name) for name in HOSTILE_NAMES)
    assert (out / "predictions.csv").read_bytes() == data


def test_the_ray_engine_refuses_a_resume_named_otherwise_before_ray_starts(demo_like_run, tmp_path):
    pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install 'medxai[ray]')")
    from medxai.jobs.ray_batch import predict_with_ray

    inputs = blob_files(tmp_path / "in", 4)
    out = tmp_path / "out"
    predict_files(demo_like_run, [inputs], out=out, keep=False)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(ConfigError, match="named by their paths.*--hash-names"):
        predict_with_ray(demo_like_run, [inputs], out, hash_names=True, resume=True, device="cpu")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
