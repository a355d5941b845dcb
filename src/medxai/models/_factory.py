"""``create_model``: build a registered architecture, then optionally load pretrained weights.

Modelled on timm's ``_factory.py``. Also holds the two small layer helpers the family modules share (stem convolution
replacement, dropout-wrapped classifier), so every family builds them the same way.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from torch import nn

from medxai.errors import ModelError
from medxai.models._pretrained import load_pretrained
from medxai.models._registry import ModelSpec, model_spec

__all__ = ["create_model", "new_conv", "dropout_classifier", "SMALL_INPUT_MAX"]

logger = logging.getLogger(__name__)

# The arguments create_model always passes to a builder; anything else must be a parameter the builder declares.
_BUILDER_ARGUMENTS = ("num_classes", "in_chans", "input_size", "dropout")

# Inputs of at most this many pixels a side get the torchvision families' small-image stem (stride-1 first
# convolution, no stem pooling), as in MedMNIST's 28 px baselines (Yang et al., Scientific Data 2023): with the
# ImageNet stem (32x downsampling overall) a 28 px image ends as a 1x1 map, useless for Grad-CAM.
SMALL_INPUT_MAX = 64


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
    dropout: float | None = None,
    drop_path_rate: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model that returns raw logits of shape ``(batch, num_classes)``.

    The softmax of the papers' "softmax output" layer is deliberately not part of the module: ``CrossEntropyLoss``
    expects logits, Grad-CAM (Selvaraju et al., ICCV 2017) differentiates the pre-softmax class score, and
    probabilities are computed outside (by the classifier wrapper, after temperature scaling).

    Every returned model carries plain attributes ``architecture`` (the registry name), ``cam_layer`` (a module name
    for ``model.get_submodule`` whose output is the last convolutional feature map), ``classifier_name`` (the final
    ``nn.Linear``), ``num_classes``, ``in_chans`` and ``input_size``. The architecture (so every state-dict name and
    shape) depends only on ``name``, ``num_classes``, ``in_chans``, ``input_size`` and family-specific ``kwargs``; not
    on ``pretrained``, ``weights``, ``dropout`` or ``drop_path_rate``.

    Args:
        name: a name from :func:`~medxai.models.list_models`.
        num_classes: number of output logits (1 for a single-logit binary head).
        in_chans: input channels (1 for grey images); the stem convolution is built for it, and pretrained RGB
            kernels are adapted to it (see :mod:`medxai.models._pretrained`).
        pretrained: start from ImageNet weights (or from ``weights``). Never falls back to random weights: when the
            weights cannot be found a :class:`~medxai.errors.ModelError` is raised.
        weights: a local ``.safetensors`` or torchvision ``.pth`` state dict to start from; implies ``pretrained``.
            Every tensor except the classifier's must match (the stem convolution is adapted when its input channels
            or kernel size differ); the classifier is freshly initialised for ``num_classes``.
        input_size: side length (pixels) of the inputs the model is built for; selects the stem of the torchvision
            families (small-image stem at 64 px or less) and the depth of ``simple_cnn``. Inputs of other sizes
            still run (global average pooling). Defaults to the family's ``default_input_size``.
        dropout: dropout probability before the final linear layer; ``None`` uses the family's default.
        drop_path_rate: stochastic depth rate (Huang et al., ECCV 2016), for families that support it.
        **kwargs: family-specific options (e.g. ``memory_efficient`` for DenseNet).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ModelError: unknown name or option, invalid argument, or pretrained weights that cannot be found or do not
            match.
    """
    spec = model_spec(name)
    _check_arguments(spec, num_classes, in_chans, input_size, dropout, drop_path_rate)
    size = spec.default_input_size if input_size is None else int(input_size)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    _check_options(spec, kwargs)

    model = spec.builder(num_classes=num_classes, in_chans=in_chans, input_size=size, dropout=dropout, **kwargs)
    model.architecture = spec.name
    model.cam_layer = spec.resolve_cam_layer(size)
    model.stage_layers = spec.resolve_stages(size)
    model.classifier_name = spec.classifier
    model.num_classes = num_classes
    model.in_chans = in_chans
    model.input_size = size
    _check_declared_layers(model, spec)

    if pretrained or weights is not None:
        load_pretrained(model, spec, weights)
    logger.debug("built %s (num_classes=%d, in_chans=%d, input_size=%d)", spec.name, num_classes, in_chans, size)
    return model


def new_conv(
    like: nn.Conv2d,
    in_channels: int,
    *,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
) -> nn.Conv2d:
    """A freshly initialised ``Conv2d`` like ``like`` but with other input channels, kernel size, stride or padding.

    Used to rebuild a stem for ``in_chans`` channels or for small images. Initialised as torchvision initialises
    these networks (He et al., ICCV 2015, ``fan_out`` mode).
    """
    conv = nn.Conv2d(
        in_channels,
        like.out_channels,
        kernel_size=like.kernel_size if kernel_size is None else kernel_size,
        stride=like.stride if stride is None else stride,
        padding=like.padding if padding is None else padding,
        bias=like.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def dropout_classifier(linear: nn.Linear, dropout: float) -> nn.Sequential:
    """``Sequential(Dropout(dropout), linear)``, so the classifier is named ``<head>.1``.

    The head is wrapped even when ``dropout`` is 0 so that state-dict names never depend on a training
    hyper-parameter (a checkpoint trained with dropout loads into a model built without it).
    """
    return nn.Sequential(nn.Dropout(dropout), linear)


def _check_arguments(
    spec: ModelSpec,
    num_classes: int,
    in_chans: int,
    input_size: int | None,
    dropout: float | None,
    drop_path_rate: float | None,
) -> None:
    for label, value in (("num_classes", num_classes), ("in_chans", in_chans), ("input_size", input_size)):
        if value is None and label == "input_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{spec.name}: {label} must be a positive integer, got {value!r}")
    for label, value in (("dropout", dropout), ("drop_path_rate", drop_path_rate)):
        if value is not None and not 0.0 <= float(value) < 1.0:
            raise ModelError(f"{spec.name}: {label} must be in [0, 1), got {value!r}")


def _check_options(spec: ModelSpec, options: dict[str, Any]) -> None:
    """Reject options the builder does not declare, with a message listing the ones it does."""
    parameters = inspect.signature(spec.builder).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    accepted = [option for option in parameters if option not in _BUILDER_ARGUMENTS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelError(
            f"{spec.name} does not accept option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) if accepted else 'no extra options'}"
        )


def _check_declared_layers(model: nn.Module, spec: ModelSpec) -> None:
    """A registration must name layers that exist: catch a wrong ``cam_layer``/``classifier`` at build time."""
    try:
        model.get_submodule(model.cam_layer)
        classifier = model.get_submodule(model.classifier_name)
    except AttributeError as error:
        raise ModelError(f"{spec.name}: registered layer not found in the built model ({error})") from None
    if not isinstance(classifier, nn.Linear) or classifier.out_features != model.num_classes:
        raise ModelError(
            f"{spec.name}: registered classifier {spec.classifier!r} is {classifier!r}, "
            f"not an nn.Linear with {model.num_classes} outputs"
        )
