"""The evaluation a run writes (intervals, calibration, operating threshold) and its HTML report, from a short
synthetic training run with label noise (so that calibration and threshold have something to do)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import medxai
from medxai.cli import main
from medxai.evaluate.bootstrap import SCALAR_METRICS
from medxai.models.checkpoint import load_weights
from medxai.report.html import SECTION_IDS, build_report

MAX_REPORT_BYTES = 5_000_000


def build_noisy_run(base: Path) -> Path:
    """Train (once per test session) on an easy synthetic task whose labels are 15% flipped, via the CLI."""
    from conftest import make_synthetic_npz

    run = base / "run"
    if (run / "report.html").is_file():
        return run
    base.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_npz(base / "noisy.npz", per_class=64)
    arrays = dict(np.load(data))
    generator = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        labels = arrays[f"{split}_labels"]
        flipped = generator.random(labels.shape[0]) < 0.15
        labels[flipped, 0] = 1 - labels[flipped, 0]
    np.savez(data, **arrays)
    code = main([
        "train", "--data", str(data), "--out", str(base), "--name", "run", "--epochs", "3", "--size", "28",
        "--model", "simple_cnn", "--set", "train.batch_size=32", "--set", "train.threads=2",
        "--set", "explain.per_outcome=2", "--set", "data.min_val_size=0",
    ])
    assert code == 0
    return run


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> Path:
    return build_noisy_run(tmp_path_factory.getbasetemp() / "report_run")


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _card(run: Path) -> dict:
    return json.loads((run / "model_card.json").read_text())


def test_metrics_json_has_intervals_for_every_metric_and_the_threshold_metrics(noisy_run):
    metrics, card = _metrics(noisy_run), _card(noisy_run)
    threshold = card["threshold"]
    assert threshold["method"] == "youden" and 0.0 < threshold["value"] < 1.0
    for split in ("val", "test"):
        entry = metrics[split]
        assert set(SCALAR_METRICS) <= set(entry["ci95"])
        for key in SCALAR_METRICS:
            low, high = entry["ci95"][key]
            assert 0.0 <= low <= high <= 1.0
            assert low - 1e-9 <= entry[key] <= high + 1e-9, (split, key)  # the estimate lies in its interval
        assert entry["ci95"]["accuracy"][1] - entry["ci95"]["accuracy"][0] > 0.02  # n = 64: clearly uncertain
        assert entry["bootstrap"]["resamples"] == 1000
        assert entry["threshold"] is None  # top level: the argmax, MedMNIST's protocol
        at = entry["at_threshold"]
        assert at["threshold"] == pytest.approx(threshold["value"])
        assert set(SCALAR_METRICS) <= set(at["ci95"])
        assert at["auc"] == pytest.approx(entry["auc"])  # a threshold does not move the ROC curve
        assert entry["calibration"]["temperature"] == pytest.approx(card["temperature"])
        assert set(entry["calibration"]["ci95"]) == {"ece", "brier"}
        assert set(entry["calibration_uncalibrated"]) == {"ece", "ece_adaptive", "brier"}
    # The threshold was fitted on val: val's metrics at the threshold are the ones stored with it.
    assert metrics["val"]["at_threshold"]["sensitivity"] == pytest.approx(threshold["val_sensitivity"])
    assert metrics["val"]["at_threshold"]["specificity"] == pytest.approx(threshold["val_specificity"])


def test_temperature_and_threshold_travel_with_the_weights_and_drive_predict(noisy_run):
    card = _card(noisy_run)
    assert card["temperature"] != 1.0  # noisy labels: the fitted temperature moved
    _, stored = load_weights(noisy_run / "checkpoints" / "best.safetensors")
    assert stored.temperature == pytest.approx(card["temperature"])
    assert stored.threshold == card["threshold"]
    classifier = medxai.load(noisy_run)
    value = card["threshold"]["value"]
    positive = classifier.card.positive_index
    probabilities = torch.zeros(2, 2)
    probabilities[:, positive] = torch.tensor([value + 1e-3, value - 1e-3])
    probabilities[:, 1 - positive] = 1 - probabilities[:, positive]
    assert classifier.decide(probabilities).tolist() == [positive, 1 - positive]
    logits = torch.tensor([[0.3, -0.8]])
    expected = torch.softmax(logits / card["temperature"], dim=1)
    assert torch.allclose(classifier.probabilities(logits), expected)
    prediction = classifier.predict(np.zeros((28, 28), dtype=np.uint8))[0]
    assert "youden" in prediction.decision_rule and f"{value:.4g}" in prediction.decision_rule


def test_figures_and_gallery_index(noisy_run):
    for name in ("precision_recall_test.png", "reliability_test.png", "reliability_val.png"):
        assert (noisy_run / "figures" / name).is_file()
    gallery = json.loads((noisy_run / "heatmaps" / "gallery.json").read_text())
    card = _card(noisy_run)
    positive = card["positive_label"]
    assert gallery["split"] == "test" and gallery["items"]
    for item in gallery["items"]:
        assert (noisy_run / "heatmaps" / item["file"]).is_file()
        is_positive, said_positive = item["label"] == positive, item["predicted"] == positive
        expected = {(True, True): "true_positive", (False, True): "false_positive",
                    (True, False): "false_negative", (False, False): "true_negative"}[(is_positive, said_positive)]
        assert item["outcome"] == expected
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert item["probability_positive"] == pytest.approx(item["probabilities"][positive])
        # Decisions follow the operating threshold, not the argmax.
        assert said_positive == (item["probability_positive"] >= card["threshold"]["value"])


def test_report_is_self_contained_complete_and_small(noisy_run):
    path = noisy_run / "report.html"
    text = path.read_text()
    assert path.stat().st_size < MAX_REPORT_BYTES
    for section in SECTION_IDS:
        assert text.count(f'<section id="{section}">') == 1, section
    assert "<script" not in text and "<link" not in text and "url(" not in text
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # nothing but embedded data and in-page anchors
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert all(source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for source in sources)
    gallery = json.loads((noisy_run / "heatmaps" / "gallery.json").read_text())["items"]
    # training curves + (confusion, ROC, PR, reliability) per split + the gallery overlays
    assert len(sources) == 1 + 4 * 2 + 1 + len(gallery)  # curves, 4 per split, domain scores (test)
    assert "Not for clinical use without independent validation" in text
    test = _metrics(noisy_run)["test"]
    low, high = test["ci95"]["accuracy"]
    assert f"{test['accuracy']:.3f}<br><span class=\"ci\">{low:.3f}–{high:.3f}</span>" in text
    threshold = _card(noisy_run)["threshold"]["value"]
    assert f"{threshold:.4f}" in text


def test_report_command_shows_explanation_quality_and_duplicates_when_present(noisy_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(noisy_run, run)
    method = {"deletion_auc": 0.21, "insertion_auc": 0.64, "road_morf": 0.3, "road_lerf": 0.7, "seconds": 3.2,
              "random_baseline": {"deletion_auc": 0.33, "insertion_auc": 0.5, "road_morf": 0.4, "road_lerf": 0.6},
              "beats_random": {"deletion_auc": True, "insertion_auc": True, "road_morf": True, "road_lerf": False},
              "sanity_check": {"passed": True, "layers": ["head"], "spearman": [0.1], "ssim": [0.2]}}
    (run / "explain_metrics.json").write_text(json.dumps({
        "run": str(run), "data": "synthetic", "split": "test", "n_images": 16, "baseline": "blur",
        "methods": {"gradcam": method, "hirescam": {**method, "sanity_check": {"passed": False}}},
    }))
    check = json.loads((run / "data_check.json").read_text())
    check["duplicates"] = {  # the schema of medxai.data.check
        "method": "pHash", "near_threshold": 24,
        "counts": {"exact_groups": 1, "exact_images": 2, "near_pairs": 0, "cross_split_pairs": 1,
                   "cross_split_exact_pairs": 1, "conflicting_label_groups": 0},
        "exact": [], "near": [],
        "cross_split": [{"kind": "exact", "distance": 0, "a": {"id": "a/1", "split": "train", "label": "0"},
                         "b": {"id": "b/7", "split": "test", "label": "0"}, "conflicting_labels": False}],
        "leaked_ids": {"test<-train": ["b/7"]}, "truncated": False,
    }
    (run / "data_check.json").write_text(json.dumps(check))
    (run / "heatmaps" / "gallery.json").unlink()  # an older run: the gallery comes from the file names
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = out.read_text()
    explanations = text[text.index('<section id="explanations">'):text.index('<section id="model-card">')]
    assert "gradcam" in explanations and "hirescam" in explanations and "0.210" in explanations
    assert "failed" in explanations and "passed" in explanations and "✗" in explanations
    data = text[text.index('<section id="data">'):text.index('<section id="config">')]
    assert "passed with findings" in data and "1 duplicate finding" in data and "test: b/7 (0)" in data
    assert "<strong>1 pair(s) across splits</strong>" in data and "test&lt;-train: 1 image(s)" in data
    gallery = text[text.index('<section id="gallery">'):text.index('<section id="explanations">')]
    assert gallery.count("<img") == len(list((run / "heatmaps").glob("*.png"))) > 0


def test_report_shrinks_images_to_fit_a_size_budget(noisy_run, tmp_path):
    full = build_report(noisy_run, tmp_path / "full.html")
    small = build_report(noisy_run, tmp_path / "small.html", max_bytes=int(full.stat().st_size * 0.9))
    assert small.stat().st_size < full.stat().st_size
    assert small.read_text().count("<img") == full.read_text().count("<img")


def test_compare_lists_runs_with_intervals(noisy_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(noisy_run, other)
    assert main(["compare", str(noisy_run), str(other), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    test = _metrics(noisy_run)["test"]
    assert [row["run"] for row in rows] == ["run", "other"]
    assert rows[0]["model"] == "simple_cnn" and rows[0]["split"] == "test" and rows[0]["n"] == test["n"]
    assert rows[0]["metrics"]["auc"] == {"value": test["auc"], "ci95": test["ci95"]["auc"]}
    assert rows[0]["at_threshold"]["sensitivity"]["value"] == test["at_threshold"]["sensitivity"]
    assert main(["compare", str(noisy_run), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "simple_cnn" in printed and f"{_metrics(noisy_run)['val']['accuracy']:.3f}" in printed


def test_report_and_compare_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert main(["compare", str(tmp_path)]) == 2
    output = capsys.readouterr().err
    assert output.count("error:") == 2 and "Traceback" not in output
