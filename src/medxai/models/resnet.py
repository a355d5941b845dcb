"""ResNet-18 and ResNet-50 (He et al., CVPR 2016), torchvision's implementation.

Changes to torchvision's network, none of which renames a backbone tensor:

* ``in_chans`` != 3: ``conv1`` takes ``in_chans`` channels (pretrained RGB kernels are adapted on loading).
* Inputs of at most 64 px: ``conv1`` is 3x3 with stride 1 and ``maxpool`` is an ``Identity``, as in the MedMNIST
  ResNet baselines (Yang et al., Scientific Data 2023), so a 28 px image keeps a 4x4 map at ``layer4``.
* The classifier is ``fc = Sequential(Dropout(p), Linear)``, so the final linear layer is ``fc.1``.

Grad-CAM reads ``layer4``, the output of the last residual stage (post-ReLU), the usual choice since Selvaraju et al.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet as tv_resnet

from medxai.models._factory import SMALL_INPUT_MAX, dropout_classifier, new_conv
from medxai.models._registry import register_model

__all__ = ["resnet18", "resnet50"]


def _build(
    tv_builder: Callable[..., tv_resnet.ResNet],
    num_classes: int,
    in_chans: int,
    input_size: int,
    dropout: float | None,
    zero_init_residual: bool,
) -> tv_resnet.ResNet:
    model = tv_builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if input_size <= SMALL_INPUT_MAX:
        model.conv1 = new_conv(model.conv1, in_chans, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = new_conv(model.conv1, in_chans)
    model.fc = dropout_classifier(model.fc, 0.0 if dropout is None else dropout)
    return model


_COMMON = {
    "cam_layer": "layer4", "classifier": "fc.1", "default_input_size": 224,
    "stages": ("layer1", "layer2", "layer3", "layer4"),
}


@register_model(
    "resnet18",
    pretrained_source="torchvision:ResNet18_Weights.IMAGENET1K_V1",
    description="ResNet-18 (He et al. 2016), torchvision; small-image stem at <= 64 px",
    **_COMMON,
)
def resnet18(
    num_classes: int, in_chans: int, input_size: int, dropout: float | None, *, zero_init_residual: bool = False
) -> tv_resnet.ResNet:
    """ResNet-18; ``zero_init_residual`` zeroes each block's last BN scale (Goyal et al. 2017)."""
    return _build(tv_resnet.resnet18, num_classes, in_chans, input_size, dropout, zero_init_residual)


@register_model(
    "resnet50",
    pretrained_source="torchvision:ResNet50_Weights.IMAGENET1K_V2",
    description="ResNet-50 (He et al. 2016), torchvision; small-image stem at <= 64 px",
    **_COMMON,
)
def resnet50(
    num_classes: int, in_chans: int, input_size: int, dropout: float | None, *, zero_init_residual: bool = False
) -> tv_resnet.ResNet:
    """ResNet-50; ``zero_init_residual`` zeroes each block's last BN scale (Goyal et al. 2017)."""
    return _build(tv_resnet.resnet50, num_classes, in_chans, input_size, dropout, zero_init_residual)
