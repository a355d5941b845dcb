"""Ensembles as a model kind: the averaged probabilities, the averaged CAM against a hand average, the run folder
that works like any other, and the members that may not be combined."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medxai
from medxai.errors import ConfigError
from medxai.explain import LogOddsTarget, get_cam_method
from medxai.explain.base import normalize_per_sample
from medxai.models.ensemble import EnsembleModel


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    from conftest import make_synthetic_npz

    from medxai.config import load_config
    from medxai.jobs.train import train_run

    folder = tmp_path_factory.mktemp("ensemble")
    data = make_synthetic_npz(folder / "synthetic.npz", per_class=48)
    runs = []
    for seed in (0, 1):
        config = load_config(None, [f"data.source={data}", "train.epochs=3", "train.bootstrap_resamples=0",
                                    "train.device=cpu", "explain.per_outcome=1", f"train.seed={seed}"])
        config.name, config.out_dir = f"seed{seed}", str(folder)
        runs.append(train_run(config))
    return folder, runs


@pytest.fixture(scope="module")
def ensemble_run(members):
    from medxai.jobs.ensemble import build_ensemble

    folder, runs = members
    return build_ensemble(runs, name="both", out_dir=folder)


def test_the_ensemble_averages_the_members_probabilities(members):
    _, runs = members
    models = [medxai.load(run, device="cpu").model for run in runs]
    ensemble = EnsembleModel(models).eval()
    batch = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(batch), dim=1) for model in models]).mean(dim=0)
        torch.testing.assert_close(torch.softmax(ensemble(batch), dim=1), expected, rtol=1e-5, atol=1e-6)
    assert ensemble.stage_layers[0] == "members.0.features.block1" and len(ensemble.stage_layers) == 6


def test_the_ensemble_cam_is_the_hand_average_of_the_members_cams(members):
    from medxai.explain import build_cam

    _, runs = members
    models = [medxai.load(run, device="cpu").model for run in runs]
    ensemble = EnsembleModel(models).eval()
    batch = torch.rand(4, 1, 28, 28)
    result = build_cam(ensemble, "gradcam", None)(batch, target=LogOddsTarget(1))
    hand = torch.stack([get_cam_method("gradcam")(model, model.cam_layer)(batch, target=LogOddsTarget(1)).maps
                        for model in models]).mean(dim=0)
    torch.testing.assert_close(result.maps, normalize_per_sample(hand), rtol=1e-5, atol=1e-6)
    assert result.target_class.tolist() == [1, 1, 1, 1]


def test_an_ensemble_run_works_like_any_run(ensemble_run, members):
    card = json.loads((ensemble_run / "model_card.json").read_text())
    assert card["architecture"] == "ensemble" and len(card["members"]) == 2
    assert card["calibration"]["method"] == "temperature" and card["domain"]["layers"]
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"} and metrics["test"]["n"] == 48
    assert (ensemble_run / "report.html").is_file() and list((ensemble_run / "heatmaps").glob("*.png"))
    classifier = medxai.load(ensemble_run, device="cpu")
    image = np.zeros((40, 40), dtype=np.uint8)
    image[15:25, 5:15] = 230  # class 0 pattern
    prediction = classifier.predict([image])[0]
    explanation = classifier.explain([image])[0]
    assert prediction.probabilities == pytest.approx(explanation.prediction.probabilities, abs=1e-5)
    assert explanation.heatmap.shape == (40, 40) and prediction.in_domain is not None
    # The weights file holds everything: the member folders are not needed to load it.
    _, runs = members
    assert all(str(run) in {member["run"] for member in card["members"]} for run in runs)


def test_members_that_do_not_fit_together_are_refused(members, tmp_path):
    from conftest import make_synthetic_npz

    from medxai.config import load_config
    from medxai.jobs.ensemble import build_ensemble
    from medxai.jobs.train import train_run

    folder, runs = members
    with pytest.raises(ConfigError, match="at least two"):
        build_ensemble(runs[:1], name="one", out_dir=tmp_path)
    other = make_synthetic_npz(tmp_path / "other.npz", per_class=40, seed=9)
    config = load_config(None, [f"data.source={other}", "train.epochs=1", "train.bootstrap_resamples=0",
                                "train.device=cpu", "explain.per_outcome=1"])
    config.name, config.out_dir = "other", str(tmp_path)
    stranger = train_run(config)
    with pytest.raises(ConfigError, match="other training data"):
        build_ensemble([runs[0], stranger], name="mixed", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="may not replace"):
        build_ensemble(runs, name="seed0", out_dir=folder, overwrite=True)


def test_a_member_whose_card_is_not_its_weights_is_refused_and_the_members_are_bound(members, ensemble_run, tmp_path):
    """A member's model_card.json must be the card its weights carry (else the ensemble would average a model under
    the wrong labels); the ensemble's own card binds its members, and an ensemble is never built inside a run."""
    import shutil

    from medxai.errors import CheckpointError
    from medxai.jobs.ensemble import build_ensemble

    folder, runs = members
    edited = shutil.copytree(runs[1], tmp_path / "edited")
    card = json.loads((edited / "model_card.json").read_text())
    (edited / "model_card.json").write_text(json.dumps({**card, "label_names": card["label_names"][::-1]}))
    with pytest.raises(CheckpointError, match="edited/model_card.json disagrees with checkpoints/best.safetensors on "
                                              "label_names"):
        build_ensemble([runs[0], edited], name="swapped", out_dir=tmp_path)
    assert not (tmp_path / "swapped").exists()
    with pytest.raises(ConfigError, match="inside the run folder"):
        build_ensemble(runs, name="nested", out_dir=runs[0])
    copy = shutil.copytree(ensemble_run, tmp_path / "both")
    card = json.loads((copy / "model_card.json").read_text())
    card["members"][0]["card"]["label_names"] = card["members"][0]["card"]["label_names"][::-1]
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="on members"):
        medxai.load(copy, device="cpu")
