"""``medxai explain-eval`` on data with lesion masks: localisation measured where the overlay puts the map.

A small BUSI-like folder (``<class>/<class> (n).png`` beside ``<class> (n)_mask.png``; non-square images so that the
padding of the model input must be undone; a "normal" class whose masks are empty) is trained on for a few epochs;
explain-eval then must give, for every image, exactly the metrics of
:func:`medxai.explain.localization.localization_metrics` on the map ``Classifier.explain`` returns (the overlay's map,
at the original resolution) against the mask read from its file, and everything around it: the counts, the
validation thresholds, the files, masks given apart (``--masks``), a mask of the wrong size as a skip reason, the
shortcut alarm in the model card, and the report's sections in a real browser.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medxai.classifier import Classifier
from medxai.cli import main
from medxai.explain.localization import empty_mask_metrics, localization_metrics
from medxai.run_folder import RunFolder

_SHAPE = (40, 56)  # (height, width): wide, so pad mode letterboxes the model input


def _write_busi_like(root: Path, per_class: int = 18, seed: int = 0) -> None:
    """Benign: a dim disc; malignant: a bright, larger one; normal: none (an empty mask). Noise everywhere."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: _SHAPE[0], : _SHAPE[1]]
    for label, (brightness, radius) in {"benign": (150, 5), "malignant": (250, 8), "normal": (0, 0)}.items():
        folder = root / label
        folder.mkdir(parents=True)
        for number in range(1, per_class + 1):
            image = rng.normal(40, 12, _SHAPE).clip(0, 255)
            mask = np.zeros(_SHAPE, dtype=bool)
            if radius:
                centre = rng.integers([radius + 2, radius + 2], [_SHAPE[0] - radius - 2, _SHAPE[1] - radius - 2])
                mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
                image[mask] = brightness
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{label} ({number}).png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{label} ({number})_mask.png")


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lesions")
    data = folder / "busi_like"
    _write_busi_like(data)
    code = main(["train", "--data", str(data), "--out", str(folder), "--name", "run", "--epochs", "3", "--size",
                 "32", "--model", "simple_cnn", "--set", "preprocess.resize_mode=pad", "--set",
                 "preprocess.channels=1", "--set", "train.batch_size=16", "--set", "train.threads=2", "--set",
                 "explain.per_outcome=1", "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25",
                 "--set", "domain.enabled=false"])
    assert code == 0
    return folder / "run", data


def _mask(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path)) > 127)


def test_every_images_metrics_are_those_of_its_overlay_map_against_its_mask(lesion_run) -> None:
    run, data = lesion_run
    assert main(["explain-eval", str(run), "--data", str(data), "--methods", "gradcam,layercam", "--steps", "4",
                 "--seed", "0"]) == 0
    document = json.loads((run / "explain_metrics.json").read_text())
    test_ids = (run / "splits" / "test.txt").read_text().splitlines()
    facts = document["localization"]
    assert facts["images_with_ground_truth"] == len(test_ids) == document["n_images"]
    assert facts["empty_mask_images"] == sum(image.startswith("normal/") for image in test_ids)
    assert facts["lesion_images"] == len(test_ids) - facts["empty_mask_images"]
    assert facts["thresholds_from"] == "val"  # per-class thresholds chosen on the run's validation masks

    with (run / "localization" / "localization.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["method"], row["id"]) for row in rows) == sorted(
        (method, image) for method in ("gradcam", "layercam") for image in test_ids)

    classifier = Classifier.from_run(run, device="cpu")
    explanations = classifier.explain([data / image for image in test_ids], method="gradcam")
    by_id = {row["id"]: row for row in rows if row["method"] == "gradcam"}
    thresholds = document["methods"]["gradcam"]["localization"]["thresholds"]
    for image, explanation in zip(test_ids, explanations, strict=True):
        row = by_id[image]
        heatmap = torch.from_numpy(explanation.heatmap)[None]
        mask = _mask(data / image.replace(".png", "_mask.png"))[None]
        assert heatmap.shape == mask.shape == (1, *_SHAPE)  # the map at the original resolution
        label = image.split("/")[0]
        assert row["class"] == label and row["empty_mask"] == str(label == "normal")
        assert row["outcome"] == ("correct" if explanation.prediction.label == label else "wrong")
        if label == "normal":
            expected = empty_mask_metrics(heatmap)
        else:
            expected = localization_metrics(heatmap, mask, value_thresholds=thresholds[label])
        for key, value in expected.items():
            value = float(value[0])
            if np.isnan(value):
                assert row[key] == "", (image, key)
            else:
                assert float(row[key]) == pytest.approx(value, abs=1e-4), (image, key)

    gradcam = document["methods"]["gradcam"]["localization"]
    lesion_rows = [row for row in by_id.values() if row["empty_mask"] == "False"]
    assert gradcam["lesion"]["all"]["pointing_game"]["n"] == len(lesion_rows)
    assert gradcam["lesion"]["all"]["pointing_game"]["mean"] == pytest.approx(
        np.mean([float(row["pointing_game"]) for row in lesion_rows]))
    low, high = gradcam["lesion"]["all"]["iou_otsu"]["interval"]
    assert low <= gradcam["lesion"]["all"]["iou_otsu"]["mean"] <= high
    for case in gradcam["cases"]:  # the best and worst cases drawn with the expert's outline in green
        pixels = np.asarray(Image.open(run / "localization" / case["file"]).convert("RGB"))
        assert pixels.shape[:2] == _SHAPE and ((pixels == (0, 255, 0)).all(axis=2)).sum() > 0
    assert len({case["file"] for case in gradcam["cases"]}) == len(gradcam["cases"])

    card = json.loads((run / "model_card.json").read_text())
    alarm = card["metrics"]["shortcut_alarm"]
    assert alarm["split"] == "test" and alarm["fires"] == document["shortcut_alarm"]["fires"]
    assert set(document["methods"]["gradcam"]["shortcut_alarm"]["regions"]) == {"border", "text",
                                                                                 "outside_foreground"}


