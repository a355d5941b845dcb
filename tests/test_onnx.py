"""ONNX export and the onnxruntime backend: the exported graph reproduces PyTorch's logits and stage statistics on
the run's own images, its batch axis is dynamic, predictions (calibration, threshold, domain verdicts) are the same
with either backend, and a missing or stale export is refused with a clear message."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import medxai
from medxai.classifier import Classifier
from medxai.config import PreprocessConfig
from medxai.errors import CheckpointError, ConfigError
from medxai.models import create_model, list_models
from medxai.models.card import ModelCard
from medxai.models.ensemble import EnsembleModel
from medxai.models.features import capture_stage_statistics
from medxai.models.onnx import ONNX_OPSET, OnnxModel, export_onnx, file_sha256, parity
from medxai.run_folder import RunFolder

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4


def parity_tolerance(max_abs_logit: float) -> float:
    """For untrained networks with large logits (a random ResNet-50's reach 180): 1e-4 of their scale, since
    float32 rounding grows with the values. Trained runs are held to the flat 1e-4 by the export job."""
    return TOLERANCE * max(1.0, max_abs_logit)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (grey 28 px simple_cnn with calibration, threshold and domain guard) and the npz it read."""
    from conftest import make_synthetic_npz

    from medxai.config import load_config
    from medxai.jobs.train import train_run

    folder = tmp_path_factory.mktemp("onnx")
    data = make_synthetic_npz(folder / "synthetic.npz", per_class=48)
    config = load_config(None, [f"data.source={data}", "train.epochs=2", "train.bootstrap_resamples=0",
                                "train.device=cpu", "explain.per_outcome=1"])
    config.name, config.out_dir = "tiny", str(folder)
    return train_run(config), data


@pytest.fixture(scope="module")
def exported(trained):
    from medxai.jobs.export import export_run

    run, _ = trained
    return export_run(run)


@pytest.fixture(scope="module")
def image_files(trained, tmp_path_factory):
    """PNG files of the test split, plus inputs the domain guard should flag (inverted, colour noise)."""
    _, data = trained
    folder = tmp_path_factory.mktemp("inputs")
    images = np.load(data)["test_images"]
    for index, image in enumerate(images[:10]):
        Image.fromarray(image).save(folder / f"test_{index:02d}.png")
    Image.fromarray(255 - images[0]).save(folder / "inverted.png")
    noise = np.random.default_rng(3).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "colour_noise.png")
    return folder


