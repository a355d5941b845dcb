"""Batch inference on Ray (``medxai.jobs.ray_batch``): on a local Ray instance over a few hundred real chest films,
the Parquet rows, the skipped list and the overlays equal the single-process jobs', and the instance keeps to
loopback."""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'medxai[ray]')")
pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install 'medxai[ray]')")

import pyarrow.parquet as pq
from conftest import make_synthetic_npz, real_data_dir
from PIL import Image

from medxai.cli import main
from medxai.config import ExplainConfig, InferenceConfig
from medxai.errors import ConfigError
from medxai.jobs.predict import (
    explain_files,
    predict_files,
    prediction_columns,
    prediction_row,
)
from medxai.jobs.ray_batch import predict_with_ray, ray_session
from medxai.jobs.results import PARQUET_FILE

pytestmark = pytest.mark.realdata

CPU = InferenceConfig(device="cpu")


@pytest.fixture(scope="module")
def chest_films() -> list[Path]:
    """300 real chest films of the official Kermany test set, both classes."""
    folder = real_data_dir()
    if folder is None:
        pytest.skip("real data not available: set MEDXAI_DATA_DIR to the shared data folder (see its README.md)")
    films = sorted((folder / "chest_xray_kermany_224" / "test").rglob("*.jpeg"))
    return films[::2][:300]


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory) -> Path:
    """A folder of what a batch job must account for: a broken PNG and a text file (unreadable), a named pipe and a
    hidden file (skipped while listing, never opened)."""
    folder = tmp_path_factory.mktemp("odd")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".hidden.png").write_bytes(b"")
    os.mkfifo(folder / "pipe.png")
    return folder


@pytest.fixture(scope="module")
def run(chest_films, request) -> Path:
    """The trained 28 px grey run of conftest, trained only where the real data is there to apply it to."""
    return request.getfixturevalue("demo_like_run")


@pytest.fixture(scope="module")
def local_ray(chest_films):
    """One local Ray instance for the module (predict_with_ray uses it instead of starting its own)."""
    with ray_session() as ray:
        yield ray


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_predictions_equal_the_single_process_job(run, chest_films, odd_inputs, local_ray, tmp_path):
    items = [*chest_films, odd_inputs]
    result = predict_with_ray(run, items, tmp_path / "ray", actors=2, batch_size=32, device="cpu")
    reference = predict_files(run, items, out=tmp_path / "single", inference=CPU)
    labels = reference.classifier.label_names

    table = pq.read_table(tmp_path / "ray" / PARQUET_FILE)
    assert table.schema == pq.read_table(tmp_path / "single" / PARQUET_FILE).schema
    assert table.column_names == prediction_columns(labels) == _csv_rows(tmp_path / "ray" / "predictions.csv")[0]
    rows, expected = table.to_pylist(), [prediction_row(item, labels) for item in reference.predictions]
    assert [row["file"] for row in rows] == [row["file"] for row in expected] == [str(path) for path in chest_films]
    _assert_same_predictions(rows, expected, labels)

    assert result.skipped == reference.skipped
    assert [name for name, _ in result.skipped] == [str(odd_inputs / name) for name in
                                                   (".hidden.png", "pipe.png", "broken.png", "notes.txt")]
    assert _csv_rows(tmp_path / "ray" / "skipped.csv") == _csv_rows(tmp_path / "single" / "skipped.csv")
    assert result.inputs == reference.inputs == 304 == result.predicted + len(result.skipped)
    assert (result.predicted, result.actors, result.gpus_per_actor) == (300, 2, 0.0)
    assert sorted(path.name for path in result.files) == sorted(path.name for path in reference.files)