def test_masks_given_apart_replace_the_datas_and_a_wrong_sized_one_is_a_skip_reason(lesion_run, tmp_path) -> None:
    run, data = lesion_run
    test_ids = (run / "splits" / "test.txt").read_text().splitlines()
    lesion_ids = [image for image in test_ids if not image.startswith("normal/")]
    wrong = tmp_path / "wrong_size.png"
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(wrong)
    table = tmp_path / "masks.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask"])
        writer.writerow([lesion_ids[0], str(wrong)])
        swapped = data / lesion_ids[2].replace(".png", "_mask.png")  # another image's lesion, elsewhere
        writer.writerow([lesion_ids[1], str(swapped)])
        for image in lesion_ids[2:]:
            writer.writerow([image, str(data / image.replace(".png", "_mask.png"))])
    (run / "localization").mkdir(exist_ok=True)
    (run / "localization" / "my notes.txt").write_text("the user's")
    earlier = sorted(path.name for path in (run / "localization").glob("layercam_*.png"))
    assert main(["explain-eval", str(run), "--data", str(data), "--masks", str(table), "--no-faithfulness",
                 "--layer", "features.block2,features.block3"]) == 0
    # The earlier evaluation's files are gone (this one explained gradcam only); the user's file stays.
    assert earlier and not list((run / "localization").glob("layercam_*.png"))
    assert (run / "localization" / "my notes.txt").read_text() == "the user's"
    document = json.loads((run / "explain_metrics.json").read_text())
    entry = document["methods"]["gradcam"]
    assert "deletion_auc" not in entry and "sanity_check" not in entry  # --no-faithfulness
    assert document["localization"]["layer"] == ["features.block2", "features.block3"]
    # The table's masks replace the data's for the images it names (one of them unusable); the others keep theirs.
    assert document["localization"]["images_with_ground_truth"] == len(test_ids) - 1
    assert document["localization"]["empty_mask_images"] == len(test_ids) - len(lesion_ids)
    # The table's mask replaced the image's own: the row is the map against the swapped mask alone.
    with (run / "localization" / "localization.csv").open(newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["id"] == lesion_ids[1])
    heatmap = torch.from_numpy(Classifier.from_run(run, device="cpu").explain(
        data / lesion_ids[1], layer=["features.block2", "features.block3"])[0].heatmap)[None]
    expected = localization_metrics(heatmap, _mask(swapped)[None])["relevance_mass"]
    assert float(row["relevance_mass"]) == pytest.approx(float(expected[0]), abs=1e-4)
    with (run / "explain_skipped.csv").open(newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["file"] for row in skipped] == [str(wrong)]
    assert skipped[0]["reason"].startswith("ground truth:") and "10" in skipped[0]["reason"]

    # A failed explain-eval (an unknown layer) keeps the last one's files and leaves no staging folder behind.
    before = sorted(path.name for path in (run / "localization").iterdir())
    assert main(["explain-eval", str(run), "--data", str(data), "--layer", "features.nothing"]) == 2
    assert sorted(path.name for path in (run / "localization").iterdir()) == before
    assert not list(run.glob(".explain-eval.partial-*"))
    # Everything explain-eval wrote is medxai's own to --overwrite; the user's note is not, and is named.
    assert RunFolder(run).foreign_files() == ["localization/my notes.txt"]


def test_the_report_shows_the_localisation_and_the_shortcut_alarm_in_a_browser(lesion_run, browser, tmp_path):
    run, data = lesion_run
    assert main(["explain-eval", str(run), "--data", str(data), "--methods", "gradcam", "--steps", "4"]) == 0
    assert main(["report", str(run)]) == 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((run / "report.html").as_uri(), wait_until="load")
    section = page.locator("section#localization")
    assert "Does the heatmap point at the lesion?" in section.locator("h2").inner_text()
    rows = section.locator("table.metrics").first.locator("tbody tr")
    assert rows.count() >= 2 and rows.first.locator("td").first.inner_text() == "gradcam"
    images = section.evaluate("s => Array.from(s.querySelectorAll('img')).map(i => i.complete && i.naturalWidth)")
    assert images and all(images)
    assert page.locator("section#shortcut table.metrics").count() == 1
    page.close()
