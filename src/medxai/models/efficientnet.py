"""EfficientNet-B0 (Tan & Le, ICML 2019), torchvision's implementation.

Changes to torchvision's network, none of which renames a backbone tensor:

* ``in_chans`` != 3: the stem convolution ``features.0.0`` takes ``in_chans`` channels.
* Inputs of at most 64 px: the stem convolution has stride 1 (16x downsampling overall instead of 32x), so a 28 px
  image keeps a 2x2 map. Its kernel stays 3x3, so ImageNet weights load unchanged.
* The classifier is ``Sequential(Dropout(p), Linear)`` as in torchvision, with a dropout that is not in place; the
  final linear layer is ``classifier.1``. ``dropout`` defaults to the paper's 0.2 for B0, ``drop_path_rate``
  (stochastic depth, Huang et al., ECCV 2016) to torchvision's 0.2.

Grad-CAM reads ``features.8``, the last block (1x1 convolution to 1280 channels, BN, SiLU), whose output is pooled
into the classifier.
"""

from __future__ import annotations

from torchvision.models import efficientnet as tv_efficientnet

from medxai.models._factory import SMALL_INPUT_MAX, dropout_classifier, new_conv
from medxai.models._registry import register_model

__all__ = ["efficientnet_b0"]

_DEFAULT_DROPOUT = 0.2
_DEFAULT_DROP_PATH_RATE = 0.2


@register_model(
    "efficientnet_b0",
    cam_layer="features.8",
    classifier="classifier.1",
    stages=("features.2", "features.3", "features.5", "features.8"),
    default_input_size=224,
    pretrained_source="torchvision:EfficientNet_B0_Weights.IMAGENET1K_V1",
    description="EfficientNet-B0 (Tan & Le 2019), torchvision; stride-1 stem at <= 64 px",
)
def efficientnet_b0(
    num_classes: int,
    in_chans: int,
    input_size: int,
    dropout: float | None,
    *,
    drop_path_rate: float | None = None,
) -> tv_efficientnet.EfficientNet:
    """EfficientNet-B0; dropout 0.2 and stochastic depth 0.2 by default."""
    dropout = _DEFAULT_DROPOUT if dropout is None else dropout
    model = tv_efficientnet.efficientnet_b0(
        weights=None,
        num_classes=num_classes,
        dropout=dropout,
        stochastic_depth_prob=_DEFAULT_DROP_PATH_RATE if drop_path_rate is None else drop_path_rate,
    )
    stem = model.features[0][0]
    if input_size <= SMALL_INPUT_MAX:
        model.features[0][0] = new_conv(stem, in_chans, stride=1)
    elif in_chans != 3:
        model.features[0][0] = new_conv(stem, in_chans)
    model.classifier = dropout_classifier(model.classifier[1], dropout)
    return model