def _assert_same_predictions(rows: list[dict], expected: list[dict], labels: list[str]) -> None:
    for column in ("file", "prediction", "decision_rule", "in_domain", "domain_reasons"):
        assert [row[column] for row in rows] == [row[column] for row in expected], column
    for label in labels:  # a convolution's float sums depend on the batch it runs in: same batches here, but
        np.testing.assert_allclose([row[f"p_{label}"] for row in rows],  # other threads
                                   [row[f"p_{label}"] for row in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose([row["domain_score"] for row in rows], [row["domain_score"] for row in expected],
                               rtol=1e-5)


def _colour_entries(heat: np.ndarray, explain: ExplainConfig) -> np.ndarray:
    """The colormap entry each pixel of an overlay takes (as :func:`~medxai.explain.overlay.blend_with_colormap`
    picks it: ``floor(heat * N)``, the last entry for 1)."""
    import matplotlib

    entries = matplotlib.colormaps[explain.colormap].N
    return np.minimum(heat.astype(np.float32) * np.float32(entries), entries - 1).astype(np.intp)


def _largest_colour_step(explain: ExplainConfig) -> int:
    """The most one channel of an overlay changes between neighbouring colormap entries, over every 8-bit base
    level (the blend table of :func:`~medxai.explain.overlay.blend_with_colormap`): 2 for jet at alpha 0.4."""
    import matplotlib

    from medxai.explain.overlay import blend_with_colormap

    cmap = matplotlib.colormaps[explain.colormap]
    levels = np.arange(256, dtype=np.uint8)
    base = np.repeat(np.repeat(levels[:, None, None], cmap.N, axis=1), 3, axis=2)
    heat = np.broadcast_to((np.arange(cmap.N, dtype=np.float32) + 0.5) / cmap.N, (256, cmap.N))
    table = blend_with_colormap(base, heat, cmap, explain.alpha).astype(np.int16)
    return int(np.abs(np.diff(table, axis=1)).max())


def test_overlays_equal_the_single_process_job(run, chest_films, odd_inputs, local_ray, tmp_path):
    """The maps are the single-process job's up to float rounding, and the overlays exactly, except where the two
    maps put a pixel in neighbouring colormap entries.

    Why not bit-equal: a Ray actor runs other batches (here 4 files, against the local job's chunks of 8) on other
    threads (one per actor), and a convolution's float sums may depend on both, so CAM maps can differ in their last
    bits. The overlay colours a heat value by its colormap entry, floor(heat * 256): a pixel whose heat lies that
    close to an entry's edge takes the neighbouring entry, whose blended colour differs by up to
    :func:`_largest_colour_step` levels (2 for jet at alpha 0.4; the test once allowed 1 and failed on such a
    pixel). Everywhere else the colours are owed exactly."""
    full_resolution = sorted((real_data_dir() / "chest_xray_fullres_sample").rglob("*.jpeg"))[:2]
    items = [*chest_films[:8], *full_resolution, odd_inputs / "broken.png"]
    explain = ExplainConfig(save_npy=True)  # the maps at the original resolution, as the overlays were coloured
    result = predict_with_ray(run, items, tmp_path / "ray", actors=2, batch_size=4, device="cpu",
                              hash_names=True, explain=explain)
    reference = explain_files(run, items, tmp_path / "single", explain=explain, hash_names=True,
                              inference=CPU)
    labels = reference.classifier.label_names

    rows = pq.read_table(tmp_path / "ray" / PARQUET_FILE).to_pylist()
    _assert_same_predictions(rows, [prediction_row(item.prediction, labels) for item in reference.explained], labels)
    assert result.overlays == 10 and result.skipped == reference.skipped and len(result.skipped) == 1
    overlays = sorted(path.name for path in (tmp_path / "ray").glob("*.png"))
    assert overlays == sorted(item.overlay.name for item in reference.explained) == sorted(
        f"{row['file']}.png" for row in rows)  # with hash_names the pseudonym is the stem
    step = _largest_colour_step(explain)
    assert step == 2
    for row, original in zip(rows, items):
        assert re.fullmatch("[0-9a-f]{20}", row["file"])  # pseudonyms, not file names
        maps = [np.load(tmp_path / side / f"{row['file']}.npy") for side in ("ray", "single")]
        np.testing.assert_allclose(maps[0], maps[1], rtol=0, atol=1e-5)
        ours, theirs = (np.asarray(Image.open(tmp_path / side / f"{row['file']}.png"), dtype=np.int16)
                        for side in ("ray", "single"))
        width, height = Image.open(original).size
        assert ours.shape == theirs.shape == (height, width, 3)
        differing = np.abs(ours - theirs).max(axis=2)
        other_entry = _colour_entries(maps[0], explain) != _colour_entries(maps[1], explain)
        assert not (differing > 0)[~other_entry].any(), row["file"]  # equal wherever the entries are
        assert differing.max() <= step, row["file"]
    assert len({Image.open(path).size for path in full_resolution + chest_films[:1]}) == 3  # three original sizes


def test_out_of_domain_inputs_are_skipped_as_the_single_process_job_skips_them(
        run, chest_films, local_ray, tmp_path):
    """Grey 28 px blobs like the training images are kept; chest films are out of this run's domain."""
    data = np.load(make_synthetic_npz(tmp_path / "synthetic.npz", per_class=48))
    folder = tmp_path / "in_domain"
    folder.mkdir()
    for index, image in enumerate(data["test_images"][:12]):
        Image.fromarray(image).save(folder / f"blob{index:02d}.png")
    items = [folder, *chest_films[:12]]
    result = predict_with_ray(run, items, tmp_path / "ray", actors=2, batch_size=8, device="cpu",
                              ood_action="skip")
    reference = predict_files(run, items, inference=CPU, ood_action="skip")

    rows = pq.read_table(tmp_path / "ray" / PARQUET_FILE).to_pylist()
    assert [row["file"] for row in rows] == [item.id for item in reference.predictions]
    assert result.skipped == reference.skipped and len(rows) == result.predicted
    assert 0 < result.predicted < 24 and result.predicted + len(result.skipped) == 24
    assert all(reason.startswith("out of domain: ") for _, reason in result.skipped)


def test_the_local_instance_keeps_to_loopback(local_ray):
    """Every socket of every Ray process (started by this one: GCS, raylet, API server, workers) is bound to and
    connected with loopback only, and those processes run with the environment that keeps Ray's cloud probe off
    the network; this process's own environment is as it was."""
    psutil = pytest.importorskip("psutil")
    processes = psutil.Process().children(recursive=True)
    assert processes, "the local Ray instance has no processes"
    sockets, api_servers = [], []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            sockets += [(process.name(), item) for item in process.net_connections(kind="inet")]
            if any(part.endswith("dashboard/dashboard.py") for part in process.cmdline()):
                api_servers.append(process.environ())
    assert sockets and len(api_servers) == 1
    assert api_servers[0].get("RAY_USAGE_STATS_ENABLED") == "0"
    assert api_servers[0].get("http_proxy", "").startswith("http://127.0.0.1:")  # its cloud probe stays here
    outside = [(name, item.laddr, item.raddr) for name, item in sockets
               if not _loopback(item.laddr.ip) or (item.raddr and not _loopback(item.raddr.ip))]
    assert not outside, outside
    assert os.environ.get("http_proxy") != "http://127.0.0.1:9"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 (Python < 3.13 calls it not loopback)
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_a_missing_ray_is_a_config_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'medxai\[ray\]'"):  # before the run folder is looked at
        predict_with_ray(tmp_path / "no-run", [tmp_path / "in"], tmp_path / "out")


def _csv_predictions(path: Path) -> list[dict]:
    """``predictions.csv`` as rows, its probabilities and domain scores as numbers."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for column in row:
            if column.startswith("p_") or column == "domain_score":
                row[column] = float(row[column])
    return rows


def test_the_cli_engine_ray_writes_what_the_local_predict_writes(run, chest_films, odd_inputs, local_ray, tmp_path,
                                                                 capsys):
    """``medxai predict --engine ray`` on the module's Ray instance: the same predictions.csv and skipped.csv as
    the local engine's, a summary on the console, and --actors, --device and --batch-size reach the pool."""
    items = [*(str(path) for path in chest_films[:40]), str(odd_inputs)]
    options = ["--device", "cpu", "--batch-size", "16"]
    assert main(["predict", str(run), *items, "--engine", "ray", "--actors", "1", "--out", str(tmp_path / "ray"),
                 *options]) == 0
    printed = capsys.readouterr().out
    assert main(["predict", str(run), *items, "--out", str(tmp_path / "local"), *options]) == 0

    assert "40 predicted, 4 skipped, 44 inputs, on 1 Ray actor(s) (CPU)" in " ".join(printed.split())
    assert "skipped 4 file(s)" in printed  # the skipped list's table
    assert str(tmp_path / "ray" / "predictions.parquet") in "".join(printed.split())  # rich folds long paths
    assert _csv_rows(tmp_path / "ray" / "predictions.csv")[0] == _csv_rows(tmp_path / "local" / "predictions.csv")[0]
    rows, expected = (_csv_predictions(tmp_path / name / "predictions.csv") for name in ("ray", "local"))
    assert [row["file"] for row in rows] == [str(path) for path in chest_films[:40]]
    _assert_same_predictions(rows, expected, [column[2:] for column in rows[0] if column.startswith("p_")])
    assert _csv_rows(tmp_path / "ray" / "skipped.csv") == _csv_rows(tmp_path / "local" / "skipped.csv")
    assert sorted(path.name for path in (tmp_path / "ray").iterdir()) == sorted(
        path.name for path in (tmp_path / "local").iterdir())


def test_the_cli_engine_ray_explains_as_the_local_explain_does(run, chest_films, local_ray, tmp_path, capsys):
    """``medxai explain --engine ray`` with the explain options (method, target, test-time views): the same
    predictions.csv and overlays as the local engine's."""
    items = [str(path) for path in chest_films[:4]]
    options = ["--device", "cpu", "--method", "gradcam++", "--target", "1", "--tta", "shift"]
    assert main(["explain", str(run), *items, "--engine", "ray", "--actors", "1", "--out", str(tmp_path / "ray"),
                 *options]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert main(["explain", str(run), *items, "--out", str(tmp_path / "local"), *options]) == 0

    assert "4 explained, 0 skipped, 4 inputs, 4 overlay(s) written, on 1 Ray actor(s) (CPU)" in printed
    rows, expected = (_csv_predictions(tmp_path / name / "predictions.csv") for name in ("ray", "local"))
    _assert_same_predictions(rows, expected, [column[2:] for column in rows[0] if column.startswith("p_")])
    overlays = sorted(path.name for path in (tmp_path / "ray").glob("*.png"))
    assert len(overlays) == 4 and overlays == sorted(path.name for path in (tmp_path / "local").glob("*.png"))
    for name in overlays:
        ours, theirs = (np.asarray(Image.open(tmp_path / folder / name), dtype=np.int16) for folder in ("ray", "local"))
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1, name

@pytest.mark.parametrize("arguments, option", [
    (["predict", "--engine", "ray"], "--out"),
    (["predict", "--engine", "ray", "--out", "{out}", "--backend", "onnxruntime"], "--backend onnxruntime"),
    (["predict", "--engine", "ray", "--out", "{out}", "--tta", "hflip"], "--tta"),
    (["predict", "--engine", "ray", "--out", "{out}", "--json"], "--json"),
    (["explain", "--engine", "ray", "--out", "{out}", "--json"], "--json"),
    (["explain", "--engine", "ray", "--out", "{out}", "--dicom-sc"], "--dicom-sc"),
    (["explain", "--engine", "ray", "--out", "{out}", "--dicom-sc-copy-patient"], "--dicom-sc-copy-patient"),
    (["explain", "--engine", "ray", "--out", "{out}", "--dicom-sc-deidentify"], "--dicom-sc-deidentify"),
    (["predict", "--ray-address", "auto"], "--ray-address"),
    (["predict", "--out", "{out}", "--actors", "2"], "--actors"),
    (["explain", "--out", "{out}", "--engine", "local", "--actors", "2"], "--actors"),
])
def test_the_cli_refuses_what_the_ray_engine_cannot_do(arguments, option, tmp_path, capsys):
    """One clear line naming the option, before the run is looked at or anything is written; no Ray started."""
    command, *options = arguments
    code = main([command, str(tmp_path / "no-run"), str(tmp_path),
                 *(item.format(out=tmp_path / "out") for item in options)])
    output = capsys.readouterr().err
    assert code == 2 and "Traceback" not in output
    assert "error:" in output and option in output and "--engine ray" in output and "no-run" not in output
    assert not (tmp_path / "out").exists()
