"""The model registry: one contract test over every registered model, pretrained loading, and simple_cnn sizing."""

from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from medxai.errors import ModelError
from medxai.models import ModelSpec, create_model, list_models, model_spec, register_model
from medxai.models import _registry
from medxai.models._factory import SMALL_INPUT_MAX
from medxai.models._pretrained import adapt_stem_kernel

NUM_CLASSES = 3


def _contract_cases() -> list[tuple[str, int, int]]:
    """(model, in_chans, input size): 28 px (the small-image stem) for all; the ImageNet stem at 72 px as well."""
    cases = []
    for name in list_models():
        sizes = [28] + ([72] if model_spec(name).default_input_size > SMALL_INPUT_MAX else [])
        cases += [(name, in_chans, size) for in_chans in (1, 3) for size in sizes]
    return cases


@pytest.mark.parametrize(("name", "in_chans", "size"), _contract_cases())
def test_model_contract(name: str, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, in_chans, input_size=size).train()
    assert model.architecture == name
    assert model.cam_layer == model_spec(name).resolve_cam_layer(size)
    classifier = model.get_submodule(model.classifier_name)
    assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES

    # Grad-CAM needs the CAM layer's output and its gradient; full backward hooks also catch in-place ops after it.
    captured: dict[str, torch.Tensor] = {}

    def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["activation"], captured["snapshot"] = output, output.detach().clone()

    def backward_hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        captured["gradient"] = grad_output[0]

    cam_module = model.get_submodule(model.cam_layer)
    handles = [cam_module.register_forward_hook(forward_hook), cam_module.register_full_backward_hook(backward_hook)]
    try:
        logits = model(torch.randn(2, in_chans, size, size))
        assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
        nn.functional.cross_entropy(logits, torch.tensor([0, NUM_CLASSES - 1])).backward()
    finally:
        for handle in handles:
            handle.remove()

    activation = captured["activation"]
    assert activation.ndim == 4 and activation.shape[0] == 2
    assert min(activation.shape[2:]) >= 2, "the small-image stem must keep a spatial map for Grad-CAM"
    assert torch.equal(activation, captured["snapshot"]), "the CAM activation was modified in place after the layer"
    assert captured["gradient"].shape == activation.shape and torch.isfinite(captured["gradient"]).all()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"no gradient for {parameter_name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient for {parameter_name}"
    assert any(parameter.grad.abs().sum() > 0 for parameter in model.parameters())


@pytest.mark.parametrize(("size", "blocks", "feature_size"), [(28, 3, 7), (64, 4, 8), (224, 5, 14)])
def test_simple_cnn_sizes(size: int, blocks: int, feature_size: int) -> None:
    model = create_model("simple_cnn", 2, 1, input_size=size).eval()
    assert model.cam_layer == f"features.block{blocks}"
    with torch.no_grad():
        features = model.features(torch.randn(1, 1, size, size))
        logits = model(torch.randn(2, 1, size, size))
    assert features.shape[2:] == (feature_size, feature_size)
    assert logits.shape == (2, 2)


def test_dropout_argument_is_honoured_and_keys_do_not_depend_on_it() -> None:
    assert create_model("simple_cnn", 2).head.dropout.p == 0.25
    assert create_model("simple_cnn", 2, dropout=0.5).head.dropout.p == 0.5
    plain = create_model("resnet18", 2, input_size=28)
    with_dropout = create_model("resnet18", 2, input_size=28, dropout=0.3)
    assert with_dropout.fc[0].p == 0.3
    assert plain.state_dict().keys() == with_dropout.state_dict().keys()


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="resnet18") as error:
        create_model("resnet_18", 2)
    assert all(name in str(error.value) for name in list_models())


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ModelError, match="drop_path_rate"):
        create_model("resnet18", 2, drop_path_rate=0.1)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("simple_cnn", 0)


def test_register_model_records_spec_and_checks_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))

    @register_model("toy", cam_layer="conv", classifier="fc", default_input_size=8)
    def toy(num_classes: int, in_chans: int, input_size: int, dropout: float | None) -> nn.Module:
        """A toy net."""
        return nn.Sequential()  # names neither 'conv' nor 'fc'

    spec = model_spec("toy")
    assert isinstance(spec, ModelSpec) and spec.description == "A toy net." and "toy" in list_models()
    with pytest.raises(ModelError, match="toy"):
        create_model("toy", 2)
    with pytest.raises(ModelError, match="already registered"):
        register_model("toy", cam_layer="conv", classifier="fc", default_input_size=8)(toy)


