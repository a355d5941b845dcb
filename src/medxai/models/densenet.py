"""DenseNet-121 (Huang et al., CVPR 2017), torchvision's implementation; the backbone of CheXNet (Rajpurkar et al.,
arXiv:1711.05225, 2017), which also showed its class activation maps on chest X-rays.

Changes to torchvision's network, none of which renames a backbone tensor:

* The final ReLU is a module, ``features.relu5``, instead of torchvision's ``F.relu(features, inplace=True)`` in
  ``forward``. Grad-CAM is given ``features.relu5``, i.e. the rectified output of ``norm5``: the feature map the
  classifier actually pools, as the Grad-CAM paper intends. (pytorch-grad-cam's usual choice,
  ``model.features[-1]``, is this same module here; on the unmodified torchvision network it is ``norm5``, whose
  output the in-place ReLU overwrites after a forward hook has seen it, and which breaks full backward hooks.)
* ``in_chans`` != 3: ``features.conv0`` takes ``in_chans`` channels.
* Inputs of at most 64 px: ``features.conv0`` is 3x3 with stride 1 and ``features.pool0`` an ``Identity``.
* The classifier is ``classifier = Sequential(Dropout(p), Linear)``; the final linear layer is ``classifier.1``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import densenet as tv_densenet

from medxai.models._factory import SMALL_INPUT_MAX, dropout_classifier, new_conv
from medxai.models._registry import register_model

__all__ = ["DenseNet", "densenet121"]


class DenseNet(tv_densenet.DenseNet):
    """torchvision's DenseNet with its final ReLU as the module ``features.relu5`` (not applied in place)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.features.add_module("relu5", nn.ReLU(inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)``."""
        features = self.features(x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(pooled)


@register_model(
    "densenet121",
    cam_layer="features.relu5",
    classifier="classifier.1",
    stages=("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.relu5"),
    default_input_size=224,
    pretrained_source="torchvision:DenseNet121_Weights.IMAGENET1K_V1",
    description="DenseNet-121 (Huang et al. 2017), CheXNet's backbone, torchvision; small-image stem at <= 64 px",
)
def densenet121(
    num_classes: int,
    in_chans: int,
    input_size: int,
    dropout: float | None,
    *,
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> DenseNet:
    """DenseNet-121; ``drop_rate`` is dropout inside dense layers, ``memory_efficient`` trades compute for memory."""
    model = DenseNet(
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        num_classes=num_classes,
        drop_rate=drop_rate,
        memory_efficient=memory_efficient,
    )
    if input_size <= SMALL_INPUT_MAX:
        model.features.conv0 = new_conv(model.features.conv0, in_chans, kernel_size=3, stride=1, padding=1)
        model.features.pool0 = nn.Identity()
    elif in_chans != 3:
        model.features.conv0 = new_conv(model.features.conv0, in_chans)
    model.classifier = dropout_classifier(model.classifier, 0.0 if dropout is None else dropout)
    return model