def _read_csv(path):
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _perturbed_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random batch-norm statistics and affine terms, so that an untrained network's activations are far from zero
    (EfficientNet's logits at initialisation are ~1e-19: a parity check on them would compare nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return model.eval()


def _card_for(model: torch.nn.Module, size: int) -> ModelCard:
    return ModelCard(architecture=model.architecture, num_classes=2, label_names=["a", "b"],
                     preprocess=PreprocessConfig(size=size, channels=1), cam_layer=model.cam_layer)


# -- the run's export ------------------------------------------------------------------------------------------------
def test_the_export_reproduces_pytorch_on_the_runs_own_images(trained, exported):
    run, _ = trained
    folder = RunFolder(run)
    assert exported.path == folder.onnx_path and exported.card_path == folder.onnx_card_path
    check = exported.parity
    assert check["images"] == "the run's val split" and check["n"] == min(16, len(folder.read_splits()["val"]))
    assert check["max_abs_logit_diff"] <= TOLERANCE and check["argmax_identical"] is True
    assert check["max_abs_stage_diff"] <= TOLERANCE and check["tolerance"] == TOLERANCE
    card = json.loads(exported.card_path.read_text())
    assert card["source_weights_sha256"] == file_sha256(folder.weights_path("best"))
    assert card["architecture"] == "simple_cnn" and card["label_names"] == folder.read_card().label_names
    assert card["export"]["opset"] == ONNX_OPSET == 18 and card["export"]["exporter"] == "dynamo"
    assert card["export"]["outputs"] == ["logits", "features.block1", "features.block2", "features.block3"]
    assert card["parity"] == check and not list(folder.path.glob("*.partial"))


def test_the_graph_has_opset_18_and_a_dynamic_batch(trained, exported):
    run, _ = trained
    graph = onnx.load(str(exported.path))
    assert [item.version for item in graph.opset_import if item.domain in ("", "ai.onnx")] == [18]
    (graph_input,) = graph.graph.input
    assert graph_input.name == "input" and graph_input.type.tensor_type.shape.dim[0].dim_param
    classifier = medxai.load(run, device="cpu")
    onnx_model = OnnxModel(exported.path)
    for batch_size in (1, 3, 7):
        batch = torch.randn(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = classifier.model(batch)
        logits = onnx_model(batch)
        assert logits.shape == (batch_size, 2) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=0, atol=TOLERANCE)


def test_onnx_stage_statistics_equal_pytorchs(trained, exported):
    run, data = trained
    classifier = medxai.load(run, device="cpu")
    batch = classifier.prepare_batch(list(np.load(data)["val_images"][:12]))
    onnx_model = OnnxModel(exported.path)
    layers = list(classifier.model.stage_layers)
    assert list(onnx_model.stage_layers) == layers
    with torch.no_grad(), capture_stage_statistics(classifier.model, layers) as expected:
        classifier.model(batch)
    with onnx_model.capture() as found:
        onnx_model(batch)
        onnx_model(batch.flip(-1))  # a second pass inside the block: first() keeps the first one
    for layer in layers:
        assert found.first()[layer].shape == expected.first()[layer].shape
        torch.testing.assert_close(found.first()[layer], expected.first()[layer], rtol=1e-5, atol=TOLERANCE)
    assert len(found.batches[layers[0]]) == 2
    with onnx_model.capture(layers[:1]):
        pass
    assert onnx_model._captures == []  # released after the block
    with pytest.raises(ConfigError, match="no stage output"), onnx_model.capture(["features.nope"]):
        pass


def test_predict_files_writes_the_same_csv_with_either_backend(trained, exported, image_files, tmp_path):
    from medxai.jobs.predict import predict_files

    run, _ = trained
    torch_result = predict_files(run, [image_files], out=tmp_path / "torch")
    onnx_result = predict_files(run, [image_files], out=tmp_path / "onnx", backend="onnxruntime")
    assert torch_result.classifier.backend == "torch" and onnx_result.classifier.backend == "onnxruntime"
    header, torch_rows = _read_csv(tmp_path / "torch" / "predictions.csv")
    onnx_header, onnx_rows = _read_csv(tmp_path / "onnx" / "predictions.csv")
    assert onnx_header == header and len(onnx_rows) == len(torch_rows) == 12
    probability_columns = [index for index, name in enumerate(header) if name.startswith("p_")]
    exact_columns = [header.index(name) for name in ("file", "prediction", "decision_rule", "in_domain")]
    for torch_row, onnx_row in zip(torch_rows, onnx_rows):
        assert [onnx_row[i] for i in exact_columns] == [torch_row[i] for i in exact_columns]
        for index in probability_columns:
            assert float(onnx_row[index]) == pytest.approx(float(torch_row[index]), abs=TOLERANCE)
        assert float(onnx_row[header.index("domain_score")]) == pytest.approx(
            float(torch_row[header.index("domain_score")]), rel=1e-3, abs=1e-3)
    in_domain = [row[header.index("in_domain")] for row in torch_rows]
    assert "true" in in_domain and "false" in in_domain  # both verdicts were compared, not just one


def test_test_time_augmentation_works_with_onnxruntime(trained, exported):
    run, data = trained
    images = list(np.load(data)["test_images"][:6])
    torch_predictions = Classifier.from_run(run, device="cpu", tta=("hflip", "shift")).predict(images)
    onnx_predictions = Classifier.from_run(run, device="cpu", tta=("hflip", "shift"),
                                           backend="onnxruntime").predict(images)
    for expected, found in zip(torch_predictions, onnx_predictions):
        assert found.label == expected.label and found.in_domain == expected.in_domain
        for label, value in expected.probabilities.items():
            assert found.probabilities[label] == pytest.approx(value, abs=TOLERANCE)


def test_explain_needs_the_pytorch_backend(trained, exported):
    run, _ = trained
    classifier = medxai.load(run, device="cpu", backend="onnxruntime")
    with pytest.raises(ConfigError, match="PyTorch backend"):
        classifier.explain([np.zeros((28, 28), dtype=np.uint8)])
    with pytest.raises(ConfigError, match="backend must be one of"):
        Classifier.from_run(run, device="cpu", backend="tensorrt")


def test_a_missing_or_stale_export_is_refused_with_the_fix(trained, exported, tmp_path):
    run, _ = trained
    copy = RunFolder(shutil.copytree(run, tmp_path / "copy"))
    copy.onnx_path.unlink()
    with pytest.raises(CheckpointError, match=r"no ONNX export; run `medxai export .* --format onnx`"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    shutil.copy(exported.path, copy.onnx_path)
    card_text = copy.onnx_card_path.read_text()
    copy.onnx_card_path.unlink()
    with pytest.raises(CheckpointError, match="no ONNX export card.*re-export: medxai export"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    copy.onnx_card_path.write_text(card_text)
    stale = json.loads(card_text)
    stale["source_weights_sha256"] = "0" * 64
    copy.onnx_card_path.write_text(json.dumps(stale))
    with pytest.raises(CheckpointError, match="other weights than best.safetensors.*re-export"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    with pytest.raises(CheckpointError, match="re-export"):  # exported from best, loaded as last
        Classifier.from_run(run, checkpoint="last", device="cpu", backend="onnxruntime")


def test_export_outside_the_run_and_without_its_data(trained, image_files, tmp_path, caplog):
    """An explicit ``out`` is written with its own card and never silently replaced; a run whose data is gone is
    checked on synthetic images and says so; ``images`` are used when given."""
    from medxai.jobs.export import export_run

    run, _ = trained
    moved = RunFolder(shutil.copytree(run, tmp_path / "moved", ignore=shutil.ignore_patterns("model.onnx*")))
    config = moved.read_config()
    config.data.source = str(tmp_path / "gone.npz")
    moved.write_config(config)
    target = tmp_path / "deploy" / "tiny.onnx"
    with caplog.at_level(logging.WARNING, logger="medxai.jobs.export"):
        result = export_run(moved.path, out=target)
    assert result.path == target and result.card_path == tmp_path / "deploy" / "tiny.onnx.json"
    assert result.parity["images"] == "synthetic (run data not found)" and result.parity["n"] == 8
    assert "synthetic noise images" in caplog.text
    assert not moved.onnx_path.exists()
    with pytest.raises(ConfigError, match="already exist"):
        export_run(moved.path, out=target)
    with pytest.raises(ConfigError, match="format must be one of"):
        export_run(moved.path, format="tflite")
    result = export_run(moved.path, out=target, images=[image_files], overwrite=True)
    assert result.parity["images"] == "given files" and result.parity["n"] == 12
    assert result.parity["max_abs_logit_diff"] <= TOLERANCE


def test_an_export_that_misses_the_tolerance_is_not_kept(trained, exported, monkeypatch):
    import medxai.jobs.export as export_job

    run, _ = trained
    folder = RunFolder(run)
    before = folder.onnx_path.read_bytes()
    monkeypatch.setattr(export_job, "PARITY_TOLERANCE", -1.0)  # any difference, even 0, now fails
    with pytest.raises(CheckpointError, match="does not reproduce PyTorch"):
        export_job.export_run(run)
    assert folder.onnx_path.read_bytes() == before  # the earlier, checked export stays
    assert not list(folder.path.glob("*.partial"))


# -- every architecture ----------------------------------------------------------------------------------------------
SLOW_TO_EXPORT = {"densenet121", "resnet50"}  # 10 and 24 s on two cores (the dynamo exporter's tracing)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_EXPORT else name
                                  for name in list_models()])
def test_every_registered_architecture_exports_with_parity(name, tmp_path):
    torch.manual_seed(0)
    model = _perturbed_batch_norms(create_model(name, num_classes=2, in_chans=1, pretrained=False, input_size=32))
    facts = export_onnx(model, _card_for(model, 32), tmp_path / f"{name}.onnx")
    assert facts["opset"] == 18 and facts["exporter"] == "dynamo"
    assert facts["outputs"] == ["logits", *model.stage_layers]
    batch = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    check = parity(model, OnnxModel(tmp_path / f"{name}.onnx"), batch)
    assert check["max_abs_logit"] > 1e-2, "the parity check would compare near-zero logits"
    assert check["max_abs_logit_diff"] <= parity_tolerance(check["max_abs_logit"]), check
    assert check["argmax_identical"] and check["n"] == 3
    assert check["max_abs_stage_diff"] <= TOLERANCE * max(1.0, check["max_abs_stage"]), check
    assert not model.training  # left in the mode it was given in


def test_an_ensemble_exports_with_every_members_stages(tmp_path):
    torch.manual_seed(0)
    members = [_perturbed_batch_norms(create_model("simple_cnn", num_classes=2, in_chans=1, input_size=28), seed)
               for seed in (0, 1)]
    ensemble = EnsembleModel(members).train()  # a model in training mode is exported in eval mode, then restored
    card = _card_for(ensemble, 28)
    facts = export_onnx(ensemble, card, tmp_path / "ensemble.onnx")
    assert ensemble.training and facts["stage_layers"] == list(ensemble.stage_layers)
    assert facts["outputs"][1] == "members.0.features.block1" and len(facts["outputs"]) == 7
    check = parity(ensemble, OnnxModel(tmp_path / "ensemble.onnx"), torch.randn(4, 1, 28, 28))
    assert check["max_abs_logit_diff"] <= TOLERANCE and check["argmax_identical"]
    assert check["max_abs_stage_diff"] <= TOLERANCE
    with pytest.raises(ConfigError, match="at least 2"):
        export_onnx(ensemble, card, tmp_path / "one.onnx", example_batch=1)


def test_the_torchscript_exporter_takes_over_when_dynamo_fails(tmp_path, monkeypatch):
    original = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("unsupported operator (simulated)")
        return original(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model = _perturbed_batch_norms(create_model("simple_cnn", num_classes=2, in_chans=1, input_size=28))
    facts = export_onnx(model, _card_for(model, 28), tmp_path / "fallback.onnx")
    assert facts["exporter"] == "torchscript" and facts["opset"] == 18
    assert facts["outputs"] == ["logits", *model.stage_layers]
    onnx_model = OnnxModel(tmp_path / "fallback.onnx")
    for batch_size in (1, 5):
        check = parity(model, onnx_model, torch.randn(batch_size, 1, 28, 28))
        assert check["max_abs_logit_diff"] <= TOLERANCE and check["max_abs_stage_diff"] <= TOLERANCE

    def both_fail(*args, **kwargs):
        raise RuntimeError("nothing works (simulated)")

    monkeypatch.setattr(torch.onnx, "export", both_fail)
    with pytest.raises(ConfigError, match="simple_cnn cannot be exported to ONNX"):
        export_onnx(model, _card_for(model, 28), tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


def test_without_the_onnx_extra_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'medxai\[onnx\]'"):
        OnnxModel(tmp_path / "any.onnx")


# -- real files ------------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_files_predict_the_same_with_either_backend(trained, exported, data_dir, tmp_path):
    """Real JPEG/PNG brain MRIs (grey and RGB, misnamed extensions) and DICOMs through both backends: the same
    labels, probabilities and domain verdicts (most of them out of this toy model's domain)."""
    from medxai.jobs.predict import predict_files

    run, _ = trained
    files = sorted((data_dir / "brain_mri_yes_no" / "yes").iterdir())[:6]
    files += sorted((data_dir / "dicom").rglob("*.dcm"))[:6]
    torch_result = predict_files(run, files, out=tmp_path / "torch")
    onnx_result = predict_files(run, files, out=tmp_path / "onnx", backend="onnxruntime")
    assert torch_result.skipped == onnx_result.skipped and len(torch_result.predictions) >= 6
    for expected, found in zip(torch_result.predictions, onnx_result.predictions, strict=True):
        assert (found.id, found.label, found.in_domain, found.domain_reasons) == (
            expected.id, expected.label, expected.in_domain, expected.domain_reasons)
        assert found.domain_score == pytest.approx(expected.domain_score, rel=1e-3, abs=1e-3)
        for label, value in expected.probabilities.items():
            assert found.probabilities[label] == pytest.approx(value, abs=TOLERANCE)


def test_the_onnxruntime_backend_honours_the_card_and_guard_binding(trained, exported, tmp_path):
    """An edited model_card.json is refused by the onnxruntime backend too, with or without the weights beside the
    export (the export's card is the one the weights vouched for), and so is a domain guard other than the one the
    export was made with."""
    from medxai.evaluate.domain import DomainGuard

    run, _ = trained
    copy = RunFolder(shutil.copytree(run, tmp_path / "copy"))
    exported_card = json.loads(copy.onnx_card_path.read_text())
    assert exported_card["medxai_domain_guard_sha256"] == file_sha256(copy.domain_guard_path)
    card = json.loads(copy.card_path.read_text())
    copy.card_path.write_text(json.dumps({**card, "label_names": card["label_names"][::-1]}))
    with pytest.raises(CheckpointError, match="model_card.json disagrees with checkpoints/best.safetensors on "
                                              "label_names"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    copy.weights_path("best").unlink()  # the export alone: its own card is compared
    with pytest.raises(CheckpointError, match="exported with a model card that differs on label_names"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    copy.card_path.write_text(json.dumps(card))
    Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")
    guard = DomainGuard.load(copy.domain_guard_path)
    guard.z_threshold *= 100
    guard.save(copy.domain_guard_path)
    with pytest.raises(CheckpointError, match="is not the domain guard saved with .*model.onnx.json"):
        Classifier.from_run(copy.path, device="cpu", backend="onnxruntime")


def test_export_out_may_not_lie_in_a_run_or_in_its_parity_images(trained, exported, image_files, tmp_path):
    from medxai.jobs.export import export_run

    run, _ = trained
    for out, images in ((run / "exports" / "tiny.onnx", None), (image_files / "tiny.onnx", [image_files])):
        with pytest.raises(ConfigError, match="overlaps"):
            export_run(run, out=out, images=images)
        assert not out.exists()