# Pretrained loading ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like_state() -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision ResNet-18 state dict: the layout of the real ImageNet file."""
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path, imagenet_like_state, suffix: str, caplog) -> None:
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(imagenet_like_state, str(path))
    else:
        torch.save(imagenet_like_state, path)
    with caplog.at_level(logging.INFO, logger="medxai.models"):
        model = create_model("resnet18", 2, 1, pretrained=True, weights=path)
    state = model.state_dict()
    assert torch.equal(state["layer1.0.conv1.weight"], imagenet_like_state["layer1.0.conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], imagenet_like_state["layer4.1.bn2.running_var"])
    torch.testing.assert_close(state["conv1.weight"], imagenet_like_state["conv1.weight"].sum(dim=1, keepdim=True))
    assert model.get_submodule(model.classifier_name).weight.shape == (2, 512)
    assert "loaded" in caplog.text and str(path) in caplog.text


def test_pretrained_small_stem_resamples_kernel(tmp_path, imagenet_like_state, caplog) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(imagenet_like_state, str(path))
    with caplog.at_level(logging.WARNING, logger="medxai.models"):
        model = create_model("resnet18", 2, 3, pretrained=True, weights=path, input_size=28)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert "conv1.weight" in caplog.text
    # The resampled kernel keeps each filter's response to a flat image (its sum).
    torch.testing.assert_close(
        model.conv1.weight.sum(dim=(2, 3)), imagenet_like_state["conv1.weight"].sum(dim=(2, 3)), rtol=1e-5, atol=1e-6
    )


def test_adapt_stem_kernel_channels() -> None:
    weight = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_stem_kernel(weight, (8, 1, 3, 3)), weight.sum(1, keepdim=True))
    five = adapt_stem_kernel(weight, (8, 5, 3, 3))
    torch.testing.assert_close(five[:, 3:], weight[:, :2] * 3 / 5)


def test_pretrained_from_torch_hub_cache(tmp_path, monkeypatch, imagenet_like_state) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MEDXAI_OFFLINE", "1")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet_like_state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("resnet18", 2, pretrained=True)
    assert torch.equal(model.conv1.weight, imagenet_like_state["conv1.weight"])


def test_pretrained_offline_without_weights_fails_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MEDXAI_OFFLINE", "1")
    with pytest.raises(ModelError, match="--weights") as error:
        create_model("resnet18", 2, 1, pretrained=True)
    assert "resnet18-f37072fd.pth" in str(error.value) and str(tmp_path) in str(error.value)


def test_pretrained_download_failure_fails_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MEDXAI_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ModelError, match="no route to host") as error:
        create_model("densenet121", 2, pretrained=True)
    assert "densenet121-a639ec97.pth" in str(error.value) and "--weights" in str(error.value)


def test_simple_cnn_pretrained_needs_weights(tmp_path) -> None:
    with pytest.raises(ModelError, match="--weights"):
        create_model("simple_cnn", 2, pretrained=True)
    source = create_model("simple_cnn", 5, 1)
    path = tmp_path / "simple.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("simple_cnn", 2, 1, weights=path)
    assert torch.equal(model.features.block1.conv1.weight, source.features.block1.conv1.weight)
    assert torch.equal(model.head.hidden.weight, source.head.hidden.weight)
    assert model.head.fc.out_features == 2


def test_pretrained_refuses_mismatched_or_unsafe_files(tmp_path) -> None:
    other = tmp_path / "simple.safetensors"
    save_file(create_model("simple_cnn", 2).state_dict(), str(other))
    with pytest.raises(ModelError, match="do not match resnet18"):
        create_model("resnet18", 2, weights=other)
    pickled = tmp_path / "object.pth"
    torch.save({"weights": _NotATensor()}, pickled)
    with pytest.raises(ModelError, match="cannot read weights"):
        create_model("resnet18", 2, weights=pickled)
    with pytest.raises(ModelError, match="not found"):
        create_model("resnet18", 2, weights=tmp_path / "missing.safetensors")


class _NotATensor:
    """An arbitrary pickled object, which weights_only loading must refuse."""
