"""The model card and the domain guard are bound to the weights: an edited or swapped ``model_card.json`` (or guard
file) is refused with the fields that differ, whatever surface loads the run, and the model version the service
reports covers weights, card and guard."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import medxai
from medxai.cli import main
from medxai.config import ServeConfig
from medxai.errors import CheckpointError
from medxai.evaluate.domain import DomainGuard
from medxai.serve.engine import Engine


@pytest.fixture
def run(demo_like_run, tmp_path) -> Path:
    """A copy of the trained run of conftest (binary, calibrated, thresholded, with a domain guard)."""
    return Path(shutil.copytree(demo_like_run, tmp_path / "run"))


@pytest.fixture
def image(tmp_path) -> Path:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[10:16, 4:10] = 220
    Image.fromarray(pixels).save(tmp_path / "film.png")
    return tmp_path / "film.png"


def _edit_card(run: Path, edit) -> None:
    card = json.loads((run / "model_card.json").read_text())
    edit(card)
    (run / "model_card.json").write_text(json.dumps(card, indent=2))


def _error_line(capsys) -> str:
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in printed.out + printed.err, printed
    return lines[0]


def test_swapped_label_names_are_refused_on_every_surface(run, image, capsys):
    """The review's case: the labels of a binary card swapped make a film read as the other class at the same
    probability, unless the card is checked against the weights."""
    _edit_card(run, lambda card: card.update(label_names=card["label_names"][::-1]))
    assert main(["predict", str(run), str(image)]) == 2
    line = _error_line(capsys)
    assert "model_card.json disagrees with checkpoints/best.safetensors on label_names" in line
    assert "edited or belongs to another run" in line
    with pytest.raises(CheckpointError, match="on label_names"):
        medxai.load(run, device="cpu")
    with pytest.raises(CheckpointError, match="on label_names"):
        Engine.load(run, ServeConfig(device="cpu"))
    assert main(["explain", str(run), str(image), "--out", str(run.parent / "maps")]) == 2
    assert "on label_names" in _error_line(capsys)
    assert not (run.parent / "maps").exists()


def _set_positive(card):
    card["positive_label"] = card["label_names"][1 - card["label_names"].index(card["positive_label"])]


@pytest.mark.parametrize("field, edit", [
    ("positive_label", _set_positive),
    ("threshold", lambda card: card["threshold"].update(value=0.05)),
    ("temperature", lambda card: card.update(temperature=card["temperature"] * 3)),
    ("calibration", lambda card: card.update(calibration=None)),
    ("preprocess", lambda card: card["preprocess"].update(mean=[0.9])),
    ("cam_layer", lambda card: card.update(cam_layer="features.0")),
    ("domain", lambda card: card["domain"].update(z_threshold=1e9)),
    ("run_id", lambda card: card.update(run_id="0" * 32)),
])
def test_every_field_that_decides_a_prediction_is_bound(field, edit, run):
    _edit_card(run, edit)
    with pytest.raises(CheckpointError, match=rf"disagrees with checkpoints/best.safetensors on {field};"):
        medxai.load(run, device="cpu")


def test_descriptions_may_be_rewritten(run, image):
    """Metrics, texts, the data description and the guard's probe rates are written after the weights (or are for
    the reader): editing them changes no prediction and is not refused."""
    reference = medxai.load(run, device="cpu").predict(image)[0]
    _edit_card(run, lambda card: card.update(metrics={}, intended_use="teaching", train_data={},
                                            domain={**card["domain"], "probes": {}}))
    assert medxai.load(run, device="cpu").predict(image)[0] == reference


def test_the_domain_guard_is_bound_too(run, tmp_path):
    guard_path = run / "checkpoints" / "domain_guard.safetensors"
    original = guard_path.read_bytes()
    guard = DomainGuard.load(guard_path)
    guard.z_threshold *= 100  # another guard: flags almost nothing
    guard.save(guard_path)
    with pytest.raises(CheckpointError, match="domain_guard.safetensors is not the domain guard saved with"):
        medxai.load(run, device="cpu")
    guard_path.unlink()
    with pytest.raises(CheckpointError, match="saved with a domain guard, but checkpoints/domain_guard.safetensors"):
        medxai.load(run, device="cpu")
    guard_path.write_bytes(original)
    medxai.load(run, device="cpu")


def _as_previous_release(run: Path) -> None:
    """The weights as the previous release wrote them: the card embedded, no digest of it, nothing on the guard."""
    path = run / "checkpoints" / "best.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        embedded = json.loads(handle.metadata()["medxai_model_card"])
    embedded.pop("run_id")
    save_file(load_file(path), path, {"medxai_model_card": json.dumps(embedded)})
    _edit_card(run, lambda card: card.pop("run_id"))


def test_a_run_of_the_previous_release_loads_and_its_card_is_compared_with_the_embedded_one(run, image):
    _as_previous_release(run)
    assert medxai.load(run, device="cpu").predict(image)[0].label
    _edit_card(run, lambda card: card.update(label_names=card["label_names"][::-1]))
    with pytest.raises(CheckpointError, match="on label_names"):
        medxai.load(run, device="cpu")


def test_the_model_version_covers_weights_card_and_guard(run):
    """The service's version: a SHA-256 over the weights file, the card's bound fields and the guard file."""
    engine = Engine.load(run, ServeConfig(device="cpu"))

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    parts = [sha(run / "checkpoints" / "best.safetensors"), engine.classifier.card.bound_digest(),
             sha(run / "checkpoints" / "domain_guard.safetensors")]
    assert engine.identity.version == hashlib.sha256(":".join(parts).encode()).hexdigest()[:12]
    assert engine.identity.version != parts[0][:12]  # not the weights' digest alone
