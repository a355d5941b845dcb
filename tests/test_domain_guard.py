"""The out-of-domain guard: Mahalanobis scores against hand computation, known separability, the input checks, the
file round trip, and the guard at work in a trained run (predict, explain, --ood-action, the banner)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medxai
from medxai.data.input_profile import ImageFacts, InputProfile, colourfulness
from medxai.evaluate.domain import DomainGuard, StageGaussians, fit_domain_guard, z_for_false_alarm_rate
from medxai.models.features import stage_statistics


def _facts(**values) -> ImageFacts:
    base = {"height": 28, "width": 28, "colourfulness": 0.0, "mean": 0.5, "std": 0.2}
    return ImageFacts(**{**base, **values})


def _profile(**declared) -> InputProfile:
    rng = np.random.default_rng(0)
    facts = [_facts(mean=float(m), std=float(s), width=int(w)) for m, s, w in zip(
        rng.uniform(0.4, 0.6, 500), rng.uniform(0.15, 0.25, 500), rng.integers(28, 42, 500))]
    return InputProfile.fit(facts, input_size=28, **declared)


def test_stage_distance_is_the_smallest_mahalanobis_distance_to_a_class_mean():
    rng = np.random.default_rng(1)
    features = torch.tensor(rng.normal(size=(400, 3)), dtype=torch.float32)
    labels = torch.tensor([0] * 200 + [1] * 200)
    features[labels == 1] += torch.tensor([4.0, 0.0, 0.0])
    gaussians = StageGaussians.fit({"stage": features}, labels, shrinkage=0.0)
    x = features.double().numpy()
    means = np.stack([x[:200].mean(0), x[200:].mean(0)])
    centred = np.concatenate([x[:200] - means[0], x[200:] - means[1]])
    precision = np.linalg.inv(centred.T @ centred / len(x))
    probe = np.array([[1.0, 2.0, -1.0], [4.0, 0.0, 0.5]])
    expected = np.min([[(p - m) @ precision @ (p - m) for m in means] for p in probe], axis=1)
    distances = gaussians.distances({"stage": torch.tensor(probe, dtype=torch.float32)})["stage"]
    train_median = np.median(np.min([[(p - m) @ precision @ (p - m) for m in means] for p in x], axis=1))
    assert distances.numpy() == pytest.approx(expected / train_median, rel=1e-4)


def test_known_separability_decides_the_flag_rates():
    """In-domain: two classes of N(mu_k, I) in 8 dimensions on two stages; out of domain: shifted by 8 sigma on one
    axis of both stages (squared distance ~ 8 + 64 against a chi-square(8) median of 7.3: the mean log ratio lies
    ~6.5 validation standard deviations up). A 1e-4 false-alarm threshold flags almost none of fresh in-domain data
    and all of the shifted. A shift at ONE stage is diluted by the mean over stages (here only ~5 % flagged at
    6 sigma): the combination favours anomalies every stage sees, as other kinds of image are."""
    rng = np.random.default_rng(2)

    def draw(count: int, shift: float = 0.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = torch.tensor(rng.integers(0, 2, count))
        first = rng.normal(size=(count, 8)) + labels.numpy()[:, None] * 3.0
        second = rng.normal(size=(count, 8))
        first[:, 5] += shift
        second[:, 2] += shift
        return {"a": torch.tensor(first, dtype=torch.float32), "b": torch.tensor(second, dtype=torch.float32)}, labels

    train, train_labels = draw(4000)
    val, _ = draw(1000)
    guard = fit_domain_guard(train, train_labels, val, _profile())
    fresh, _ = draw(2000)
    shifted, _ = draw(2000, shift=8.0)
    fresh_rate = float((guard.scores(fresh) > guard.z_threshold).float().mean())
    shifted_rate = float((guard.scores(shifted) > guard.z_threshold).float().mean())
    assert fresh_rate <= 0.01
    assert shifted_rate >= 0.99
    assert guard.z_threshold == pytest.approx(3.719, abs=1e-3)
    assert z_for_false_alarm_rate(0.05) == pytest.approx(1.6449, abs=1e-4)


def test_the_guard_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(3)
    features = {"x": torch.tensor(rng.normal(size=(300, 4)), dtype=torch.float32)}
    labels = torch.tensor(rng.integers(0, 2, 300))
    guard = fit_domain_guard(features, labels, features, _profile(modalities=["cr"]))
    loaded = DomainGuard.load(guard.save(tmp_path / "guard.safetensors"))
    probe = {"x": torch.tensor(rng.normal(size=(10, 4)) * 3, dtype=torch.float32)}
    assert torch.equal(guard.scores(probe), loaded.scores(probe))
    assert loaded.profile == guard.profile and loaded.profile.modalities == ["CR"]
    assert loaded.describe() == guard.describe()


def test_input_checks_flag_other_kinds_of_image_and_nothing_unknown():
    profile = _profile(modalities=["CR", "DX"], body_parts=["CHEST"])
    assert profile.reasons(_facts()) == []
    assert profile.reasons(_facts(modality="", body_part="")) == []  # what a header does not say is not held
    assert profile.reasons(_facts(modality="MR")) == ["modality MR not among those trained on (CR, DX)"]
    assert profile.reasons(_facts(modality="CR", body_part="EXTREMITY")) == [
        "body part EXTREMITY not among those trained on (CHEST)"]
    # A header value that is no defined term (a crafted file put a name there) is never repeated.
    crafted = profile.reasons(_facts(modality="SMITHJOHN1970", body_part="SMITHJOHN1970", photometric="SMITH"))
    assert crafted[:2] == ["unexpected modality (not among those trained on: CR, DX)",
                           "unexpected body part (not among those trained on: CHEST)"]
    assert not any("SMITH" in reason for reason in crafted)
    declared = _profile(body_parts=["CHEST", "SMITHJOHN"])  # nor a training value that is no defined term
    assert declared.reasons(_facts(body_part="HEAD")) == [
        "body part HEAD not among those trained on (CHEST, 1 other value(s))"]
    assert "colour image" in profile.reasons(_facts(colourfulness=0.3))[0]
    assert "aspect ratio" in profile.reasons(_facts(height=28, width=200))[0]  # 0.14 < (28/41) / 2
    assert profile.reasons(_facts(height=28, width=80)) == []  # 0.35 is within a factor 2 of the training 0.68
    one_shape = InputProfile.fit([_facts()] * 10, input_size=28)  # MedMNIST: every image 28x28
    assert one_shape.aspect_range is None and one_shape.reasons(_facts(height=1300, width=2000)) == []
    assert InputProfile.from_dict(one_shape.to_dict()) == one_shape
    assert "too small" in profile.reasons(_facts(height=10, width=10))[0]
    assert "intensity mean" in profile.reasons(_facts(mean=0.02))[0]
    grey_rgb = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    assert colourfulness(grey_rgb) == 0.0
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert colourfulness(red) == pytest.approx(1.0)


def test_stage_statistics_are_channel_means_and_standard_deviations():
    output = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    statistics = stage_statistics(output)
    assert statistics.shape == (2, 6)
    assert statistics[0, :3].tolist() == pytest.approx([1.5, 5.5, 9.5])
    assert statistics[0, 3:].tolist() == pytest.approx([np.std([0, 1, 2, 3])] * 3)


# -- the guard in a trained run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory) -> Path:
    from conftest import make_synthetic_npz

    from medxai.config import load_config
    from medxai.jobs.train import train_run

    folder = tmp_path_factory.mktemp("guarded")
    data = make_synthetic_npz(folder / "synthetic.npz", per_class=64)
    config = load_config(None, [f"data.source={data}", "train.epochs=3", "train.bootstrap_resamples=0",
                                "train.device=cpu", "explain.per_outcome=1", "train.batch_size=32"])
    config.name, config.out_dir = "run", str(folder)
    return train_run(config)


def test_training_fits_and_reports_the_guard(guarded_run):
    card = json.loads((guarded_run / "model_card.json").read_text())
    assert card["domain"]["layers"] == ["features.block1", "features.block2", "features.block3"]
    assert (guarded_run / "checkpoints" / "domain_guard.safetensors").is_file()
    assert set(card["domain"]["probes"]) == {"inverted", "noise", "blobs"}
    assert card["domain"]["probes"]["noise"]["rate"] >= 0.95
    metrics = json.loads((guarded_run / "metrics.json").read_text())
    assert metrics["test"]["domain"]["n"] == metrics["test"]["n"]
    assert metrics["test"]["domain"]["rate"] <= 0.1
    assert (guarded_run / "figures" / "domain_scores_test.png").is_file()
    report = (guarded_run / "report.html").read_text()
    assert "Inputs outside the training domain" in report


def _in_domain_image(rng) -> np.ndarray:
    image = rng.integers(0, 60, size=(28, 28)).astype(np.uint8)
    image[10:16, 4:10] = 220
    return image


def test_every_prediction_carries_the_verdict(guarded_run):
    rng = np.random.default_rng(5)
    classifier = medxai.load(guarded_run)
    noise = rng.integers(0, 256, size=(28, 28, 3)).astype(np.uint8)
    noise[..., 0] = 255  # a colour picture: flagged by the input check whatever the features say
    normal, strange = classifier.predict([_in_domain_image(rng), noise])
    assert normal.in_domain is True and normal.domain_reasons == []
    assert strange.in_domain is False and any("colour image" in reason for reason in strange.domain_reasons)
    assert isinstance(normal.domain_score, float)
    assert set(normal.to_dict()) >= {"in_domain", "domain_score", "domain_reasons"}
    explained = classifier.explain([noise])[0]
    assert explained.prediction.in_domain is False
    assert explained.prediction.domain_score == pytest.approx(strange.domain_score, abs=1e-3)


def test_ood_action_marks_or_skips_and_the_overlay_gets_a_banner(guarded_run, tmp_path):
    from medxai.jobs.predict import explain_files, predict_files

    rng = np.random.default_rng(6)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(_in_domain_image(rng)).save(inputs / "chest.png")
    colour = np.zeros((28, 28, 3), dtype=np.uint8)
    colour[..., 1] = 200
    Image.fromarray(colour).save(inputs / "green.png")
    marked = predict_files(guarded_run, [inputs], out=tmp_path / "marked")
    rows = {Path(row["file"]).name: row for row in csv.DictReader((tmp_path / "marked" / "predictions.csv").open())}
    assert rows["green.png"]["in_domain"] == "false" and rows["chest.png"]["in_domain"] == "true"
    assert "colour image" in rows["green.png"]["domain_reasons"]
    assert len(marked.predictions) == 2
    skipped = predict_files(guarded_run, [inputs], out=tmp_path / "skipped", ood_action="skip")
    assert [Path(item.id).name for item in skipped.predictions] == ["chest.png"]
    listed = list(csv.DictReader((tmp_path / "skipped" / "skipped.csv").open()))
    assert Path(listed[0]["file"]).name == "green.png" and listed[0]["reason"].startswith("out of domain: ")
    explain_files(guarded_run, [inputs], tmp_path / "overlays")
    banner = np.asarray(Image.open(next((tmp_path / "overlays").glob("*green*.png"))))[:3].reshape(-1, 3)
    plain = np.asarray(Image.open(next((tmp_path / "overlays").glob("*chest*.png"))))[:3].reshape(-1, 3)
    assert (banner[:, 0] > 150).mean() > 0.5 and (banner[:, 1] < 60).mean() > 0.5  # a red strip on top
    assert not ((plain[:, 0] > 150) & (plain[:, 1] < 60) & (plain[:, 2] < 60)).all()
    with pytest.raises(medxai.errors.ConfigError, match="ood-action"):
        predict_files(guarded_run, [inputs], ood_action="drop")


def test_the_demo_recipe_guard_on_real_data(data_dir, pneumoniamnist_run):
    """A short PneumoniaMNIST run (the demo recipe, 2 epochs): its guard passes the other PneumoniaMNIST test films
    and flags brain MRIs and breast ultrasound."""
    from medxai.data import read_image

    classifier = medxai.load(pneumoniamnist_run, device="cpu")
    pneumonia = np.load(data_dir / "medmnist" / "pneumoniamnist.npz")["test_images"]
    breast = np.load(data_dir / "medmnist" / "breastmnist.npz")["test_images"]
    brains = [read_image(path) for path in sorted((data_dir / "brain_mri_yes_no").rglob("*"))
              if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert len(brains) == 253

    def flagged(images) -> float:
        return float(np.mean([item.in_domain is False for item in classifier.predict(list(images))]))

    full_resolution = sorted((data_dir / "chest_xray_fullres_sample").rglob("*.jpeg"))
    assert flagged(pneumonia) <= 0.05
    assert flagged(full_resolution) <= 0.15  # the same films at 399-2890 px, landscape: not flagged for their shape
    assert flagged(breast) >= 0.95
    assert flagged(brains) >= 0.95
